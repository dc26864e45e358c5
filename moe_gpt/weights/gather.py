"""Knowledge gathering: a dense student from an MoE teacher (``distill.init=experts``), the inverse of upcycling.

The dense MLP (4 * n_embd hidden units) is cut into k slices of the experts' width: k = 1 for
experts as wide as GPT-2's MLP, 2 for half-width experts, and so on. The experts, ranked by usage,
are dealt round-robin into k groups; each slice is its group's usage-weighted mean (each tensor
averaged), and its output projection is scaled by the group's share of the usage, so the slices'
outputs add up like the teacher's routing weights do. A teacher whose experts are identical gives
back exactly that expert (every slice is the expert and the shares sum to 1), and the student then
computes the teacher's logits. Attention, embeddings, norms and any dense blocks are copied, the
routers dropped. The weights are each expert's share of token-slots from the teacher checkpoint's
usage counters (the counts ``ExpertUsageLogger`` keeps since its last logged step) when it holds
some, else uniform; the log says which.

Round-robin groups rather than the k most-used experts: measured on a 120-step ``moe:8:2``
teacher of the default corpus (seed 1337, teacher val loss 3.97), the gathered student starts at
6.36 with round-robin groups and 7.04 with the top-2 experts side by side (docs/compare.md).
"""

from __future__ import annotations

import logging
from typing import Any, Optional

import torch
from torch import Tensor

from moe_gpt.config import ConfigError, GPTConfig
from moe_gpt.model.gpt import GPT
from moe_gpt.weights.upcycle import DENSE_MLP_TENSORS

log = logging.getLogger(__name__)

USAGE_CALLBACK = "ExpertUsageLogger"  # its checkpoint state: {"counters": (MoE layers, E + 3)}


def checkpoint_usage(checkpoint: dict[str, Any], num_experts: int) -> Optional[Tensor]:
    """Token-slots per expert, one row per MoE layer, from a training checkpoint; None when it has none counted."""
    state = checkpoint.get("callbacks", {}).get(USAGE_CALLBACK) or {}
    counters = state.get("counters")
    if counters is None:
        return None
    counts = counters[:, :num_experts].double()  # the last three columns are dropped slots, entropy, tokens
    return counts if bool((counts.sum(dim=1) > 0).all()) else None


def expert_weights(usage: Optional[Tensor], moe_layers: int, num_experts: int) -> tuple[Tensor, str]:
    """Each MoE layer's weights over its experts (rows sum to 1), and where they come from, for the log."""
    if usage is None:
        uniform = torch.full((moe_layers, num_experts), 1.0 / num_experts, dtype=torch.float64)
        return uniform, "uniform (the teacher checkpoint holds no expert-usage counts)"
    slots = int(usage.sum())
    return usage / usage.sum(dim=1, keepdim=True), f"usage-weighted ({slots:,} token-slots counted in the teacher)"


def check_gatherable(teacher: GPTConfig, student: GPTConfig, what: str) -> None:
    """A dense student of the teacher's shape, whose MLPs have the experts' shape and activation."""
    if not teacher.use_moe:
        raise ConfigError(f"distill.init=experts gathers an MoE teacher's experts, but {what} is dense; use distill.init=scratch")
    if student.use_moe:
        raise ConfigError("distill.init=experts builds a dense student; set model=dense")
    for key in ("n_layer", "n_embd", "n_head", "vocab_size", "bias"):
        if getattr(teacher, key) != getattr(student, key):
            raise ConfigError(
                f"distill.init=experts copies the teacher's layers, but {what} has model.{key}={getattr(teacher, key)} "
                f"and the student {getattr(student, key)}; set model.{key}={getattr(teacher, key)}"
            )
    moe = teacher.moe
    if moe.activation != "gelu" or moe.num_shared_experts:
        raise ConfigError(
            f"distill.init=experts: {what}'s experts (activation={moe.activation}, {moe.num_shared_experts} shared) "
            "are not GPT-2 MLPs (gelu, none shared); use distill.init=scratch"
        )
    slices = slices_per_mlp(teacher)
    if slices * teacher.ffn_hidden_size != 4 * teacher.n_embd or slices > moe.num_experts:
        raise ConfigError(
            f"distill.init=experts: {what}'s experts are {teacher.ffn_hidden_size} wide; the dense MLP "
            f"({4 * teacher.n_embd} wide) is gathered from slices of 1 to num_experts={moe.num_experts} experts' width; "
            "use distill.init=scratch"
        )


def slices_per_mlp(teacher: GPTConfig) -> int:
    """How many expert-wide slices make up the dense MLP's hidden units (at least 1)."""
    return max(1, 4 * teacher.n_embd // teacher.ffn_hidden_size)


def round_robin_groups(layer_weights: Tensor, slices: int) -> list[Tensor]:
    """The experts' indices, ranked by weight and dealt into ``slices`` groups (the most-used expert leads group 0)."""
    ranked = torch.argsort(layer_weights, descending=True, stable=True)
    return [ranked[group::slices] for group in range(slices)]


def gathered_mlp(experts: dict[str, Tensor], layer_weights: Tensor, slices: int) -> dict[str, Tensor]:
    """One dense MLP's tensors (``DENSE_MLP_TENSORS`` names) from one layer's stacked expert tensors (E, ...)."""
    parts: dict[str, list[Tensor]] = {name: [] for name in experts}
    for group in round_robin_groups(layer_weights, slices):
        share = layer_weights[group].sum()
        within = (layer_weights[group] / share).to(next(iter(experts.values())).dtype)
        for name, stacked in experts.items():
            mean = torch.tensordot(within, stacked[group], dims=1)
            # The output projection carries the group's share of the routing weight; c_proj's bias is added once per slice.
            parts[name].append(mean * share.to(mean.dtype) if name.startswith("c_proj") else mean)
    hidden_dim = {"c_fc.weight": 0, "c_fc.bias": 0, "c_proj.weight": 1}
    return {
        name: torch.cat(pieces, dim=hidden_dim[name]) if name in hidden_dim else torch.stack(pieces).sum(0)
        for name, pieces in parts.items()
    }


def gathered_state_dict(teacher: GPT, usage: Optional[Tensor], student: GPTConfig, what: str) -> dict[str, Tensor]:
    """The dense student's state dict gathered from ``teacher`` (``usage``: ``checkpoint_usage``'s rows)."""
    check_gatherable(teacher.config, student, what)
    weights, source = expert_weights(usage, teacher.config.num_moe_layers, teacher.config.moe.num_experts)
    slices = slices_per_mlp(teacher.config)
    log.info("distill.init=experts: each dense MLP is the %s mean of %s's experts, in %d slice(s)", source, what, slices)
    state = {key: tensor for key, tensor in teacher.state_dict().items() if ".mlp.router." not in key}
    state["transformer.wpe.weight"] = state["transformer.wpe.weight"][: student.block_size]
    moe_layers = [i for i in range(teacher.config.n_layer) if teacher.config.is_moe_layer(i)]
    for layer, layer_weights in zip(moe_layers, weights):
        prefix = f"transformer.h.{layer}.mlp."
        expert_keys = {name: prefix + "experts." + name.replace(".", "_") for name in DENSE_MLP_TENSORS}
        # Biases are absent when model.bias=false; Linear's layout per expert: (E, out, in).
        experts = {name: state.pop(key) for name, key in expert_keys.items() if key in state}
        for name, tensor in gathered_mlp(experts, layer_weights, slices).items():
            state[prefix + name] = tensor
    return {key: tensor.clone() for key, tensor in state.items()}
