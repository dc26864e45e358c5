"""The MoE layer on its own: router, dispatch, experts, losses and usage statistics."""

import json

import pytest
import torch

from moe_gpt.config import ACTIVATIONS, GPTConfig, MoEConfig
from moe_gpt.model.intermediate import to_jsonable
from moe_gpt.model.moe import (
    Experts,
    MoELayer,
    Router,
    reference_moe_forward,
    switch_load_balance_loss,
    variance_load_balance_loss,
)


def make_layer(num_experts=4, top_k=2, activation="gelu", n_embd=32, **moe) -> MoELayer:
    torch.manual_seed(0)
    config = GPTConfig(
        n_embd=n_embd, n_head=4, use_moe=True, moe=MoEConfig(num_experts=num_experts, top_k=top_k, activation=activation, **moe)
    )
    layer = MoELayer(config)
    for p in layer.parameters():  # zero-initialised biases would hide bias bugs
        torch.nn.init.normal_(p, std=0.2)
    return layer


def test_expert_forward_maps_tokens_to_model_width():
    experts = Experts(num_experts=3, n_embd=16, hidden=64, activation="relu", dropout=0.0, bias=True)
    torch.nn.init.normal_(experts.c_fc_weight)
    torch.nn.init.normal_(experts.c_proj_weight)
    x = torch.randn(5, 16)
    out = experts.expert_forward(1, x)
    expected = torch.relu(x @ experts.c_fc_weight[1].T + experts.c_fc_bias[1]) @ experts.c_proj_weight[1].T
    assert out.shape == (5, 16)
    torch.testing.assert_close(out, expected + experts.c_proj_bias[1])


def test_gate_probabilities_sum_to_one():
    router = Router(32, MoEConfig(num_experts=8, top_k=2, normalize_top_k=True))
    route = router(torch.randn(50, 32))
    torch.testing.assert_close(route.probs_TE.sum(-1), torch.ones(50))
    assert (route.probs_TE >= 0).all()


def test_topk_indices_are_in_range_and_distinct():
    router = Router(32, MoEConfig(num_experts=8, top_k=3, normalize_top_k=True))
    idx = router(torch.randn(200, 32)).topk_idx_TK
    assert idx.shape == (200, 3)
    assert idx.min() >= 0 and idx.max() < 8
    assert all(len(set(row)) == 3 for row in idx.tolist())


def test_topk_indices_pick_the_largest_probabilities():
    router = Router(32, MoEConfig(num_experts=8, top_k=2, normalize_top_k=False))
    route = router(torch.randn(100, 32))
    chosen = route.probs_TE.gather(1, route.topk_idx_TK).min(-1).values
    unchosen = route.probs_TE.scatter(1, route.topk_idx_TK, -1.0).max(-1).values
    assert (chosen >= unchosen).all()
    torch.testing.assert_close(route.topk_scores_TK, route.probs_TE.gather(1, route.topk_idx_TK))


def test_topk_weights_sum_to_one():
    router = Router(32, MoEConfig(num_experts=8, top_k=2, normalize_top_k=True))
    scores = router(torch.randn(100, 32)).topk_scores_TK
    torch.testing.assert_close(scores.sum(-1), torch.ones(100))


def test_router_runs_in_float32_under_autocast():
    router = Router(32, MoEConfig(num_experts=4, top_k=1, normalize_top_k=True)).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        route = router(torch.randn(10, 32, dtype=torch.bfloat16))
    assert route.logits_TE.dtype == torch.float32 and route.probs_TE.dtype == torch.float32


@pytest.mark.parametrize("top_k", [1, 2, 4])
def test_sorted_dispatch_matches_reference_loop(top_k):
    layer = make_layer(num_experts=4, top_k=top_k)
    x = torch.randn(3, 7, 32)
    fast, _, _ = layer(x)
    torch.testing.assert_close(fast, reference_moe_forward(layer, x), rtol=1e-5, atol=1e-6)


def test_sorted_dispatch_gradients_match_reference_loop():
    layer = make_layer(num_experts=6, top_k=2)
    x = torch.randn(2, 9, 32, requires_grad=True)
    target = torch.randn(2, 9, 32)

    def gradients(forward):
        layer.zero_grad()
        x.grad = None
        (forward(x) * target).sum().backward()
        return [x.grad.clone()] + [p.grad.clone() for p in layer.parameters()]

    fast = gradients(lambda x: layer(x)[0])
    reference = gradients(lambda x: reference_moe_forward(layer, x))
    for a, b in zip(fast, reference):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_gradients_reach_router_and_every_used_expert():
    layer = make_layer(num_experts=4, top_k=2)
    x = torch.randn(4, 16, 32)
    out, losses, _ = layer(x)
    (out.pow(2).mean() + 0.01 * losses.load_balance).backward()
    assert layer.router.gate.weight.grad.abs().sum() > 0
    used = torch.bincount(layer.router(x.view(-1, 32)).topk_idx_TK.flatten(), minlength=4)
    for expert in range(4):
        has_grad = layer.experts.c_fc_weight.grad[expert].abs().sum() > 0
        assert has_grad == (used[expert] > 0)


