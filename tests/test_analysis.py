"""Costs of a config and routing reports, checked against the model itself."""

import json
import re
from dataclasses import replace

import pytest
import torch

from moe_gpt.model.analysis import (
    ParallelLayout,
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


MIB = 2**20


def counted_by_hand(config: GPTConfig) -> dict[str, int]:
    """Expert and other parameters of a built model, its root (outside the blocks) and its largest block."""
    model = GPT(config)
    experts = sum(p.numel() for layer in model.moe_layers() for p in layer.experts.parameters())
    blocks = [sum(p.numel() for p in block.parameters()) for block in model.transformer.h]
    block_experts = [sum(p.numel() for p in b.mlp.experts.parameters()) if b.is_moe else 0 for b in model.transformer.h]
    largest = max(range(len(blocks)), key=blocks.__getitem__)
    return {
        "total": model.num_parameters(), "experts": experts, "root": model.num_parameters() - sum(blocks),
        "block": blocks[largest], "block_experts": block_experts[largest],
    }  # fmt: skip


def test_every_ddp_process_holds_what_one_process_holds():
    one = memory_estimate(small(), 4, "bf16-mixed")
    assert memory_estimate(small(), 4, "bf16-mixed", ParallelLayout(processes=8)) == one
    assert one["gathered_weights_mib"] == 0
    assert one["weights_mib"] * MIB == counted_by_hand(small())["total"] * 4  # float32 weights under bf16-mixed


@pytest.mark.parametrize("precision,stored_bytes,compute_bytes", [("32-true", 4, 4), ("bf16-mixed", 4, 2), ("bf16-true", 2, 2)])
def test_fsdp_stores_one_nth_and_gathers_the_root_and_two_blocks(precision, stored_bytes, compute_bytes):
    counts, sharded = counted_by_hand(small()), memory_estimate(small(), 4, precision, ParallelLayout(4, sharded=True))
    assert sharded["weights_mib"] * MIB == pytest.approx(counts["total"] * stored_bytes / 4)
    assert sharded["gradients_mib"] == sharded["weights_mib"]
    assert sharded["optimizer_mib"] * MIB == pytest.approx(counts["total"] * 8 / 4)
    assert sharded["gathered_weights_mib"] * MIB == pytest.approx((counts["root"] + 2 * counts["block"]) * compute_bytes)
    alone = memory_estimate(small(), 4, precision)
    assert sharded["activations_mib"] == alone["activations_mib"] and sharded["logits_mib"] == alone["logits_mib"]


def test_expert_parallel_processes_hold_their_own_experts_and_never_gather_them():
    counts = counted_by_hand(small(num_experts=8))
    rest = counts["total"] - counts["experts"]
    ddp_ep = memory_estimate(small(num_experts=8), 4, "32-true", ParallelLayout(4, expert_parallel=4))
    assert ddp_ep["weights_mib"] * MIB == pytest.approx((rest + counts["experts"] / 4) * 4)
    fsdp = memory_estimate(small(num_experts=8), 4, "32-true", ParallelLayout(4, sharded=True))
    fsdp_ep = memory_estimate(small(num_experts=8), 4, "32-true", ParallelLayout(4, sharded=True, expert_parallel=4))
    assert fsdp_ep["weights_mib"] == pytest.approx(fsdp["weights_mib"])  # 1/4 of everything either way
    gathered_experts = fsdp["gathered_weights_mib"] - fsdp_ep["gathered_weights_mib"]
    assert gathered_experts * MIB == pytest.approx(2 * counts["block_experts"] * 4)  # none gathered
    # Expert groups of 2 in 4 processes: everything is sharded over a group of 2 and replicated over the 2 groups
    # (FSDP2's hybrid sharding on the expert mesh), so halved, not quartered.
    fsdp_ep2 = memory_estimate(small(num_experts=8), 4, "32-true", ParallelLayout(4, sharded=True, expert_parallel=2))
    assert fsdp_ep2["weights_mib"] * MIB == pytest.approx((rest / 2 + counts["experts"] / 2) * 4)


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


def test_analyze_config_reads_the_processes_and_the_sharding_from_the_trainer_settings():
    def memory(*overrides):
        result = script_main("analyze", ["config", "model/size=gpt2_small", "trainer=gpu", *overrides])
        assert result.returncode == 0, result.stderr[-2000:]
        return json.loads(result.stdout)["memory_estimate"]

    alone, ddp = memory(), memory("trainer.devices=4")
    fsdp = memory("trainer.devices=2", "trainer.num_nodes=2", "trainer.strategy=fsdp")
    assert (alone["processes"], ddp["processes"], fsdp["processes"]) == (1, 4, 4) and fsdp["strategy"] == "fsdp"
    assert ddp["weights_mib"] == alone["weights_mib"] and fsdp["weights_mib"] == pytest.approx(alone["weights_mib"] / 4)
    assert fsdp["gathered_weights_mib"] > 0 == alone["gathered_weights_mib"]
    expert_parallel = memory("trainer.devices=4", "trainer.strategy=fsdp", "trainer.expert_parallel=4")
    assert expert_parallel["expert_parallel"] == 4
    assert expert_parallel["gathered_weights_mib"] < fsdp["gathered_weights_mib"]  # the experts are never gathered
    refused = script_main("analyze", ["config", "trainer.devices=4", "trainer.expert_parallel=4"])
    assert refused.returncode == 2 and refused.stderr.strip().endswith("add trainer.strategy=fsdp")


def test_analyze_config_with_an_unknown_process_count_is_one_line():
    result = script_main("analyze", ["config", "trainer=gpu", "trainer.devices=auto", "trainer.strategy=fsdp"])
    assert result.returncode == 2 and "trainer.devices='auto' does not say how many processes" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


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
