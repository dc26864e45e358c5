"""moe_gpt/compare/runner.py and held_out.py's cache: how a comparison starts its runs, passes a stop
signal on, fixes a time budget's steps once, and evaluates each checkpoint once."""

import dataclasses
import json
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

from moe_gpt.compare.held_out import HELD_OUT_FILE, cached_held_out_loss
from moe_gpt.compare.plan import Budget, plan_run
from moe_gpt.compare.run_process import run_passing_signals_on
from moe_gpt.compare.runner import (
    last_message,
    why_it_ended,
    set_aside_an_earlier_attempt,
    time_budget_steps,
    train,
    train_arguments,
)
from moe_gpt.compare.variants import parse_variant
from moe_gpt.config import ConfigError, TrainerConfig
from moe_gpt.errors import Interrupted
from moe_gpt.training.preemption import stop_signals_raise
from moe_gpt.training.run_folder import write_json

DENSE = parse_variant("dense", 128, "active")


def dense_run(out_dir: Path):
    return plan_run(out_dir, Budget("tokens"), DENSE, 1, ["trainer.max_steps=5"], None)


def test_a_run_is_train_py_with_its_overrides_into_its_folder_and_resume_last_when_resuming(tmp_path):
    run = dense_run(tmp_path)
    head = ["trainer.max_steps=5", "model=dense", "seed=1"]
    assert train_arguments(run, resume=False) == [*head, f"hydra.run.dir={run.run_dir}"]
    assert train_arguments(run, resume=True) == [*head, "resume=last", f"hydra.run.dir={run.run_dir}"]


def test_a_finished_run_is_kept_without_starting_train_py(tmp_path, capsys):
    run = dense_run(tmp_path)
    run.run_dir.mkdir(parents=True)
    write_json(run.run_dir / "metrics.json", {"val_loss": 4.25, "steps": 5})
    assert train(run) == {"status": "ok", "val_loss": 4.25, "steps": 5}
    assert capsys.readouterr().out.startswith(f"[compare] keeping {run.run_dir}")


def test_a_run_prints_one_line_when_it_starts_and_one_with_its_reason_when_it_fails_and_keeps_its_output(
    tmp_path, capsys
):
    run = plan_run(tmp_path, Budget("tokens"), DENSE, 1, ["model/size=nosuch"], None)  # refused by Hydra at once
    outcome = train(run)
    assert outcome["status"] == "failed" and "nosuch" in outcome["reason"]
    output = run.run_dir / "output.log"
    started, ended = capsys.readouterr().out.splitlines()  # nothing else: train.py's output went to the file
    assert started.startswith(f"[compare] train {run.run_dir}: ")
    assert ended == f"[compare] failed {run.run_dir}: {outcome['reason']} (its output: {output})"
    assert outcome["reason"] in output.read_text()
    assert [path.name for path in tmp_path.rglob("*output.log")] == ["output.log"]  # no file left beside the folder


def test_an_attempt_stopped_before_its_first_checkpoint_is_moved_aside_not_overwritten(tmp_path, capsys):
    run_dir = dense_run(tmp_path).run_dir
    assert set_aside_an_earlier_attempt(run_dir) is None  # nothing there yet
    run_dir.mkdir(parents=True)
    assert set_aside_an_earlier_attempt(run_dir) is None  # an empty folder is a fresh start
    (run_dir / "train.log").write_text("the killed attempt's log\n")
    (run_dir.parent / f"{run_dir.name}.stopped-1").mkdir()  # an earlier one, already set aside

    aside = set_aside_an_earlier_attempt(run_dir)
    assert aside == run_dir.parent / f"{run_dir.name}.stopped-2" and not run_dir.exists()
    assert (aside / "train.log").read_text() == "the killed attempt's log\n"
    assert capsys.readouterr().out == (
        f"[compare] {run_dir} holds an attempt that stopped before its first checkpoint: moved to {aside}\n"
    )


def test_a_failed_runs_reason_is_its_last_line_without_the_log_prefix():
    stderr = "some warning\n[2026-11-27 11:00:00,123][train][ERROR] - checkpoint x.ckpt is damaged\n\n"
    assert last_message(stderr) == "checkpoint x.ckpt is damaged"
    assert last_message("error: Could not override 'model.nope'\n") == "error: Could not override 'model.nope'"
    assert last_message("") == "no output"


def test_a_run_killed_by_a_signal_is_reported_as_killed_not_by_its_last_progress_line():
    progress = "[2026-11-28 00:52:01,002][moe_gpt.progress][INFO] - step 20/3000  loss 10.264\n"
    assert why_it_ended(-signal.SIGKILL, progress) == (
        "train.py was killed by SIGKILL; run the same command again to go on with it"
    )
    assert why_it_ended(2, "error: Could not override 'model.nope'\n") == "error: Could not override 'model.nope'"


def behave_as_a_program(notes: str, how_to_end: str) -> int:
    """Note what the process sees, print through Python and through the file descriptors, register an
    exit handler, and end as asked."""
    import atexit

    Path(notes).write_text(json.dumps({"env": os.environ.get("MOE_GPT_TEST_NOTE"), "cwd": os.getcwd()}))
    atexit.register(lambda: print("exit handler ran", flush=True))
    print("to stdout")
    print("to stderr", file=sys.stderr)
    os.write(1, b"a library writing to fd 1\n")
    if how_to_end == "raise":
        raise RuntimeError("something broke")
    if how_to_end == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    return 3


