"""The loss curves of a run: training loss at step 0 (the first batch, before any update) and every
``log_every_n_steps`` steps, and validation loss at every validation during fit, each with the training tokens
and seconds so far (``curves.png``, ``metrics.json``'s ``train_history`` and ``val_history``). Saved in
checkpoints, so a resumed run's curves begin where the first session's ended."""

from __future__ import annotations

from typing import Any, Optional

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn

from moe_gpt.training.clock import TrainingClock
from moe_gpt.training.lightning_internals import logs_training_metrics_at


class LossHistory(Callback):
    """Must come before the callbacks that save checkpoints at validation end (preemption.py), so the
    checkpoint holds that validation's point."""

    def __init__(self, clock: TrainingClock):
        self.clock = clock
        self.train: list[dict[str, float]] = []  # {"step", "tokens", "loss"}
        self.val: list[dict[str, float]] = []  # {"step", "tokens", "seconds", "val_loss"}
        self._initial_loss: Optional[torch.Tensor] = None  # a new run's first loss, on the device until it logs
        self._first_batch = False

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._first_batch = trainer.global_step == 0  # a new run, not a resumed one

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        """The loss of the step's last batch (averaged over processes), every log interval; a new run's first
        batch's loss is kept on the device and read with the first of them, as the point at step 0."""
        step = trainer.global_step
        if self._first_batch:  # its loss was computed before any update
            self._first_batch, self._initial_loss = False, outputs["loss"].detach()
        recorded = self.train[-1]["step"] if self.train else -1
        if step == recorded or not logs_training_metrics_at(trainer, step):
            return
        if self._initial_loss is not None:
            self.train.append({"step": 0, "tokens": 0, "loss": self._averaged(trainer, self._initial_loss)})
            self._initial_loss = None
        loss = self._averaged(trainer, outputs["loss"])
        self.train.append({"step": step, "tokens": pl_module.tokens_seen, "loss": loss})

    @staticmethod
    def _averaged(trainer: L.Trainer, loss: torch.Tensor) -> float:
        loss = loss.detach()
        if trainer.world_size > 1:
            loss = trainer.strategy.reduce(loss, reduce_op="mean")
        return loss.item()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn != TrainerFn.FITTING or trainer.sanity_checking:
            return
        entry = {"step": trainer.global_step, "tokens": pl_module.tokens_seen, "seconds": self.clock.train_seconds}
        self.val.append({**entry, "val_loss": trainer.callback_metrics["val/loss"].item()})

    def state_dict(self) -> dict[str, Any]:
        return {"train": list(self.train), "val": list(self.val)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.train, self.val = list(state_dict["train"]), list(state_dict["val"])
