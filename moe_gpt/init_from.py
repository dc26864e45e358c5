"""``init_from``: the weights a new training run starts from instead of a random init."""

from __future__ import annotations

import logging
from typing import Optional

from torch import Tensor

from moe_gpt.checkpoints import check_weights_fit, load_model
from moe_gpt.config import ConfigError, GPTConfig, RunConfig
from moe_gpt.hf import load_hf_gpt2
from moe_gpt.model import GPT
from moe_gpt.upcycle import upcycle

log = logging.getLogger(__name__)


def initial_weights(cfg: RunConfig) -> Optional[dict[str, Tensor]]:
    """A state dict for ``GPT(cfg.model)`` from ``cfg.init_from``, upcycled when a dense source meets an MoE run.

    None without ``init_from``. (A resumed run does not call this: the checkpoint's weights win.)
    """
    if cfg.init_from is None:
        return None
    source = load_source(cfg.init_from)
    check_compatible(source.config, cfg.model, cfg.init_from)
    if cfg.model.use_moe and not source.config.use_moe:
        log.info("init_from=%s: upcycling its dense MLPs into %d experts", cfg.init_from, cfg.model.moe.num_experts)
        source = upcycle(source, cfg.model.moe)
    else:
        log.info("init_from=%s: starting from its weights", cfg.init_from)
    return source.state_dict()


def load_source(init_from: str) -> GPT:
    """A training checkpoint (``.ckpt``) or an HF GPT-2 (``save_pretrained`` directory or hub name)."""
    try:
        return load_model(init_from) if init_from.endswith(".ckpt") else load_hf_gpt2(init_from)
    except ConfigError as error:
        raise ConfigError(f"init_from={init_from}: {error}") from None


def check_compatible(source: GPTConfig, run: GPTConfig, init_from: str) -> None:
    """The source's weights must fit the run's model exactly (dense -> MoE is upcycled)."""
    if source.use_moe and not run.use_moe:
        raise ConfigError(f"init_from={init_from} is an MoE model; start a dense run from a dense one, or set model=moe")
    check_weights_fit(source, run, f"init_from={init_from}")
