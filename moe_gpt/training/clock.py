"""The one throughput figure a run reports: training tokens per second of training time, validation left out.

Lightning's ``Timer`` times fit from its first training batch to its end and keeps the elapsed time
across a resume, but counts fit's validations as training. ``TrainingClock`` subtracts them, so its
``train_seconds`` is what a time budget and loss-against-time curves count, and its tokens/s (this
session's tokens over this session's training seconds) is what the progress bar, the loggers,
``metrics.json`` and the printed summary all show; MFU follows from it on devices with a known peak.
"""

from __future__ import annotations

import time
from typing import Any, Optional

import lightning as L
import torch
from lightning.fabric.utilities.throughput import get_available_flops
from lightning.pytorch.callbacks import Timer
from lightning.pytorch.trainer.states import TrainerFn

from moe_gpt.training.lightning_internals import logs_training_metrics_at

# Lightning precision setting -> the dtype its matmuls run in, for Lightning's peak-FLOPs table.
MATMUL_DTYPES = {"bf16-mixed": torch.bfloat16, "bf16-true": torch.bfloat16, "bf16": torch.bfloat16,
                 "16-mixed": torch.float16, "16-true": torch.float16, "16": torch.float16}  # fmt: skip


class TrainingClock(Timer):
    """Lightning's Timer, with the validations inside fit left out of the training time.

    Reads ``tokens_seen`` and ``train_flops_per_token`` from the LightningModule.
    """

    def __init__(self) -> None:
        super().__init__(verbose=False)
        self._seconds_before_this_session = 0.0  # earlier sessions of a resumed run, from the checkpoint
        self._validation_seconds = 0.0  # this session's finished validations inside fit
        self._validating = False  # a validation inside fit is running now
        self._tokens_at_start = 0
        self._peak_flops: Optional[float] = None  # all processes together; None where unknown (CPUs)
        self._logged_step = -1

    @property
    def session_seconds(self) -> float:
        """Training seconds of this session so far: its validations, the one running now included, left out."""
        running = time.monotonic() - self.start_time("validate") if self._validating else 0.0
        elapsed = self.time_elapsed("train") - self._seconds_before_this_session
        return elapsed - self._validation_seconds - running

    @property
    def train_seconds(self) -> float:
        """Training seconds of every session of this run, validation left out."""
        return self._seconds_before_this_session + self.session_seconds

    def tokens_per_sec(self, pl_module: L.LightningModule) -> float:
        """This session's training tokens (all processes) per training second."""
        seconds = self.session_seconds
        return (pl_module.tokens_seen - self._tokens_at_start) / seconds if seconds > 0 else 0.0

    def mfu(self, pl_module: L.LightningModule) -> Optional[float]:
        """Achieved training FLOP/s over the devices' peak (Lightning's table); None where the peak is unknown."""
        if not self._peak_flops:
            return None
        return pl_module.train_flops_per_token * self.tokens_per_sec(pl_module) / self._peak_flops

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._tokens_at_start = pl_module.tokens_seen
        self._peak_flops = peak_flops(trainer)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        # Only where Lightning logs: a value logged goes to the device and is read back (not prog_bar: Lightning
        # would read it again after every batch; console.py shows it).
        if trainer.global_step == self._logged_step or not logs_training_metrics_at(trainer, trainer.global_step):
            return
        self._logged_step = trainer.global_step  # once, not again for the first batches of an accumulated next step
        pl_module.log("train/tokens_per_sec", self.tokens_per_sec(pl_module))
        mfu = self.mfu(pl_module)
        if mfu is not None:
            pl_module.log("train/mfu", mfu)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_start(trainer, pl_module)
        # The sanity check runs before training starts, and a validate() after fit is not inside it.
        self._validating = trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if self._validating:
            self._validation_seconds += self.time_elapsed("validate")
            self._validating = False

    def state_dict(self) -> dict[str, Any]:
        # Timer's own format, its training entry without validation: Timer.load_state_dict resumes from it.
        state = super().state_dict()
        state["time_elapsed"]["train"] = self.train_seconds
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._seconds_before_this_session = state_dict["time_elapsed"]["train"]


def peak_flops(trainer: L.Trainer) -> Optional[float]:
    """The peak FLOP/s of all the run's devices together in its matmul dtype, from Lightning's table of
    devices; None where the device is not in it (CPUs, and GPUs whose name it does not match)."""
    dtype = MATMUL_DTYPES.get(str(trainer.precision), torch.float32)
    peak = get_available_flops(trainer.strategy.root_device, dtype)
    return peak * trainer.world_size if peak else None
