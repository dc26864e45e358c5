"""The MoE layer under CPU autocast (bf16 and fp16): every expert path against its own float32 result,
and real Lightning training runs in bf16-mixed and 16-mixed."""

import math

import pytest
import torch

from moe_gpt.config import GPTConfig, LoggerConfig, MoEConfig, TrainerConfig
from moe_gpt.model.moe import MoELayer
from moe_gpt.training.run import train
from tests.helpers import csv_column

IMPLS = ["loop", "blocked", "grouped_mm", "auto"]
# Relative error (norm of the difference over the norm of the float32 result) each dtype's
# 8- or 11-bit mantissa allows after two matmuls; float32 rounding itself is ~1e-7.
TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 3e-3}
# Narrow experts (hidden < n_embd) scale the hidden activations by the routing weight, wide ones the outputs.
WIDTHS = {"narrow": 16, "wide": 64}
FEATURES = [{}, {"capacity_factor": 0.5, "num_shared_experts": 1}]


def layer_outputs_and_gradients(layer: MoELayer, x: torch.Tensor, dtype=None) -> list[torch.Tensor]:
    """The layer's output, then the gradients of x and of every parameter, all in float32."""
    x = x.clone().requires_grad_()
    layer.zero_grad()
    with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
        out, losses, _ = layer(x)
    target = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    ((out.float() * target).sum() + losses.load_balance).backward()
    return [out.detach().float(), x.grad] + [p.grad for p in layer.parameters()]


def assert_matches_float32(layer: MoELayer, x: torch.Tensor, dtype: torch.dtype) -> None:
    expected = layer_outputs_and_gradients(layer, x)
    actual = layer_outputs_and_gradients(layer, x, dtype)
    names = ["output", "x.grad"] + [f"{name}.grad" for name, _ in layer.named_parameters()]
    for name, got, want in zip(names, actual, expected):
        assert torch.isfinite(got).all(), name
        relative_error = ((got - want).norm() / want.norm()).item()
        assert relative_error < TOLERANCE[dtype], f"{name}: relative error {relative_error:.2e}"


def make_layer(n_embd: int, **moe) -> MoELayer:
    torch.manual_seed(0)
    layer = MoELayer(GPTConfig(n_embd=n_embd, n_head=4, use_moe=True, moe=MoEConfig(experts_impl=moe.pop("impl"), **moe)))
    for p in layer.parameters():  # zero-initialised biases would hide bias bugs
        torch.nn.init.normal_(p, std=0.2)
    return layer


@pytest.mark.parametrize("dtype", TOLERANCE, ids=str)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("features", FEATURES, ids=lambda f: ",".join(f) or "dropless")
def test_every_expert_path_matches_float32_under_autocast(dtype, impl, width, features):
    layer = make_layer(32, impl=impl, num_experts=4, top_k=2, hidden_size=WIDTHS[width], **features)
    x = torch.randn(2, 24, 32, generator=torch.Generator().manual_seed(1))
    assert_matches_float32(layer, x, dtype)


@pytest.mark.parametrize("dtype", TOLERANCE, ids=str)
@pytest.mark.parametrize("impl", IMPLS)
def test_fine_grained_experts_narrower_than_the_model_match_float32_under_autocast(dtype, impl):
    # The README's fine-grained example: 32 experts of width 64 in a 128-wide model, 8 per token.
    layer = make_layer(128, impl=impl, num_experts=32, top_k=8, hidden_size=64)
    x = torch.randn(2, 32, 128, generator=torch.Generator().manual_seed(1))
    assert_matches_float32(layer, x, dtype)


# ------------------------------------------------------------------------ real training runs
def training_losses(tiny_run_config, run_dir, precision: str) -> list[float]:
    moe = MoEConfig(num_experts=4, top_k=2, hidden_size=16)  # narrower than the 32-wide model
    cfg = tiny_run_config(
        run_dir,
        model=GPTConfig(block_size=32, n_layer=2, n_head=2, n_embd=32, use_moe=True, moe=moe),
        trainer=TrainerConfig(
            accelerator="cpu", devices=1, precision=precision, max_steps=4, val_check_interval=4,
            limit_val_batches=1, log_every_n_steps=1,
        ),
        logger=LoggerConfig(kind="csv"),
    )
    train(cfg)
    return [loss for _, loss in csv_column(run_dir, "train/loss")]


# On the CPU Lightning runs 16-mixed as bf16-mixed (with a warning): both must train. The layer
# tests above compare the numbers with float32; here the whole run must stay finite and learn.
@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_mixed_precision_training_through_narrow_experts_lowers_a_finite_loss(precision, tiny_run_config, tmp_path):
    losses = training_losses(tiny_run_config, tmp_path, precision)
    assert len(losses) == 4 and all(math.isfinite(loss) for loss in losses)
    assert losses[-1] < losses[0]
