"""scripts/make_next_line_task.py: a downstream task from the corpus's held-out documents, scored through lm-eval."""

import json
from pathlib import Path

import numpy as np
import pytest

from moe_gpt.compare.next_line_task import TASK_NAME, indentation, next_line_questions
from moe_gpt.compose import compose_run_config
from moe_gpt.data.corpus import load_corpus
from moe_gpt.data.split import split_score
from moe_gpt.weights.safe_load import load_model
from tests.helpers import error_lines, script_main
from tests.test_evaluate import choice_logprob

DOCUMENTS = [
    "\n".join(f"{'    ' * (i % 2)}line {i} of document {doc}, long enough" for i in range(12)) for doc in range(5)
]


def test_each_question_asks_for_the_line_that_follows_among_lines_of_its_indentation_from_other_documents():
    questions = next_line_questions(DOCUMENTS, count=20, context_lines=3, seed=1)
    assert len(questions) == 20 and len({q["question"] for q in questions}) == 20
    for question in questions:
        answer = question["choices"][question["answer"]]
        context = question["question"].splitlines()
        doc = next(d for d in DOCUMENTS if question["question"] in d + "\n")
        lines = doc.splitlines()
        assert len(context) == 3 and lines[lines.index(context[-1]) + 1] == answer  # the line after the context
        assert len(set(question["choices"])) == 4
        for other in question["choices"]:
            assert indentation(other) == indentation(answer)
            assert other == answer or other not in doc  # distractors come from other documents
    assert next_line_questions(DOCUMENTS, 20, 3, seed=1) == questions
    assert next_line_questions(DOCUMENTS, 20, 3, seed=2) != questions


@pytest.fixture(scope="module")
def task_folder(tmp_path_factory, corpus_overrides) -> tuple[Path, list[str]]:
    out = tmp_path_factory.mktemp("next_line")
    overrides = [*corpus_overrides, "data.val_fraction=0.6"]  # two of the four documents: distractors need another
    result = script_main("make_next_line_task", ["--out", str(out), "--questions", "6", "--context-lines", "4", *overrides])
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"6 questions of task {TASK_NAME}" in result.stdout
    return out, overrides


def test_questions_come_from_validation_documents_only(task_folder):
    out, overrides = task_folder
    data = compose_run_config(overrides).data
    texts = [text for batch in load_corpus(data).documents.iter(batch_size=16) for text in batch["text"]]
    val = [text for text in texts if split_score(text) < data.val_fraction]
    assert 0 < len(val) < len(texts)
    for line in (out / "next_line.jsonl").read_text().splitlines():
        question = json.loads(line)
        holders = [text for text in texts if question["question"] in text]
        assert holders and all(text in val for text in holders)


def test_lm_eval_scores_the_written_task_from_any_folder_as_the_models_own_log_probabilities(
    task_folder, tiny_checkpoint, tmp_path, monkeypatch, gpt2
):
    out, _ = task_folder
    monkeypatch.chdir(tmp_path)  # the YAML names its JSONL by absolute path
    args = ["--checkpoint", str(tiny_checkpoint), "--tasks", TASK_NAME, "--include-path", str(out), "--out", "eval"]
    result = script_main("evaluate", args)
    assert result.returncode == 0, result.stderr[-3000:]
    model = load_model(tiny_checkpoint)
    docs = [json.loads(line) for line in (out / "next_line.jsonl").read_text().splitlines()]
    scores = [[choice_logprob(model, gpt2, doc["question"], choice) for choice in doc["choices"]] for doc in docs]
    acc = np.mean([int(np.argmax(lls)) == doc["answer"] for lls, doc in zip(scores, docs)])
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert results["results"][TASK_NAME]["acc,none"] == pytest.approx(acc)


def test_a_folder_that_holds_a_task_and_a_request_for_more_questions_than_the_corpus_gives_are_one_line(
    task_folder, tmp_path
):
    out, overrides = task_folder
    before = (out / "next_line.jsonl").read_bytes()
    result = script_main("make_next_line_task", ["--out", str(out), *overrides])
    assert result.returncode == 2 and "already holds a next-line task" in error_lines(result.stderr)[0]
    assert (out / "next_line.jsonl").read_bytes() == before
    result = script_main("make_next_line_task", ["--out", str(tmp_path / "new"), "--questions", "100000", *overrides])
    assert result.returncode == 2 and "fewer than --questions 100000" in error_lines(result.stderr)[0]
    assert not (tmp_path / "new").exists()
    (tmp_path / "book.txt").write_text("\n".join(f"line {i} of the only document" for i in range(200)))
    one_document = [*overrides, f"data.paths=[{tmp_path / 'book.txt'}]"]  # the token cache cuts it by tokens
    result = script_main("make_next_line_task", ["--out", str(tmp_path / "new"), *one_document])
    assert result.returncode == 2 and "of the corpus's 1 document(s) are validation" in error_lines(result.stderr)[0]
    assert not (tmp_path / "new").exists()
    (tmp_path / "a_file").write_text("kept")
    result = script_main("make_next_line_task", ["--out", str(tmp_path / "a_file"), *overrides])
    assert result.returncode == 2 and "is a file; pass a folder" in error_lines(result.stderr)[0]
    assert (tmp_path / "a_file").read_text() == "kept"
