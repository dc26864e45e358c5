"""One training run: build the data, model, loggers and trainer from a RunConfig, fit, summarise."""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger

from moe_gpt.config import ConfigError, LoggerConfig, RunConfig, config_warnings
from moe_gpt.console import StepProgressBar
from moe_gpt.data import TokenDataModule
from moe_gpt.expert_usage import ExpertUsageLogger
from moe_gpt.init_from import initial_weights
from moe_gpt.lit_module import GPTLightningModule

log = logging.getLogger(__name__)


def build_loggers(cfg: LoggerConfig, run_dir: Path, run_name: str, resolved_config: dict) -> list[Logger]:
    if cfg.kind == "wandb":
        return [
            WandbLogger(
                project=cfg.project,
                name=run_name,
                group=cfg.group,
                save_dir=str(run_dir),
                offline=cfg.mode == "offline",
                config=resolved_config,
            )
        ]
    if cfg.kind == "csv":
        return [CSVLogger(save_dir=str(run_dir), name="csv", version="")]
    return []


def resolve_checkpoint(resume: Optional[str], checkpoint_dir: Path) -> Optional[str]:
    """``resume=last`` means this run directory's last checkpoint; anything else is a path."""
    if resume is None:
        if checkpoint_dir.is_dir() and any(checkpoint_dir.iterdir()):
            raise ConfigError(
                f"{checkpoint_dir} already holds checkpoints; pass resume=last to continue that run "
                "or choose another hydra.run.dir"
            )
        return None
    path = checkpoint_dir / "last.ckpt" if resume == "last" else Path(resume)
    if not path.is_file():
        raise ConfigError(f"resume={resume}: no checkpoint at {path}; pass an existing .ckpt path")
    return str(path)


def train(cfg: RunConfig, resolved_config: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """Train one model and write ``metrics.json`` into the run directory; returns the metrics."""
    started = time.perf_counter()
    run_dir = Path(cfg.run_dir)
    checkpoint_dir = run_dir / "checkpoints"
    ckpt_path = resolve_checkpoint(cfg.resume, checkpoint_dir)
    for warning in config_warnings(cfg.model):
        log.warning(warning)
    L.seed_everything(cfg.seed, workers=True)
    init_state = initial_weights(cfg)  # before the data: a bad init_from fails fast

    datamodule = TokenDataModule(cfg.data, block_size=cfg.model.block_size, seed=cfg.seed)
    module = GPTLightningModule(cfg.model, cfg.optim, max_steps=cfg.trainer.max_steps)
    if init_state is not None:
        module.model.load_state_dict(init_state)
    if cfg.compile:
        module.model = torch.compile(module.model)
    model_kind = "moe" if cfg.model.use_moe else "dense"
    loggers = build_loggers(cfg.logger, run_dir, f"{model_kind}-{run_dir.name}", resolved_config or asdict(cfg))
    checkpoint = ModelCheckpoint(
        dirpath=checkpoint_dir, filename="best", monitor="val/loss", mode="min", save_top_k=1, save_last=True
    )
    callbacks = [
        checkpoint,
        ExpertUsageLogger(cfg.logger.expert_stats_every_n_steps, cfg.logger.heatmap_every_n_steps),
        StepProgressBar(),
    ]
    if loggers:
        callbacks.append(LearningRateMonitor(logging_interval="step"))
    trainer = L.Trainer(
        **asdict(cfg.trainer),
        max_epochs=-1,  # training length is max_steps; epochs just repeat the data
        check_val_every_n_epoch=None,  # validate every val_check_interval batches, across epochs
        default_root_dir=str(run_dir),
        logger=loggers or False,
        callbacks=callbacks,
    )
    try:
        fit_started = time.perf_counter()
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
        fit_seconds = time.perf_counter() - fit_started
        val_loss = trainer.validate(module, datamodule=datamodule, verbose=False)[0]["val/loss"]
    finally:
        if any(isinstance(logger, WandbLogger) for logger in loggers):
            import wandb

            wandb.finish()

    metrics = summarize(cfg, module, datamodule, trainer, val_loss, fit_seconds, time.perf_counter() - started)
    metrics["model"] = model_kind
    metrics["best_val_loss"] = float(checkpoint.best_model_score) if checkpoint.best_model_score is not None else None
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    log.info("metrics: %s", json.dumps(metrics))
    return metrics


def summarize(
    cfg: RunConfig,
    module: GPTLightningModule,
    datamodule: TokenDataModule,
    trainer: L.Trainer,
    val_loss: float,
    fit_seconds: float,
    wall_seconds: float,
) -> dict[str, Any]:
    tokens_per_step = cfg.data.batch_size * cfg.model.block_size * cfg.trainer.accumulate_grad_batches
    train_tokens = trainer.global_step * tokens_per_step
    tokens_this_fit = (trainer.global_step - module.start_step) * tokens_per_step
    return {
        "val_loss": val_loss,
        "val_ppl": math.exp(val_loss),
        "train_tokens": train_tokens,
        "steps": trainer.global_step,
        "params_total": module.model.num_parameters(),
        "params_active": module.model.num_active_parameters(),
        "tokens_per_sec": tokens_this_fit / fit_seconds,
        "wall_time_s": wall_seconds,
        "peak_memory_mb": peak_memory_mb(),
        "corpus": cfg.data.name,
        "corpus_train_tokens": datamodule.train_tokens,
        "val_history": [{**entry, "tokens": entry["step"] * tokens_per_step} for entry in module.val_history],
    }


def peak_memory_mb() -> float:
    """Peak GPU memory allocated when on CUDA, else this process's peak resident memory."""
    if torch.cuda.is_available() and torch.cuda.max_memory_allocated() > 0:
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
