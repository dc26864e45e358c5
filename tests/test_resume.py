"""Resume and preemption through the real CLI: kill -9, SIGTERM, Ctrl-C, SLURM requeue, and what a resume may change.

Runs that receive signals or are killed run train.py as a process of their own; the others call its
``main(argv)`` here.

"The same run" means: every weight of the final checkpoint equal with atol=0, and the same
per-step training losses, validation losses and token counts as the run left alone.
"""

import csv
import json
import os
import random
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from moe_gpt.errors import Interrupted
from moe_gpt.training.atomic_write import temp_files
from moe_gpt.training.loggers import ContinuingCSVLogger
from moe_gpt.training.preemption import stop_signals_raise
from moe_gpt.weights.safe_load import read_checkpoint
from tests.helpers import (
    REPO,
    TINY,
    csv_column,
    error_lines,
    folder_state,
    start_train_cli,
    train_main,
    wait_for_file,
)

# Dropout, gradient accumulation, validation every 2 steps, last.ckpt at every step and aux_free's
# selection biases: every piece of state a resume must restore (RNG, data position, optimizer,
# schedule, loops, biases) matters.
RESUMABLE = TINY + [
    "model.moe.router=sigmoid",
    "model.moe.load_balance=aux_free",
    "model.moe.bias_update_rate=0.01",
    "logger=csv",
    "checkpoint.every_n_steps=1",
    "trainer.max_steps=10",
    "trainer.val_check_interval=4",
    "trainer.accumulate_grad_batches=2",
    "model.dropout=0.1",
]


EXPERT_USAGE = "moe/max_load_violation"  # one column of the expert-usage rows


def train_cli(args: list[str]) -> int:
    """``python train.py <args>`` in this process: its exit code."""
    return train_main(args).returncode


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, corpus_overrides) -> Path:
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    assert train_cli(RESUMABLE + corpus_overrides + [f"hydra.run.dir={run_dir}"]) == 0
    return run_dir


def last_checkpoint(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)


def assert_same_run(expected: Path, actual: Path) -> None:
    weights, resumed = last_checkpoint(expected)["state_dict"], last_checkpoint(actual)["state_dict"]
    assert weights.keys() == resumed.keys() and any(key.endswith("selection_bias") for key in weights)
    assert all(torch.equal(weights[key], resumed[key]) for key in weights), "weights or selection biases differ"
    for column in ("train/loss", "val/loss", "lr/with_weight_decay"):
        assert csv_column(actual, column) == csv_column(expected, column), column
    metrics, resumed_metrics = (json.loads((d / "metrics.json").read_text()) for d in (expected, actual))
    assert resumed_metrics["train_tokens"] == metrics["train_tokens"] == 10 * 2 * 4 * 32
    strip_time = lambda history: [{k: v for k, v in entry.items() if k != "seconds"} for entry in history]  # noqa: E731
    assert strip_time(resumed_metrics["val_history"]) == strip_time(metrics["val_history"])
    assert [entry["step"] for entry in metrics["val_history"]] == [2, 4, 6, 8, 10]
    # Every expert-usage row, the checkpoint's step's included, with the same values (the counts are saved).
    for column in (EXPERT_USAGE, "moe/layer0/expert0_share"):
        assert csv_column(actual, column) == csv_column(expected, column), column


def resume_last(run_dir: Path) -> None:
    """``resume=last`` with nothing else repeated: the run's own settings come from its checkpoint."""
    assert train_cli([f"hydra.run.dir={run_dir}", "resume=last"]) == 0


