"""The private Lightning and W&B names in moe_gpt/training/lightning_internals.py, pinned to the installed
versions: when an upgrade moves one, these fail and say which version the code was written for."""

import random
from importlib.metadata import version

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.demos.boring_classes import BoringModel
from lightning.pytorch.loggers import Logger, WandbLogger
from lightning.pytorch.loops.training_epoch_loop import _TrainingEpochLoop
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_only

from moe_gpt.training.lightning_internals import (
    WRITTEN_FOR,
    collect_rng_states,
    drop_wandb_anonymous_setting,
    launches_by_rerunning_command,
    logs_training_metrics_at,
    set_rng_states,
    shard_over_every_process,
    skip_per_batch_sigterm_broadcast,
    validation_follows,
)
from moe_gpt.training.run_folder import settle_rank_before_trainer
from moe_gpt.training.sharding import FSDP2Strategy


@pytest.mark.parametrize("package", sorted(WRITTEN_FOR))
def test_the_installed_version_is_the_one_the_internals_were_checked_against(package):
    assert version(package) == WRITTEN_FOR[package], (
        f"{package} {version(package)} is installed but moe_gpt/training/lightning_internals.py was written for "
        f"{WRITTEN_FOR[package]}: check each private name there against the new version, then update WRITTEN_FOR"
    )


def draws() -> tuple:
    return torch.rand(3).tolist(), np.random.rand(3).tolist(), [random.random() for _ in range(3)]


def test_rng_states_restore_every_generator_after_a_checkpoint_round_trip(tmp_path):
    states = collect_rng_states()
    assert {"torch", "numpy", "python"} <= states.keys(), f"lightning {WRITTEN_FOR['lightning']}: keys moved"
    expected = draws()
    kind, keys, *rest = states["numpy"]
    # As RNGStateCallback stores them, read back the way checkpoints are (Python's state comes back as lists).
    torch.save({**states, "numpy": [kind, keys.tolist(), *rest]}, tmp_path / "rng.pt")
    set_rng_states(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert draws() == expected


def test_the_subprocess_launcher_is_told_apart_from_spawn_and_single_process():
    def trainer(**kwargs) -> L.Trainer:
        return L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, **kwargs)

    assert launches_by_rerunning_command(trainer(devices=2, strategy="ddp"))
    assert not launches_by_rerunning_command(trainer(devices=2, strategy="ddp_spawn"))
    assert not launches_by_rerunning_command(trainer(devices=1))


def test_every_process_of_every_node_goes_into_the_one_sharding_group():
    assert ModelParallelStrategy(data_parallel_size=5)._data_parallel_size == 5, (
        f"lightning {WRITTEN_FOR['lightning']}: ModelParallelStrategy keeps its data-parallel size elsewhere"
    )
    strategy = FSDP2Strategy()
    L.Trainer(accelerator="cpu", devices=3, num_nodes=2, strategy=strategy, logger=False, enable_progress_bar=False)
    shard_over_every_process(strategy)
    assert strategy._data_parallel_size == 6


def quiet_trainer(root, **settings) -> L.Trainer:
    """A CPU Trainer that runs to max_steps across epochs and writes nothing but what ``settings`` ask for."""
    return L.Trainer(
        accelerator="cpu", max_epochs=-1, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=root, **settings,
    )  # fmt: skip


class ValidationWatch(L.Callback):
    """Compares, batch by batch, what validation_follows predicts with what Lightning then does."""

    def __init__(self):
        self.predicted: list[bool] = []
        self.validated: list[bool] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.predicted.append(validation_follows(trainer))
        self.validated.append(False)

    def on_validation_start(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.validated[-1] = True


@pytest.mark.parametrize("accumulate", [1, 2])
def test_validation_follows_predicts_lightnings_own_validation_schedule(tmp_path, accumulate):
    watch = ValidationWatch()
    trainer = quiet_trainer(
        tmp_path,
        max_steps=7,
        val_check_interval=3,
        check_val_every_n_epoch=None,
        limit_val_batches=1,
        accumulate_grad_batches=accumulate,
        num_sanity_val_steps=0,
        logger=False,
        callbacks=[watch],
    )
    trainer.fit(BoringModel())  # 64 batches an epoch: the run crosses no epoch boundary
    assert sum(watch.validated) >= 2
    assert watch.predicted == watch.validated, f"lightning {WRITTEN_FOR['lightning']}: the validation rule moved"


class StepsLogged(Logger):
    """The optimizer steps at whose end Lightning wrote training metrics to its loggers."""

    name, version = "steps", 0

    def __init__(self):
        super().__init__()
        self.trainer = None
        self.steps: list[int] = []

    def log_metrics(self, metrics, step=None):
        if "loss" in metrics:
            self.steps.append(self.trainer.global_step)

    def log_hyperparams(self, params, *args, **kwargs):
        pass


class LoggingModel(BoringModel):
    def training_step(self, batch, batch_idx):
        output = super().training_step(batch, batch_idx)
        self.log("loss", output["loss"])
        return output


class LoggingWatch(L.Callback):
    def __init__(self):
        self.predicted: list[int] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if logs_training_metrics_at(trainer, step) and step not in self.predicted:
            self.predicted.append(step)


@pytest.mark.parametrize("accumulate", [1, 2])
def test_logs_training_metrics_at_predicts_lightnings_own_logging_steps(tmp_path, accumulate):
    logger, watch = StepsLogged(), LoggingWatch()
    trainer = quiet_trainer(
        tmp_path, max_steps=10, log_every_n_steps=3, limit_val_batches=0, accumulate_grad_batches=accumulate,
        logger=logger, callbacks=[watch],
    )  # fmt: skip
    logger.trainer = trainer
    trainer.fit(LoggingModel())
    assert logger.steps == [3, 6, 9]
    assert watch.predicted == logger.steps, f"lightning {WRITTEN_FOR['lightning']}: the logging rule moved"


def test_the_per_batch_sigterm_broadcast_is_a_method_of_the_epoch_loop_and_switches_off():
    assert callable(getattr(_TrainingEpochLoop, "_broadcast_sigterm_tensor", None)), (
        f"lightning {WRITTEN_FOR['lightning']} broadcast the SIGTERM flag before every batch from "
        "_TrainingEpochLoop._broadcast_sigterm_tensor; see skip_per_batch_sigterm_broadcast"
    )
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
    skip_per_batch_sigterm_broadcast(trainer)
    assert trainer.fit_loop.epoch_loop._broadcast_sigterm_tensor() is None


def test_the_anonymous_setting_lightning_passes_to_wandb_is_dropped(tmp_path):
    logger = WandbLogger(save_dir=str(tmp_path), offline=True)
    assert logger._wandb_init.get("anonymous", "missing") is None, (
        f"lightning {WRITTEN_FOR['lightning']} passed anonymous=None to wandb.init; see drop_wandb_anonymous_setting"
    )
    drop_wandb_anonymous_setting(logger)
    assert "anonymous" not in logger._wandb_init


def test_a_second_nodes_first_process_is_not_rank_zero_before_the_trainer_exists(monkeypatch):
    # Lightning reads RANK, LOCAL_RANK and SLURM_PROCID, not NODE_RANK: settle_rank_before_trainer adds it.
    for name in ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NODE_RANK", "1")
    monkeypatch.setattr(rank_zero_only, "rank", 0)
    from lightning.fabric.utilities.rank_zero import _get_rank

    assert _get_rank() is None, f"lightning {WRITTEN_FOR['lightning']} now reads NODE_RANK itself"
    settle_rank_before_trainer()
    assert rank_zero_only.rank == 1

