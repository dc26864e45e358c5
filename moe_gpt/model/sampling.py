"""The sampling arguments' checks, without torch: scripts/generate.py checks its command line before it
imports torch and loads a checkpoint (seconds)."""

from __future__ import annotations

from typing import Optional

from moe_gpt.config import ConfigError


def check_sampling_arguments(
    max_new_tokens: int, temperature: float, top_k: Optional[int], top_p: Optional[float]
) -> None:
    if max_new_tokens < 0:
        raise ConfigError(f"max_new_tokens={max_new_tokens} must be >= 0")
    if temperature < 0:
        raise ConfigError(f"temperature={temperature} must be >= 0 (0 means greedy)")
    if top_k is not None and top_k < 1:
        raise ConfigError(f"top_k={top_k} must be >= 1, or None to keep every token")
    if top_p is not None and not 0 < top_p <= 1:
        raise ConfigError(f"top_p={top_p} must be in (0, 1], or None to keep every token")
