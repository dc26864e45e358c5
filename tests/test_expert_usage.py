"""Expert-usage statistics computed from the counts an MoE layer keeps."""

import math

import pytest
import torch

from moe_gpt.config import GPTConfig, MoEConfig
from moe_gpt.training.expert_usage import usage_heatmap_png, usage_stats
from moe_gpt.model.moe import MoELayer


def layer_with_counts(counts: list[float]) -> MoELayer:
    layer = MoELayer(GPTConfig(n_embd=16, n_head=2, use_moe=True, moe=MoEConfig(num_experts=len(counts), top_k=1)))
    layer.tokens_per_expert.copy_(torch.tensor(counts))
    return layer


def test_balanced_usage_has_no_load_violation():
    stats = usage_stats(layer_with_counts([5, 5, 5, 5]))
    assert stats["share"] == [0.25] * 4
    assert stats["max_load_violation"] == pytest.approx(0.0)


def test_collapsed_usage_violation_is_experts_minus_one():
    stats = usage_stats(layer_with_counts([0, 12, 0, 0]))
    assert stats["max_load_violation"] == pytest.approx(3.0)


def test_router_entropy_is_the_mean_over_routed_tokens():
    layer = layer_with_counts([1, 1, 1, 1])
    layer.train()
    layer(torch.zeros(1, 3, 16))  # equal logits: uniform probabilities, entropy ln(E)
    stats = usage_stats(layer)
    assert stats["router_entropy"] == pytest.approx(math.log(4), rel=1e-5)
    assert stats["router_entropy_ratio"] == pytest.approx(1.0, rel=1e-5)


def test_heatmap_is_a_png():
    assert usage_heatmap_png([[0.5, 0.5], [0.9, 0.1]]).startswith(b"\x89PNG")
