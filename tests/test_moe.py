"""The MoE layer on its own: router, dispatch, experts, losses and usage statistics."""

import json
import math

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


# ---------------------------------------------------------------- routing against a plain-Python oracle
ROUTERS = ["softmax", "noisy", "sigmoid"]  # noisy in eval mode: its noise is off, so the oracle is exact
ROUTING = {
    "plain": {},
    "aux_free": {"load_balance": "aux_free"},
    "groups": {"num_groups": 4, "topk_groups": 2},
    "aux_free+groups": {"load_balance": "aux_free", "num_groups": 4, "topk_groups": 2},
}


def oracle_router(kind: str, routing: str, **moe) -> Router:
    torch.manual_seed(0)
    router = Router(32, MoEConfig(num_experts=16, router=kind, **ROUTING[routing], **moe)).eval()
    torch.nn.init.normal_(router.gate.weight, std=0.5)
    if router.selection_bias is not None:  # large enough to reorder the experts of most tokens
        router.selection_bias.copy_(torch.randn(16, generator=torch.Generator().manual_seed(3)) * 0.3)
    return router


def oracle_scores(kind: str, logits: list[float]) -> tuple[list[float], list[float]]:
    """Scores (what weights are made of) and probabilities, from one token's logits."""
    if kind == "sigmoid":
        scores = [1 / (1 + math.exp(-v)) for v in logits]
    else:
        scores = [math.exp(v) / sum(math.exp(u) for u in logits) for v in logits]
    return scores, [v / sum(scores) for v in scores]


def oracle_candidates(router: Router, scores: list[float]) -> list[int]:
    """top_k experts by score + bias, inside the topk_groups groups whose two best sum highest; best first."""
    bias = [0.0] * len(scores) if router.selection_bias is None else router.selection_bias.tolist()
    selection = [s + b for s, b in zip(scores, bias)]
    size = len(selection) // router.num_groups
    group_score = [sum(sorted(selection[g * size : (g + 1) * size])[-2:]) for g in range(router.num_groups)]
    best_groups = sorted(range(router.num_groups), key=lambda g: -group_score[g])[: router.topk_groups]
    inside = [e for e in range(len(selection)) if e // size in best_groups]
    return sorted(inside, key=lambda e: -selection[e])[: router.top_k]


def oracle_used(candidates: list[int], probs: list[float], top_p: float, min_experts: int) -> set[int]:
    """Candidates in descending probability until their probability reaches top_p, at least min_experts."""
    used, mass = set(), 0.0
    for rank, expert in enumerate(sorted(candidates, key=lambda e: -probs[e])):
        if mass >= top_p and rank >= min_experts:
            break
        used.add(expert)
        mass += probs[expert]
    return used


@pytest.mark.parametrize("routing", ROUTING)
@pytest.mark.parametrize("kind", ROUTERS)
def test_router_chooses_the_top_k_selection_scores_and_renormalises_their_weights(kind, routing):
    router = oracle_router(kind, routing, top_k=3)
    x = torch.randn(100, 32)
    route = router(x)
    for t, logits in enumerate(route.logits_TE.double().tolist()):
        scores, probs = oracle_scores(kind, logits)
        chosen = oracle_candidates(router, scores)
        assert route.topk_idx_TK[t].tolist() == chosen
        expected = torch.tensor([scores[e] / sum(scores[e] for e in chosen) for e in chosen])
        torch.testing.assert_close(route.topk_scores_TK[t], expected.float())
        torch.testing.assert_close(route.probs_TE[t], torch.tensor(probs).float())


@pytest.mark.parametrize("top_p,min_experts", [(0.3, 1), (0.5, 2), (1.0, 1)])
@pytest.mark.parametrize("routing", ROUTING)
@pytest.mark.parametrize("kind", ROUTERS)
def test_top_p_keeps_the_most_probable_candidates_until_their_mass_reaches_p(kind, routing, top_p, min_experts):
    router = oracle_router(kind, routing, top_k=4, top_p=top_p, min_experts_per_token=min_experts)
    x = torch.randn(100, 32)
    route = router(x)
    used_TK = torch.ones_like(route.topk_idx_TK, dtype=torch.bool) if route.slot_used_TK is None else route.slot_used_TK
    for t, logits in enumerate(route.logits_TE.double().tolist()):
        scores, probs = oracle_scores(kind, logits)
        candidates = oracle_candidates(router, scores)
        used = oracle_used(candidates, probs, top_p, min_experts)
        assert route.topk_idx_TK[t].tolist() == candidates
        assert set(route.topk_idx_TK[t][used_TK[t]].tolist()) == used
        expected = torch.tensor([scores[e] / sum(scores[e] for e in used) if e in used else 0.0 for e in candidates])
        torch.testing.assert_close(route.topk_scores_TK[t], expected.float())
    if top_p == 1.0:  # exactly top-k routing
        assert route.slot_used_TK is None


def test_the_selection_bias_puts_candidates_out_of_probability_order():
    """Otherwise the top_p oracle test above could not tell selection order from probability order."""
    route = oracle_router("softmax", "aux_free", top_k=4)(torch.randn(100, 32))
    chosen_probs_TK = route.probs_TE.gather(1, route.topk_idx_TK)
    assert (chosen_probs_TK.diff(dim=-1) > 0).any(dim=-1).sum() > 10


# Logits far below zero: every sigmoid, or every chosen softmax probability, underflows to 0.
EXTREME_LOGITS = [[-200.0] * 4, [-1e4] * 4, [0.0, 0.0, -1e4, -1e4], [-1e4, 30.0, -200.0, -1e4]]


@pytest.mark.parametrize("top_p", [None, 0.5])
@pytest.mark.parametrize("bias", [None, [0.0, 0.0, 2.0, 2.0]], ids=["no_bias", "bias_to_underflowed"])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("kind", ROUTERS)
def test_extreme_logits_give_finite_weights_probabilities_and_gradients(kind, normalize, bias, top_p):
    balance = "switch" if bias is None else "aux_free"
    moe = MoEConfig(num_experts=4, top_k=2, router=kind, normalize_top_k=normalize, top_p=top_p, load_balance=balance)
    router = Router(4, moe).eval()
    torch.nn.init.eye_(router.gate.weight)  # the input rows are the logits
    if bias is not None:
        router.selection_bias.copy_(torch.tensor(bias))
    x = torch.tensor(EXTREME_LOGITS, requires_grad=True)
    route = router(x)
    assert torch.isfinite(route.topk_scores_TK).all() and torch.isfinite(route.probs_TE).all()
    torch.testing.assert_close(route.probs_TE.sum(-1), torch.ones(4))
    if normalize:
        torch.testing.assert_close(route.topk_scores_TK.sum(-1), torch.ones(4))
    (route.topk_scores_TK * torch.arange(1.0, 3.0)).sum().add(route.probs_TE[:, 0].sum()).backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(router.gate.weight.grad).all()


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


def test_intermediate_holds_every_routing_field_and_serialises():
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
