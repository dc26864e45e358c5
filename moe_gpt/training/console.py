"""What a run prints: each Lightning message once, no advertisements, an 80-column step progress bar on a
terminal, and plain progress lines in train.log (and on a console that is not a terminal)."""

import logging
import time
import warnings
from datetime import timedelta
from typing import Optional

import lightning as L
from lightning.pytorch.callbacks import Callback, RichProgressBar
from lightning.pytorch.callbacks.progress.rich_progress import BatchesProcessedColumn, CustomBarColumn
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_only
from rich.console import Console
from rich.progress import ProgressColumn, Task
from rich.text import Text

from moe_gpt.training.clock import TrainingClock
from moe_gpt.training.history import LossHistory
from moe_gpt.training.lightning_internals import logs_training_metrics_at

PROGRESS_LOGGER = "moe_gpt.progress"
progress_log = logging.getLogger(PROGRESS_LOGGER)

# Lightning's info lines that advertise other products; nothing in them is about this run.
_ADVERT_PREFIX = "💡 Tip:"


class _DropAdverts(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_ADVERT_PREFIX)


def tidy_lightning_logging() -> None:
    """Call after Hydra has configured logging (inside the task function).

    The ``lightning`` package gives its logger a console handler of its own *and* lets records
    propagate to the root logger that Hydra configures, so every Lightning message appeared twice.
    Without its handler, each message goes through Hydra's handlers once: the console and train.log.
    """
    # Imported before any logging was configured (a comparison's runs are forked from a server that imported
    # Lightning first), its packages also stop their records from propagating: undone, so that every message
    # reaches Hydra's handlers once wherever Lightning was imported.
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        lightning_logger = logging.getLogger(name)
        for handler in list(lightning_logger.handlers):
            lightning_logger.removeHandler(handler)
        lightning_logger.propagate = True
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_DropAdverts())
    # Lightning 2.6 calling an API that torch 2.13 deprecated: nothing a user can act on.
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
    # torchdata 0.11's StatefulDataLoader calling an API that torch 2.13 deprecated: the same.
    warnings.filterwarnings("ignore", message="'set_vital' is deprecated")
    # Lightning warns whenever checkpoints/ is not empty, resumes included; run_folder.py decides who writes there.
    warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")


class RemainingTimeColumn(ProgressColumn):
    """``eta 0:01:05``: the time left (the elapsed time is in train.log's timestamps)."""

    max_refresh = 0.5  # no jitter

    def __init__(self, style: str):
        self.style = style
        super().__init__()

    def render(self, task: Task) -> Text:
        remaining = task.time_remaining
        return Text(
            "eta " + ("-:--:--" if remaining is None else str(timedelta(seconds=int(remaining)))), style=self.style
        )


class StepDescriptionColumn(ProgressColumn):
    """``train`` for the training bar (Lightning's ``Epoch 0/-2`` means nothing when runs end at max_steps),
    Lightning's own description (``Validation``) for the others."""

    def __init__(self, bar: RichProgressBar):
        self.bar = bar
        super().__init__()

    def render(self, task: Task) -> Text:
        description = "train" if task.id == self.bar.train_progress_bar_id else task.description
        return Text(description, style="progress.description")


