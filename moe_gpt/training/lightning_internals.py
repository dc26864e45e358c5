"""Every private Lightning and W&B name this project relies on, in one place.

Each has no public equivalent in the versions below; each function says why it is needed.
tests/test_lightning_internals.py pins them: it fails, naming the version, when an upgrade moves one.
"""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.fabric.utilities.seed import _collect_rng_states, _set_rng_states
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher

WRITTEN_FOR = {"lightning": "2.6.6", "wandb": "0.31.0"}


def collect_rng_states() -> dict[str, Any]:
    """This process's torch, CUDA, numpy and Python random states: Lightning's own collection (its spawn
    launcher and ``isolate_rng`` use it), which it exports only under a private name."""
    return _collect_rng_states(include_cuda=True)


def set_rng_states(states: dict[str, Any]) -> None:
    """The counterpart of ``collect_rng_states`` (accepts Python's state with lists where tuples were)."""
    _set_rng_states(states)


def launches_by_rerunning_command(trainer: L.Trainer) -> bool:
    """Whether Lightning starts the run's other processes by re-running this command line.

    Only the launcher's class tells: Lightning's subprocess-script launcher re-runs ``sys.argv``,
    its spawn launcher does not, and neither says so through a public attribute.
    """
    launcher = trainer.strategy.launcher
    return isinstance(launcher, _SubprocessScriptLauncher) and not launcher.cluster_environment.creates_processes_externally


def shard_over_every_process(strategy: ModelParallelStrategy) -> None:
    """Put every process in ModelParallelStrategy's one data-parallel group (FSDP2 only, no tensor parallelism).

    The strategy takes its group sizes when built, before Lightning resolves ``trainer.devices`` (auto,
    -1, a list of ids) into processes, and its "auto" means one group per node (tensor parallelism
    within a node). Called once the processes are known (``setup_environment``), through its private size.
    """
    strategy._data_parallel_size = strategy.num_nodes * strategy.num_processes


def validation_follows(trainer: L.Trainer) -> bool:
    """Whether Lightning validates right after the current training batch.

    Lightning's rule for an integer ``val_check_interval`` with ``check_val_every_n_epoch=None``; it
    decides inside its training-epoch loop and exposes no public "validation is next".
    """
    return (trainer.fit_loop.epoch_loop.total_batch_idx + 1) % trainer.val_check_batch == 0


def logs_training_metrics_at(trainer: L.Trainer, step: int) -> bool:
    """Whether Lightning writes the training metrics to the loggers at the end of optimizer step ``step``.

    Its rule (``_LoggerConnector.should_update_logs``, counting steps with its private
    ``_batches_that_stepped``): every ``log_every_n_steps``-th step. A training step reads values on the
    host only at these steps (moe_gpt/training/divergence.py). Step 0 is no optimizer step: the first batches of
    an accumulated first step end with ``global_step`` 0.
    """
    return step > 0 and step % trainer.log_every_n_steps == 0


def skip_per_batch_sigterm_broadcast(trainer: L.Trainer) -> None:
    """Lightning 2.6 broadcasts from rank 0, before every training batch of a multi-process run, whether its
    SIGTERM handler has fired, and reads the result on the host: a collective and a wait for the device at
    every batch. preemption.py replaces that handler for the whole of training, so the flag never changes:
    the broadcast is switched off for this fit (a method of the private epoch loop; no setting turns it off)."""
    trainer.fit_loop.epoch_loop._broadcast_sigterm_tensor = lambda: None


def drop_wandb_anonymous_setting(logger: WandbLogger) -> None:
    """Lightning always passes ``anonymous=None`` to ``wandb.init``, and wandb 0.31 warns on every run that
    the setting has no effect. The keyword arguments WandbLogger hands to ``wandb.init`` are private."""
    logger._wandb_init.pop("anonymous", None)
