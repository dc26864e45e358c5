"""Compose ``configs/`` the way ``train.py`` does, for scripts and tests that need a RunConfig."""

from __future__ import annotations

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from moe_gpt.config import PROJECT_ROOT, RunConfig, register_schema

CONFIG_DIR = PROJECT_ROOT / "configs"


def compose_run_config(overrides: list[str], run_dir: str = "unused") -> RunConfig:
    """The validated RunConfig that ``python train.py <overrides>`` would train."""
    register_schema()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[*overrides, f"run_dir={run_dir}"])
    return OmegaConf.to_object(cfg)
