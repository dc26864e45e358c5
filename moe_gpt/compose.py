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


def override_key(override: str) -> str:
    """``model.n_layer`` for ``model.n_layer=6``, ``+x=1``, ``++x=1`` and ``~x``."""
    return override.split("=", 1)[0].lstrip("+~")


def merge_overrides(earlier: list[str], later: list[str]) -> list[str]:
    """Both lists, with ``later`` winning for a key given in both."""
    later_keys = {override_key(o) for o in later}
    return [o for o in earlier if override_key(o) not in later_keys] + later
