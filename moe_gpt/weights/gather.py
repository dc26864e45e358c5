"""Knowledge gathering: a dense student from an MoE teacher (``distill.init=experts``), the inverse of upcycling.

Every MoE block's dense MLP is the usage-weighted mean of its experts' weights (each tensor
averaged, so a teacher whose experts are identical gives back exactly that expert, and the
student then computes the teacher's logits: a weighted sum of identical experts whose weights sum
to 1 is that expert); attention, embeddings, norms and any dense blocks are copied, the routers
dropped. The weights are each expert's share of token-slots from the teacher checkpoint's usage
counters (the counts ``ExpertUsageLogger`` keeps since its last logged step) when it holds some,
else uniform; the log says which.
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
    if teacher.ffn_hidden_size != 4 * teacher.n_embd or moe.activation != "gelu" or moe.num_shared_experts:
        raise ConfigError(
            f"distill.init=experts: {what}'s experts (hidden_size={teacher.ffn_hidden_size}, activation={moe.activation}, "
            f"{moe.num_shared_experts} shared) are not GPT-2 MLPs (4*n_embd wide, gelu, none shared); use distill.init=scratch"
        )


def gathered_state_dict(teacher: GPT, usage: Optional[Tensor], student: GPTConfig, what: str) -> dict[str, Tensor]:
    """The dense student's state dict gathered from ``teacher`` (``usage``: ``checkpoint_usage``'s rows)."""
    check_gatherable(teacher.config, student, what)
    weights, source = expert_weights(usage, teacher.config.num_moe_layers, teacher.config.moe.num_experts)
    log.info("distill.init=experts: each dense MLP is the %s mean of %s's experts", source, what)
    state = {key: tensor for key, tensor in teacher.state_dict().items() if ".mlp.router." not in key}
    state["transformer.wpe.weight"] = state["transformer.wpe.weight"][: student.block_size]
    moe_layers = [i for i in range(teacher.config.n_layer) if teacher.config.is_moe_layer(i)]
    for layer, layer_weights in zip(moe_layers, weights):
        prefix = f"transformer.h.{layer}.mlp."
        for name in DENSE_MLP_TENSORS:
            expert_key = prefix + "experts." + name.replace(".", "_")
            if expert_key in state:  # biases are absent when model.bias=false
                stacked = state.pop(expert_key)  # (E, ...): Linear's layout per expert
                mean = torch.tensordot(layer_weights.to(stacked.dtype), stacked, dims=1)
                state[prefix + name] = mean.to(stacked.dtype)
    return {key: tensor.clone() for key, tensor in state.items()}
