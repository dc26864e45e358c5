"""Progressive growth: start an MoE GPT with m times the experts from a trained one with fewer.

Expert e of the source becomes experts e*m .. e*m+m-1 of the grown model (contiguous, so the
groups of group-limited routing keep their experts). The router's rows are copied, so the m
copies of an expert get the same logit, and the run routes each token to top_k = m x the
source's top_k experts: exactly the copies of its former top-k. The grown model then computes
what the source did:

- softmax (and noisy, which is softmax outside training): each copy gets probability p/m, so
  the copies of an expert together carry its former weight p, renormalised or not;
- sigmoid with ``normalize_top_k``: each copy keeps the score s and the weights are normalised
  over the m*k chosen copies, so the copies of an expert together carry s / sum(chosen s) again.
  Without ``normalize_top_k`` every copy would carry the full s (m times the former output), so
  that setting is refused.

Two routing options are not preserved exactly: dynamic routing (``top_p``), which counts
probability mass copy by copy, and group-limited routing with topk_groups < num_groups, which
ranks groups by their two best scores (after growth often two copies of one expert).

The aux_free selection bias is added to the scores: under softmax-family routers the scores
shrink by m, so the bias is divided by m to keep the same ranking; under sigmoid it is copied.
Copies j >= 1 of every expert tensor get Gaussian noise of ``growth_noise`` times the std of the
row it perturbs (one output unit's weights, or one expert's bias), so the copies differ and
training can pull them apart. With ``growth_noise=0.0`` the grown model computes what the source
did (logits equal to 1e-5). With the default 0.01 the logits move by about 1% of their std: measured
on random 4-layer models grown from 8 to 16 experts (top_k 2 -> 4) at n_embd 32, 64, 128 and 256,
softmax and sigmoid routers, 4 seeds each, the largest logit change per token was a median 0.7-1.2%
of the source logits' std and under 2% on at least 96% of tokens; the other tokens had a near-tied
routing choice flipped by the noise and moved by up to one logit std. An absolute bound cannot hold
at every width, since the logits' scale depends on the width and the weights. How far the logits
move also depends on how much the experts contribute: in a freshly initialised GPT-2 at n_embd=128,
whose MLPs dominate its residual stream, the median was 3.2%.
"""

from __future__ import annotations

import logging
import re
from dataclasses import replace
from typing import Optional

import torch
from torch import Tensor

from moe_gpt.weights.safe_load import check_weights_fit
from moe_gpt.config import ConfigError, GPTConfig
from moe_gpt.model.gpt import GPT

log = logging.getLogger(__name__)

# Router tensors that one router / load_balance setting has and another lacks.
ROUTER_EXTRAS = ("mlp.router.noise.weight", "mlp.router.selection_bias")
SOFTMAX_SCORED_ROUTERS = ("softmax", "noisy")


def grow_experts(
    source: GPT,
    run_config: GPTConfig,
    generator: Optional[torch.Generator] = None,
    what: str = "the source model",  # how errors and log lines name the source, e.g. "init_from=<path>"
) -> dict[str, Tensor]:
    """A state dict for ``GPT(run_config)``: the source's weights with every expert split into m copies."""
    check_growable(source.config, run_config, what)
    copies = run_config.moe.num_experts // source.config.moe.num_experts
    grown = {
        key: grown_tensor(key, tensor, copies, run_config, generator) for key, tensor in source.state_dict().items()
    }
    return with_run_router_extras(grown, run_config, what)


