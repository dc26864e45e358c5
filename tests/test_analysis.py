"""Costs of a config and routing reports, checked against the model itself."""

import json
import re
from dataclasses import replace

import pytest
import torch

from moe_gpt.model.analysis import (
    flops_per_token,
    memory_estimate,
    parameter_counts,
    recommended_settings,
    routing_report,
)
from moe_gpt.config import GPTConfig, MoEConfig
from moe_gpt.model.gpt import GPT
from tests.helpers import script_main


def small(use_moe=True, **moe) -> GPTConfig:
    return GPTConfig(
        block_size=16,
        n_layer=2,
        n_head=2,
        n_embd=32,
        use_moe=use_moe,
        moe=MoEConfig(**{"num_experts": 4, "top_k": 2, **moe}),
    )


def test_parameter_counts_match_a_built_model():
    model = GPT(small())
    assert parameter_counts(small()) == {
        "params_total": model.num_parameters(),
        "params_active": model.num_active_parameters(),
    }


def test_gpt2_small_has_124m_parameters():
    counts = parameter_counts(GPTConfig(block_size=1024, n_layer=12, n_head=12, n_embd=768, use_moe=False))
    assert counts["params_total"] == pytest.approx(124.4e6, rel=0.001)


def test_matched_moe_has_dense_flops_plus_router():
    dense = flops_per_token(small(use_moe=False))["forward_flops_per_token"]
    matched = flops_per_token(small(top_k=2, hidden_size=64))["forward_flops_per_token"]  # 2 experts of 64 = 4*32
    assert matched - dense == 2 * 2 * 32 * 4  # the router's matmul in each of 2 layers
    assert flops_per_token(small())["train_flops_per_token"] == 3 * flops_per_token(small())["forward_flops_per_token"]


def test_flops_grow_with_top_k_not_with_expert_count():
    base = flops_per_token(small(num_experts=4, top_k=1))["forward_flops_per_token"]
    more_experts = flops_per_token(small(num_experts=8, top_k=1))["forward_flops_per_token"]
    more_active = flops_per_token(small(num_experts=4, top_k=2))["forward_flops_per_token"]
    assert more_experts - base == 2 * 2 * 32 * 4  # router only
    assert more_active - base == 2 * 2 * (2 * 32 * 128)


def test_memory_estimate_scales_activations_with_batch_and_sums():
    one, four = memory_estimate(small(), 1), memory_estimate(small(), 4)
    assert four["activations_mib"] == pytest.approx(4 * one["activations_mib"])
    assert four["weights_mib"] == one["weights_mib"]
    assert one["total_mib"] == pytest.approx(sum(v for k, v in one.items() if k != "total_mib"))
    with pytest.raises(ValueError, match="precision"):
        memory_estimate(small(), 1, "fp8")


def test_chunked_loss_caps_the_logits_memory_at_one_chunk():
    full = replace(small(), loss_chunk_size=0)
    assert memory_estimate(full, 8)["logits_mib"] == pytest.approx(8 * memory_estimate(full, 1)["logits_mib"])
    chunked = replace(small(), loss_chunk_size=16)  # one sequence of small()'s block_size, or less
    assert memory_estimate(chunked, 8)["logits_mib"] == memory_estimate(chunked, 1)["logits_mib"]
    assert memory_estimate(chunked, 8)["logits_mib"] < memory_estimate(full, 8)["logits_mib"]


def test_recommendations_are_advice_for_the_size():
    advice = recommended_settings(small())
    assert any("num_experts 2-4, top_k 1" in line for line in advice)
    assert any("current: num_experts=4, top_k=2" in line for line in advice)


def test_routing_report_shares_sum_to_one_per_layer():
    torch.manual_seed(0)
    report = routing_report(GPT(small()).eval(), torch.randint(0, 50257, (2, 16)))
    assert len(report["moe_layers"]) == 2
    for layer in report["moe_layers"]:
        assert sum(layer["expert_share"]) == pytest.approx(1.0)
        # E * sum(f * P): near 1 for a fresh router, at most E=4 (a sample can dip just under 1).
        assert 0.5 < layer["switch_balance_loss"] <= 4.0
        assert layer["experts_per_token"] == 2.0 and layer["dropped_fraction"] == 0.0


def test_routing_report_gives_experts_per_token_under_top_p_and_the_dropped_share_under_capacity():
    torch.manual_seed(0)
    model = GPT(small(top_p=0.3, capacity_factor=0.5)).eval()
    with torch.no_grad():  # a peaked router: top_p then often stops at one expert
        for layer in model.moe_layers():
            layer.router.gate.weight.mul_(200.0)
    report = routing_report(model, torch.randint(0, 50257, (2, 16)))
    for layer in report["moe_layers"]:
        assert 1.0 <= layer["experts_per_token"] < 2.0
        assert 0.0 < layer["dropped_fraction"] < 1.0


def test_analyze_config_cli_prints_costs_as_json():
    result = script_main("analyze", ["config", "model.moe.num_experts=4", "model.moe.top_k=1"])
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout)
    assert report["params_active"] < report["params_total"]
    assert report["memory_estimate"]["batch_size"] == 16 and report["advice"]


def test_analyze_routing_cli_reports_a_checkpoint(tiny_moe_checkpoint):
    result = script_main(
        "analyze",
        ["routing", "--checkpoint", str(tiny_moe_checkpoint), "--text", "def main():\n    return 0\n", "--intermediate"],
    )
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout)
    assert len(report["moe_layers"]) == 2
    assert set(report["moe_layers"][0]["intermediate"]) >= {"gate_scores", "top_k_indices", "expert_usage"}


def test_analyze_routing_cli_prints_a_table_in_three_decimals_and_json_on_request(tiny_moe_checkpoint):
    args = ["routing", "--checkpoint", str(tiny_moe_checkpoint), "--text", "def main():\n    return 0\n"]
    table = script_main("analyze", args)
    assert table.returncode == 0, table.stderr[-2000:]
    lines = table.stdout.splitlines()
    assert lines[2].startswith("| block | experts/token |") and len(lines) == 2 + 2 + 2  # 2 MoE blocks
    assert not re.search(r"\d\.\d{4}", table.stdout)  # no 0.1666666716337204
    report = json.loads(script_main("analyze", [*args, "--json"]).stdout)
    assert f"{report['moe_layers'][1]['expert_share'][0]:.3f}" in lines[-1]


def test_analyze_routing_cli_missing_checkpoint_is_one_line(tmp_path):
    result = script_main("analyze", ["routing", "--checkpoint", str(tmp_path / "no.ckpt"), "--text", "x"])
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: checkpoint {tmp_path / 'no.ckpt'} does not exist; pass a .ckpt from a run's checkpoints/ folder"
    ]
