"""The Lightning Trainer for a RunConfig, with every setting Lightning would reject turned into one line."""

from __future__ import annotations

import logging
from dataclasses import asdict

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from moe_gpt.config import ConfigError, RunConfig, TrainerConfig
from moe_gpt.training.atomic_write import AtomicCheckpointIO
from moe_gpt.training.lightning_internals import launches_by_rerunning_command

log = logging.getLogger(__name__)


def build_trainer(cfg: RunConfig, loggers: list[Logger], callbacks: list[Callback]) -> L.Trainer:
    check_accelerator_available(cfg.trainer)
    # Every checkpoint (last.ckpt, best.ckpt, the save on a stop signal) is written atomically.
    plugins: list = [AtomicCheckpointIO()]
    if SLURMEnvironment.detect():
        # Lightning's own requeue handler saves a checkpoint mid-step from inside the signal
        # handler; preemption.py saves at the end of the step instead and requeues then.
        plugins.append(SLURMEnvironment(auto_requeue=False))
    try:
        trainer = L.Trainer(
            **asdict(cfg.trainer),
            max_epochs=-1,  # training length is max_steps; epochs just repeat the data
            check_val_every_n_epoch=None,  # validate every val_check_interval batches, across epochs
            use_distributed_sampler=False,  # TokenDataModule shards the data itself, resumably
            default_root_dir=cfg.run_dir,
            logger=loggers or False,
            callbacks=callbacks,
            plugins=plugins,
        )
    except (MisconfigurationException, ValueError, RuntimeError) as error:
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ConfigError(f"the trainer settings do not work here: {first_line}") from None
    check_multirun_launch(trainer)
    return trainer


def check_accelerator_available(cfg: TrainerConfig) -> None:
    if cfg.accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError(
            f"trainer.accelerator={cfg.accelerator} but no CUDA GPU is available here; use trainer=cpu "
            "(or trainer.accelerator=cpu)"
        )
    if cfg.accelerator == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("trainer.accelerator=mps but this machine has no Apple GPU; use trainer=cpu")


def check_multirun_launch(trainer: L.Trainer) -> None:
    """A sweep (``-m``) cannot start extra processes by re-running its own command line."""
    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return
    if launches_by_rerunning_command(trainer):
        raise ConfigError(
            f"-m with {trainer.world_size} processes per job: Lightning starts the extra processes by re-running "
            "this command line, which would start the whole sweep again in each; run each job without -m, or sweep "
            "with hydra/launcher=slurm (one SLURM task per device)"
        )
