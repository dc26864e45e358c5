"""``trainer.strategy=fsdp``'s name and what ``trainer.expert_parallel`` needs, without torch or Lightning:
``scripts/analyze.py config`` refuses what train.py would without importing them (seconds). The strategy
itself: moe_gpt/training/sharding.py."""

from __future__ import annotations

from moe_gpt.config import ConfigError, RunConfig

FSDP = "fsdp"  # the trainer.strategy name, Lightning's FSDP1 before this version


def check_expert_parallel(cfg: RunConfig, processes: int) -> None:
    """``trainer.expert_parallel``: an MoE model under fsdp, dividing the process count and the expert count."""
    size = cfg.trainer.expert_parallel
    if size == 1:
        return
    key = f"trainer.expert_parallel={size}"
    if not cfg.model.use_moe:
        raise ConfigError(f"{key} needs an MoE model (model=moe); a dense model has no experts to spread")
    if cfg.trainer.strategy != FSDP:
        raise ConfigError(f"{key} runs under FSDP2 only; add trainer.strategy=fsdp")
    if processes % size:
        raise ConfigError(f"{key} must divide the process count ({processes}); set trainer.devices to a multiple")
    if cfg.model.moe.num_experts % size:
        raise ConfigError(
            f"{key} must divide model.moe.num_experts={cfg.model.moe.num_experts}; each process holds an equal share"
        )
