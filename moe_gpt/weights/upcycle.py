"""Sparse upcycling: start an MoE GPT from a trained dense one (Komatsuzaki et al., 2022).

Every expert begins as a copy of its block's dense MLP and the router starts fresh. With
``normalize_top_k`` the k routing weights sum to 1, so a weighted sum of identical experts is
the dense MLP again: the upcycled model computes what the dense one did until training
moves the experts apart.
"""

from __future__ import annotations

from dataclasses import replace

from torch import Tensor

from moe_gpt.config import ConfigError, GPTConfig, MoEConfig
from moe_gpt.model.gpt import GPT


def upcycle(dense: GPT, moe: MoEConfig) -> GPT:
    """An MoE GPT (same train/eval mode as ``dense``) with the dense model's weights and experts copied from its MLPs."""
    check_upcyclable(dense.config, moe)
    model = GPT(replace(dense.config, use_moe=True, moe=moe))  # fresh init gives the router its GPT-2 init
    state = model.state_dict()
    state.update(upcycled_state_dict(dense.state_dict(), model.config))
    model.load_state_dict(state)
    return model.train(dense.training)


def check_upcyclable(config: GPTConfig, moe: MoEConfig) -> None:
    if config.use_moe:
        raise ConfigError("upcycling starts from a dense model, but this one already has MoE layers")
    if moe.hidden_size not in (None, 4 * config.n_embd):
        raise ConfigError(
            f"model.moe.hidden_size={moe.hidden_size}: upcycled experts copy the dense MLP, "
            f"so set it to null or 4*n_embd={4 * config.n_embd}"
        )
    if moe.activation != "gelu":
        raise ConfigError(
            f"model.moe.activation={moe.activation}: upcycled experts copy the dense MLP, which uses gelu; set it to gelu"
        )


def upcycled_state_dict(dense_state: dict[str, Tensor], moe_config: GPTConfig) -> dict[str, Tensor]:
    """The dense weights renamed for the MoE model; every router is missing (the caller keeps a fresh one)."""
    state = dict(dense_state)
    experts = moe_config.moe.num_experts
    for layer in range(moe_config.n_layer):
        if not moe_config.is_moe_layer(layer):
            continue  # this block keeps its dense MLP under the same names
        prefix = f"transformer.h.{layer}.mlp."
        for name in ("c_fc.weight", "c_fc.bias", "c_proj.weight", "c_proj.bias"):
            tensor = state.pop(prefix + name, None)
            if tensor is not None:  # biases are absent when model.bias=false
                # Linear's (out, in) layout is the per-expert layout of Experts: one copy per expert.
                state[prefix + "experts." + name.replace(".", "_")] = tensor.expand(experts, *tensor.shape).clone()
    return state
