"""How a run ends: the printed summary, summary.txt, curves.png, and throughput that leaves validation out."""

import json
import math
import shlex
import time
from pathlib import Path

import pytest
from lightning.pytorch.callbacks import Callback

from moe_gpt.data import tokens
from moe_gpt.training import run
from moe_gpt.training.clock import TrainingClock
from moe_gpt.training.run import run_callbacks
from moe_gpt.training.summary import COMPARISON_ENV, summary_text
from tests.helpers import TINY, assert_drawn_plot, csv_column, script_main, train_in_process, train_main


def test_a_run_ends_with_a_summary_whose_continue_command_works_even_without_a_logger(tmp_path, corpus_overrides, monkeypatch):
    run_dir = tmp_path / "run"
    monkeypatch.setattr(tokens, "_ANNOUNCED", set())  # as in a fresh process: no token cache reported yet
    result = train_main(TINY + corpus_overrides + ["logger=none", f"hydra.run.dir={run_dir}"])
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    printed = result.stdout[result.stdout.index("run finished:") :].strip()
    assert printed == (run_dir / "summary.txt").read_text().strip()
    assert f"run finished: {run_dir}" in printed
    assert f"val loss {metrics['val_loss']:.3f}" in printed and f"best {metrics['best_val_loss']:.3f}" in printed
    assert "MFU n/a" in printed  # no peak FLOPs for a CPU
    assert "no metrics logger (logger=none)" in printed
    assert_drawn_plot(run_dir / "curves.png")
    assert "metrics: {" not in result.stderr  # the long JSON line is gone: metrics.json has it
    bar = [line for line in result.stdout.splitlines() if line.startswith("train ") and "loss:" in line]
    assert bar and all(len(line) <= 80 and "tok/s:" in line and " eta " in line for line in bar)
    assert "v_num" not in result.stdout
    assert result.stderr.count("token cache") == 1  # set up twice (fit, final validation), said once

    continue_command = next(line for line in printed.splitlines() if "continue:" in line).split("python train.py ")[1]
    resumed = train_main(continue_command.split())
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((run_dir / "metrics.json").read_text())["steps"] == 2 * metrics["steps"]


def test_a_run_shorter_than_val_check_interval_lists_only_the_checkpoints_it_wrote(tmp_path, corpus_overrides):
    # TINY validates every 3 steps: in 2 steps no validation runs during training, so no best.ckpt is written.
    train_in_process(TINY + corpus_overrides + ["logger=none", "trainer.max_steps=2"], tmp_path)
    summary = (tmp_path / "summary.txt").read_text()
    assert not (tmp_path / "checkpoints" / "best.ckpt").exists() and "best.ckpt" not in summary
    assert f"checkpoints: {tmp_path / 'checkpoints'}/ (last.ckpt: " in summary
    generate = next(line for line in summary.splitlines() if "generate:" in line).split("python scripts/generate.py ")[1]
    result = script_main("generate", [*shlex.split(generate), "--max-new-tokens", "2"])
    assert result.returncode == 0, result.stderr[-2000:]


class ValidationProbe(Callback):
    """Makes every validation during fit last at least ``pause`` seconds, and notes (on Lightning's Timer
    clock, time.monotonic) when training started and ended and when each validation ran."""

    def __init__(self, pause: float):
        self.pause = pause
        self.train_window: list[float] = []
        self.validations: list[tuple[float, float]] = []

    def on_train_start(self, trainer, pl_module):
        self.train_window.append(time.monotonic())

    def on_train_end(self, trainer, pl_module):
        self.train_window.append(time.monotonic())

    def on_validation_start(self, trainer, pl_module):
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            self.validations.append((time.monotonic(), math.nan))

    def on_validation_epoch_end(self, trainer, pl_module):
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            time.sleep(self.pause)  # inside the validation: every callback's validation hooks surround it

    def on_validation_end(self, trainer, pl_module):
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            self.validations[-1] = (self.validations[-1][0], time.monotonic())

    def training_seconds_until(self, moment: float) -> float:
        """Seconds from the start of training to ``moment``, without the validations that ended before it."""
        pauses = sum(end - start for start, end in self.validations if end <= moment)
        return moment - self.train_window[0] - pauses


def test_train_seconds_and_tokens_per_second_leave_validation_out(tmp_path, corpus_overrides, monkeypatch):
    # Two validations of at least PAUSE seconds each; HOOK_SLACK covers the microseconds between one
    # callback's hook and the next (a scheduler's pause included), far below the 2 s validation takes.
    pause, hook_slack = 1.0, 0.4
    probe = ValidationProbe(pause)
    monkeypatch.setattr(run, "run_callbacks", lambda *args, **kwargs: [*run_callbacks(*args, **kwargs), probe])
    overrides = ["trainer.max_steps=4", "trainer.val_check_interval=2", "logger=csv"]
    metrics = train_in_process(TINY + corpus_overrides + overrides, tmp_path)

    assert len(probe.validations) == 2 and all(end - start >= pause for start, end in probe.validations)
    assert metrics["train_seconds"] == pytest.approx(probe.training_seconds_until(probe.train_window[1]), abs=hook_slack)
    # The x axis of loss-against-time curves: the training seconds when each validation began.
    for entry, (start, _) in zip(metrics["val_history"], probe.validations, strict=True):
        assert entry["seconds"] == pytest.approx(probe.training_seconds_until(start), abs=hook_slack)
    # One throughput figure: metrics.json's, and the same running figure on the progress bar and in the logs.
    assert metrics["tokens_per_sec"] == pytest.approx(metrics["train_tokens"] / metrics["train_seconds"])
    logged = csv_column(tmp_path, "train/tokens_per_sec")
    assert [step for step, _ in logged] == [0, 1, 2, 3]  # every batch (steps counted from 0)
    assert logged[-1][1] >= metrics["tokens_per_sec"]  # logged at the last batch's end, before training ended
    assert metrics["mfu"] is None and not csv_column(tmp_path, "train/mfu")  # no known peak for a CPU


def test_a_resumed_clock_starts_from_the_training_seconds_it_saved():
    clock = TrainingClock()
    clock.load_state_dict({"time_elapsed": {"train": 12.5, "validate": 3.0}})
    assert clock.train_seconds == 12.5 and clock.session_seconds == 0.0
    assert clock.state_dict()["time_elapsed"]["train"] == 12.5


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


def test_a_run_of_a_comparison_is_told_to_continue_with_its_comparisons_command(monkeypatch):
    metrics = {"steps": 10, "train_tokens": 1, "wall_time_s": 1, "val_loss": 3.5, "val_ppl": 33.1, "tokens_per_sec": 1}
    assert "continue: python train.py hydra.run.dir=/runs/a resume=last" in summary_text(metrics, Path("/runs/a"), "csv")
    monkeypatch.setenv(COMPARISON_ENV, "python scripts/compare.py --out outputs/compare/x")
    text = summary_text(metrics, Path("/runs/a"), "csv")
    assert "continue: python scripts/compare.py --out outputs/compare/x (run it again" in text
    assert "python train.py" not in text


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
