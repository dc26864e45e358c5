"""A run's steady-state speed and each step's loss, for checks that train a few steps (``make gpu-check``).

The run's own figure (``TrainingClock``) counts every step from the first, so a short compiled run's
tokens/s is mostly compile time. ``StepTimer`` times the steps after ``warmup_steps`` only: from the end
of step ``warmup_steps`` to the end of the last step, with the device synchronised at those two points
alone, so the steps in between queue work as they do in any run.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from moe_gpt.training.clock import peak_flops


@dataclass(frozen=True)
class StepTiming:
    strategy: str  # the Lightning strategy's class name
    steps: int  # optimizer steps trained
    warmup_steps: int  # steps before the timed ones (compilation, allocator, kernel selection)
    warmup_seconds: float  # from the start of training to the end of the warm-up steps
    step_seconds: float  # mean over the timed steps
    tokens_per_sec: float  # over the timed steps, all processes
    train_flops_per_token: float
    peak_flops: Optional[float]  # the devices' peak (Lightning's table); None where unknown
    losses: list[float]  # each training batch's loss (one a step without gradient accumulation)

    def mfu(self, peak_flops: Optional[float] = None) -> Optional[float]:
        """Over the timed steps, against ``peak_flops`` (default: Lightning's figure); None without a peak."""
        peak = peak_flops or self.peak_flops
        return self.train_flops_per_token * self.tokens_per_sec / peak if peak else None


class StepTimer(Callback):
    """Times the steps after the first ``warmup_steps`` and keeps each batch's loss; ``timing`` holds the result
    once a run trained to ``trainer.max_steps``, past the warm-up."""

    def __init__(self, warmup_steps: int) -> None:
        self.warmup_steps = warmup_steps
        self.timing: Optional[StepTiming] = None
        self._losses: list[torch.Tensor] = []
        self._marks: dict[str, tuple[float, int, int]] = {}  # "start", "warm", "end" -> (seconds, step, tokens)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._mark("start", trainer, pl_module)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        # Kept on the device and read once at the end: .item() here would make every step wait for the device.
        self._losses.append(outputs["loss"].detach())
        step = trainer.global_step
        if step == self.warmup_steps and "warm" not in self._marks:  # the first batch that ended that step
            self._mark("warm", trainer, pl_module)
        elif step == trainer.max_steps and step > self.warmup_steps:
            self._mark("end", trainer, pl_module)  # before validation and the last checkpoint, which follow it

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if "end" not in self._marks:
            return
        started, _, _ = self._marks["start"]
        warm_seconds, warm_step, warm_tokens = self._marks["warm"]
        end_seconds, end_step, end_tokens = self._marks["end"]
        self.timing = StepTiming(
            strategy=type(trainer.strategy).__name__,
            steps=end_step,
            warmup_steps=warm_step,
            warmup_seconds=warm_seconds - started,
            step_seconds=(end_seconds - warm_seconds) / (end_step - warm_step),
            tokens_per_sec=(end_tokens - warm_tokens) / (end_seconds - warm_seconds),
            train_flops_per_token=pl_module.train_flops_per_token,
            peak_flops=peak_flops(trainer),
            losses=torch.stack(self._losses).float().tolist(),
        )

    def _mark(self, name: str, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._marks[name] = (_device_time(pl_module.device), trainer.global_step, pl_module.tokens_seen)


def _device_time(device: torch.device) -> float:
    """``time.perf_counter()`` once the work queued on ``device`` has run."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()
