"""scripts/evaluate.py: a checkpoint scored through lm-evaluation-harness, offline.

The task is tests/lm_eval_tasks/tiny_choice (8 questions, two of them longer than the tiny models'
32-token block). Scores are checked against the model's own log-probabilities, against lm-eval's
``hf`` model on the same weights exported with scripts/export_hf.py, and the rolling log-likelihood
against the loss of train.py's validation loop.
"""

import json
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from moe_gpt.compare.lm_eval_model import MoeGptLM
from moe_gpt.config import OptimConfig
from moe_gpt.data.datamodule import TokenWindows
from moe_gpt.data.tokenizer import ENDOFTEXT, ENDOFTEXT_ID
from moe_gpt.data.tokens import TOKEN_DTYPE
from moe_gpt.model.generate import generate
from moe_gpt.training.lit_module import GPTLightningModule
from moe_gpt.weights.safe_load import load_model
from tests.conftest import REPO_ROOT, TOKENIZER_DIR
from tests.helpers import TINY, script_main, train_main

TASKS = REPO_ROOT / "tests" / "lm_eval_tasks"
TASK = "moe_gpt_tiny_choice"
BLOCK_SIZE = 32  # the tiny checkpoints'


@pytest.fixture(autouse=True)
def at_project_root(monkeypatch):
    # lm-eval reads a task's data_files relative to the working directory (tiny_choice.yaml's comment).
    monkeypatch.chdir(REPO_ROOT)


def documents() -> list[dict]:
    return [json.loads(line) for line in (TASKS / "tiny_choice.jsonl").read_text().splitlines()]


def evaluate(checkpoint: Path, out: Path, *extra: str):
    result = script_main(
        "evaluate",
        ["--checkpoint", str(checkpoint), "--tasks", TASK, "--include-path", str(TASKS), "--out", str(out), *extra],
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def choice_logprob(model, gpt2, context: str, choice: str) -> float:
    """log p(choice | context) straight from the model's logits: the last block_size + 1 tokens, one forward pass.

    As lm-eval documents, whitespace that ends the context belongs to the continuation.
    """
    context, choice = context.rstrip(), context[len(context.rstrip()) :] + choice
    context_ids = gpt2.encode_ordinary(context)
    choice_ids = gpt2.encode_ordinary(context + choice)[len(context_ids) :]
    tokens = torch.tensor((context_ids + choice_ids)[-(BLOCK_SIZE + 1) :])
    with torch.no_grad():
        logprobs = model(tokens[None, :-1]).logits[0].log_softmax(-1)
    targets = tokens[1:]
    return sum(logprobs[i, targets[i]].item() for i in range(len(targets) - len(choice_ids), len(targets)))


def test_multiple_choice_accuracy_is_the_models_own_choice_by_log_probability(tiny_moe_checkpoint, tmp_path, gpt2):
    model = load_model(tiny_moe_checkpoint)
    docs = documents()
    assert max(len(gpt2.encode_ordinary(doc["question"])) for doc in docs) > BLOCK_SIZE  # the truncation is exercised

    evaluate(tiny_moe_checkpoint, tmp_path / "out", "--batch-size", "3")

    expected = [[choice_logprob(model, gpt2, doc["question"], choice) for choice in doc["choices"]] for doc in docs]
    samples = [json.loads(line) for line in (tmp_path / "out" / f"samples_{TASK}.jsonl").read_text().splitlines()]
    for sample in sorted(samples, key=lambda s: s["doc_id"]):
        scored = [logprob for logprob, _ in sample["filtered_resps"]]
        assert scored == pytest.approx(expected[sample["doc_id"]], abs=1e-4)
    acc = np.mean([int(np.argmax(lls)) == doc["answer"] for lls, doc in zip(expected, docs)])
    acc_norm = np.mean(
        [int(np.argmax([ll / len(c) for ll, c in zip(lls, doc["choices"])])) == doc["answer"] for lls, doc in zip(expected, docs)]
    )
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["results"][TASK]["acc,none"] == pytest.approx(acc)
    assert results["results"][TASK]["acc_norm,none"] == pytest.approx(acc_norm)
    table = (tmp_path / "out" / "results.md").read_text()
    assert f"| {TASK} | acc | {acc:.4f} |" in table and f"| {TASK} | acc_norm | {acc_norm:.4f} |" in table


@pytest.fixture(scope="module")
def hf_tokenizer():
    """GPT-2's tokenizer as a Hugging Face fast tokenizer, converted from the local tiktoken ranks (offline)."""
    from tiktoken_ext.openai_public import r50k_pat_str
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    converted = TikTokenConverter(
        vocab_file=str(TOKENIZER_DIR / "gpt2.tiktoken"), pattern=r50k_pat_str, extra_special_tokens=[ENDOFTEXT]
    ).converted()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=converted, eos_token=ENDOFTEXT, bos_token=ENDOFTEXT)
    assert tokenizer.convert_tokens_to_ids(ENDOFTEXT) == ENDOFTEXT_ID
    return tokenizer


