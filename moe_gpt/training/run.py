"""One training run: claim the folder, build the data, model, loggers and trainer, fit, summarise."""

from __future__ import annotations

import logging
import math
import secrets
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import lightning as L
import torch
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only

from moe_gpt.training.checkpoint_callbacks import (
    BestCheckpoint,
    LastCheckpoint,
    RNGStateCallback,
    RunRecordCallback,
)
from moe_gpt.training.clock import TrainingClock
from moe_gpt.config import ConfigError, RunConfig, run_warnings
from moe_gpt.training.console import ProgressLog, StepProgressBar
from moe_gpt.data import TokenDataModule
from moe_gpt.data.tokenizer import GPT2_N_VOCAB
from moe_gpt.training.expert_usage import HEATMAP_DIR, ExpertUsageLogger
from moe_gpt.training.history import LossHistory
from moe_gpt.weights.init_from import initial_weights
from moe_gpt.weights.teacher import Teacher, check_same_teacher, load_teacher
from moe_gpt.training.lit_module import GPTLightningModule
from moe_gpt.training.loggers import build_loggers
from moe_gpt.training.preemption import StopAtStepEnd, stop_signals_raise
from moe_gpt.training.resume import Resume, check_resumable, find_resume
from moe_gpt.training.resume_changes import log_applied_changes
from moe_gpt.training.run_folder import (
    checkpoint_path,
    claimed,
    is_inside,
    logging_to_file,
    settle_rank_before_trainer,
    write_json,
)
from moe_gpt.training.summary import CURVES_FILE, SUMMARY_FILE, summary_text, write_curves_png
from moe_gpt.training.trainer import build_trainer, check_trainer_settings

log = logging.getLogger(__name__)


@dataclass
class RunRecord:
    """What a checkpoint remembers of the command that made it, so ``resume=last`` can rebuild it."""

    overrides: list[str] = field(default_factory=list)  # Hydra's task overrides
    resolved_config: Optional[dict[str, Any]] = None  # what W&B shows; default: the RunConfig as a dict
    save_config_files: Optional[Callable[[Path], None]] = None  # train.py writes Hydra's .hydra/ files
    claimed: bool = False  # set once the folder is this run's: only then may a failure be recorded in it
    callbacks: list[L.Callback] = field(default_factory=list)  # added to the run's own (the GPU check's step timer)


def train(cfg: RunConfig, record: Optional[RunRecord] = None) -> dict[str, Any]:
    """Train one model and write ``metrics.json`` into the run directory; returns the metrics."""
    record = record or RunRecord()
    run_dir = Path(cfg.run_dir)
    with ExitStack() as stack:
        stack.enter_context(stop_signals_raise())  # until training starts, a stop signal stops at once
        # Every check of the input comes before the folder is claimed: a refused command writes nothing.
        resume = find_resume(cfg.resume, run_dir)  # before any data: a bad checkpoint fails fast
        changes = check_resumable(resume, cfg) if resume is not None else []
        check_vocabulary(cfg)
        teacher = load_teacher(cfg.distill, cfg.model)
        if resume is not None:
            check_same_teacher(resume.checkpoint, teacher, cfg.resume or "last")
        check_trainer_settings(cfg)
        settle_rank_before_trainer()
        if rank_zero_only.rank == 0:
            stack.enter_context(claimed(run_dir, resume.path if resume is not None else None))
            record.claimed = True
            stack.enter_context(logging_to_file(run_dir))
            if record.save_config_files is not None:
                record.save_config_files(run_dir)
        return _train_in_claimed_dir(cfg, record, resume, changes, teacher)


def check_vocabulary(cfg: RunConfig) -> None:
    if cfg.model.vocab_size < GPT2_N_VOCAB:
        raise ConfigError(
            f"model.vocab_size={cfg.model.vocab_size} is smaller than the GPT-2 tokenizer's {GPT2_N_VOCAB} token ids; "
            f"set model.vocab_size={GPT2_N_VOCAB}"
        )


def _train_in_claimed_dir(
    cfg: RunConfig, record: RunRecord, resume: Optional[Resume], changes: list[str], teacher: Optional[Teacher]
) -> dict[str, Any]:
    started = time.perf_counter()
    run_dir = Path(cfg.run_dir)
    log_run_warnings(cfg, resume)
    if resume is not None:
        log_applied_changes(changes, resume.step)
    L.seed_everything(cfg.seed, workers=True)
    init_state = initial_weights(cfg, teacher) if resume is None else None  # before the data: fails fast

    datamodule = TokenDataModule(cfg.data, block_size=cfg.model.block_size, seed=cfg.seed)
    module = GPTLightningModule(cfg.model, cfg.optim, max_steps=cfg.trainer.max_steps, teacher=teacher)
    if init_state is not None:
        module.model.load_state_dict(init_state)
    if cfg.compile:
        module.model.compile()  # in place: the checkpoint keeps the plain model's keys
    model_kind = "moe" if cfg.model.use_moe else "dense"
    continues_this_folder = resume is not None and is_inside(resume.path, run_dir)
    wandb_id = continued_wandb_id(resume if continues_this_folder else None)
    config_to_log = record.resolved_config or asdict(cfg)
    resumed_step = resume.step if resume is not None else None
    loggers = build_loggers(cfg.logger, run_dir, f"{model_kind}-{run_dir.name}", config_to_log, wandb_id, resumed_step)
    best = BestCheckpoint(run_dir, continues_this_folder, cfg.checkpoint.save_weights_only)
    run_record = {"overrides": record.overrides, "config": asdict(cfg), "wandb_id": wandb_id}
    clock = TrainingClock()
    history = LossHistory(clock)
    # First: a checkpoint saved at a validation's end (preemption.py) then holds that validation's point.
    callbacks = [clock, history, ProgressLog(clock, history)]  # ProgressLog prints the points history records
    callbacks += run_callbacks(cfg, best, run_record, with_lr_monitor=bool(loggers))
    callbacks += record.callbacks
    trainer = build_trainer(cfg, loggers, callbacks)
    warn_if_world_size_changed(resume, trainer)
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=resume.path if resume else None, weights_only=True)
        val_loss = final_validation_loss(trainer, module, datamodule, history)
    finally:
        if any(isinstance(logger, WandbLogger) for logger in loggers):
            import wandb

            wandb.finish()

    metrics = summarize(cfg, module, datamodule, trainer, clock, history, val_loss, time.perf_counter() - started)
    metrics["model"] = model_kind
    metrics["best_val_loss"] = float(best.best_model_score) if best.best_model_score is not None else None
    if trainer.is_global_zero:
        write_json(run_dir / "metrics.json", metrics)
        write_curves_png(run_dir / CURVES_FILE, history.train, history.val, f"loss curves of {run_dir.name}")
        summary = summary_text(metrics, run_dir, cfg.logger.kind, cfg.checkpoint.save_weights_only)
        (run_dir / SUMMARY_FILE).write_text(summary + "\n")
        print(summary, flush=True)
    return metrics


