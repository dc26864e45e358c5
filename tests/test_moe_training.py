"""The MoE options in real training runs: the aux-free bias in Lightning, the logged routing state, and every
option from the CLI on the default corpus (an aux_free run's resume: tests/test_resume.py)."""

import json
import math

import pytest
import torch

from tests.helpers import REPO, TINY, csv_column, train_in_process, train_main

AUX_FREE = [
    "model.moe.router=sigmoid",
    "model.moe.load_balance=aux_free",
    "model.moe.aux_loss_coef=0",
    "model.moe.bias_update_rate=0.01",
]


def selection_biases(run_dir) -> list[torch.Tensor]:
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    return [tensor for key, tensor in state.items() if key.endswith("router.selection_bias")]


def test_aux_free_bias_moves_once_per_optimizer_step_is_checkpointed_and_logged(tmp_path, corpus_overrides):
    steps, rate = 4, 0.01
    overrides = (
        TINY
        + corpus_overrides
        + AUX_FREE
        + ["logger=csv", f"trainer.max_steps={steps}", "trainer.accumulate_grad_batches=2"]
    )
    train_in_process(overrides, tmp_path)
    biases = selection_biases(tmp_path)
    assert len(biases) == 2  # one per MoE block
    for bias in biases:
        moves = bias / rate
        torch.testing.assert_close(moves, moves.round(), rtol=0, atol=1e-4)  # whole steps of the update rate
        assert moves.abs().max() <= steps  # once per optimizer step, not per accumulated batch
        assert moves.abs().sum() > 0
    logged = csv_column(tmp_path, "moe/layer0/expert0_bias")
    assert logged and all(math.isfinite(value) for _, value in logged)


def test_capacity_and_top_p_log_dropped_fraction_and_experts_per_token(tmp_path, corpus_overrides):
    overrides = TINY + corpus_overrides + ["logger=csv", "model.moe.capacity_factor=0.5", "model.moe.top_p=0.5"]
    train_in_process(overrides, tmp_path)
    dropped = [value for _, value in csv_column(tmp_path, "moe/dropped_fraction")]
    per_token = [value for _, value in csv_column(tmp_path, "moe/experts_per_token")]
    assert dropped and all(0 < value < 1 for value in dropped)  # half capacity: some slots always overflow
    assert per_token and all(1 <= value <= 2 for value in per_token)


# The routers, group-limited and dynamic routing, the balancing losses, capacity, shared experts,
# first_k_dense and the reference expert path, from the CLI, on the default corpus (stdlib), in three runs.
OPTION_RUNS = {
    "noisy_capacity_first_k_dense": [
        "model.moe.router=noisy",
        "model.moe.capacity_factor=1.0",
        "model.moe.eval_capacity_factor=2.0",
        "model.n_layer=3",
        "model.moe.first_k_dense=1",
    ],
    "sigmoid_groups_aux_free_shared": [
        *AUX_FREE,
        "model.moe.num_experts=8",
        "model.moe.num_groups=4",
        "model.moe.topk_groups=2",
        "model.moe.num_shared_experts=1",
        "model.moe.hidden_size=32",
    ],
    "top_p_loop_variance": [
        "model.moe.top_p=0.6",
        "model.moe.min_experts_per_token=1",
        "model.moe.experts_impl=loop",
        "model.moe.load_balance=variance",
    ],
}


@pytest.mark.slow
@pytest.mark.parametrize("options", OPTION_RUNS.values(), ids=OPTION_RUNS.keys())
def test_every_moe_option_trains_from_the_cli_on_the_default_corpus(tmp_path, options):
    default_corpus = [f"data.tokenizer_dir={REPO / 'data' / 'tokenizer'}", f"data.cache_dir={REPO / 'data' / 'tokens'}"]
    result = train_main(TINY + default_corpus + options + ["logger=csv", f"hydra.run.dir={tmp_path}"])
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert math.isfinite(metrics["val_loss"]) and metrics["val_loss"] < 11.0
    assert csv_column(tmp_path, "moe/experts_per_token")
