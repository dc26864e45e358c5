"""Writing checkpoints a run can continue from exactly: when last.ckpt is written, and what it holds
beyond Lightning's own state (model, optimizer, schedule, loop and data-loader position).

- ``BestCheckpoint``: ``best.ckpt``, the lowest validation loss so far, also across a moved folder.
- ``LastCheckpoint``: ``last.ckpt`` every ``checkpoint.every_n_steps`` optimizer steps and at the
  last step, whatever validation does (``best.ckpt`` follows validation, see run.py).
- ``RNGStateCallback``: the torch, CUDA, numpy and Python random states, so dropout masks after a
  resume are the ones the uninterrupted run would have drawn.
- ``RunRecordCallback``: the command-line overrides and settings of the run (resume.py reads them).

Every write goes through Lightning's ``trainer.save_checkpoint`` and the Trainer's ``AtomicCheckpointIO``
(atomic_write.py): to a temporary file beside the target, synced, then renamed over it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, Checkpoint, ModelCheckpoint

from moe_gpt.training.lightning_internals import collect_rng_states, set_rng_states, validation_follows
from moe_gpt.training.resume import RUN_RECORD
from moe_gpt.training.run_folder import CHECKPOINT_FOLDER


class BestCheckpoint(ModelCheckpoint):
    """``checkpoints/best.ckpt``: the state at the lowest ``val/loss`` so far.

    Lightning restores the best score only when the checkpoint names the same folder path; in a run
    folder that was moved or copied it would forget it, and the next validation would replace
    ``best.ckpt`` even with a worse model. The saved paths are moved onto this folder instead. A run
    continued from another folder's checkpoint starts afresh: that folder's ``best.ckpt`` is not here.
    """

    def __init__(self, run_dir: Path, continues_this_folder: bool, weights_only: bool = False):
        super().__init__(
            dirpath=run_dir / CHECKPOINT_FOLDER, filename="best", monitor="val/loss", mode="min", save_top_k=1,
            save_weights_only=weights_only,
        )  # fmt: skip
        self.continues_this_folder = continues_this_folder

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not self.continues_this_folder:
            return
        saved_dir = state_dict.get("dirpath")
        if saved_dir and saved_dir != self.dirpath:
            state_dict = paths_moved(state_dict, saved_dir, self.dirpath)
        super().load_state_dict(state_dict)


def paths_moved(state: dict[str, Any], old_dir: str, new_dir: str) -> dict[str, Any]:
    """ModelCheckpoint's state with every path under ``old_dir`` moved under ``new_dir``."""

    def moved(path: Any) -> Any:
        return new_dir + path[len(old_dir) :] if isinstance(path, str) and path.startswith(old_dir) else path

    return {
        **{key: moved(value) for key, value in state.items()},
        "best_k_models": {moved(path): score for path, score in state.get("best_k_models", {}).items()},
    }


class LastCheckpoint(Checkpoint):
    """``last.ckpt`` at every N-th optimizer step and at ``max_steps``; with ``weights_only``
    (``checkpoint.save_weights_only``) without the optimizer, schedule and callback states."""

    def __init__(self, path: Path, every_n_steps: int, weights_only: bool = False):
        self.path, self.every_n_steps, self.weights_only = path, every_n_steps, weights_only
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
            save_checkpoint_and_logs(trainer, self.path, self.weights_only)
        self._saved_step = step

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._due_after_validation and not trainer.sanity_checking:
            self._due_after_validation = False
            save_checkpoint_and_logs(trainer, self.path, self.weights_only)


def save_checkpoint_and_logs(trainer: L.Trainer, path: Path, weights_only: bool = False) -> None:
    """Write a checkpoint (by default the full state: optimizer, loops, callbacks), and flush the loggers so
    their files hold every step it covers."""
    trainer.save_checkpoint(path, weights_only=weights_only)
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
            set_rng_states(self._to_restore[trainer.global_rank])
        self._to_restore = None


def _rng_state() -> dict[str, Any]:
    state = collect_rng_states()
    # numpy's key array as plain ints (np.random.set_state takes a list), so checkpoints load with weights_only=True.
    kind, keys, *rest = state["numpy"]
    return {**state, "numpy": [kind, keys.tolist(), *rest]}


class RunRecordCallback(Callback):
    """Stores the run's record (overrides, settings, W&B id) in every checkpoint."""

    def __init__(self, record: dict[str, Any]):
        self.record = record

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        checkpoint[RUN_RECORD] = {**self.record, "world_size": trainer.world_size}
