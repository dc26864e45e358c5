"""How a run ends: the printed summary, summary.txt, curves.png, and throughput that leaves validation out."""

import json
from pathlib import Path

import pytest

from moe_gpt.training.summary import summary_text
from tests.helpers import TINY, csv_column, run_train_cli, train_in_process


def test_a_run_ends_with_a_summary_whose_continue_command_works_even_without_a_logger(tmp_path, corpus_overrides):
    run_dir = tmp_path / "run"
    result = run_train_cli(TINY + corpus_overrides + ["logger=none", f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    printed = result.stdout[result.stdout.index("run finished:") :].strip()
    assert printed == (run_dir / "summary.txt").read_text().strip()
    assert f"run finished: {run_dir}" in printed
    assert f"val loss {metrics['val_loss']:.3f}" in printed and f"best {metrics['best_val_loss']:.3f}" in printed
    assert "MFU n/a" in printed  # no peak FLOPs for a CPU
    assert "no metrics logger (logger=none)" in printed
    assert (run_dir / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "metrics: {" not in result.stderr  # the long JSON line is gone: metrics.json has it
    bar = [line for line in result.stdout.splitlines() if line.startswith("train ") and "loss:" in line]
    assert bar and all(len(line) <= 80 and "tok/s:" in line and " eta " in line for line in bar)
    assert "v_num" not in result.stdout
    assert result.stderr.count("token cache") == 1  # set up twice (fit, final validation), said once

    continue_command = next(line for line in printed.splitlines() if "continue:" in line).split("python train.py ")[1]
    resumed = run_train_cli(continue_command.split(), cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((run_dir / "metrics.json").read_text())["steps"] == 2 * metrics["steps"]


def test_tokens_per_second_leaves_validation_out(tmp_path, corpus_overrides):
    # Validation after every step, 40 batches each: most of the wall time is validation.
    overrides = ["trainer.val_check_interval=1", "trainer.limit_val_batches=40", "logger=none"]
    metrics = train_in_process(TINY + corpus_overrides + overrides, tmp_path)
    assert metrics["tokens_per_sec"] == pytest.approx(metrics["train_tokens"] / metrics["train_seconds"])
    assert metrics["train_seconds"] < 0.5 * metrics["wall_time_s"]
    assert metrics["tokens_per_sec"] > 2 * metrics["train_tokens"] / metrics["wall_time_s"]
    # The x axis of loss-against-time curves leaves validation out too.
    assert metrics["val_history"][-1]["seconds"] <= 1.25 * metrics["train_seconds"]
    assert metrics["mfu"] is None


def test_lightnings_throughput_monitor_logs_tokens_per_second(tmp_path, corpus_overrides):
    train_in_process(TINY + corpus_overrides + ["logger=csv", "trainer.max_steps=12"], tmp_path)
    logged = csv_column(tmp_path, "train/device/items_per_sec")  # items: tokens, over a 10-batch window
    assert logged and all(value > 0 for _, value in logged)


def test_summary_names_every_logger_and_formats_missing_values():
    metrics = {
        "steps": 10,
        "train_tokens": 1234567,
        "wall_time_s": 125.4,
        "val_loss": 3.5,
        "val_ppl": 33.1,
        "best_val_loss": None,
        "tokens_per_sec": 2216.4,
        "mfu": 0.4123,
    }
    text = summary_text(metrics, Path("/runs/a"), "wandb")
    assert "1,234,567 training tokens, 2 min 5 s" in text
    assert "best n/a" in text and "2,216 tokens/s" in text and "MFU 41.2%" in text
    assert "wandb sync /runs/a/wandb/offline-run-*" in text
    assert "/runs/a/csv/metrics.csv" in summary_text(metrics, Path("/runs/a"), "csv")
    assert all(len(line) <= 120 for line in text.splitlines())


@pytest.mark.parametrize("max_steps,extra_pass", [(6, False), (7, True)])
def test_the_final_val_loss_reuses_a_validation_at_the_last_step(tmp_path, corpus_overrides, max_steps, extra_pass):
    """TINY validates every 3 steps: at step 6 the fit's own validation is the final one; at 7 one more pass runs."""
    metrics = train_in_process(TINY + corpus_overrides + ["logger=csv", f"trainer.max_steps={max_steps}"], tmp_path)
    logged = csv_column(tmp_path, "val/loss")
    assert len(logged) == len(metrics["val_history"]) + extra_pass
    assert metrics["val_loss"] == pytest.approx(logged[-1][1])
    if not extra_pass:
        assert metrics["val_loss"] == metrics["val_history"][-1]["val_loss"]
    # The fraction of the training split seen; Lightning's whole-epoch counter (1 after any fit) is left out.
    epochs = [value for _, value in csv_column(tmp_path, "train/epochs")]
    assert epochs == sorted(epochs) and 0 < epochs[-1] < 1
    assert not csv_column(tmp_path, "epoch")
    assert epochs[-1] == pytest.approx(metrics["train_tokens"] / metrics["corpus_train_tokens"])
