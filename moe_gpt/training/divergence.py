"""Divergence caught without making every step wait on the host.

Reading ``isfinite(loss)`` on the host at every step would make the host wait for the device each
time. Instead the device notes the first step whose loss or gradients were not finite, and from that
step on every optimizer update is skipped on the device: AdamW runs fused and reads its ``found_inf``
flag there, as it does under a gradient scaler, so the weights, both moment estimates and the step
count stay exactly as they were before that step (the learning-rate schedule still advances: it
counts on the host). The host reads the note only where it reads values anyway: at the steps that
log training metrics, before any checkpoint is written and before expert statistics are logged. The
run then stops with ``Diverged`` naming the first bad step, at most ``trainer.log_every_n_steps``
steps after it, holding the weights from before it; no checkpoint or log ever sees a non-finite value.
"""

from __future__ import annotations

import math
from typing import Optional

import lightning as L
import torch
from torch import Tensor
from torch.distributed.tensor import DTensor

from moe_gpt.errors import Diverged

NO_STEP = torch.iinfo(torch.int64).max  # "no non-finite step yet": the largest step, so the minimum over processes wins


class NonFiniteWatch:
    """The first optimizer step with a non-finite loss or gradient, and the loss then, kept on the device."""

    def __init__(self) -> None:
        self._step: Optional[Tensor] = None  # int64, NO_STEP until a step goes bad
        self._loss: Optional[Tensor] = None  # float32: this process's loss at that step
        self._last_loss: Optional[Tensor] = None  # the latest batch's, for a step whose gradients alone go bad

    def observe_loss(self, loss: Tensor, step: int) -> None:
        """A batch's loss, looked at on the device only."""
        self._last_loss = loss.detach().float()
        self._note(~torch.isfinite(self._last_loss), step)

    def observe_gradients(self, gradients: list[Tensor], step: int) -> None:
        """The gradients an optimizer step is about to apply; their largest magnitude is NaN or inf exactly when
        one is. Under DDP they are already averaged over the processes, so every process notes the same. Under
        FSDP each process looks at its own shard only (agreeing would take a collective at every step): a process
        whose shard stays finite keeps updating it until the logging step, where all of them stop together."""
        local = [g.to_local() if isinstance(g, DTensor) else g for g in gradients]
        largest = torch.nn.utils.get_total_norm(local, norm_type=float("inf"))
        self._note(~torch.isfinite(largest), step)

    def _note(self, bad: Tensor, step: int) -> None:
        if self._step is None:
            self._step = torch.full((), NO_STEP, dtype=torch.int64, device=bad.device)
            self._loss = torch.zeros((), dtype=torch.float32, device=bad.device)
        first = bad & (self._step == NO_STEP)
        self._step.masked_fill_(first, step)
        if self._last_loss is not None:
            self._loss.copy_(torch.where(first, self._last_loss, self._loss))

    def skip_updates(self, device: torch.device) -> Tensor:
        """1.0 from the first bad step on, else 0.0 (float32, on the device): fused AdamW's ``found_inf``."""
        if self._step is None:
            return torch.zeros((), dtype=torch.float32, device=device)
        return (self._step != NO_STEP).float()

    def raise_if_seen(self, trainer: L.Trainer, hint: str) -> None:
        """Raise ``Diverged`` if any process has seen a non-finite step: reads the note on the host, with several
        processes after one all-reduce (so every process must call this at the same point of the run)."""
        step = self._step.clone() if self._step is not None else torch.tensor(NO_STEP, device=trainer.strategy.root_device)
        if trainer.world_size > 1:
            torch.distributed.all_reduce(step, op=torch.distributed.ReduceOp.MIN)
        first_step = int(step)
        if first_step != NO_STEP:
            raise Diverged(f"training diverged: {self._what_went_bad(first_step)} at step {first_step}; {hint}", first_step)

    def _what_went_bad(self, first_step: int) -> str:
        if self._step is None or int(self._step) != first_step:
            return "the loss or the gradients were not finite on another process"
        loss = float(self._loss)
        return f"the loss is {loss}" if not math.isfinite(loss) else f"the gradients are not finite (loss {loss:.4g})"
