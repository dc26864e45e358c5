"""Writing checkpoints a run can continue from exactly: when last.ckpt is written, and what it holds
beyond Lightning's own state (model, optimizer, schedule, loop and data-loader position).

- ``LastCheckpoint``: ``last.ckpt`` every ``checkpoint.every_n_steps`` optimizer steps and at the
  last step, whatever validation does (``best.ckpt`` follows validation, see run.py).
- ``RNGStateCallback``: the torch, CUDA, numpy and Python random states, so dropout masks after a
  resume are the ones the uninterrupted run would have drawn.
- ``RunRecordCallback``: the command-line overrides and settings of the run (resume.py reads them).

Every write goes through Lightning's ``trainer.save_checkpoint``: to a temporary file, then renamed.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Optional

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, Checkpoint

from moe_gpt.training.resume import RUN_RECORD


class LastCheckpoint(Checkpoint):
    """``last.ckpt`` at every N-th optimizer step and at ``max_steps``."""

    def __init__(self, path: Path, every_n_steps: int):
        self.path, self.every_n_steps = path, every_n_steps
        self._saved_step: Optional[int] = None
        self._due_after_validation = False

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._saved_step = trainer.global_step  # a resumed run's checkpoint already holds this step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        due = step % self.every_n_steps == 0 or step >= trainer.max_steps
        if not due or step == self._saved_step:  # within gradient accumulation the step repeats
            return
        if validation_follows(trainer):
            self._due_after_validation = True
        else:
            save_checkpoint_and_logs(trainer, self.path)
        self._saved_step = step

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._due_after_validation and not trainer.sanity_checking:
            self._due_after_validation = False
            save_checkpoint_and_logs(trainer, self.path)


def validation_follows(trainer: L.Trainer) -> bool:
    """Whether Lightning validates right after the current training batch.

    A checkpoint of a step that is validated is saved after the validation: one saved before it
    would, on resume, skip that validation (Lightning does not repeat it), losing its val/loss.
    """
    # Lightning's rule for an integer val_check_interval with check_val_every_n_epoch=None (trainer.py).
    return (trainer.fit_loop.epoch_loop.total_batch_idx + 1) % trainer.val_check_batch == 0


def save_checkpoint_and_logs(trainer: L.Trainer, path: Path) -> None:
    """Write a checkpoint, and flush the loggers so their files hold every step it covers."""
    trainer.save_checkpoint(path, weights_only=False)  # the full state: optimizer, loops, callbacks
    for logger in trainer.loggers:
        logger.save()


class RNGStateCallback(Callback):
    """Saves every random number generator's state; restores it when training (re)starts.

    Restored in ``on_train_start``, after the sanity-check validation. Each process has its own
    states: all are gathered into the checkpoint and each process gets its own back.
    """

    def __init__(self) -> None:
        self._to_restore: Optional[list[dict[str, Any]]] = None

    def state_dict(self) -> dict[str, Any]:
        local = _rng_state()
        if not torch.distributed.is_available() or not torch.distributed.is_initialized():
            return {"per_process": [local]}
        gathered: list[Any] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(gathered, local)
        return {"per_process": gathered}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._to_restore = state_dict["per_process"]

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._to_restore is None:
            return
        if len(self._to_restore) == trainer.world_size:
            _set_rng_state(self._to_restore[trainer.global_rank])
        self._to_restore = None


def _rng_state() -> dict[str, Any]:
    # Plain values and tensors only, so checkpoints load with weights_only=True.
    kind, keys, position, has_gauss, cached_gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached_gauss],
        "python": random.getstate(),
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, keys, position, has_gauss, cached_gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached_gauss))
    random.setstate(_as_tuples(state["python"]))


def _as_tuples(value: Any) -> Any:
    """random.setstate wants the tuples that getstate gave (a checkpoint may hand back lists)."""
    return tuple(_as_tuples(item) for item in value) if isinstance(value, (list, tuple)) else value


class RunRecordCallback(Callback):
    """Stores the run's record (overrides, settings, W&B id) in every checkpoint."""

    def __init__(self, record: dict[str, Any]):
        self.record = record

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        checkpoint[RUN_RECORD] = {**self.record, "world_size": trainer.world_size}