def test_lm_evals_own_hf_model_scores_the_exported_checkpoint_the_same(tiny_checkpoint, tmp_path, hf_tokenizer):
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    assert script_main("export_hf", ["--checkpoint", str(tiny_checkpoint), "--out", str(tmp_path / "hf")]).returncode == 0
    evaluate(tiny_checkpoint, tmp_path / "ours")
    oracle = HFLM(pretrained=str(tmp_path / "hf"), tokenizer=hf_tokenizer, device="cpu", batch_size=4, dtype="float32")
    theirs = lm_eval.simple_evaluate(
        model=oracle, tasks=[TASK], task_manager=TaskManager(include_path=str(TASKS), include_defaults=False)
    )

    ours = json.loads((tmp_path / "ours" / "results.json").read_text())["results"][TASK]
    for metric in ("acc,none", "acc_norm,none"):
        assert ours[metric] == theirs["results"][TASK][metric]
    our_samples = [json.loads(line) for line in (tmp_path / "ours" / f"samples_{TASK}.jsonl").read_text().splitlines()]
    by_doc = {sample["doc_id"]: sample for sample in our_samples}
    assert len(theirs["samples"][TASK]) == len(documents())
    for sample in theirs["samples"][TASK]:
        mine = by_doc[sample["doc_id"]]
        assert mine["arguments"] == [list(arguments) for arguments in sample["arguments"]]
        assert [ll for ll, _ in mine["filtered_resps"]] == pytest.approx([ll for ll, _ in sample["filtered_resps"]], abs=1e-4)
        assert [greedy for _, greedy in mine["filtered_resps"]] == [greedy for _, greedy in sample["filtered_resps"]]


def rolling_request(text: str):
    from lm_eval.api.instance import Instance

    return Instance("loglikelihood_rolling", doc={}, arguments=(text,), idx=0)


def text_of_tokens(gpt2, count: int) -> tuple[str, list[int]]:
    """A stdlib text cut to ``count`` tokens that encode back to the same tokens."""
    tokens = gpt2.encode_ordinary(Path(json.__file__).read_text())
    while gpt2.encode_ordinary(gpt2.decode(tokens[:count])) != tokens[:count]:
        tokens = tokens[1:]
    return gpt2.decode(tokens[:count]), tokens[:count]


def test_rolling_loglikelihood_is_the_summed_loss_of_the_validation_loop(tiny_checkpoint, tmp_path, gpt2):
    model = load_model(tiny_checkpoint)
    text, tokens = text_of_tokens(gpt2, 3 * BLOCK_SIZE)
    # The validation loop's windows over <|endoftext|> + the text: 3 windows, every text token a target once.
    path = tmp_path / "val.bin"
    np.array([ENDOFTEXT_ID, *tokens], dtype=TOKEN_DTYPE).tofile(path)
    module = GPTLightningModule(model.config, OptimConfig(), max_steps=1)
    module.model.load_state_dict(model.state_dict())
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    val_loss = trainer.validate(module, DataLoader(TokenWindows(path, BLOCK_SIZE), batch_size=2), verbose=False)[0]["val/loss"]

    (rolling,) = MoeGptLM(model, gpt2, batch_size=2).loglikelihood_rolling([rolling_request(text)])

    assert rolling == pytest.approx(-val_loss * len(tokens), rel=1e-5)


def loglikelihood_request(context: str, continuation: str):
    from lm_eval.api.instance import Instance

    return Instance("loglikelihood", doc={}, arguments=(context, continuation), idx=0)


def test_a_continuation_longer_than_the_block_is_scored_in_the_rolling_windows(tiny_checkpoint, gpt2):
    lm = MoeGptLM(load_model(tiny_checkpoint), gpt2, batch_size=3)
    text, _ = text_of_tokens(gpt2, 2 * BLOCK_SIZE + 7)  # a last window that is not full
    (rolling,) = lm.loglikelihood_rolling([rolling_request(text)])
    ((logprob, _),) = lm.loglikelihood([loglikelihood_request(ENDOFTEXT, text)])
    assert logprob == pytest.approx(rolling, rel=1e-6)