# Two moments after the first checkpoint; a kill during a checkpoint write has a test of its own (below).
@pytest.mark.parametrize("delay", [0.0, pytest.param(0.4, marks=pytest.mark.slow)])
def test_a_run_killed_with_sigkill_resumes_into_the_same_run(uninterrupted, corpus_overrides, tmp_path, delay):
    run_dir = tmp_path / "run"
    process = start_train_cli(RESUMABLE + corpus_overrides + [f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    wait_for_file(run_dir / "checkpoints" / "last.ckpt", process)
    time.sleep(delay)  # lands anywhere: in a step, a validation or a checkpoint write
    process.kill()
    process.wait()
    assert 1 <= last_checkpoint(run_dir)["global_step"] < 10  # killed mid-run, checkpoint intact

    resume_last(run_dir)
    assert_same_run(uninterrupted, run_dir)


def files_in(tmpdir: Path) -> list[Path]:
    """The files directly in TMPDIR, where Lightning's own save writes (tiktoken keeps a cache folder there)."""
    return [path for path in tmpdir.iterdir() if path.is_file()]


def wait_for_a_checkpoint_write(
    checkpoints: Path, tmpdir: Path, process: subprocess.Popen, leftovers: list[Path]
) -> None:
    """Until a checkpoint is being written: a new temporary file beside last.ckpt, or a file in TMPDIR (where
    Lightning's own save writes first)."""
    deadline = time.monotonic() + 300
    while not (set(temp_files(checkpoints)) - set(leftovers) or files_in(tmpdir)):
        assert process.poll() is None, f"train.py ended (code {process.returncode}):\n{process.stderr.read()[-3000:]}"
        assert time.monotonic() < deadline, "no checkpoint write began within 300 s"
        time.sleep(0.001)


@pytest.mark.slow
def test_kill_9_while_checkpoints_are_written_always_leaves_a_run_that_resumes(
    corpus_overrides, tmp_path, tmpdir_elsewhere
):
    run_dir = tmp_path / "run"
    checkpoints = run_dir / "checkpoints"
    # TINY's checkpoint is 20 MB (mostly the embedding and its AdamW state): a write takes a while.
    every_step = ["logger=csv", "checkpoint.every_n_steps=1", "trainer.max_steps=1000", f"hydra.run.dir={run_dir}"]
    first = TINY + corpus_overrides + every_step
    rng = random.Random(0)
    mid_write = 0
    for attempt in range(4):
        leftovers = temp_files(checkpoints) if checkpoints.is_dir() else []
        process = start_train_cli(first if attempt == 0 else [f"hydra.run.dir={run_dir}", "resume=last"], cwd=tmp_path)
        wait_for_file(checkpoints / "last.ckpt", process)
        wait_for_a_checkpoint_write(checkpoints, tmpdir_elsewhere, process, leftovers)
        time.sleep(rng.uniform(0.0, 0.03))
        process.kill()
        process.wait()
        mid_write += bool(set(temp_files(checkpoints)) - set(leftovers))
        read_checkpoint(checkpoints / "last.ckpt")  # complete: every record's CRC matches
        assert files_in(tmpdir_elsewhere) == [], "a temporary file was left in TMPDIR"
    step = last_checkpoint(run_dir)["global_step"]
    assert train_cli([f"hydra.run.dir={run_dir}", "resume=last", f"trainer.max_steps={step + 2}"]) == 0
    assert last_checkpoint(run_dir)["global_step"] == step + 2
    assert temp_files(checkpoints) == [] and mid_write >= 2, f"{mid_write} of 4 kills landed during a write"


@pytest.mark.parametrize(
    "signum,exit_code", [(signal.SIGTERM, 143), pytest.param(signal.SIGINT, 130, marks=pytest.mark.slow)]
)
def test_sigterm_and_ctrl_c_save_the_step_record_it_and_resume_exactly(
    uninterrupted, corpus_overrides, tmp_path, signum, exit_code
):
    run_dir = tmp_path / "run"
    process = start_train_cli(RESUMABLE + corpus_overrides + [f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    wait_for_file(run_dir / "checkpoints" / "last.ckpt", process)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=300)

    assert process.returncode == exit_code
    step = last_checkpoint(run_dir)["global_step"]
    name = signal.Signals(signum).name
    assert error_lines(stderr)[-1].endswith(f"stopped by {name} at step {step}; checkpoints/last.ckpt holds it")
    failure = json.loads((run_dir / "failure.json").read_text())
    assert (failure["status"], failure["error_type"], failure["step"]) == ("interrupted", "Interrupted", step)
    assert not (run_dir / "metrics.json").exists()

    resume_last(run_dir)
    assert_same_run(uninterrupted, run_dir)


def test_a_stop_signal_before_training_starts_stops_at_once():
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Interrupted) as stopped, stop_signals_raise():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # never reached: the handler raises
    assert stopped.value.step is None and stopped.value.exit_code == 143
    assert signal.getsignal(signal.SIGTERM) is before


@pytest.fixture(scope="module")
def continued_run(tmp_path_factory, corpus_overrides) -> tuple[Path, list[tuple[int, float]]]:
    """A finished run of 2 steps continued to 4, and the val/loss rows of its first session.

    TINY logs expert usage every 2 steps, so the checkpoint's step has an expert-usage row; it
    validates every 3 steps, so the first session ends with one more validation pass, logged at step
    2, and so is the continued run's validation after step 3 (Lightning logs it at the step before).
    """
    run_dir = tmp_path_factory.mktemp("continued")
    assert train_cli(TINY + corpus_overrides + ["logger=csv", "trainer.max_steps=2", f"hydra.run.dir={run_dir}"]) == 0
    first_session = csv_column(run_dir, "val/loss")
    assert first_session == [(2, json.loads((run_dir / "metrics.json").read_text())["val_loss"])]
    assert train_cli([f"hydra.run.dir={run_dir}", "resume=last", "trainer.max_steps=4"]) == 0
    return run_dir, first_session


def test_a_resumed_run_keeps_the_expert_usage_row_of_its_checkpoints_step(continued_run):
    run_dir, _ = continued_run
    assert [step for step, _ in csv_column(run_dir, EXPERT_USAGE)] == [2, 4]


def test_continuing_a_finished_run_keeps_its_final_validation_row(continued_run):
    run_dir, first_session = continued_run
    continued = csv_column(run_dir, "val/loss")
    assert continued[:1] == first_session and [step for step, _ in continued] == [2, 2, 4]


def test_a_resumed_csv_log_replaces_the_rows_a_killed_session_logged_past_its_checkpoint(tmp_path):
    lr, expert_usage = {"lr/with_weight_decay": 1e-3}, {EXPERT_USAGE: 0.5}
    before = [(3, lr), (3, {"train/loss": 2.0, "train/epochs": 0.4}), (4, expert_usage)]  # steps 1-4
    # Killed after its checkpoint at step 4: Lightning logs the next batch's rows, and the validation
    # after step 5, at step 4 too.
    after = [
        (4, lr),
        (4, {"train/loss": 1.9, "train/epochs": 0.5}),
        (4, {"val/loss": 2.1, "train/epochs": 0.5}),
        (5, lr),
    ]
    killed = ContinuingCSVLogger(tmp_path, resumed_step=None)
    for step, metrics in before + after:
        killed.log_metrics(metrics, step)
    resumed = ContinuingCSVLogger(tmp_path, resumed_step=4)
    for step, metrics in after:  # an exact resume logs them again
        resumed.log_metrics(metrics, step)
    with open(tmp_path / "csv" / "metrics.csv", newline="") as handle:
        logged = [(int(row.pop("step")), {k: float(v) for k, v in row.items() if v}) for row in csv.DictReader(handle)]
    assert logged == before + after


@pytest.fixture(scope="module")
def dense_run(tmp_path_factory, corpus_overrides) -> Path:
    """A dense run of 3 steps, logged to W&B (offline), to resume in various ways."""
    run_dir = tmp_path_factory.mktemp("dense") / "run"
    args = TINY + corpus_overrides + ["model=dense", "logger=wandb", "trainer.max_steps=3", f"hydra.run.dir={run_dir}"]
    assert train_cli(args) == 0
    return run_dir


@pytest.mark.parametrize(
    "override,message",
    [
        ("model.n_layer=3", "resume=last has model.n_layer=2 but this run has model.n_layer=3; set model.n_layer=2"),
        ("model=moe", "resume=last has model.use_moe=False but this run has model.use_moe=True"),
        ("trainer.max_steps=3", "is already at step 3; set trainer.max_steps above 3 to train further"),
        (
            "data.val_fraction=0.5",
            "resume=last: data.val_fraction=0.5 but the run being resumed has data.val_fraction=0.3, and it fixes "
            "which batches the run sees",
        ),
        ("seed=7", "resume=last: seed=7 but the run being resumed has seed=1337"),
        ("data.batch_size=2", "resume=last: data.batch_size=2 but the run being resumed has data.batch_size=4"),
    ],
)
def test_a_resume_whose_change_cannot_take_effect_is_refused_and_writes_nothing(dense_run, override, message):
    assert_resume_refused(dense_run, [override], message)


# The case: a finished MoE run, continued with a router or balancing kind that changes its weights.
@pytest.mark.parametrize(
    "override,message",
    [
        ("model.moe.router=noisy", "model.moe.router='noisy' but the run being resumed has model.moe.router='softmax'"),
        ("model.moe.load_balance=aux_free", "model.moe.load_balance='aux_free' but the run being resumed has"),
        ("model.moe.activation=relu", "model.moe.activation='relu' but the run being resumed has"),
        ("model.moe.num_experts=8", "resume=last has model.moe.num_experts=4 but this run has model.moe.num_experts=8"),
    ],
)
def test_a_refused_resume_leaves_the_finished_moe_run_byte_for_byte(finished_moe_run, override, message):
    assert_resume_refused(finished_moe_run, [override, "trainer.max_steps=42"], message)
    assert not (finished_moe_run / "failure.json").exists()


def assert_resume_refused(run_dir: Path, overrides: list[str], message: str) -> None:
    before = folder_state(run_dir)
    args = [f"hydra.run.dir={run_dir}", "resume=last", "trainer.max_steps=5", *overrides]  # the last one wins
    result = train_main(args)
    assert result.returncode == 2
    errors = error_lines(result.stderr)
    assert len(errors) == 1 and message in errors[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert folder_state(run_dir) == before


def test_a_resume_applies_and_logs_every_change_it_accepts(finished_moe_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(finished_moe_run, run_dir)
    changes = ["model.moe.top_k=1", "model.moe.capacity_factor=1.5", "model.dropout=0.1", "optim.lr=5e-4"]
    result = train_main([f"hydra.run.dir={run_dir}", "resume=last", "trainer.max_steps=5", *changes])
    assert result.returncode == 0, result.stderr[-2000:]
    for change in [
        "model.moe.top_k: 2 -> 1",
        "model.moe.capacity_factor: None -> 1.5",
        "model.dropout: 0.0 -> 0.1",
        "optim.lr: 0.001 -> 0.0005",
        "trainer.max_steps: 3 -> 5",
    ]:
        assert f"resumed run changes {change} (from step 3 on)" in result.stderr
    assert f"resumed run changes {change} (from step 3 on)" in (run_dir / "train.log").read_text()
    hparams = last_checkpoint(run_dir)["hyper_parameters"]["model_config"]
    assert hparams["moe"]["top_k"] == 1 and hparams["dropout"] == 0.1


def test_resume_uses_the_runs_own_config_applies_new_optimizer_values_and_continues_its_logs(
    dense_run, tmp_path
):
    # Copied, so the refusal tests above keep a 3-step run to work on.
    run_dir = tmp_path / "run"
    shutil.copytree(dense_run, run_dir)
    result = train_main([f"hydra.run.dir={run_dir}", "resume=last", "trainer.max_steps=6", "optim.lr=5e-4"])
    assert result.returncode == 0, result.stderr[-2000:]
    stderr = result.stderr

    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["model"] == "dense" and metrics["steps"] == 6  # model=dense was not repeated
    assert metrics["train_tokens"] == 6 * 4 * 32
    assert [entry["step"] for entry in metrics["val_history"]] == [3, 6]  # the first session's point is kept
    assert metrics["val_history"][1]["seconds"] > metrics["val_history"][0]["seconds"]
    assert "resumed run changes optim.lr: 0.001 -> 0.0005 (from step 3 on)" in stderr
    overrides = yaml.safe_load((run_dir / ".hydra" / "overrides.yaml").read_text())
    assert "model=dense" in overrides and overrides[-3:] == ["resume=last", "trainer.max_steps=6", "optim.lr=5e-4"]
    # One W&B run per folder: the resumed session logs to the same run id.
    runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and len({run.name.rsplit("-", 1)[1] for run in runs}) == 1
    assert last_checkpoint(run_dir)["optimizer_states"][0]["param_groups"][0]["initial_lr"] == 5e-4


def test_a_moved_run_folder_keeps_its_best_checkpoint_when_resumed(dense_run, tmp_path):
    # Copied (as a moved folder): the checkpoints name the old folder's paths.
    run_dir = tmp_path / "moved"
    shutil.copytree(dense_run, run_dir)
    best_before = json.loads((dense_run / "metrics.json").read_text())["best_val_loss"]
    # To step 4: no validation in between (every 3 steps), so the best so far must come from step 3.
    result = train_main([f"hydra.run.dir={run_dir}", "resume=last", "trainer.max_steps=4"])
    assert result.returncode == 0, result.stderr[-2000:]
    assert "dirpath has changed" not in result.stderr
    assert json.loads((run_dir / "metrics.json").read_text())["best_val_loss"] == best_before
    (state,) = [v for k, v in last_checkpoint(run_dir)["callbacks"].items() if k.startswith("BestCheckpoint")]
    assert state["best_model_path"] == str((run_dir / "checkpoints" / "best.ckpt").resolve())
    assert float(state["best_model_score"]) == best_before


@pytest.mark.slow
def test_a_slurm_requeue_signal_saves_requeues_and_the_requeued_job_resumes(corpus_overrides, tmp_path, monkeypatch):
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    scontrol = fake_bin / "scontrol"  # records its arguments instead of talking to a cluster
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "scontrol.calls"}\n')
    scontrol.chmod(scontrol.stat().st_mode | stat.S_IEXEC)
    slurm = {
        "PATH": f"{fake_bin}:{os.environ['PATH']}",
        **{"SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "train", "SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "1"},
        **{"SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0"},
    }
    run_dir = tmp_path / "run"
    args = RESUMABLE + corpus_overrides + [f"hydra.run.dir={run_dir}"]
    process = start_train_cli(args, cwd=tmp_path, env=slurm)
    wait_for_file(run_dir / "checkpoints" / "last.ckpt", process)
    process.send_signal(signal.SIGUSR1)  # what `sbatch --signal=USR1@120` sends before the time limit
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 128 + signal.SIGUSR1, stderr[-2000:]
    assert (tmp_path / "scontrol.calls").read_text() == "requeue 4242\n"

    # SLURM starts the same command again, with SLURM_RESTART_COUNT set: it resumes without being asked
    # (in this process: what matters is what it reads from the environment).
    for name, value in {**slurm, "SLURM_RESTART_COUNT": "1"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(tmp_path)
    restarted = train_main(args)
    assert restarted.returncode == 0, restarted.stderr[-2000:]
    assert "requeued SLURM job: resuming from" in restarted.stderr
    assert json.loads((run_dir / "metrics.json").read_text())["steps"] == 10


@pytest.mark.slow
def test_a_requeue_handler_installed_before_training_is_called_after_the_step_is_saved(corpus_overrides, tmp_path):
    # submitit installs a SIGUSR2 handler that requeues the job; here a stand-in records that it ran.
    run_dir, marker = tmp_path / "run", tmp_path / "requeued"
    args = RESUMABLE + corpus_overrides + [f"hydra.run.dir={run_dir}"]
    wrapper = (
        "import runpy, signal, sys\n"
        f"signal.signal(signal.SIGUSR2, lambda signum, frame: open({str(marker)!r}, 'w').write('requeue'))\n"
        f"sys.argv = ['train.py', *{args!r}]\n"
        f"runpy.run_path({str(REPO / 'train.py')!r}, run_name='__main__')"
    )
    env = {**os.environ, "WANDB_MODE": "offline"}
    process = subprocess.Popen(
        [sys.executable, "-c", wrapper], cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True
    )
    wait_for_file(run_dir / "checkpoints" / "last.ckpt", process)
    process.send_signal(signal.SIGUSR2)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 128 + signal.SIGUSR2, stderr[-2000:]
    assert marker.read_text() == "requeue"
    step = last_checkpoint(run_dir)["global_step"]
    assert json.loads((run_dir / "failure.json").read_text())["step"] == step < 10


@pytest.mark.slow
def test_a_sigterm_to_one_of_two_processes_stops_both_after_the_same_logging_step(corpus_overrides, tmp_path):
    # The processes agree on stopping only at logging steps (every 4 here): no collective at the steps between.
    run_dir = tmp_path / "run"
    two = ["trainer.devices=2", "trainer.strategy=ddp", "data.batch_size=2"]
    long = ["trainer.max_steps=400", "trainer.val_check_interval=400", "trainer.log_every_n_steps=4", "logger=csv"]
    args = TINY + corpus_overrides + two + long + ["checkpoint.every_n_steps=3", f"hydra.run.dir={run_dir}"]
    process = start_train_cli(args, cwd=tmp_path)
    wait_for_file(run_dir / "checkpoints" / "last.ckpt", process)
    process.send_signal(signal.SIGTERM)  # the first process only: Lightning started the second one itself
    _, stderr = process.communicate(timeout=300)

    assert process.returncode == 143, stderr[-2000:]
    step = last_checkpoint(run_dir)["global_step"]
    assert 0 < step < 400 and step % 4 == 0
    assert json.loads((run_dir / "failure.json").read_text())["step"] == step