def test_load_balance_loss_gives_router_gradient_without_lm_loss():
    layer = make_layer()
    _, losses, _ = layer(torch.randn(2, 8, 32))
    losses.load_balance.backward()
    assert layer.router.gate.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("num_experts,top_k", [(4, 1), (8, 2), (8, 8)])
def test_switch_loss_is_one_for_uniform_routing(num_experts, top_k):
    probs = torch.full((64, num_experts), 1.0 / num_experts)
    counts = torch.full((num_experts,), 64.0 * top_k / num_experts)
    torch.testing.assert_close(switch_load_balance_loss(probs, counts), torch.tensor(1.0))


@pytest.mark.parametrize("num_experts", [2, 4, 16])
def test_switch_loss_is_num_experts_for_total_collapse(num_experts):
    probs = torch.zeros(64, num_experts)
    probs[:, 0] = 1.0
    counts = torch.zeros(num_experts)
    counts[0] = 64
    torch.testing.assert_close(switch_load_balance_loss(probs, counts), torch.tensor(float(num_experts)))


def test_variance_loss_is_zero_when_balanced_and_positive_when_not():
    assert variance_load_balance_loss(torch.full((10, 4), 0.25)).item() == 0.0
    skewed = torch.tensor([[0.7, 0.1, 0.1, 0.1]]).repeat(10, 1)
    assert variance_load_balance_loss(skewed).item() > 0


def test_load_balance_none_is_zero():
    _, losses, _ = make_layer(load_balance="none")(torch.randn(2, 4, 32))
    assert losses.load_balance.item() == 0.0


def test_z_loss_is_mean_squared_logsumexp():
    layer = make_layer()
    x = torch.randn(2, 5, 32)
    _, losses, _ = layer(x)
    logits = layer.router(x.view(-1, 32)).logits_TE
    torch.testing.assert_close(losses.z, torch.logsumexp(logits, -1).pow(2).mean())


def test_no_expert_is_ignored_on_random_input():
    layer = make_layer(num_experts=8, top_k=2)
    layer.train()
    layer(torch.randn(8, 64, 32))
    assert (layer.tokens_per_expert > 0).all()
    assert layer.tokens_per_expert.sum().item() == 8 * 64 * 2


def test_usage_is_recorded_only_in_training_and_resets():
    layer = make_layer()
    layer.eval()
    layer(torch.randn(2, 8, 32))
    assert layer.tokens_per_expert.sum() == 0
    layer.train()
    layer(torch.randn(2, 8, 32))
    assert layer.tokens_per_expert.sum() == 2 * 8 * 2 and layer.routed_tokens == 16
    layer.reset_usage()
    assert layer.tokens_per_expert.sum() == 0 and layer.routed_tokens == 0


def test_usage_buffers_are_not_saved_in_checkpoints():
    assert not any("tokens_per_expert" in key for key in make_layer().state_dict())


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("num_experts", [2, 4, 8])
def test_every_activation_topk_and_expert_count_combination_runs(activation, top_k, num_experts):
    layer = make_layer(num_experts=num_experts, top_k=top_k, activation=activation)
    x = torch.randn(2, 6, 32, requires_grad=True)
    out, losses, _ = layer(x)
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert torch.isfinite(losses.load_balance) and torch.isfinite(losses.z)
    out.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_activation_changes_the_output():
    x = torch.randn(2, 6, 32)
    outputs = {a: make_layer(activation=a)(x)[0] for a in ACTIVATIONS}
    assert not torch.allclose(outputs["gelu"], outputs["relu"])
    assert not torch.allclose(outputs["swish"], outputs["tanh"])


def test_intermediate_holds_the_design_fields_and_serialises():
    layer = make_layer(num_experts=4, top_k=2)
    out, _, data = layer(torch.randn(2, 5, 32), return_intermediate=True)
    assert data["gate_scores"].shape == (10, 4)
    assert data["top_k_scores"].shape == data["top_k_indices"].shape == (10, 2)
    assert data["expert_outputs"]["tokens_per_expert"].sum() == 20
    torch.testing.assert_close(data["final_output"], out.view(10, 32))
    torch.testing.assert_close(data["expert_usage"]["token_share"].sum(), torch.tensor(1.0))
    payload = json.loads(json.dumps(to_jsonable(data)))
    assert set(payload) == {
        "gate_scores",
        "top_k_scores",
        "top_k_indices",
        "top_k_used",
        "expert_outputs",
        "final_output",
        "load_balance_loss",
        "z_loss",
        "expert_usage",
    }
    assert payload["top_k_indices"] == data["top_k_indices"].tolist()


def test_expert_dropout_falls_back_to_model_dropout():
    config = GPTConfig(n_embd=32, n_head=4, dropout=0.3, use_moe=True)
    assert MoELayer(config).experts.dropout.p == 0.3
    config = GPTConfig(n_embd=32, n_head=4, dropout=0.3, use_moe=True, moe=MoEConfig(dropout=0.1))
    assert MoELayer(config).experts.dropout.p == 0.1


def test_expert_hidden_size_defaults_to_four_times_width():
    assert make_layer(n_embd=32).experts.c_fc_weight.shape == (4, 128, 32)
    assert make_layer(n_embd=32, hidden_size=48).experts.c_fc_weight.shape == (4, 48, 32)
