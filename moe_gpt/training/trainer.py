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

from moe_gpt.config import ConfigError, RunConfig, TrainerConfig, check_cpu_devices
from moe_gpt.training.atomic_write import AtomicCheckpointIO
from moe_gpt.training.lightning_internals import launches_by_rerunning_command
from moe_gpt.training.parallel_settings import check_expert_parallel
from moe_gpt.training.sharding import check_fsdp_settings, strategy_for

log = logging.getLogger(__name__)


def build_trainer(cfg: RunConfig, loggers: list[Logger], callbacks: list[Callback]) -> L.Trainer:
    # Every checkpoint (last.ckpt, best.ckpt, the save on a stop signal) is written atomically.
    plugins: list = [AtomicCheckpointIO()]
    if SLURMEnvironment.detect():
        # Lightning's own requeue handler saves a checkpoint mid-step from inside the signal
        # handler; preemption.py saves at the end of the step instead and requeues then.
        plugins.append(SLURMEnvironment(auto_requeue=False))
    trainer = _trainer(cfg, logger=loggers or False, callbacks=callbacks, plugins=plugins)
    check_multirun_launch(trainer)
    return trainer


def check_trainer_settings(cfg: RunConfig) -> None:
    """Refuse, with one line, trainer settings Lightning would reject, before the run claims its folder.

    A Trainer with these settings and nothing attached is built and dropped: it costs milliseconds
    and touches no file. Its report of the hardware is left to the real one.
    """
    hardware_report = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    level = hardware_report.level
    hardware_report.setLevel(logging.WARNING)
    try:
        _trainer(cfg, logger=False, callbacks=[], enable_checkpointing=False, enable_progress_bar=False)
    finally:
        hardware_report.setLevel(level)


def _trainer(cfg: RunConfig, **attached) -> L.Trainer:
    check_accelerator_available(cfg.trainer)
    check_fsdp_settings(cfg.trainer)
    # expert_parallel is no Trainer argument: the fsdp strategy takes it (sharding.py).
    lightning_settings = {key: value for key, value in asdict(cfg.trainer).items() if key != "expert_parallel"}
    try:
        trainer = L.Trainer(
            **{**lightning_settings, "strategy": strategy_for(cfg.trainer)},  # fsdp: FSDP2, sharding.py
            max_epochs=-1,  # training length is max_steps; epochs just repeat the data
            check_val_every_n_epoch=None,  # validate every val_check_interval batches, across epochs
            use_distributed_sampler=False,  # TokenDataModule shards the data itself, resumably
            default_root_dir=cfg.run_dir,
            **attached,
        )
    except (MisconfigurationException, ValueError, RuntimeError) as error:
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ConfigError(f"the trainer settings do not work here: {first_line}") from None
    check_expert_parallel(cfg, trainer.world_size)
    return trainer


def check_accelerator_available(cfg: TrainerConfig) -> None:
    if cfg.accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError(
            f"trainer.accelerator={cfg.accelerator} but no CUDA GPU is available here; use trainer=cpu "
            "(or trainer.accelerator=cpu)"
        )
    if cfg.accelerator == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("trainer.accelerator=mps but this machine has no Apple GPU; use trainer=cpu")
    if cfg.accelerator == "auto" and not (torch.cuda.is_available() or torch.backends.mps.is_available()):
        check_cpu_devices(cfg.devices, "with trainer.accelerator=auto on this machine, which has no GPU")


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
