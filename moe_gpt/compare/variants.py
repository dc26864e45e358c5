"""The models a comparison trains: ``dense`` or ``moe:E:K[:activation][:key=value...]``, as train.py overrides.

Matching decides each expert's width so that variants are compared on equal terms:

- ``active`` (default): every expert a token uses (its top_k routed ones and the shared ones) is
  4*n_embd/(K + shared) wide, so a token meets as many FFN parameters as in the dense model;
- ``total``: the E routed and the shared experts together hold the dense FFN's parameters, each
  4*n_embd/(E + shared) wide, so every model has the same size and MoE uses fewer per token;
- ``none``: experts keep the configured width.

``distill:<teacher>[:alpha=A][:temperature=T][:init=experts]`` is a dense student (the ``dense``
variant's model) trained with ``distill.teacher``: a checkpoint, a run folder (its best.ckpt), or an
earlier variant of the same comparison, whose run of the same budget and seed then teaches it
(``dense,moe:8:2,distill:moe:8:2`` is "dense / MoE teacher / distilled dense" seed by seed).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Optional

from moe_gpt.config import ACTIVATIONS, ConfigError, DistillConfig, MoEConfig
from moe_gpt.training.run_folder import checkpoint_path, run_folder_of

MATCH_RULES = {  # for reports
    "active": "each expert is 4*n_embd/(top_k + shared experts) wide, so the experts a token uses hold as many "
    "parameters as the dense FFN",
    "total": "each expert is 4*n_embd/(num_experts + shared experts) wide, so every model has the dense model's "
    "parameters and MoE uses fewer per token",
    "none": "none: experts keep the configured width",
}
MATCHING = tuple(MATCH_RULES)
VARIANT_FORMAT = (
    "'dense', 'moe:E:K[:activation][:key=value...]' or 'distill:<teacher>[:key=value...]', e.g. moe:8:2, "
    "moe:4:1:swish, moe:16:4:num_shared_experts=1 or distill:moe:8:2"
)
MOE_KEYS = {field.name for field in fields(MoEConfig)}
DISTILL_KEYS = {field.name for field in fields(DistillConfig)} - {"teacher"}


@dataclass(frozen=True)
class Variant:
    spec: str  # as the user wrote it
    name: str  # for folders and tables: the spec with ':' and '=' as '-'
    overrides: list[str]
    teacher_variant: Optional[str] = None  # distill:<variant>: that variant's run of the same budget and seed teaches

    @property
    def shared_overrides(self) -> list[str]:
        """The overrides of every run of this variant, for the config its runs share: a taught variant's
        teacher is a different checkpoint per seed (``plan_run`` adds it), so it stands here as the
        teacher variant's name (the config checks ``distill.init=experts`` has a teacher)."""
        if self.teacher_variant is None:
            return self.overrides
        return [*self.overrides, f"distill.teacher={self.teacher_variant}"]


def parse_variant(spec: str, n_embd: int, match: str, earlier: tuple[Variant, ...] = ()) -> Variant:
    """``dense``, ``moe:E:K[:activation][:key=value...]`` (any model.moe key) or ``distill:<teacher>[:key=value...]``
    (``earlier``: the variants before it, which may teach it) -> the overrides that build it."""
    if spec == "dense":
        return Variant(spec, "dense", ["model=dense"])
    if spec.startswith("distill:"):
        return parse_distill_variant(spec, earlier)
    parts = spec.split(":")
    if parts[0] != "moe" or len(parts) < 3 or not (parts[1].isdigit() and parts[2].isdigit()):
        raise ConfigError(f"variant {spec!r} is not {VARIANT_FORMAT}")
    experts, top_k = int(parts[1]), int(parts[2])
    if experts < 1 or top_k < 1:
        raise ConfigError(f"variant {spec!r}: E and K must be at least 1, e.g. moe:8:2")
    overrides = ["model=moe", f"model.moe.num_experts={experts}", f"model.moe.top_k={top_k}"]
    settings = dict(_variant_setting(spec, part) for part in parts[3:])
    overrides += [f"model.moe.{key}={value}" for key, value in settings.items()]
    if match != "none":
        shared = int(settings.get("num_shared_experts", 0))
        overrides.append(f"model.moe.hidden_size={matched_width(spec, n_embd, match, experts, top_k, shared)}")
    return Variant(spec, spec.replace(":", "-").replace("=", "-"), overrides)