def check_growable(source: GPTConfig, run: GPTConfig, what: str) -> None:
    """The run must have m >= 2 times the source's experts, select m times as many, and match it otherwise."""
    if not (source.use_moe and run.use_moe):
        raise ConfigError(f"{what}: growing experts needs an MoE source and an MoE run (model=moe)")
    source_experts, run_experts = source.moe.num_experts, run.moe.num_experts
    if run_experts == source_experts:
        raise ConfigError(f"{what} already has model.moe.num_experts={run_experts}: nothing to grow; load it as it is")
    differs = f"{what} has model.moe.num_experts={source_experts} but this run has model.moe.num_experts={run_experts}"
    if run_experts < source_experts:
        raise ConfigError(
            f"{differs}; growing needs more experts: to keep fewer, prune the source with scripts/prune_experts.py, "
            f"or set model.moe.num_experts={source_experts}"
        )
    if run_experts % source_experts:
        raise ConfigError(
            f"{differs}; growing splits each expert into equal copies, so set model.moe.num_experts to a multiple "
            f"of {source_experts} (e.g. {2 * source_experts})"
        )
    copies = run_experts // source_experts
    if run.moe.top_k != copies * source.moe.top_k:
        raise ConfigError(
            f"{differs}; growing splits each expert into {copies} copies and each token must select every copy of "
            f"its former top_k={source.moe.top_k} experts, so set model.moe.top_k={copies * source.moe.top_k}"
        )
    if run.moe.router == "sigmoid" and not run.moe.normalize_top_k:
        raise ConfigError(
            f"{what}: model.moe.router=sigmoid without normalize_top_k gives each of the {copies} copies its former "
            "expert's full weight, so the grown model would not compute what the source did; "
            "set model.moe.normalize_top_k=true"
        )
    # Every other architecture key must match: compare as if the source already had the run's experts.
    as_grown = replace(source, moe=replace(source.moe, num_experts=run_experts, top_k=run.moe.top_k))
    check_weights_fit(as_grown, run, what)


def grown_tensor(
    key: str, tensor: Tensor, copies: int, run_config: GPTConfig, generator: Optional[torch.Generator]
) -> Tensor:
    """One entry of the source's state dict, as the grown model holds it."""
    if ".mlp.experts." in key:
        return noisy_copies(tensor, copies, run_config.moe.growth_noise, generator)
    if key.endswith(".mlp.router.selection_bias"):
        # Softmax scores of the copies are p/m: a bias divided by m keeps score + bias ranked as before.
        bias = tensor.repeat_interleave(copies, dim=0)
        return bias / copies if run_config.moe.router in SOFTMAX_SCORED_ROUTERS else bias
    if ".mlp.router." in key:  # gate and noise weights: one row per expert
        return tensor.repeat_interleave(copies, dim=0)
    return tensor


def noisy_copies(experts_E: Tensor, copies: int, noise: float, generator: Optional[torch.Generator]) -> Tensor:
    """(E, ...) -> (E * copies, ...): expert e becomes rows e*copies .. e*copies+copies-1, all but its first noisy."""
    grown = experts_E.unsqueeze(1).expand(experts_E.shape[0], copies, *experts_E.shape[1:]).clone()
    if noise > 0:
        # Each output row's noise is relative to that row's own spread, so every copy's outputs move by
        # about `noise` of their size whatever the width, and a small row (a weak unit, a quiet expert)
        # is not drowned by noise sized for the layer's largest ones.
        std = noise * experts_E.float().std(dim=-1, keepdim=True, correction=0).unsqueeze(1)
        jitter = torch.randn(grown[:, 1:].shape, generator=generator, dtype=grown.dtype, device=grown.device)
        grown[:, 1:] += (std * jitter).to(grown.dtype)
    return grown.flatten(0, 1)


def with_run_router_extras(state: dict[str, Tensor], run_config: GPTConfig, what: str) -> dict[str, Tensor]:
    """``state`` with the router extras ``GPT(run_config)`` has: ones it lacks dropped, ones it needs started fresh.

    Other differences are left for the strict load to report: only the router / load_balance settings may
    change between the source and the run without changing any weight's shape.
    """
    with torch.device("meta"):  # the run model's keys without allocating its weights
        run_keys = GPT(run_config).state_dict().keys()
    dropped = [key for key in state if key not in run_keys and is_router_extra(key)]
    missing = [key for key in run_keys if key not in state and is_router_extra(key)]
    fitted = {key: tensor for key, tensor in state.items() if key not in dropped}
    if missing:
        fresh = GPT(run_config).state_dict()
        fitted.update({key: fresh[key] for key in missing})
        log.info("%s: this run's %s start from a fresh init (the source has none)", what, layer_names(missing))
    if dropped:
        log.info("%s: dropped its %s (this run's router has none)", what, layer_names(dropped))
    return fitted


def is_router_extra(key: str) -> bool:
    return key.endswith(ROUTER_EXTRAS)


def layer_names(keys: list[str]) -> str:
    """Keys without their block index, once each: "mlp.router.noise.weight" for every layer's."""
    return ", ".join(sorted({re.sub(r"^transformer\.h\.\d+\.", "", key) for key in keys}))
