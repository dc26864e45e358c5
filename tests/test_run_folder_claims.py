"""Who may write into a run folder: a refused command writes nothing anywhere, and no run writes over another's.

Each case goes through train.py's ``main(argv)``; "nothing written" is checked on a hash of every
file and folder (tests/helpers.py ``folder_state``).
"""

import json
import os
import shutil
from pathlib import Path

import pytest

from moe_gpt.training.run_folder import folder_lock
from tests.helpers import TINY, error_lines, folder_state, train_main


@pytest.fixture
def finished_run(finished_moe_run) -> Path:
    return finished_moe_run


def copy_of(run_dir: Path, tmp_path: Path, name: str = "copy") -> Path:
    copy = tmp_path / name
    shutil.copytree(run_dir, copy)
    return copy


def assert_refused_in_one_line(args: list[str], message: str) -> None:
    result = train_main(args)
    assert result.returncode == 2, result.stderr[-3000:]
    errors = error_lines(result.stderr)
    assert len(errors) == 1 and message in errors[0], result.stderr[-3000:]
    assert "Traceback" not in result.stderr


def test_a_run_killed_before_its_first_checkpoint_is_not_overwritten_by_a_fresh_run(
    finished_run, corpus_overrides, tmp_path
):
    run_dir = copy_of(finished_run, tmp_path)
    shutil.rmtree(run_dir / "checkpoints")  # as a run killed or diverged before its first checkpoint leaves it
    before = folder_state(run_dir)
    args = TINY + corpus_overrides + ["logger=csv", f"hydra.run.dir={run_dir}"]
    assert_refused_in_one_line(args, f"{run_dir} already holds .hydra/, csv/, curves.png, metrics.json, ...")
    assert folder_state(run_dir) == before


def test_resuming_another_runs_checkpoint_into_a_folder_of_a_run_is_refused(finished_run, corpus_overrides, tmp_path):
    other = copy_of(finished_run, tmp_path, "other")
    run_dir = copy_of(finished_run, tmp_path, "this")
    before = folder_state(run_dir)
    checkpoint = other / "checkpoints" / "last.ckpt"
    args = [f"hydra.run.dir={run_dir}", f"resume={checkpoint}", "trainer.max_steps=5"]
    assert_refused_in_one_line(
        args, f"resume={checkpoint} continues a run from another folder, but {run_dir} already holds"
    )
    assert folder_state(run_dir) == before


def test_another_runs_checkpoint_continues_in_an_empty_folder(finished_run, tmp_path):
    run_dir = tmp_path / "continued"
    checkpoint = finished_run / "checkpoints" / "last.ckpt"
    before = folder_state(finished_run)
    result = train_main([f"hydra.run.dir={run_dir}", f"resume={checkpoint}", "trainer.max_steps=4"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((run_dir / "metrics.json").read_text())["steps"] == 4
    assert folder_state(finished_run) == before  # the run it came from is only read


@pytest.mark.parametrize(
    "override,message",
    [
        ("resume=last", "no checkpoint at"),  # the live run has none yet
        ("optim.lr=-1", "optim.lr=-1.0 must be a finite positive number"),
        ("optim.lr=1e-3", "another run is training in"),  # nothing wrong with it: the lock refuses it
    ],
)
def test_a_second_command_writes_nothing_into_a_live_runs_folder(finished_run, corpus_overrides, tmp_path, override, message):
    run_dir = copy_of(finished_run, tmp_path)
    shutil.rmtree(run_dir / "checkpoints")
    (run_dir / "metrics.json").unlink()  # still training, before its first checkpoint
    # The lock a live run holds (flock: a second open file in this process conflicts like another process).
    with folder_lock(run_dir, busy_message="held by the live run"):
        before = folder_state(run_dir)
        assert_refused_in_one_line(TINY + corpus_overrides + [override, f"hydra.run.dir={run_dir}"], message)
        assert folder_state(run_dir) == before


@pytest.mark.parametrize("override", ["optim.lr=-1", "model.moe.top_k=9", "resume=last"])
def test_a_refused_command_leaves_no_folder_behind(corpus_overrides, tmp_path, override):
    run_dir = tmp_path / "new-run"
    result = train_main(TINY + corpus_overrides + [override, f"hydra.run.dir={run_dir}"])
    assert result.returncode == 2
    assert not run_dir.exists()  # Hydra made it for the job; the refusal takes it away again


def test_a_refusal_keeps_an_empty_folder_the_user_made(corpus_overrides, tmp_path):
    run_dir = tmp_path / "made-by-me"
    run_dir.mkdir()
    old = 1_000_000_000  # made long before the command
    os.utime(run_dir, (old, old))
    assert train_main(TINY + corpus_overrides + ["optim.lr=-1", f"hydra.run.dir={run_dir}"]).returncode == 2
    assert run_dir.is_dir()
