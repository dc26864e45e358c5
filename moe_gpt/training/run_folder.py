"""The run folder: who may write into it, and the records a run leaves there.

A run claims its folder before writing anything: only an empty folder, or the folder of the run
it continues, is accepted, and a lock keeps a second live run out. Only then are the resolved config
(``.hydra/``), the log file (``train.log``) and later ``metrics.json`` or ``failure.json`` written,
and only by the process of global rank zero (the other processes of a multi-process run share the
folder). Records are strict JSON (no NaN), written atomically.
"""

from __future__ import annotations

import fcntl
import json
import logging
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional

from moe_gpt.config import ConfigError
from moe_gpt.errors import Interrupted

LOCK_FILE = ".lock"
LOG_FILE = "train.log"
LOG_FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"  # as Hydra's console

log = logging.getLogger(__name__)


class FolderRefused(ConfigError):
    """The run folder belongs to another run; nothing was written into it."""


def settle_rank_before_trainer() -> None:
    """Make Lightning's ``rank_zero_only.rank`` tell rank zero apart before the Trainer exists.

    Lightning reads it when imported, from RANK (torchrun), LOCAL_RANK (its own launcher's extra
    processes) or SLURM_PROCID, and the strategy sets the true global rank once the Trainer starts.
    The first process on a second node that Lightning's launcher runs has only NODE_RANK; marked
    non-zero here (its global rank is not known yet), it leaves the run folder to the first node.
    """
    # Imported here: the commands that read or lock run folders (compare, evaluate, summarize_sweep) need
    # no Lightning until they train, and importing it takes seconds.
    from lightning.pytorch.utilities import rank_zero_only

    node_rank = int(os.environ.get("NODE_RANK", "0") or 0)
    if rank_zero_only.rank == 0 and node_rank > 0:
        rank_zero_only.rank = node_rank


CHECKPOINT_FOLDER = "checkpoints"  # in every run folder: last.ckpt and best.ckpt


def checkpoint_path(run_dir: Path, name: str) -> Path:
    """Where the run folder keeps checkpoint ``name`` (``best.ckpt``, ``last.ckpt``), whether or not it is there yet."""
    return run_dir / CHECKPOINT_FOLDER / name


def saved_checkpoint(run_dir: Path, names: tuple[str, ...] = ("best.ckpt", "last.ckpt")) -> Optional[Path]:
    """The first of ``names`` that the run folder's ``checkpoints/`` holds, else None."""
    return next((checkpoint_path(run_dir, name) for name in names if checkpoint_path(run_dir, name).is_file()), None)


def run_folder_of(checkpoint: Path) -> Optional[Path]:
    """The run folder a checkpoint was written into (``<run>/checkpoints/x.ckpt``), if it is one."""
    return checkpoint.parent.parent if checkpoint.parent.name == CHECKPOINT_FOLDER else None


def has_checkpoints(run_dir: Path) -> bool:
    checkpoints = run_dir / "checkpoints"
    return checkpoints.is_dir() and any(checkpoints.iterdir())


def is_inside(path: Path, folder: Path) -> bool:
    return folder.resolve() in path.resolve().parents


@contextmanager
def claimed(run_dir: Path, resume_from: Optional[Path]) -> Iterator[None]:
    """Hold ``run_dir`` for this run, or refuse it (one line) having written nothing into it.

    A run may only write into an empty folder, or into its own: the run it continues from one of
    the folder's checkpoints. Anything else there (another run's checkpoints or logs, a run killed
    before its first checkpoint, other files) is refused rather than overwritten. A lock keeps a
    second live process out.
    """
    busy = f"another run is training in {run_dir} right now; wait for it to finish or choose another hydra.run.dir"
    if is_locked(run_dir):
        raise FolderRefused(busy)
    if resume_from is None or not is_inside(resume_from, run_dir):
        refuse_folder_of_another_run(run_dir, resume_from)
    with folder_lock(run_dir, busy):
        yield


