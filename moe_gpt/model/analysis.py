"""What a config costs before training it, and how a trained model routes a text.

Counts and FLOPs are exact for this code's model; the memory figure is an estimate (it
ignores allocator slack and framework buffers) meant for choosing batch sizes, not for
promising that a run fits.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch

from moe_gpt.config import ConfigError, GPTConfig
from moe_gpt.model.gpt import GPT
from moe_gpt.model.moe import switch_load_balance_loss

BYTES_PER_PARAM = {"32-true": 4, "bf16-mixed": 4, "16-mixed": 4, "bf16-true": 2, "16-true": 2}
ACTIVATION_BYTES = {"32-true": 4, "bf16-mixed": 2, "16-mixed": 2, "bf16-true": 2, "16-true": 2}


def parameter_counts(config: GPTConfig) -> dict[str, int]:
    """Total and per-token active parameters, counted on the meta device (no memory used)."""
    with torch.device("meta"):
        model = GPT(config)
    return {"params_total": model.num_parameters(), "params_active": model.num_active_parameters()}


def flops_per_token(config: GPTConfig) -> dict[str, int]:
    """Matmul FLOPs per token (2 per multiply-add) for a full-length sequence.

    Training costs about 3x the forward pass (backward = 2x forward).
    """
    d, t = config.n_embd, config.block_size
    attention = 2 * (4 * d * d) + 2 * (2 * t * d)  # qkv + output projections; scores and weighted values
    dense_ffn = 2 * (2 * d * 4 * d)
    moe = config.moe
    router = 2 * (d * moe.num_experts) * (2 if moe.router == "noisy" else 1)  # noisy: a second map for the noise
    experts_per_token = moe.top_k + moe.num_shared_experts  # at most top_k with top_p
    moe_ffn = router + experts_per_token * 2 * (2 * d * config.ffn_hidden_size)
    ffn = sum(moe_ffn if config.is_moe_layer(i) else dense_ffn for i in range(config.n_layer))
    forward = config.n_layer * attention + ffn + 2 * d * config.padded_vocab_size  # + output layer
    return {"forward_flops_per_token": forward, "train_flops_per_token": 3 * forward}


@dataclass(frozen=True)
class ParallelLayout:
    """How a run spreads over its processes (``trainer.devices`` x ``trainer.num_nodes``): DDP keeps every weight on
    every process; FSDP2 (``trainer.strategy=fsdp``) keeps 1/N of every weight, gradient and AdamW moment; expert
    parallelism (``trainer.expert_parallel``) splits each MoE layer's experts over that many processes."""

    processes: int = 1
    sharded: bool = False
    expert_parallel: int = 1


def parameter_groups(config: GPTConfig) -> dict[str, int]:
    """Routed-expert and other parameters, in all and in the largest block and the root (the embeddings,
    final norm and output layer: FSDP2's outermost group), counted on the meta device."""
    with torch.device("meta"):
        model = GPT(config)
    experts = {id(p) for layer in model.moe_layers() for p in layer.experts.parameters()}
    in_blocks = {id(p) for p in model.transformer.h.parameters()}

    def count(params, want_experts: bool) -> int:
        return sum(p.numel() for p in params if (id(p) in experts) == want_experts)

    blocks = [(count(b.parameters(), False), count(b.parameters(), True)) for b in model.transformer.h]
    largest_rest, largest_experts = max(blocks, key=sum)
    return {
        "experts": count(model.parameters(), True),
        "rest": count(model.parameters(), False),
        "block_rest": largest_rest,
        "block_experts": largest_experts,
        "root": sum(p.numel() for p in model.parameters() if id(p) not in in_blocks),
    }


