"""What a run prints: each Lightning message once, no advertisements, a step-based progress bar."""

import logging
import warnings

from lightning.pytorch.callbacks import RichProgressBar

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
    lightning_logger = logging.getLogger("lightning")
    for handler in list(lightning_logger.handlers):
        lightning_logger.removeHandler(handler)
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_DropAdverts())
    # Lightning 2.6 calling an API that torch 2.13 deprecated: nothing a user can act on.
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
    # torchdata 0.11's StatefulDataLoader calling an API that torch 2.13 deprecated: the same.
    warnings.filterwarnings("ignore", message="'set_vital' is deprecated")
    # Lightning warns whenever checkpoints/ is not empty, resumes included; run_dir.py decides who writes there.
    warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")


class StepProgressBar(RichProgressBar):
    """Lightning's rich bar without the epoch limit in its label.

    Runs end at ``max_steps`` with ``max_epochs=-1``, which the stock label shows as ``Epoch 0/-2``;
    the bar's own count already runs to ``max_steps``.
    """

    def _get_train_description(self, current_epoch: int) -> str:
        return f"{f'Epoch {current_epoch}':{len(self.validation_description)}}"
