"""Checkpoints and logs a kill -9 cannot leave half-written, with TMPDIR on another filesystem.

The kill tests need a process to kill: a forked child that keeps writing (it starts at once, with
torch already imported), killed at random moments, many times.
"""

import csv
import multiprocessing
import os
import random
import signal
import tempfile
import time
from pathlib import Path

import pytest
import torch

from moe_gpt.config import TrainerConfig
from moe_gpt.training.atomic_write import AtomicCheckpointIO, replacing, temp_files
from moe_gpt.training.loggers import ContinuingCSVLogger
from moe_gpt.training.trainer import build_trainer
from moe_gpt.weights.safe_load import read_checkpoint

KILLS = 20


def versions() -> tuple[torch.Tensor, torch.Tensor]:
    """Two payloads of 32 MB each that differ everywhere: even versions save the first, odd ones the second."""
    first = torch.arange(8 * 2**20, dtype=torch.float32)
    return first, -first - 1


def checkpoint_of(version: int, payloads: tuple[torch.Tensor, torch.Tensor]) -> dict:
    """A state shaped like a moe-gpt checkpoint, so read_checkpoint accepts it."""
    state = {"state_dict": {"payload": payloads[version % 2]}, "hyper_parameters": {"model_config": {}}}
    return {**state, "version": version}


def keep_saving(target: Path, first_version: int, payloads, saved) -> None:
    """The child: save version after version until killed; ``saved`` counts the completed saves."""
    tempfile.tempdir = None  # read TMPDIR again: the parent process may have cached another folder
    io = AtomicCheckpointIO()
    for version in range(first_version, first_version + 10**6):
        io.save_checkpoint(checkpoint_of(version, payloads), target)
        saved.value += 1


def assert_one_complete_version(target: Path, payloads) -> int:
    checkpoint = read_checkpoint(target)  # every record's CRC checked: a partial or mixed file fails here
    version = checkpoint["version"]
    assert torch.equal(checkpoint["state_dict"]["payload"], payloads[version % 2]), f"version {version} is mixed"
    return version


def test_a_checkpoint_killed_mid_write_keeps_the_previous_complete_version(tmp_path, tmpdir_elsewhere):
    payloads = versions()
    target = tmp_path / "checkpoints" / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint(checkpoint_of(0, payloads), target)
    fork = multiprocessing.get_context("fork")
    rng = random.Random(0)
    version, mid_write = 0, 0
    for _ in range(KILLS):
        saved = fork.Value("i", 0)
        child = fork.Process(target=keep_saving, args=(target, version + 1, payloads, saved))
        child.start()
        while saved.value < 1:  # the leftovers of the previous kill are removed by this first save
            assert child.is_alive(), "the saving process died"
            time.sleep(0.001)
        assert len(temp_files(target.parent)) <= 1  # at most its own write in progress
        time.sleep(rng.uniform(0.0, 0.1))  # a save takes about 0.06 s here
        os.kill(child.pid, signal.SIGKILL)
        child.join()
        mid_write += bool(temp_files(target.parent))
        newer = assert_one_complete_version(target, payloads)
        assert newer > version
        version = newer
    assert mid_write >= KILLS // 4, f"only {mid_write} of {KILLS} kills landed during a write"
    AtomicCheckpointIO().save_checkpoint(checkpoint_of(version + 1, payloads), target)
    assert temp_files(target.parent) == [] and sorted(target.parent.iterdir()) == [target]
    assert list(tmpdir_elsewhere.iterdir()) == []  # nothing was written to TMPDIR, so nothing is left there


def test_a_write_that_fails_leaves_the_old_file_and_no_temporary_file(tmp_path):
    target = tmp_path / "metrics.csv"
    target.write_text("old\n")
    with pytest.raises(RuntimeError), replacing(target) as file:
        file.write(b"half of the new")
        raise RuntimeError("disk full")
    assert target.read_text() == "old\n" and temp_files(tmp_path) == []


def log_rows(run_dir: Path, first_step: int, count: int, saved, new_column_every: int = 3) -> None:
    """Log ``count`` rows from ``first_step`` on, as a run resumed there would; every ``new_column_every``-th
    row brings a new column, so the file is rewritten with a new header. ``saved``: the last step saved."""
    logger = ContinuingCSVLogger(run_dir, resumed_step=first_step)
    for step in range(first_step, first_step + count):
        new_column = {f"moe/layer{step}/share": 0.5} if step % new_column_every == 0 else {}
        logger.log_metrics({"train/loss": float(step), **new_column}, step=step)  # saved at once
        saved.value = step


def logged_steps(run_dir: Path) -> list[int]:
    with open(run_dir / "csv" / "metrics.csv", newline="") as handle:
        return [int(row["step"]) for row in csv.DictReader(handle)]


def test_a_csv_log_killed_mid_write_keeps_every_saved_row(tmp_path):
    fork = multiprocessing.get_context("fork")
    saved = fork.Value("i", -1)
    log_rows(tmp_path, 0, 400, saved, new_column_every=20)  # a long log: each rewrite takes a while
    rng = random.Random(0)
    mid_rewrite = 0
    for _ in range(KILLS):
        first = saved.value + 1
        child = fork.Process(target=log_rows, args=(tmp_path, first, 10**6, saved))
        child.start()
        while saved.value < first:
            assert child.is_alive(), "the logging process died"
            time.sleep(0.001)
        time.sleep(rng.uniform(0.0, 0.1))
        os.kill(child.pid, signal.SIGKILL)
        child.join()
        mid_rewrite += bool(temp_files(tmp_path / "csv"))
        steps = logged_steps(tmp_path)
        assert len(steps) > saved.value, "a saved row was lost"
        assert steps == list(range(len(steps))), "a row was lost or logged twice"
        saved.value = steps[-1]  # a row written just before the kill, before it was counted, is kept too
    assert mid_rewrite >= KILLS // 4, f"only {mid_rewrite} of {KILLS} kills landed during a rewrite"


@pytest.mark.parametrize("devices,strategy", [(1, "auto"), (2, "ddp")])
def test_every_checkpoint_the_trainer_writes_goes_through_the_atomic_plugin(
    tiny_run_config, tmp_path, devices, strategy
):
    cfg = tiny_run_config(tmp_path, trainer=TrainerConfig(accelerator="cpu", devices=devices, strategy=strategy))
    trainer = build_trainer(cfg, loggers=[], callbacks=[])  # a DDP trainer starts its processes only in fit
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)