def test_generation_is_greedy_decoding_with_the_kv_cache_cut_at_the_stop_string(tiny_checkpoint, gpt2):
    from lm_eval.api.instance import Instance

    model = load_model(tiny_checkpoint)
    prompt = "def wrap(text, width=70, **kwargs):\n    w = TextWrapper(width=width, **kwargs)\n"
    prompt_ids = gpt2.encode_ordinary(prompt)
    assert len(prompt_ids) + 30 > BLOCK_SIZE  # generation slides past the block
    # The reference decodes without the cache; the stop string is a token it produces 20 tokens in.
    reference = generate(model, torch.tensor([prompt_ids]), 30, temperature=0, use_cache=False)[0].tolist()
    continuation = gpt2.decode(reference[len(prompt_ids) :])
    stop = gpt2.decode(reference[len(prompt_ids) + 20 : len(prompt_ids) + 21])
    expected = continuation.split(stop)[0]
    assert len(expected) < len(continuation) and ENDOFTEXT not in expected

    request = Instance(
        "generate_until", doc={}, arguments=(prompt, {"until": [stop], "max_gen_toks": 30, "do_sample": False}), idx=0
    )
    assert MoeGptLM(model, gpt2).generate_until([request]) == [expected]


def test_a_task_that_asks_for_sampled_generation_is_refused(tiny_checkpoint, gpt2):
    from lm_eval.api.instance import Instance

    from moe_gpt.config import ConfigError

    request = Instance(
        "generate_until", doc={}, arguments=("def ", {"until": ["\n"], "do_sample": True, "temperature": 0.7}), idx=0,
        metadata=("sampled_task", 0, 1),
    )
    with pytest.raises(ConfigError, match="task sampled_task asks for sampled generation"):
        MoeGptLM(load_model(tiny_checkpoint), gpt2).generate_until([request])


@pytest.mark.slow  # trains a run logged to W&B, then starts W&B's service again: about 15 s here
def test_scores_go_into_the_run_folder_and_its_wandb_run(tmp_path, corpus_overrides):
    run_dir = tmp_path / "run"
    # 3 steps: TINY validates every 3, so the run has a best.ckpt.
    args = TINY + corpus_overrides + ["model=dense", "logger=wandb", "trainer.max_steps=3", f"hydra.run.dir={run_dir}"]
    assert train_main(args).returncode == 0
    (trained,) = (run_dir / "wandb").glob("offline-run-*")
    wandb_id = trained.name.rsplit("-", 1)[1]

    result = script_main("evaluate", ["--checkpoint", str(run_dir), "--tasks", TASK, "--include-path", str(TASKS)])

    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((run_dir / "lm_eval" / "results.json").read_text())
    assert results["checkpoint"] == str(run_dir / "checkpoints" / "best.ckpt")
    assert f"added to W&B run {wandb_id}" in result.stdout
    import wandb

    wandb.teardown()  # what the command's exit does: W&B's service writes out what it still holds
    (evaluated,) = [run for run in (run_dir / "wandb").glob(f"offline-run-*-{wandb_id}") if run != trained]
    (log,) = evaluated.glob("*.wandb")
    assert f"eval/{TASK}/acc".encode() in log.read_bytes()


def write_task(folder: Path, name: str, dataset_path: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    yaml = (TASKS / "tiny_choice.yaml").read_text().replace(f"task: {TASK}", f"task: {name}")
    yaml = yaml.replace("dataset_path: json", f"dataset_path: {dataset_path}")
    (folder / f"{name}.yaml").write_text(yaml)
    return folder


def test_a_task_whose_data_is_on_the_hub_is_one_line_saying_what_to_do_offline(tiny_checkpoint, tmp_path):
    # The same task, its data named as a hub dataset (as arc_easy's is): offline, it cannot be fetched.
    tasks = write_task(tmp_path / "tasks", "hub_choice", "allenai/ai2_arc")
    args = ["--checkpoint", str(tiny_checkpoint), "--tasks", "hub_choice", "--include-path", str(tasks)]
    result = script_main("evaluate", [*args, "--out", str(tmp_path / "out")])
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: --tasks hub_choice: a task's data is on the Hugging Face hub")
    assert "HF_DATASETS_OFFLINE=1" in line and "--include-path" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "args,message",
    [
        (["--tasks", ","], "error: --tasks is empty"),
        (["--tasks", TASK, "--limit", "0"], "error: --limit 0 must be >= 1"),
        (["--tasks", TASK, "--include-path", "no/such/folder"], "error: --include-path no/such/folder is not a folder"),
    ],
)
def test_bad_arguments_are_one_line_and_exit_code_2(tiny_checkpoint, tmp_path, args, message):
    result = script_main("evaluate", ["--checkpoint", str(tiny_checkpoint), "--out", str(tmp_path / "out"), *args])
    assert result.returncode == 2
    assert result.stderr.strip().startswith(message) and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_a_checkpoint_that_does_not_exist_is_named_in_one_line(tmp_path):
    missing = tmp_path / "no.ckpt"
    result = script_main("evaluate", ["--checkpoint", str(missing), "--tasks", TASK])
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: --checkpoint {missing} does not exist; pass a .ckpt or a run folder"]


