"""Autoregressive sampling from a GPT: greedy, temperature, top-k and nucleus (top-p), with a KV cache."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from moe_gpt.config import ConfigError
from moe_gpt.model.gpt import GPT, KVCache
from moe_gpt.model.sampling import check_sampling_arguments


def generate(
    model: GPT,
    idx: Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Extend each row of ``idx`` (B, T) by ``max_new_tokens`` tokens; returns (B, T + max_new_tokens).

    ``temperature=0`` picks the most likely token (greedy). Past ``block_size`` tokens the model
    sees only the last ``block_size`` of them. The model runs in eval mode and is put back after.
    """
    check_sampling_arguments(max_new_tokens, temperature, top_k, top_p)
    check_prompt(idx, model.config.vocab_size)
    was_training = model.training
    # Dropout would make greedy decoding random, and MoE layers count expert usage only in training.
    model.eval()
    try:
        with torch.no_grad():
            return _extend(model, idx, max_new_tokens, temperature, top_k, top_p, use_cache, generator)
    finally:
        model.train(was_training)


def check_prompt(idx: Tensor, vocab_size: int) -> None:
    if idx.dim() != 2 or idx.shape[1] == 0 or idx.dtype != torch.long:
        raise ConfigError(
            f"prompt must be a (batch, tokens) long tensor with at least one token, got {idx.dtype} {tuple(idx.shape)}"
        )
    low, high = idx.min().item(), idx.max().item()
    if low < 0 or high >= vocab_size:
        raise ConfigError(f"prompt token ids must be in [0, {vocab_size}), got {low}..{high}")


def _extend(
    model: GPT,
    idx: Tensor,
    max_new_tokens: int,
    temperature: float,
    top_k: Optional[int],
    top_p: Optional[float],
    use_cache: bool,
    generator: Optional[torch.Generator],
) -> Tensor:
    tokens, cache = idx, None
    for _ in range(max_new_tokens):
        logits, cache = next_token_logits(model, tokens, cache, use_cache)
        tokens = torch.cat([tokens, choose_token(logits.float(), temperature, top_k, top_p, generator)], dim=1)
    return tokens


def next_token_logits(
    model: GPT, tokens: Tensor, cache: Optional[list[KVCache]], use_cache: bool
) -> tuple[Tensor, Optional[list[KVCache]]]:
    """Logits (B, vocab_size) for the token after ``tokens``, and the cache covering ``tokens``.

    ``cache`` covers all of ``tokens`` but the newest. While the newest token still fits the
    context window only it is fed; otherwise the context is cropped to the last ``block_size``
    tokens and run in full, because cropping shifts every position and stales the cached keys.
    Only the last position is projected to logits: it is the only one sampled from.
    """
    block_size = model.config.block_size
    if cache is not None and cache[0][0].shape[2] < block_size:
        out = model(tokens[:, -1:], use_cache=True, past_kv=cache, last_logits_only=True)
    else:
        out = model(tokens[:, -block_size:], use_cache=use_cache, last_logits_only=True)
    return out.logits[:, -1], out.cache


def choose_token(
    logits: Tensor,
    temperature: float,
    top_k: Optional[int],
    top_p: Optional[float],
    generator: Optional[torch.Generator],
) -> Tensor:
    """One token id per row (B, 1) from next-token logits (B, V)."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None:
        logits = keep_top_k(logits, top_k)
    if top_p is not None:
        logits = keep_top_p(logits, top_p)
    return torch.multinomial(logits.softmax(dim=-1), num_samples=1, generator=generator)


def keep_top_k(logits: Tensor, k: int) -> Tensor:
    """Logits with all but the k largest per row set to -inf."""
    kth_largest = logits.topk(min(k, logits.shape[-1]), dim=-1).values[:, -1:]
    return logits.masked_fill(logits < kth_largest, float("-inf"))


def keep_top_p(logits: Tensor, p: float) -> Tensor:
    """Logits outside the smallest set of most likely tokens whose probability reaches p set to -inf."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    # A token is dropped when the tokens ranked above it already reach p; the top token always stays.
    drop_sorted = probs.cumsum(dim=-1) - probs >= p
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))