def matched_width(spec: str, n_embd: int, match: str, experts: int, top_k: int, shared: int) -> int:
    """The expert width that gives the dense FFN's 4*n_embd over the experts ``match`` counts."""
    counted = top_k + shared if match == "active" else experts + shared
    what = "a token uses" if match == "active" else "in a layer"
    if (4 * n_embd) % counted:
        raise ConfigError(
            f"variant {spec}: 4*n_embd={4 * n_embd} is not divisible by the {counted} experts {what}; use --match none"
        )
    return 4 * n_embd // counted


def _variant_setting(spec: str, part: str) -> tuple[str, str]:
    """``swish`` (an activation) or ``key=value`` for a model.moe key."""
    if "=" not in part:
        if part not in ACTIVATIONS:
            raise ConfigError(
                f"variant {spec!r}: {part!r} is neither an activation ({', '.join(ACTIVATIONS)}) nor key=value"
            )
        return "activation", part
    key, value = part.split("=", 1)
    settable = sorted(MOE_KEYS - {"num_experts", "top_k"})  # those two are E and K of moe:E:K
    if key not in settable:
        raise ConfigError(
            f"variant {spec!r}: {key!r} is not a model.moe key to set here; the keys: {', '.join(settable)}"
        )
    if key == "num_shared_experts" and not value.isdigit():
        raise ConfigError(f"variant {spec!r}: num_shared_experts={value} must be a whole number")
    return key, value


def parse_distill_variant(spec: str, earlier: tuple[Variant, ...]) -> Variant:
    """``distill:<teacher>[:alpha=A][:temperature=T][:init=experts]``: the dense student of a teacher."""
    parts = spec.split(":")[1:]
    settings = [part for part in parts if part.partition("=")[0] in DISTILL_KEYS and "=" in part]
    teacher = ":".join(part for part in parts if part not in settings)
    overrides = ["model=dense", *(f"distill.{setting}" for setting in settings)]
    suffix = "".join("-" + setting.replace("=", "-") for setting in settings)
    teacher_variant = next((variant for variant in earlier if teacher in (variant.spec, variant.name)), None)
    if teacher_variant is not None:
        return Variant(spec, f"distill-{teacher_variant.name}{suffix}", overrides, teacher_variant.name)
    path = teacher_checkpoint(spec, teacher)
    folder = run_folder_of(path)
    name = folder.name if folder is not None else path.stem
    return Variant(spec, f"distill-{name}{suffix}", [*overrides, f"distill.teacher={path}"])


def teacher_checkpoint(spec: str, teacher: str) -> Path:
    """A .ckpt as it is; a run folder's checkpoints/best.ckpt."""
    path = Path(teacher).expanduser().resolve()
    if path.is_dir():
        path = checkpoint_path(path, "best.ckpt")
    if not path.is_file():
        raise ConfigError(
            f"variant {spec!r}: the teacher {teacher!r} is neither an earlier variant nor a checkpoint or run folder "
            f"({path} does not exist); list the teacher's variant first, e.g. dense,moe:8:2,distill:moe:8:2"
        )
    return path


def parse_variants(specs: list[str], n_embd: int, match: str) -> list[Variant]:
    """Every variant checked before anything trains; each once (runs would share a folder)."""
    if match not in MATCHING:
        raise ConfigError(f"match {match!r} is not one of {', '.join(MATCHING)}")
    variants: list[Variant] = []
    for spec in specs:
        variants.append(parse_variant(spec, n_embd, match, tuple(variants)))
    names = [variant.name for variant in variants]
    if len(set(names)) < len(names) or not names:
        raise ConfigError(f"variants {','.join(specs)}: give at least one, and each once (runs would share a folder)")
    return variants
