"""Continuing a run from a checkpoint: which checkpoint, with which config, and what may change.

A checkpoint carries the command-line overrides of the run that wrote it (``RUN_RECORD``), so
``resume=last`` recomposes that run's config and applies only what this command line changes:
nothing has to be repeated. Which settings may change is decided key by key in
resume_changes.py: a change is refused with one line, or applied and logged. A
``trainer.max_steps`` the checkpoint has already reached is refused too.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from moe_gpt.weights.safe_load import ARCHITECTURE_KEYS, check_weights_fit, model_config, read_checkpoint
from moe_gpt.compose import override_key
from moe_gpt.config import ConfigError, RunConfig
from moe_gpt.training.resume_changes import check_changes
from moe_gpt.training.run_folder import checkpoint_path

log = logging.getLogger(__name__)

RUN_RECORD = "run"  # checkpoint key: {"overrides", "config", "wandb_id", "world_size"}
SHAPE_KEYS = (*ARCHITECTURE_KEYS, "use_moe")  # a resumed run cannot turn dense into MoE: use init_from
NOT_CARRIED_OVER = ("resume", "init_from", "distill.init")  # settings of the earlier command that do not apply again


@dataclass(frozen=True)
class Resume:
    path: Path
    checkpoint: dict[str, Any]  # memory-mapped: its tensors are read only when used
    requeued: bool = False  # resumed without being asked: a requeued SLURM job

    @property
    def step(self) -> int:
        return int(self.checkpoint["global_step"])

    @property
    def record(self) -> dict[str, Any]:
        return self.checkpoint.get(RUN_RECORD, {})


def find_resume(resume: Optional[str], run_dir: Path) -> Optional[Resume]:
    """The checkpoint ``resume`` names (``last``: this run folder's), read and checked; None to start fresh.

    A SLURM job that was requeued (``SLURM_RESTART_COUNT`` > 0) resumes from its folder's last.ckpt
    without being asked: it is the same command running again after a preemption.
    """
    last = checkpoint_path(run_dir, "last.ckpt")
    if resume is None:
        if int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0) > 0 and last.is_file():
            return Resume(last, read_checkpoint(last), requeued=True)
        return None
    path = last if resume == "last" else Path(resume).expanduser()
    if not path.is_file():
        raise ConfigError(f"resume={resume}: no checkpoint at {path}; pass resume=last in a run folder or a .ckpt path")
    checkpoint = read_checkpoint(path)
    if "global_step" not in checkpoint or "optimizer_states" not in checkpoint:
        # Weights only (e.g. from scripts/prune_experts.py): a starting point, not a run to continue.
        raise ConfigError(
            f"resume={resume}: {path} holds weights but no training state to continue; "
            f"start a new run from it with init_from={path}"
        )
    return Resume(path, checkpoint)


def saved_overrides(resume: Resume) -> Optional[list[str]]:
    """The command-line overrides of the run that wrote the checkpoint (None for older checkpoints)."""
    overrides = resume.record.get("overrides")
    return None if overrides is None else [o for o in overrides if override_key(o) not in NOT_CARRIED_OVER]


def check_resumable(resume: Resume, cfg: RunConfig) -> list[str]:
    """Refuse, with one line, a resume whose settings could not take effect; the changes that will
    (``key: old -> new``), for the log."""
    if cfg.trainer.max_steps <= resume.step:
        raise ConfigError(
            f"trainer.max_steps={cfg.trainer.max_steps} but {resume.path} is already at step {resume.step}; "
            f"set trainer.max_steps above {resume.step} to train further"
        )
    check_weights_fit(model_config(resume.checkpoint), cfg.model, f"resume={cfg.resume}", SHAPE_KEYS)
    saved = resume.record.get("config")
    if saved is None:
        log.warning(
            "%s has no record of its run's settings (an older checkpoint): its data and seed are not checked",
            resume.path,
        )
        return []
    return check_changes(saved, cfg, resume.path, cfg.resume or "last")
