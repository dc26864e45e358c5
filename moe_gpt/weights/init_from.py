"""``init_from``: the weights a new training run starts from instead of a random init.

A dense source into an MoE run is upcycled (upcycle.py); an MoE source into a run with m times its
experts is grown (grow.py); otherwise the weights must fit the run's model, except the router
extras that differ between router and load_balance settings.
"""

from __future__ import annotations

import logging
from typing import Optional

from torch import Tensor

from moe_gpt.weights.safe_load import check_weights_fit, load_model
from moe_gpt.config import ConfigError, GPTConfig, RunConfig
from moe_gpt.weights.grow import check_growable, grow_experts, with_run_router_extras
from moe_gpt.weights.hf import load_hf_gpt2
from moe_gpt.model.gpt import GPT
from moe_gpt.weights.teacher import Teacher
from moe_gpt.weights.upcycle import upcycle

log = logging.getLogger(__name__)


def initial_weights(cfg: RunConfig, teacher: Optional[Teacher] = None) -> Optional[dict[str, Tensor]]:
    """A state dict for ``GPT(cfg.model)`` from ``cfg.init_from``: upcycled, grown, or as it is; or gathered from
    the teacher's experts (``distill.init=experts``).

    None without either. (A resumed run does not call this: the checkpoint's weights win.)
    """
    if cfg.distill.init == "experts":
        return teacher.student_weights(cfg.model)
    if cfg.init_from is None:
        return None
    source = load_source(cfg.init_from)
    check_compatible(source.config, cfg.model, cfg.init_from)
    what = f"init_from={cfg.init_from}"
    if cfg.model.use_moe and not source.config.use_moe:
        log.info(
            "%s: upcycling the dense MLPs of its %d MoE block(s) of %d into %d experts each",
            what, cfg.model.num_moe_layers, cfg.model.n_layer, cfg.model.moe.num_experts,
        )  # fmt: skip
        return upcycle(source, cfg.model.moe).state_dict()
    if grows(source.config, cfg.model):
        source_experts, run_experts = source.config.moe.num_experts, cfg.model.moe.num_experts
        log.info(
            "%s: growing its %d experts per MoE layer into %d (each split into %d copies, growth_noise=%g)",
            what,
            source_experts,
            run_experts,
            run_experts // source_experts,
            cfg.model.moe.growth_noise,
        )
        return grow_experts(source, cfg.model, what=what)
    log.info("%s: starting from its weights", what)
    return with_run_router_extras(source.state_dict(), cfg.model, what)


def load_source(init_from: str) -> GPT:
    """A training checkpoint (``.ckpt``) or an HF GPT-2 (``save_pretrained`` directory or hub name)."""
    try:
        return load_model(init_from) if init_from.endswith(".ckpt") else load_hf_gpt2(init_from)
    except ConfigError as error:
        raise ConfigError(f"init_from={init_from}: {error}") from None


def check_compatible(source: GPTConfig, run: GPTConfig, init_from: str) -> None:
    """The source's weights must fit the run's model exactly (dense -> MoE is upcycled, fewer -> more experts grown)."""
    if source.use_moe and not run.use_moe:
        raise ConfigError(
            f"init_from={init_from} is an MoE model; start a dense run from a dense one, or set model=moe"
        )
    if source.use_moe and run.use_moe and run.moe.num_experts != source.moe.num_experts:
        check_growable(source, run, f"init_from={init_from}")  # also refuses fewer experts, naming prune_experts.py
    else:
        check_weights_fit(source, run, f"init_from={init_from}")


def grows(source: GPTConfig, run: GPTConfig) -> bool:
    """An MoE source into an MoE run with more experts per layer."""
    return source.use_moe and run.use_moe and run.moe.num_experts > source.moe.num_experts