def final_validation_loss(
    trainer: L.Trainer, module: GPTLightningModule, datamodule: TokenDataModule, history: LossHistory
) -> float:
    """The val loss at the last step: the fit's own validation when one ran there, else one more pass.

    (Every process takes the same branch: each keeps the same history.)
    """
    last = history.val[-1] if history.val else None
    if last is not None and last["step"] == trainer.global_step:
        return last["val_loss"]
    return trainer.validate(module, datamodule=datamodule, verbose=False)[0]["val/loss"]


def log_run_warnings(cfg: RunConfig, resume: Optional[Resume]) -> None:
    for warning in run_warnings(cfg):
        log.warning(warning)
    if resume is not None and resume.requeued:
        log.info("requeued SLURM job: resuming from %s", resume.path)
    if resume is not None and cfg.init_from is not None:
        log.warning("init_from=%s ignored: resuming from %s, whose weights win", cfg.init_from, resume.path)


def run_callbacks(
    cfg: RunConfig, best: BestCheckpoint, run_record: dict[str, Any], with_lr_monitor: bool
) -> list[L.Callback]:
    last = checkpoint_path(Path(cfg.run_dir), "last.ckpt")
    callbacks = [
        best,
        LastCheckpoint(last, cfg.checkpoint.every_n_steps, cfg.checkpoint.save_weights_only),
        # Before StopAtStepEnd: a step's usage row is on disk before a stop signal's checkpoint holds the step.
        ExpertUsageLogger(
            cfg.logger.expert_stats_every_n_steps, cfg.logger.heatmap_every_n_steps, Path(cfg.run_dir) / HEATMAP_DIR
        ),
        StopAtStepEnd(last),
        RunRecordCallback(run_record),
        RNGStateCallback(),
        StepProgressBar(),
    ]
    return callbacks + [LearningRateMonitor(logging_interval="step")] if with_lr_monitor else callbacks


def warn_if_world_size_changed(resume: Optional[Resume], trainer: L.Trainer) -> None:
    saved = resume.record.get("world_size", trainer.world_size) if resume is not None else trainer.world_size
    if saved != trainer.world_size:
        log.warning(
            "resuming a run of %d process(es) with %d: training continues, but not exactly as it would have "
            "(the data position was saved per process)",
            saved,
            trainer.world_size,
        )


def continued_wandb_id(resume_of_this_folder: Optional[Resume]) -> str:
    """The W&B run id: the resumed run's when it continues this folder's run (one W&B run per folder)."""
    if resume_of_this_folder is not None:
        saved = resume_of_this_folder.record.get("wandb_id")
        if saved:
            return saved
    return secrets.token_hex(4)  # W&B's own ids are 8 characters too


def summarize(
    cfg: RunConfig,
    module: GPTLightningModule,
    datamodule: TokenDataModule,
    trainer: L.Trainer,
    clock: TrainingClock,
    history: LossHistory,
    val_loss: float,
    wall_seconds: float,
) -> dict[str, Any]:
    return {
        "val_loss": val_loss,
        "val_ppl": perplexity(val_loss),
        "train_tokens": module.tokens_seen,  # all processes, all sessions of a resumed run
        "steps": trainer.global_step,
        "world_size": trainer.world_size,
        "params_total": module.model.num_parameters(),
        "params_active": module.model.num_active_parameters(),
        "tokens_per_sec": clock.tokens_per_sec(module),  # this session, validation excluded
        "train_seconds": clock.train_seconds,  # all sessions, validation excluded
        "mfu": clock.mfu(module),
        "wall_time_s": wall_seconds,
        "peak_memory_mb": peak_memory_mb(),
        "corpus": cfg.data.name,
        "corpus_train_tokens": datamodule.train_tokens,
        "val_history": history.val,
        "train_history": history.train,
    }


def perplexity(loss: float) -> float:
    try:
        return math.exp(loss)
    except OverflowError:  # a loss above ~709 nats; written as null in metrics.json
        return math.inf


def peak_memory_mb() -> float:
    """Peak GPU memory allocated when on CUDA, else this process's peak resident memory."""
    if torch.cuda.is_available() and torch.cuda.max_memory_allocated() > 0:
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