@pytest.mark.parametrize(
    "how_to_end, exit_code, last_line",
    [("return", 3, "exit handler ran"), ("raise", 1, "exit handler ran"), ("kill", -signal.SIGKILL, None)],
)
def test_a_runs_process_has_this_ones_environment_and_folder_and_ends_as_a_program_does(
    tmp_path, monkeypatch, how_to_end, exit_code, last_line
):
    monkeypatch.setenv("MOE_GPT_TEST_NOTE", how_to_end)  # set after the server started: it must still arrive
    monkeypatch.chdir(tmp_path)
    notes, output = tmp_path / "notes.json", tmp_path / "runs" / "output.log"
    assert run_passing_signals_on(behave_as_a_program, (str(notes), how_to_end), output) == exit_code
    assert json.loads(notes.read_text()) == {"env": how_to_end, "cwd": str(tmp_path)}
    printed = output.read_text().splitlines()
    assert {"to stdout", "to stderr", "a library writing to fd 1"} <= set(printed)
    if how_to_end == "raise":
        assert "RuntimeError: something broke" in printed  # the traceback, as the interpreter prints it
    assert (printed[-1] if last_line else None) == last_line


def wait_for_sigterm(stopped: str, ready: str) -> int:
    """A run that says when it listens, and at SIGTERM notes it and ends as train.py does."""
    signal.signal(signal.SIGTERM, lambda *_: (Path(stopped).write_text("stopped"), sys.exit(143)))
    Path(ready).write_text("ready")
    time.sleep(60)
    return 0


def test_a_stop_signal_during_a_run_is_passed_on_to_it_and_raised_again(tmp_path):
    stopped, ready = tmp_path / "stopped", tmp_path / "ready"

    def signal_this_process_once_the_child_listens() -> None:
        deadline = time.monotonic() + 30
        while not ready.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGTERM)  # as a scheduler stopping compare.py

    start = time.monotonic()
    threading.Thread(target=signal_this_process_once_the_child_listens, daemon=True).start()
    with stop_signals_raise(), pytest.raises(Interrupted) as stop:
        run_passing_signals_on(wait_for_sigterm, (str(stopped), str(ready)), tmp_path / "output.log")
    assert stop.value.signum == signal.SIGTERM and stop.value.exit_code == 143
    assert stopped.read_text() == "stopped"  # the child got the signal and ended before it returned
    assert time.monotonic() - start < 30  # not the child's 60 s sleep


def finished(variant: str, seconds_per_step: float) -> dict:
    """A report row of a finished 10-step run of 2,048 tokens per step."""
    speed = 2048 / seconds_per_step
    return {"variant": variant, "status": "ok", "train_tokens": 2048 * 10, "steps": 10, "tokens_per_sec": speed}


def test_a_time_budgets_steps_come_from_measured_speed_and_are_chosen_once_per_folder(tmp_path, capsys):
    budget, variants = Budget("time", 1.0), [DENSE, parse_variant("moe:4:2", 128, "active")]
    done = [finished("dense", 0.5), finished("moe-4-2", 2.0)]
    steps, untimed = time_budget_steps(budget, variants, 1, [], tmp_path, done)
    assert (steps, untimed) == ({"dense": 120, "moe-4-2": 30}, {})  # 60 s / seconds per step
    assert json.loads((tmp_path / "compare.json").read_text())["time_steps"] == {"time-1min": steps}
    assert "[compare] time-1min: dense gets 120 steps" in capsys.readouterr().out
    # A re-run measures other speeds (a busier machine) but trains exactly the same runs.
    slower = [finished("dense", 5.0), finished("moe-4-2", 5.0)]
    again, _ = time_budget_steps(budget, variants, 1, [], tmp_path, slower)
    assert again == steps and capsys.readouterr().out == ""


def test_a_held_out_loss_is_kept_in_the_run_folder_and_reused_for_the_same_corpus(
    tmp_path, tiny_checkpoint, tiny_corpus
):
    checkpoint = tmp_path / "best.ckpt"
    shutil.copy(tiny_checkpoint, checkpoint)
    trainer = dataclasses.replace(TrainerConfig(), limit_val_batches=2)
    loss = cached_held_out_loss(tmp_path, checkpoint, tiny_corpus, "tiny", trainer)
    record = json.loads((tmp_path / HELD_OUT_FILE).read_text())
    assert record["eval_data"] == "tiny" and record["loss"] == loss and 0 < loss < 20
    assert record["windows"] == 2 * tiny_corpus.batch_size  # limit_val_batches batches
    checkpoint.unlink()  # a second evaluation would now fail: the cached value must answer
    assert cached_held_out_loss(tmp_path, checkpoint, tiny_corpus, "tiny", trainer) == loss
    with pytest.raises(ConfigError, match="does not exist"):  # another corpus is evaluated, not read from the cache
        cached_held_out_loss(tmp_path, checkpoint, tiny_corpus, "another", trainer)