class StepProgressBar(RichProgressBar):
    """Lightning's rich bar in 80 columns: ``train ━━━━━━━━━━━━ 120/250 eta 0:01:05 loss: 3.812 tok/s: 2,216 val: 3.922``.

    Only the step, the time left, the training loss, tokens/s and the last validation loss are shown
    (no ``v_num``, no epoch: runs end at ``max_steps``); everything else goes to the loggers. The loss and
    tokens/s are those of the last logging step (every ``trainer.log_every_n_steps``).
    """

    SHOWN = {
        "train/loss": ("loss", "{:.3f}"),
        "train/tokens_per_sec": ("tok/s", "{:,.0f}"),
        "val/loss": ("val", "{:.3f}"),
    }
    # Logged at logging steps only and not as progress-bar values, which Lightning reads after every batch:
    # read here once per logging step.
    TRAINING = ("train/loss", "train/tokens_per_sec")
    BAR_WIDTH = 12

    def __init__(self) -> None:
        super().__init__()
        self._training: dict[str, float] = {}
        self._read_at_step = -1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step != self._read_at_step and logs_training_metrics_at(trainer, step):
            self._read_at_step = step
            logged = trainer.callback_metrics
            self._training = {key: float(logged[key]) for key in self.TRAINING if key in logged}
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def get_metrics(self, trainer, pl_module) -> dict[str, str]:
        metrics = {**self._training, **super().get_metrics(trainer, pl_module)}
        return {label: fmt.format(float(metrics[key])) for key, (label, fmt) in self.SHOWN.items() if key in metrics}

    def configure_columns(self, trainer) -> list:
        return [
            StepDescriptionColumn(self),
            CustomBarColumn(
                bar_width=self.BAR_WIDTH,
                complete_style=self.theme.progress_bar,
                finished_style=self.theme.progress_bar_finished,
                pulse_style=self.theme.progress_bar_pulse,
            ),
            BatchesProcessedColumn(style=self.theme.batch_progress),
            RemainingTimeColumn(style=self.theme.time),
        ]


class ProgressLog(Callback):
    """Plain lines for train.log, ``nohup``, ``| tee`` and SLURM's ``.out`` files, where no bar is drawn::

        step 120/250  loss 3.812  2,216 tokens/s  eta 0:01:05
        step 150/250  val loss 3.745 (best 3.745)

    A training line at every logging step (``trainer.log_every_n_steps``), from the loss ``LossHistory`` read
    there (nothing else is read from the device), and a line after every validation during fit. On a terminal
    the progress bar shows the same, so these lines go to train.log only.

    Must come after ``history`` in the callback list: it prints the point that callback has just recorded.
    """

    def __init__(self, clock: TrainingClock, history: LossHistory):
        self.clock, self.history = clock, history
        self._started = 0.0
        self._first_step = 0
        self._printed_step = -1
        self._hidden_from: list[logging.Handler] = []

    @rank_zero_only
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._started, self._first_step = time.monotonic(), trainer.global_step
        if trainer.progress_bar_callback is not None and Console().is_terminal:  # rich's own test for a live bar
            self._hidden_from = console_handlers()
            for handler in self._hidden_from:
                handler.addFilter(_drop_progress_lines)

    @rank_zero_only
    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for handler in self._hidden_from:
            handler.removeFilter(_drop_progress_lines)
        self._hidden_from = []

    @rank_zero_only
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        point = self.history.train[-1] if self.history.train else None
        if point is None or point["step"] != trainer.global_step or point["step"] == self._printed_step:
            return
        self._printed_step = step = point["step"]
        progress_log.info(
            "step %d/%d  loss %.3f  %s tokens/s  eta %s",
            step,
            trainer.max_steps,
            point["loss"],
            f"{self.clock.tokens_per_sec(pl_module):,.0f}",
            self._time_left(step, trainer.max_steps) or "-:--:--",
        )

    @rank_zero_only
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn != TrainerFn.FITTING or trainer.sanity_checking or not self.history.val:
            return
        point = self.history.val[-1]
        best = min(entry["val_loss"] for entry in self.history.val)
        progress_log.info(
            "step %d/%d  val loss %.3f (best %.3f)", point["step"], trainer.max_steps, point["val_loss"], best
        )

    def _time_left(self, step: int, max_steps: int) -> Optional[str]:
        """This session's seconds per step so far (validations included) times the steps left."""
        done = step - self._first_step
        if done <= 0:
            return None
        seconds = (time.monotonic() - self._started) / done * (max_steps - step)
        return str(timedelta(seconds=int(seconds)))


def console_handlers() -> list[logging.Handler]:
    """The root logger's handlers that write to a stream (Hydra's console), not to a file (train.log)."""
    return [
        handler
        for handler in logging.getLogger().handlers
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler)
    ]


def _drop_progress_lines(record: logging.LogRecord) -> bool:
    return record.name != PROGRESS_LOGGER
