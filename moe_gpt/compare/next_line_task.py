"""A downstream task made from the corpus's own held-out text: which line of code comes next?

Hub tasks (HellaSwag, ARC, LAMBADA) need the network and measure English; the default corpus is
Python source. This task asks the question a code model should answer, on documents it never
trained on: the validation documents of the training corpus (the same hash split as the token
cache, ``moe_gpt/data/split.py``). Each question is the ``context_lines`` lines of a document before the answer;
the choices are the line that follows and three lines with the same indentation drawn from other
validation documents, so indentation alone does not give the answer away (chance: 25%).

Written as an lm-eval multiple-choice task (``next_line.yaml`` + ``next_line.jsonl``; the YAML
names the JSONL by absolute path, so lm-eval finds it from any folder) for ``scripts/evaluate.py
--tasks moe_gpt_next_line --include-path DIR`` and ``scripts/compare.py --eval-tasks``.
"""

from __future__ import annotations

import json
import random
from collections import defaultdict
from pathlib import Path

from moe_gpt.config import ConfigError, DataConfig
from moe_gpt.data.corpus import load_corpus
from moe_gpt.data.split import goes_to_validation, split_score
from moe_gpt.training.atomic_write import replacing

TASK_NAME = "moe_gpt_next_line"
CHOICES = 4
MIN_LINE_CHARS = 12  # shorter lines ("else:", "return x") fit almost anywhere: no question in them


def validation_documents(data: DataConfig) -> list[str]:
    """The corpus's documents that the token cache puts in validation (none of them is trained on)."""
    documents = load_corpus(data).documents.iter(batch_size=256)
    texts = [text for batch in documents for text in batch["text"] if text and not text.isspace()]  # as tokenized
    val = [text for text in texts if goes_to_validation(split_score(text), data.val_fraction)]
    if not val or len(val) == len(texts):
        # The token cache then moves a document across or cuts a single one by tokens (data/split.py):
        # which text was trained on is no longer a whole document's question.
        raise ConfigError(
            f"{len(val)} of the corpus's {len(texts)} document(s) are validation documents by their hash; the "
            "next-line task needs documents on both sides: use a corpus of several documents or change data.val_fraction"
        )
    return val


def indentation(line: str) -> str:
    return line[: len(line) - len(line.lstrip())]


def answerable(line: str) -> bool:
    return len(line.strip()) >= MIN_LINE_CHARS


def next_line_questions(documents: list[str], count: int, context_lines: int, seed: int) -> list[dict]:
    """``count`` questions: {"question": context ending in a newline, "choices": 4 lines, "answer": index}."""
    lines = [document.splitlines() for document in documents]
    documents_of: dict[str, set[int]] = defaultdict(set)  # an answerable line -> the documents holding it
    slots = []  # (document, line index) of every line that can be asked for
    for doc, doc_lines in enumerate(lines):
        for index, line in enumerate(doc_lines):
            if answerable(line):
                documents_of[line].add(doc)
                if index >= context_lines:
                    slots.append((doc, index))
    by_indent: dict[str, list[str]] = defaultdict(list)  # indentation -> its distinct lines, sorted once
    for line in sorted(documents_of):
        by_indent[indentation(line)].append(line)
    rng = random.Random(seed)
    rng.shuffle(slots)
    questions = []
    for doc, index in slots:
        answer = lines[doc][index]
        others = [line for line in by_indent[indentation(answer)] if line != answer and documents_of[line] != {doc}]
        if len(others) < CHOICES - 1:
            continue
        choices = [answer, *rng.sample(others, CHOICES - 1)]
        rng.shuffle(choices)
        context = "\n".join(lines[doc][index - context_lines : index]) + "\n"
        questions.append({"question": context, "choices": choices, "answer": choices.index(answer)})
        if len(questions) == count:
            return questions
    raise ConfigError(
        f"the corpus's validation documents give {len(questions)} next-line questions, fewer than --questions {count}; "
        "ask for fewer or raise data.val_fraction"
    )


def task_yaml(jsonl: Path) -> str:
    return "\n".join(
        [
            "# Written by scripts/make_next_line_task.py: which line comes next, in the corpus's validation documents.",
            f"task: {TASK_NAME}",
            "dataset_path: json",
            "dataset_kwargs:",
            "  data_files:",
            f"    test: {json.dumps(str(jsonl))}",
            "output_type: multiple_choice",
            "test_split: test",
            'doc_to_text: "{{question}}"',
            'doc_to_choice: "{{choices}}"',
            "doc_to_target: answer",
            'target_delimiter: ""  # the question ends with its newline; a choice is the whole next line',
            "metric_list:",
            "  - {metric: acc, aggregation: mean, higher_is_better: true}",
            "  - {metric: acc_norm, aggregation: mean, higher_is_better: true}",
            "metadata:",
            "  version: 1.0",
            "",
        ]
    )


def write_next_line_task(data: DataConfig, out: Path, count: int, context_lines: int, seed: int) -> Path:
    """The task's two files in ``out`` (refused if it holds them already); returns the YAML's path."""
    out = out.resolve()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; pass a folder for the task's two files")
    jsonl, yaml = out / "next_line.jsonl", out / "next_line.yaml"
    if jsonl.exists() or yaml.exists():
        raise ConfigError(f"{out} already holds a next-line task; choose another --out or delete it first")
    questions = next_line_questions(validation_documents(data), count, context_lines, seed)
    out.mkdir(parents=True, exist_ok=True)
    for path, text in ((jsonl, "".join(json.dumps(question) + "\n" for question in questions)), (yaml, task_yaml(jsonl))):
        with replacing(path) as file:
            file.write(text.encode("utf-8"))
    return yaml
