"""Writing a file so that a kill at any moment leaves its previous version or its new one, never a part.

The new bytes go to a temporary file in the target's own folder, are flushed to disk, and replace
the target with one ``os.replace`` (a rename within one filesystem, which is atomic); the folder is
then synced so the rename itself survives a crash. Lightning's own save instead writes its temporary
file in TMPDIR, and when that is another filesystem (a tmpfs) the final move is a copy straight into
the target: a kill during it leaves a partial ``last.ckpt``.

``AtomicCheckpointIO`` routes every checkpoint Lightning writes (``last.ckpt``, ``best.ckpt``, the
save on a stop signal) through ``replacing``; the CSV log uses it for its rewrites (loggers.py).
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Optional, Union

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

TEMP_SUFFIX = ".moe-gpt-partial"  # ".<target name>.<random>" + this: hidden, and never a *.ckpt or *.csv


def temp_files(folder: Path) -> list[Path]:
    """The temporary files ``replacing`` left in ``folder`` when its process was killed mid-write."""
    return sorted(folder.glob(f".*{TEMP_SUFFIX}"))


@contextmanager
def replacing(target: Path) -> Iterator[IO[bytes]]:
    """A binary file to write ``target``'s new content into; it becomes ``target`` when the block ends without error.

    Temporary files that killed writes left in the folder are removed first. Only one process writes
    into a folder at a time (the run folder's lock; rank zero alone saves checkpoints), so any such
    file is a leftover, not another write in progress.
    """
    folder = target.parent
    folder.mkdir(parents=True, exist_ok=True)
    for leftover in temp_files(folder):
        leftover.unlink(missing_ok=True)
    temp = folder / f".{target.name}.{secrets.token_hex(4)}{TEMP_SUFFIX}"
    try:
        with open(temp, "wb") as file:
            yield file
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp, target)
    except BaseException:
        temp.unlink(missing_ok=True)  # a failed write (disk full, an exception) leaves the old target alone
        raise
    sync_folder(folder)


def sync_folder(folder: Path) -> None:
    """Flush the folder's entries to disk, so a renamed file is there after a power loss too."""
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``torch.save`` checkpoints, written through ``replacing``; loading is Lightning's own."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Union[str, Path], storage_options: Optional[Any] = None
    ) -> None:
        if storage_options is not None:
            raise TypeError("storage_options are not supported when saving moe-gpt checkpoints")
        with replacing(Path(path)) as file:
            torch.save(checkpoint, file)
