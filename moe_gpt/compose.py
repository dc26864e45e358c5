"""Compose ``configs/`` the way ``train.py`` does, for scripts and tests that need a RunConfig."""

from __future__ import annotations

from functools import cache

from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.errors import OverrideParseException
from omegaconf import OmegaConf

from moe_gpt.config import PROJECT_ROOT, ConfigError, RunConfig, register_schema

CONFIG_DIR = PROJECT_ROOT / "configs"


def compose_run_config(overrides: list[str], run_dir: str = "unused") -> RunConfig:
    """The validated RunConfig that ``python train.py <overrides>`` would train."""
    register_schema()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[*overrides, f"run_dir={run_dir}"])
    return OmegaConf.to_object(cfg)


@cache
def _parser() -> OverridesParser:
    return OverridesParser.create()


def _parse_override(override: str) -> Override:
    """One command-line override, read by Hydra's own grammar (so ``+``, ``++``, ``~`` and quoting mean what
    they mean to ``train.py``)."""
    try:
        (parsed,) = _parser().parse_overrides([override])
    except OverrideParseException as error:
        reason = str(error).strip().splitlines()[0]
        raise ConfigError(
            f"the override {override!r} is not valid Hydra syntax ({reason}); write key=value, and quote a value "
            "that contains '=' or spaces: key='a=b'"
        ) from None
    return parsed


def override_key(override: str) -> str:
    """``model.n_layer`` for ``model.n_layer=6``, ``+model.n_layer=6``, ``++model.n_layer=6`` and ``~model.n_layer``
    (``group@package`` for a config group placed at another package)."""
    parsed = _parse_override(override)
    return parsed.key_or_group if parsed.package is None else f"{parsed.key_or_group}@{parsed.package}"


def merge_overrides(earlier: list[str], later: list[str]) -> list[str]:
    """Both lists, with ``later`` winning for a key given in both."""
    later_keys = {override_key(o) for o in later}
    return [o for o in earlier if override_key(o) not in later_keys] + later