def refuse_folder_of_another_run(run_dir: Path, resume_from: Optional[Path]) -> None:
    """A fresh run, or one continued from another folder's checkpoint, needs an empty ``run_dir``."""
    held = sorted(entry.name + ("/" if entry.is_dir() else "") for entry in folder_entries(run_dir))
    if not held:
        return
    listing = ", ".join(held[:4]) + (", ..." if len(held) > 4 else "")
    if resume_from is not None:
        own_run = " (or pass resume=last to continue that folder's own run)" if has_checkpoints(run_dir) else ""
        raise FolderRefused(
            f"resume={resume_from} continues a run from another folder, but {run_dir} already holds {listing}; "
            f"continue it in a new hydra.run.dir{own_run}"
        )
    if has_checkpoints(run_dir):
        raise FolderRefused(
            f"{run_dir / 'checkpoints'} already holds checkpoints; pass resume=last to continue that run "
            "or choose another hydra.run.dir"
        )
    raise FolderRefused(
        f"{run_dir} already holds {listing} (a run that stopped before its first checkpoint, or other files); "
        "choose another hydra.run.dir, or move those files away"
    )


def folder_entries(folder: Path) -> list[Path]:
    """What ``folder`` holds besides the lock file (nothing when it does not exist)."""
    if not folder.is_dir():
        return []
    return [entry for entry in folder.iterdir() if entry.name != LOCK_FILE]


@contextmanager
def folder_lock(folder: Path, busy_message: str) -> Iterator[None]:
    """An ``flock`` on ``folder/.lock`` for as long as the block runs; ``busy_message`` when another
    process holds it. The kernel drops it when the process ends, even on kill -9, so a crash never
    leaves the folder locked."""
    folder.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        _lock_or_refuse(descriptor, busy_message)
        yield
    finally:
        os.close(descriptor)  # releases the lock


def _lock_or_refuse(descriptor: int, busy_message: str) -> None:
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise FolderRefused(busy_message) from None


def is_locked(folder: Path) -> bool:
    """Whether a live process holds ``folder``'s lock (a run training in it). Writes nothing."""
    try:
        descriptor = os.open(folder / LOCK_FILE, os.O_RDWR)
    except FileNotFoundError:
        return False
    try:
        _lock_or_refuse(descriptor, busy_message="")
        return False
    except FolderRefused:
        return True
    finally:
        os.close(descriptor)


@contextmanager
def logging_to_file(run_dir: Path) -> Iterator[None]:
    """Also send every log record to ``run_dir/train.log`` (appended: a resumed run continues it)."""
    handler = logging.FileHandler(run_dir / LOG_FILE)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)
        handler.close()


def finite_or_none(value: Any) -> Any:
    """JSON has no NaN or infinity: such a number is written as null (recursively)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: finite_or_none(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(item) for item in value]
    return value


def write_json(path: Path, record: dict[str, Any]) -> None:
    """Strict JSON, written to a temporary file and renamed, so a reader never sees half a file."""
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(finite_or_none(record), indent=2, allow_nan=False) + "\n")
    os.replace(temporary, path)


def record_failure(run_dir: Path, error: BaseException, overrides: list[str], step: Optional[int] = None) -> None:
    """``failure.json``: why the run stopped (``status`` failed or interrupted), for people and sweep summaries."""
    path = run_dir / "failure.json"
    if path.exists():
        log.warning("replacing %s, left by an earlier attempt in this directory", path)
    lines = str(error).strip().splitlines()
    record = {
        "status": "interrupted" if isinstance(error, Interrupted) else "failed",
        "error_type": type(error).__name__,
        "reason": lines[0] if lines else type(error).__name__,
        "step": step,
        "overrides": overrides,
    }
    write_json(path, record)


def read_record(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ConfigError(f"{path} is not valid JSON ({error}); was the run killed while writing it?") from None


def run_outcome(run_dir: Path) -> dict[str, Any]:
    """How the run in ``run_dir`` ended, from the records it left: status ``ok`` (with the metrics),
    ``failed`` or ``interrupted`` (with the reason), or ``incomplete`` (no record: still running,
    killed or timed out). The newer record wins when an earlier attempt left the other."""
    recorded = [path for path in (run_dir / "metrics.json", run_dir / "failure.json") if path.is_file()]
    if not recorded:
        return {"status": "incomplete", "reason": "no metrics.json or failure.json: still running, killed or timed out"}
    latest = max(recorded, key=lambda path: path.stat().st_mtime)
    if latest.name == "failure.json":
        failure = read_record(latest)
        return {"status": failure.get("status", "failed"), "reason": f"{failure['error_type']}: {failure['reason']}"}
    return {"status": "ok", **read_record(latest)}
