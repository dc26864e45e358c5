"""The MoE layer under CPU autocast (bf16 and fp16): every expert path against its own float32 result,
and real Lightning training runs in bf16-mixed and 16-mixed."""


import lightning as L
import pytest
import torch

from moe_gpt.config import GPTConfig, LoggerConfig, MoEConfig, TrainerConfig
from moe_gpt.model.moe import MoELayer
from moe_gpt.training.run import RunRecord, train
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
def training_losses(tiny_run_config, run_dir, precision: str, clip: float = 1.0, callbacks=()) -> list[float]:
    moe = MoEConfig(num_experts=4, top_k=2, hidden_size=16)  # narrower than the 32-wide model
    cfg = tiny_run_config(
        run_dir,
        model=GPTConfig(block_size=32, n_layer=2, n_head=2, n_embd=32, use_moe=True, moe=moe),
        trainer=TrainerConfig(
            accelerator="cpu", devices=1, precision=precision, max_steps=4, val_check_interval=4,
            limit_val_batches=1, log_every_n_steps=1, gradient_clip_val=clip,
        ),
        logger=LoggerConfig(kind="csv"),
    )
    train(cfg, RunRecord(callbacks=list(callbacks)))
    return [loss for _, loss in csv_column(run_dir, "train/loss")]


class GradientNorms(L.Callback):
    """The global gradient norm of each optimizer step before clipping, and as applied (the gradients stay until
    the next step zeroes them)."""

    def __init__(self):
        self.before: list[float] = []
        self.applied: list[float] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.before.append(self._norm(pl_module))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.applied.append(self._norm(pl_module))

    @staticmethod
    def _norm(pl_module) -> float:
        return float(torch.nn.utils.get_total_norm([p.grad for p in pl_module.parameters() if p.grad is not None]))


# Lightning's mixed-precision plugin refuses to clip for the fused AdamW; the module clips itself.
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_the_global_gradient_norm_is_clipped_with_the_fused_optimizer(precision, tiny_run_config, tmp_path):
    norms = GradientNorms()
    training_losses(tiny_run_config, tmp_path, precision, clip=1e-3, callbacks=[norms])
    assert len(norms.applied) == 4 and all(norm > 1e-2 for norm in norms.before), norms.before
    assert all(norm <= 1e-3 * (1 + 1e-4) for norm in norms.applied), norms.applied
