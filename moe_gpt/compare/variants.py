"""The models a comparison trains: ``dense`` or ``moe:E:K[:activation][:key=value...]``, as train.py overrides.

Matching decides each expert's width so that variants are compared on equal terms:

- ``active`` (default): every expert a token uses (its top_k routed ones and the shared ones) is
  4*n_embd/(K + shared) wide, so a token meets as many FFN parameters as in the dense model;
- ``total``: the E routed and the shared experts together hold the dense FFN's parameters, each
  4*n_embd/(E + shared) wide, so every model has the same size and MoE uses fewer per token;
- ``none``: experts keep the configured width.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from moe_gpt.config import ACTIVATIONS, ConfigError, MoEConfig

MATCH_RULES = {  # for reports
    "active": "each expert is 4*n_embd/(top_k + shared experts) wide, so the experts a token uses hold as many "
    "parameters as the dense FFN",
    "total": "each expert is 4*n_embd/(num_experts + shared experts) wide, so every model has the dense model's "
    "parameters and MoE uses fewer per token",
    "none": "none: experts keep the configured width",
}
MATCHING = tuple(MATCH_RULES)
VARIANT_FORMAT = (
    "'dense' or 'moe:E:K[:activation][:key=value...]', e.g. moe:8:2, moe:4:1:swish or moe:16:4:num_shared_experts=1"
)
MOE_KEYS = {field.name for field in fields(MoEConfig)}


@dataclass(frozen=True)
class Variant:
    spec: str  # as the user wrote it
    name: str  # for folders and tables: the spec with ':' and '=' as '-'
    overrides: list[str]


def parse_variant(spec: str, n_embd: int, match: str) -> Variant:
    """``dense`` or ``moe:E:K[:activation][:key=value...]`` (any model.moe key) -> the overrides that build it."""
    if spec == "dense":
        return Variant(spec, "dense", ["model=dense"])
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


def parse_variants(specs: list[str], n_embd: int, match: str) -> list[Variant]:
    """Every variant checked before anything trains; each once (runs would share a folder)."""
    if match not in MATCHING:
        raise ConfigError(f"match {match!r} is not one of {', '.join(MATCHING)}")
    variants = [parse_variant(spec, n_embd, match) for spec in specs]
    names = [variant.name for variant in variants]
    if len(set(names)) < len(names) or not names:
        raise ConfigError(f"variants {','.join(specs)}: give at least one, and each once (runs would share a folder)")
    return variants