def memory_estimate(
    config: GPTConfig, batch_size: int, precision: str = "32-true", layout: ParallelLayout = ParallelLayout()
) -> dict[str, float]:
    """Training memory in MiB on each process: weights, gradients, AdamW state, weights gathered for the blocks
    running now (FSDP2 only), activations and logits for one batch of ``batch_size`` sequences (per process).

    Under FSDP2 a process stores 1/N of everything and all-gathers the root's weights for the whole step and
    about two blocks at a time (the one running and the next, prefetched); with expert parallelism it holds
    only its own experts, which are never gathered: the tokens travel to them instead.
    """
    if precision not in BYTES_PER_PARAM:
        raise ConfigError(f"trainer.precision={precision!r} is unknown; choose one of {', '.join(BYTES_PER_PARAM)}")
    groups = parameter_groups(config)
    ep = layout.expert_parallel
    # FSDP2 alone shards every weight over every process. With expert parallelism each process keeps its E/N
    # experts whole, left out of FSDP2's gathers, and the other weights are sharded over its expert group of
    # N (replicated over the P/N groups: hybrid sharding; moe_gpt/training/sharding.py).
    sharding = ep if ep > 1 else layout.processes
    stored = groups["rest"] / (sharding if layout.sharded else 1) + groups["experts"] / (sharding if layout.sharded else ep)
    block_gathered = groups["block_rest"] + (groups["block_experts"] if ep == 1 else 0)
    gathered = groups["root"] + 2 * block_gathered if layout.sharded else 0
    tokens = batch_size * config.block_size
    act_bytes = ACTIVATION_BYTES[precision]
    d, h = config.n_embd, config.ffn_hidden_size
    # Saved for backward per token and block: layer-norm inputs, qkv, attention output and
    # projections (~10 d), plus the FFN's hidden activations (before and after the nonlinearity).
    moe_width = (config.moe.top_k + config.moe.num_shared_experts) * h + config.moe.num_experts
    ffn_width = [moe_width if config.is_moe_layer(i) else 4 * d for i in range(config.n_layer)]
    activations = tokens * act_bytes * sum(10 * d + 2 * w for w in ffn_width)
    # float32 logits and their gradient: for the whole batch, or for one chunk of the chunked loss
    # (which also keeps a float32 gradient of the output weight).
    if config.loss_chunk_size > 0:
        logits = (
            min(tokens, config.loss_chunk_size) * config.padded_vocab_size * 4 * 2 + d * config.padded_vocab_size * 4
        )
    else:
        logits = tokens * config.padded_vocab_size * 4 * 2
    mib = 2**20
    estimate = {
        "weights_mib": stored * BYTES_PER_PARAM[precision] / mib,
        "gradients_mib": stored * BYTES_PER_PARAM[precision] / mib,
        "optimizer_mib": stored * 8 / mib,  # AdamW: two float32 moments per parameter
        "gathered_weights_mib": gathered * act_bytes / mib,  # in the compute dtype (bf16 under bf16-mixed)
        "activations_mib": activations / mib,
        "logits_mib": logits / mib,
    }
    estimate["total_mib"] = sum(estimate.values())
    return estimate


def recommended_settings(config: GPTConfig) -> list[str]:
    """Common rules of thumb for experts and top_k by dense model size, as advice next to the current config."""
    dense_params = parameter_counts(replace(config, use_moe=False))["params_total"]
    if dense_params < 1e9:
        size, experts, top_k = "small (< 1B dense)", "2-4", "1"
    elif dense_params <= 10e9:
        size, experts, top_k = "medium (1B-10B dense)", "8-16", "2"
    else:
        size, experts, top_k = "large (> 10B dense)", "16-64", "2-4"
    current = f"num_experts={config.moe.num_experts}, top_k={config.moe.top_k}" if config.use_moe else "dense"
    return [
        f"model size: {size}, {dense_params / 1e6:.1f}M parameters as a dense model",
        f"rule of thumb for this size: num_experts {experts}, top_k {top_k} (current: {current})",
        "these are common starting points, not measurements of this model: compare with scripts/compare.py",
    ]


@torch.no_grad()
def routing_report(model: GPT, idx: torch.Tensor, include_intermediate: bool = False) -> dict[str, Any]:
    """Per MoE layer for ``idx``: the share of token-slots each expert got, the switch balance loss, experts
    per token (below top_k with top_p) and the share of slots dropped by the capacity."""
    out = model(idx, return_intermediate=True)
    layers = []
    for block_index, item in enumerate(out.intermediate):
        if item is None:
            continue
        moe = item["moe"]
        counts = moe["expert_outputs"]["tokens_per_expert"].float()
        layer = {
            "block": block_index,
            "expert_share": moe["expert_usage"]["token_share"].tolist(),
            "mean_gate_prob": moe["expert_usage"]["mean_gate_prob"].tolist(),
            "switch_balance_loss": switch_load_balance_loss(moe["gate_scores"], counts).item(),
            "z_loss": moe["z_loss"].item(),
            "experts_per_token": moe["expert_usage"]["experts_per_token"].item(),
            "dropped_fraction": moe["expert_usage"]["dropped_fraction"].item(),
        }
        if include_intermediate:
            layer["intermediate"] = moe
        layers.append(layer)
    return {"tokens": idx.numel(), "moe_layers": layers}
