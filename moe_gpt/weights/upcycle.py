"""Sparse upcycling: start an MoE GPT from a trained dense one (Komatsuzaki et al., 2022).

Every routed expert begins as a copy of its block's dense MLP and the router starts fresh. With
``normalize_top_k`` the chosen experts' weights sum to 1 whatever the router picks (also with
``top_p``, group-limited routing and an aux_free selection bias, which only change the choice), so a
weighted sum of identical experts is the dense MLP again. Shared experts start silent (see
``silent_shared_experts``). The upcycled model therefore computes exactly what the dense one did,
in every router and layout, until training moves the experts apart. Two settings would break
that: a capacity that drops token-slots is refused; ``normalize_top_k=false`` scales each MLP by
the chosen experts' total weight, which is allowed (training adapts to it) with a warning.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Optional

from torch import Tensor

from moe_gpt.config import ConfigError, GPTConfig, MoEConfig
from moe_gpt.model.gpt import GPT

log = logging.getLogger(__name__)

DENSE_MLP_TENSORS = ("c_fc.weight", "c_fc.bias", "c_proj.weight", "c_proj.bias")


def upcycle(dense: GPT, moe: MoEConfig) -> GPT:
    """An MoE GPT (same train/eval mode as ``dense``) with the dense model's weights and experts copied from its MLPs."""
    check_upcyclable(dense.config, moe)
    model = GPT(replace(dense.config, use_moe=True, moe=moe))  # fresh init gives the router its GPT-2 init
    model.load_state_dict(upcycled_state_dict(dense.state_dict(), model.state_dict(), model.config))
    return model.train(dense.training)


def check_upcyclable(config: GPTConfig, moe: MoEConfig) -> None:
    """Refuse what cannot copy the dense MLP or cannot compute what it did; warn where only the scale changes."""
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
    check_nothing_dropped(moe)
    if not moe.normalize_top_k:
        log.warning(
            "model.moe.normalize_top_k=false: each upcycled MLP's output is scaled by its chosen experts' total "
            "routing weight, so the upcycled model starts away from the dense one; set it to true to start exact"
        )


def check_nothing_dropped(moe: MoEConfig) -> None:
    """A capacity below num_experts/top_k can drop token-slots, and a dropped slot loses part of the dense MLP."""
    # ceil(factor * T * top_k / E) >= T once factor >= E / top_k, and no expert gets more than T slots.
    dropless_factor = moe.num_experts / moe.top_k
    for key in ("capacity_factor", "eval_capacity_factor"):
        factor: Optional[float] = getattr(moe, key)
        if factor is not None and factor < dropless_factor:
            raise ConfigError(
                f"model.moe.{key}={factor} drops token-slots over an expert's capacity, so the upcycled model would "
                f"not compute what the dense one did; set it to null (dropless) or >= {dropless_factor:g} to upcycle"
            )


def upcycled_state_dict(
    dense_state: dict[str, Tensor], fresh_state: dict[str, Tensor], moe_config: GPTConfig
) -> dict[str, Tensor]:
    """The MoE model's state dict: the dense weights, MLPs copied into experts, routers from ``fresh_state``."""
    state = {key: tensor for key, tensor in fresh_state.items() if ".mlp.router." in key}
    state.update(dense_state)
    experts = moe_config.moe.num_experts
    for layer in range(moe_config.n_layer):
        if not moe_config.is_moe_layer(layer):
            continue  # this block keeps its dense MLP under the same names
        prefix = f"transformer.h.{layer}.mlp."
        # Biases are absent when model.bias=false.
        mlp = {name: state.pop(prefix + name) for name in DENSE_MLP_TENSORS if prefix + name in state}
        for name, tensor in mlp.items():
            # Linear's (out, in) layout is the per-expert layout of Experts: one copy per expert.
            state[prefix + "experts." + name.replace(".", "_")] = tensor.expand(experts, *tensor.shape).clone()
        if moe_config.moe.num_shared_experts > 0:
            state.update(silent_shared_experts(mlp, fresh_state, prefix + "shared_experts."))
    return state


def silent_shared_experts(mlp: dict[str, Tensor], fresh_state: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """Shared experts that add nothing yet: the routed experts' weighted sum alone is the dense MLP.

    Their output projection is zero, so the upcycled model stays exact, and it is trained from the
    first step on (its gradient is the shared hidden activations times the output's gradient), like
    a zero-initialised residual branch. The first shared expert's input projection copies the dense
    MLP's, so it starts from the pretrained features rather than random ones; further shared experts
    keep their fresh init, because identical copies behind a zero projection would receive identical
    updates and never differ. (Splitting the dense MLP's output between shared and routed experts
    would also be exact, but would halve the routed experts' outputs and the gradients they get.)
    """
    shared = {name: fresh_state[prefix + name].clone() for name in DENSE_MLP_TENSORS if prefix + name in fresh_state}
    hidden = mlp["c_fc.weight"].shape[0]
    shared["c_fc.weight"][:hidden] = mlp["c_fc.weight"]
    if "c_fc.bias" in mlp:
        shared["c_fc.bias"][:hidden] = mlp["c_fc.bias"]
    shared["c_proj.weight"].zero_()
    if "c_proj.bias" in shared:
        shared["c_proj.bias"].zero_()
    return {prefix + name: tensor for name, tensor in shared.items()}
