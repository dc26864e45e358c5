"""The loss curves of a run: training loss every ``log_every_n_steps`` steps and validation loss at every
validation during fit, each with the training tokens and seconds so far (``curves.png``, ``metrics.json``'s
``val_history``). Saved in checkpoints, so a resumed run's curves begin where the first session's ended."""

from __future__ import annotations

from typing import Any

import lightning as L
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

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        """The loss of the step's last batch (averaged over processes), every log interval."""
        step = trainer.global_step
        recorded = self.train[-1]["step"] if self.train else -1
        if step == recorded or not logs_training_metrics_at(trainer, step):
            return
        loss = outputs["loss"].detach()
        if trainer.world_size > 1:
            loss = trainer.strategy.reduce(loss, reduce_op="mean")
        self.train.append({"step": step, "tokens": pl_module.tokens_seen, "loss": loss.item()})

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn != TrainerFn.FITTING or trainer.sanity_checking:
            return
        entry = {"step": trainer.global_step, "tokens": pl_module.tokens_seen, "seconds": self.clock.train_seconds}
        self.val.append({**entry, "val_loss": trainer.callback_metrics["val/loss"].item()})

    def state_dict(self) -> dict[str, Any]:
        return {"train": list(self.train), "val": list(self.val)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.train, self.val = list(state_dict["train"]), list(state_dict["val"])
