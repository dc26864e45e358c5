"""Compose ``configs/`` the way ``train.py`` does, for scripts and tests that need a RunConfig."""

from __future__ import annotations

import dataclasses
import difflib
import typing
from collections.abc import Iterator
from functools import cache

from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.errors import OverrideParseException
from omegaconf import DictConfig, OmegaConf

from moe_gpt.config import PROJECT_ROOT, ConfigError, RunConfig, register_schema

CONFIG_DIR = PROJECT_ROOT / "configs"


def compose_run_config(overrides: list[str], run_dir: str = "unused") -> RunConfig:
    """The validated RunConfig that ``python train.py <overrides>`` would train."""
    register_schema()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[*overrides, f"run_dir={run_dir}"])
    check_known_keys(cfg, overrides)
    return OmegaConf.to_object(cfg)


def check_known_keys(cfg: DictConfig, overrides: list[str]) -> None:
    """Refuse a key the schema does not have, naming the override that added it and the closest valid key.

    Hydra lets ``+key=value`` and ``++key=value`` add keys past the schema's struct mode, and
    ``OmegaConf.to_object`` then drops them without a word: a typo would silently train the default.
    """
    for path, valid in _unknown_keys(cfg, RunConfig, ""):
        parent, _, name = path.rpartition(".")
        typed = next((o for o in overrides if _adds(o, path)), path)
        close = difflib.get_close_matches(name, valid, n=1)
        hint = f"did you mean {path.removesuffix(name)}{close[0]}?" if close else f"its keys are {', '.join(valid)}"
        raise ConfigError(
            f"{typed}: {parent or 'the config'} has no key {name}; {hint} (python train.py --cfg job prints every key)"
        )


def _unknown_keys(node: DictConfig, schema: type, prefix: str) -> Iterator[tuple[str, list[str]]]:
    """Each key below ``node`` that its dataclass ``schema`` lacks (dotted), with the keys the schema has there."""
    types = typing.get_type_hints(schema)
    for key in node:
        if key not in types:
            yield f"{prefix}{key}", list(types)
        elif dataclasses.is_dataclass(types[key]):
            yield from _unknown_keys(node[key], types[key], f"{prefix}{key}.")


def _adds(override: str, path: str) -> bool:
    """Whether ``override`` is a ``+``/``++`` override that adds the key at ``path`` (or a dictionary holding it)."""
    parsed = _parse_override(override)
    key = parsed.key_or_group
    return (parsed.is_add() or parsed.is_force_add()) and (path == key or path.startswith(key + "."))


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