def test_a_checkpoint_outside_a_run_folder_needs_out(tiny_checkpoint, tmp_path):
    lone = tmp_path / "lone.ckpt"
    lone.write_bytes(tiny_checkpoint.read_bytes())
    result = script_main("evaluate", ["--checkpoint", str(lone), "--tasks", TASK, "--include-path", str(TASKS)])
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: --checkpoint {lone} is not inside a run folder; pass --out for the results"


@pytest.mark.slow  # indexes every task lm-eval ships (10 to 40 s here)
def test_an_unknown_task_is_one_line(tiny_checkpoint, tmp_path):
    result = script_main("evaluate", ["--checkpoint", str(tiny_checkpoint), "--tasks", "no_such_task", "--out", str(tmp_path)])
    assert result.returncode == 2
    assert "no_such_task" in result.stderr and len(result.stderr.strip().splitlines()) == 1


# ---- scripts/compare.py --eval-tasks


def test_a_verdict_on_a_score_where_higher_is_better_names_the_higher_variant():
    from moe_gpt.compare.verdict import paired_difference, verdict

    difference = paired_difference([0.61, 0.62, 0.64], [0.50, 0.52, 0.51])  # candidate's accuracy is higher
    sentence = verdict("moe-8-2", "dense", difference, metric="arc_easy acc", higher_is_better=True)
    assert sentence.startswith("moe-8-2 beats dense: arc_easy acc higher by 0.1133 (95% CI")
    assert verdict("moe-8-2", "dense", difference).startswith("dense beats moe-8-2: val loss lower by 0.1133")


def test_the_comparison_report_gives_each_variants_scores_over_seeds_with_verdicts():
    from moe_gpt.compare.downstream import report_fields
    from moe_gpt.compare.report import downstream_section

    def row(variant, seed, acc, ppl):
        scores = [
            {"task": "t", "metric": "acc", "value": acc, "stderr": 0.1, "higher_is_better": True},
            {"task": "t", "metric": "perplexity", "value": ppl, "stderr": None, "higher_is_better": False},
        ]
        return {"variant": variant, "seed": seed, "status": "ok", **report_fields(scores)}

    rows = [row("dense", seed, 0.50 + seed / 100, 30.0 + seed) for seed in (1, 2, 3)]
    rows += [row("moe-4-2", seed, 0.60 + seed / 100, 30.0 + seed + (0.5 if seed == 2 else -0.5)) for seed in (1, 2, 3)]
    rows.append({"variant": "moe-4-2", "seed": 4, "status": "failed", "reason": "diverged"})

    section = downstream_section(rows)

    assert "| variant | t acc (mean ± std) | t perplexity (mean ± std) |" in section
    assert "| dense | 0.5200 ± 0.0100 | 32.0000 ± 1.0000 |" in section
    assert "- moe-4-2 beats dense: lm-eval t acc higher by 0.1000 (95% CI" in section
    assert "- no difference shown between moe-4-2 and dense: lm-eval t perplexity -0.1667" in section
    assert downstream_section([{"variant": "dense", "seed": 1, "status": "ok"}]) == ""


def test_bad_eval_arguments_of_a_comparison_are_one_line_before_anything_trains(tmp_path):
    from tests.helpers import run_main
    from moe_gpt.cli.compare import main as compare_main

    result = run_main(compare_main, ["--out", str(tmp_path / "report"), "--eval-tasks", TASK, "--eval-limit", "0"])
    assert result.returncode == 2
    assert result.stderr.strip() == "error: --eval-limit 0 must be >= 1 (leave it out to evaluate every document)"
    assert not (tmp_path / "report").exists()
