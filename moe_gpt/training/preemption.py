"""Stopping on a signal without losing work: finish the optimizer step, save ``last.ckpt``, exit.

SIGTERM (a scheduler's preemption, ``kill``) and SIGINT (Ctrl-C) are the stop signals. Before
training starts (tokenising, building the model) they stop the run at once: nothing is lost. During
training they are deferred to the end of the current optimizer step, where ``last.ckpt`` is saved
and ``Interrupted`` is raised; ``resume=last`` then continues exactly.

SIGUSR1 and SIGUSR2 are the signals SLURM sends ahead of a time limit (Lightning asks for USR1,
submitit for USR2). During training they stop the run the same way, and then whatever handled the
signal before training (submitit's requeue) is called, or the job is requeued with ``scontrol
requeue``; the requeued job resumes from ``last.ckpt`` (``SLURM_RESTART_COUNT``, see training/resume.py).

With several processes a signal may reach only some of them, and all must stop after the same step: they
agree with a collective, which makes every process wait for the others and for its device. So they agree
only at the steps that log training metrics (every ``trainer.log_every_n_steps``) and at the last step: a
multi-process run stops up to ``log_every_n_steps - 1`` steps later than one process would.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional

import lightning as L

from moe_gpt.training.checkpoint_callbacks import save_checkpoint_and_logs
from moe_gpt.training.lightning_internals import (
    logs_training_metrics_at,
    skip_per_batch_sigterm_broadcast,
    validation_follows,
)
from moe_gpt.errors import Interrupted

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
REQUEUE_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)


@contextmanager
def stop_signals_raise() -> Iterator[None]:
    """Within this block a stop signal raises ``Interrupted`` where the program is (nothing to save yet)."""

    def handler(signum: int, frame: Any) -> None:
        raise Interrupted(signum, step=None)

    previous = {signum: signal.signal(signum, handler) for signum in STOP_SIGNALS}
    try:
        yield
    finally:
        for signum, handler_before in previous.items():
            signal.signal(signum, handler_before)


class StopAtStepEnd(L.Callback):
    """During training: a stop or requeue signal ends the run after the current optimizer step, saved."""

    def __init__(self, last_checkpoint: Path):
        self.last_checkpoint = last_checkpoint
        self.received: Optional[int] = None
        self._handlers_before: dict[int, Any] = {}
        self._steps_seen = -1
        self._stop_after_validation = False
        self._stop_before_next_batch = False

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Installed here, after Lightning's own SIGTERM handler (which stops mid-accumulation and
        # saves nothing); Lightning's teardown restores the handlers from before the run.
        self._steps_seen = trainer.global_step
        for signum in STOP_SIGNALS + REQUEUE_SIGNALS:
            self._handlers_before[signum] = signal.signal(signum, self._record)
        skip_per_batch_sigterm_broadcast(trainer)  # it broadcasts what the handler replaced here would have noted

    def _record(self, signum: int, frame: Any) -> None:
        if self.received is None:
            log.warning("%s received: stopping after this optimizer step", signal.Signals(signum).name)
        self.received = signum

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self._steps_seen:
            return  # inside gradient accumulation: the optimizer step is not finished yet
        self._steps_seen = trainer.global_step
        stop = self.received is not None
        if trainer.world_size > 1:  # a signal may reach one process only; all stop at the same step
            if not self._agreeing_at(trainer, trainer.global_step):
                return
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if not stop:
            return
        if validation_follows(trainer):  # the validation of this step goes into the checkpoint too
            self._stop_after_validation = True
        else:
            self._save(trainer)
            self._stop_before_next_batch = True  # once Lightning has logged this step's metrics

    @staticmethod
    def _agreeing_at(trainer: L.Trainer, step: int) -> bool:
        return logs_training_metrics_at(trainer, step) or step >= trainer.max_steps

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._stop_after_validation and not trainer.sanity_checking:
            self._save(trainer)
            self._stop(trainer)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx) -> None:
        if self._stop_before_next_batch:
            self._stop(trainer)

    def _save(self, trainer: L.Trainer) -> None:
        save_checkpoint_and_logs(trainer, self.last_checkpoint)
        log.warning("saved %s at step %d", self.last_checkpoint, trainer.global_step)

    def _stop(self, trainer: L.Trainer) -> None:
        for logger in trainer.loggers:
            logger.save()
        signum = self.received or signal.SIGTERM  # another process received it
        if signum in REQUEUE_SIGNALS and trainer.is_global_zero:
            self._hand_over_for_requeue(signum)
        raise Interrupted(signum, trainer.global_step)

    def _hand_over_for_requeue(self, signum: int) -> None:
        """Let the handler from before training requeue the job (submitit), else ask SLURM directly."""
        before = self._handlers_before.get(signum)
        if callable(before):
            before(signum, None)
        elif os.environ.get("SLURM_JOB_ID"):
            job = os.environ.get("SLURM_ARRAY_JOB_ID")
            job_id = f"{job}_{os.environ['SLURM_ARRAY_TASK_ID']}" if job else os.environ["SLURM_JOB_ID"]
            result = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True)
            outcome = "requeued" if result.returncode == 0 else f"could not be requeued ({result.stderr.strip()})"
            log.warning("SLURM job %s %s", job_id, outcome)
