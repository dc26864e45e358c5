"""The routed experts' whole pass, gather -> FFN -> weighted scatter-add, as one operator.

``moe_ffn(x_TD, token_of_row_S, weight_S, offsets_E, w1_EHD, b1_EH, w2_EDH, ...)`` returns

    out[t] = sum over rows s of token t:  weight[s] * act(x[t] @ w1[e].T + b1[e]) @ w2[e].T

where rows are token-slots sorted by expert, expert e owns rows ``offsets[e-1]:offsets[e]``
(``offsets`` is the running sum of rows per expert, on the device), and rows from
``offsets[-1]`` on are not computed. The output bias is left to the caller (it is one
(T, E) x (E, D) matmul there).

Two implementations, chosen by ``impl``:
- ``grouped_mm``: whole-tensor gathers and scatters around ``torch.nn.functional.grouped_mm``,
  one call per matmul; nothing is read on the host. Used on CUDA (bfloat16, Ampere or newer).
- ``blocked``: one expert's rows at a time (matmul, bias, activation, weighting, matmul) while
  the block is in cache. Used on the CPU, where reading the offsets on the host costs nothing;
  it measured faster there than grouped_mm, whose full-size elementwise passes run out of
  cache (scripts/bench_moe.py times both).
``auto`` picks between them by device and dtype.

Both are custom operators (``torch.library.custom_op``) with shape-only fake versions, so
``torch.compile(fullgraph=True)`` traces through them; the backward pass is a second operator
for the same reason. Saved for backward: the activation's input and output per row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from moe_gpt.config import ACTIVATIONS as ACTIVATION_NAMES

# grouped_mm's kernels in torch 2.13: these dtypes on the CPU, bfloat16 on CUDA from Ampere on.
GROUPED_MM_CPU_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MIN_CUDA_CAPABILITY = (8, 0)


@dataclass(frozen=True)
class Activation:
    forward: Callable[[Tensor], Tensor]
    into: Callable[[Tensor, Tensor], Tensor]  # the same, written into a given tensor (one pass less than a copy)
    backward: Callable[[Tensor, Tensor, Tensor], Tensor]  # (grad of output, input, output) -> grad of input


_KERNELS = {
    # GPT-2 was trained with the tanh approximation; using it keeps pretrained FFNs exact.
    "gelu": Activation(
        lambda x: F.gelu(x, approximate="tanh"),
        lambda x, out: torch._C._nn.gelu(x, approximate="tanh", out=out),
        lambda grad, h, a: torch.ops.aten.gelu_backward(grad, h, approximate="tanh"),
    ),
    "relu": Activation(F.relu, lambda x, out: torch.clamp_min(x, 0, out=out), lambda grad, h, a: grad * (h > 0)),
    "swish": Activation(
        F.silu, lambda x, out: torch._C._nn.silu(x, out=out), lambda grad, h, a: torch.ops.aten.silu_backward(grad, h)
    ),
    "tanh": Activation(
        torch.tanh, lambda x, out: torch.tanh(x, out=out), lambda grad, h, a: torch.ops.aten.tanh_backward(grad, a)
    ),
}
# Keyed by the names the config accepts (config.ACTIVATIONS, kept free of torch so that validating
# a config never imports it): a name without a kernel here fails at import, not mid-training.
ACTIVATIONS: dict[str, Activation] = {name: _KERNELS[name] for name in ACTIVATION_NAMES}


def has_grouped_mm_kernel(x: Tensor) -> bool:
    if x.device.type == "cpu":
        return x.dtype in GROUPED_MM_CPU_DTYPES
    if x.device.type == "cuda":
        return x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device) >= MIN_CUDA_CAPABILITY
    return False


def uses_grouped_mm(impl: str, weight: Tensor) -> bool:
    if impl == "auto":
        return weight.device.type != "cpu" and has_grouped_mm_kernel(weight)
    return impl == "grouped_mm"


def row_blocks(offsets_E: Tensor) -> list[tuple[int, int, int]]:
    """(expert, first row, end row) of every expert with rows; reads the offsets on the host."""
    ends = offsets_E.tolist()
    return [(e, start, end) for e, (start, end) in enumerate(zip([0] + ends[:-1], ends)) if end > start]


def _zero_unowned(rows: Tensor, offsets_E: Tensor) -> Tensor:
    """grouped_mm leaves rows past the last offset undefined, not zero."""
    owned = torch.arange(rows.shape[0], device=rows.device) < offsets_E[-1]
    return rows.masked_fill_(~owned[:, None], 0)


def _expert_of_row(offsets_E: Tensor, num_rows: int) -> Tensor:
    """Each row's expert, from the offsets on the device (rows past the end get the last expert)."""
    rows = torch.arange(num_rows, device=offsets_E.device, dtype=offsets_E.dtype)
    return torch.searchsorted(offsets_E, rows, right=True).clamp_max(offsets_E.shape[0] - 1)


def _grouped_mm(a: Tensor, b: Tensor, offsets_E: Tensor, every_row_computed: bool) -> Tensor:
    out = F.grouped_mm(a, b, offs=offsets_E)
    return out if every_row_computed else _zero_unowned(out, offsets_E)


# ---------------------------------------------------------------------------------- forward
def _forward_grouped(x, tokens, weight, offsets, w1, b1, w2, every_row_computed, activation):
    x_rows = x.index_select(0, tokens).to(w1.dtype)
    h = _grouped_mm(x_rows, w1.transpose(-2, -1), offsets, every_row_computed)
    if b1 is not None:
        h = h + b1.index_select(0, _expert_of_row(offsets, h.shape[0]))
    a = ACTIVATIONS[activation].forward(h)
    y = _grouped_mm((a * weight[:, None]).to(w2.dtype), w2.transpose(-2, -1), offsets, every_row_computed)
    return torch.zeros_like(x).index_add_(0, tokens, y.to(x.dtype)), h, a


def _forward_blocked(x, tokens, weight, offsets, w1, b1, w2, every_row_computed, activation):
    x_rows = x.index_select(0, tokens).to(w1.dtype)
    h = torch.empty(x_rows.shape[0], w1.shape[1], dtype=w1.dtype, device=x.device)
    a, y = torch.empty_like(h), _rows_buffer(x_rows, w2.shape[1], every_row_computed)
    scale_outputs = _outputs_are_narrower(w1, w2)
    for e, start, end in row_blocks(offsets):
        rows = slice(start, end)
        if b1 is None:
            torch.mm(x_rows[rows], w1[e].t(), out=h[rows])
        else:
            torch.addmm(b1[e], x_rows[rows], w1[e].t(), out=h[rows])
        ACTIVATIONS[activation].into(h[rows], a[rows])
        if scale_outputs:
            torch.mm(a[rows], w2[e].t(), out=y[rows]).mul_(weight[rows, None])
        else:
            # The float32 weight promotes the product: back to the matmul's dtype (autocast).
            torch.mm((a[rows] * weight[rows, None]).to(w2.dtype), w2[e].t(), out=y[rows])
    # One scatter for all rows: measured twice as fast as one per expert.
    return torch.zeros_like(x).index_add_(0, tokens, y.to(x.dtype)), h, a


def _rows_buffer(like: Tensor, width: int, every_row_computed: bool) -> Tensor:
    """Per-row results: every row is written by its expert's block, except rows no expert owns (zero)."""
    make = torch.empty if every_row_computed else torch.zeros
    return make(like.shape[0], width, dtype=like.dtype, device=like.device)


def _outputs_are_narrower(w1: Tensor, w2: Tensor) -> bool:
    """Scale by the routing weight wherever the numbers are fewer: the outputs (D) or the hidden units (H)."""
    return w2.shape[1] <= w1.shape[1]


@torch.library.custom_op("moe_gpt::moe_ffn", mutates_args=())
def moe_ffn(
    x_TD: Tensor,
    token_of_row_S: Tensor,
    weight_S: Tensor,
    offsets_E: Tensor,
    w1_EHD: Tensor,
    b1_EH: Optional[Tensor],
    w2_EDH: Tensor,
    every_row_computed: bool,
    activation: str,
    impl: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """(out_TD, h_SH, a_SH): the weighted sum per token, and the activation's input and output per row."""
    forward = _forward_grouped if uses_grouped_mm(impl, w1_EHD) else _forward_blocked
    return forward(x_TD, token_of_row_S, weight_S, offsets_E, w1_EHD, b1_EH, w2_EDH, every_row_computed, activation)


@moe_ffn.register_fake
def _moe_ffn_shapes(x_TD, token_of_row_S, weight_S, offsets_E, w1_EHD, b1_EH, w2_EDH, *flags):
    h = x_TD.new_empty(token_of_row_S.shape[0], w1_EHD.shape[1], dtype=w1_EHD.dtype)
    return torch.empty_like(x_TD), h, torch.empty_like(h)


# --------------------------------------------------------------------------------- backward
def _backward_grouped(g, x, tokens, weight, offsets, w1, w2, h, a, every_row_computed, activation):
    g_rows = g.index_select(0, tokens).to(w2.dtype)
    da = _grouped_mm(g_rows, w2, offsets, every_row_computed)  # gradient of the unweighted activation
    grad_weight = (da.float() * a.float()).sum(-1)
    grad_w2 = F.grouped_mm(g_rows.t(), (a * weight[:, None]).to(w2.dtype), offs=offsets)  # rows cut at offsets
    dh = ACTIVATIONS[activation].backward((da * weight[:, None]).to(h.dtype), h, a).to(w1.dtype)
    x_rows = x.index_select(0, tokens).to(w1.dtype)
    grad_w1 = F.grouped_mm(dh.t(), x_rows, offs=offsets)
    grad_b1 = dh.new_zeros(w1.shape[:2]).index_add_(0, _expert_of_row(offsets, dh.shape[0]), dh)
    dx_rows = _grouped_mm(dh, w1, offsets, every_row_computed)
    grad_x = torch.zeros_like(x).index_add_(0, tokens, dx_rows.to(x.dtype))
    return grad_x, grad_weight, grad_w1, grad_b1, grad_w2


def _backward_blocked(g, x, tokens, weight, offsets, w1, w2, h, a, every_row_computed, activation):
    g_rows, x_rows = g.index_select(0, tokens).to(w2.dtype), x.index_select(0, tokens).to(w1.dtype)
    dx_rows, grad_weight = _rows_buffer(x_rows, x_rows.shape[1], every_row_computed), weight.new_zeros(weight.shape)
    grad_w1, grad_w2, grad_b1 = torch.empty_like(w1), torch.empty_like(w2), w1.new_empty(w1.shape[:2])
    blocks = row_blocks(offsets)
    for e in set(range(w1.shape[0])) - {e for e, _, _ in blocks}:  # experts without rows: no gradient
        grad_w1[e], grad_w2[e], grad_b1[e] = 0, 0, 0
    scale_outputs = _outputs_are_narrower(w1, w2)
    for e, start, end in blocks:
        rows = slice(start, end)
        a_rows, w_rows = a[rows], weight[rows, None].to(w2.dtype)
        da = g_rows[rows] @ w2[e]  # gradient of the unweighted activation output
        grad_weight[rows] = torch.linalg.vecdot(da, a_rows)
        if scale_outputs:
            torch.mm((g_rows[rows] * w_rows).t(), a_rows, out=grad_w2[e])
        else:
            torch.mm(g_rows[rows].t(), a_rows * w_rows, out=grad_w2[e])
        dh = ACTIVATIONS[activation].backward(da.mul_(w_rows), h[rows], a_rows)
        torch.mm(dh.t(), x_rows[rows], out=grad_w1[e])
        torch.sum(dh, 0, out=grad_b1[e])
        torch.mm(dh, w1[e], out=dx_rows[rows])
    return torch.zeros_like(x).index_add_(0, tokens, dx_rows.to(x.dtype)), grad_weight, grad_w1, grad_b1, grad_w2


@torch.library.custom_op("moe_gpt::moe_ffn_backward", mutates_args=())
def moe_ffn_backward(
    grad_out_TD: Tensor,
    x_TD: Tensor,
    token_of_row_S: Tensor,
    weight_S: Tensor,
    offsets_E: Tensor,
    w1_EHD: Tensor,
    w2_EDH: Tensor,
    h_SH: Tensor,
    a_SH: Tensor,
    every_row_computed: bool,
    activation: str,
    impl: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of x, the routing weights, w1, b1 and w2."""
    backward = _backward_grouped if uses_grouped_mm(impl, w1_EHD) else _backward_blocked
    tensors = (grad_out_TD.contiguous(), x_TD, token_of_row_S, weight_S, offsets_E, w1_EHD, w2_EDH, h_SH, a_SH)
    return backward(*tensors, every_row_computed, activation)


@moe_ffn_backward.register_fake
def _moe_ffn_backward_shapes(grad_out_TD, x_TD, token_of_row_S, weight_S, offsets_E, w1_EHD, w2_EDH, *rest):
    grad_b1 = w1_EHD.new_empty(w1_EHD.shape[:2])
    return (
        torch.empty_like(x_TD),
        torch.empty_like(weight_S),
        torch.empty_like(w1_EHD),
        grad_b1,
        torch.empty_like(w2_EDH),
    )


def _save_for_backward(ctx, inputs, output) -> None:
    x, tokens, weight, offsets, w1, b1, w2, every_row_computed, activation, impl = inputs
    _, h, a = output
    ctx.save_for_backward(x, tokens, weight, offsets, w1, w2, h, a)
    ctx.flags = (every_row_computed, activation, impl)
    ctx.has_b1 = b1 is not None


def _backward(ctx, grad_out: Tensor, grad_h: Optional[Tensor], grad_a: Optional[Tensor]):
    x, tokens, weight, offsets, w1, w2, h, a = ctx.saved_tensors
    grad_x, grad_weight, grad_w1, grad_b1, grad_w2 = moe_ffn_backward(
        grad_out, x, tokens, weight, offsets, w1, w2, h, a, *ctx.flags
    )
    return grad_x, None, grad_weight, None, grad_w1, grad_b1 if ctx.has_b1 else None, grad_w2, None, None, None


moe_ffn.register_autograd(_backward, setup_context=_save_for_backward)


# FLOP counts for torch.utils.flop_counter (Lightning's model summary and throughput use it): an
# opaque operator counts as zero otherwise. Every row counts, as for the dense matmuls it replaces.
@register_flop_formula(torch.ops.moe_gpt.moe_ffn)
def _moe_ffn_flops(x_shape, token_shape, weight_shape, offsets_shape, w1_shape, *args, out_shape=None, **kwargs) -> int:
    rows, (_, hidden, width) = token_shape[0], w1_shape
    return 2 * 2 * rows * hidden * width  # two matmuls


@register_flop_formula(torch.ops.moe_gpt.moe_ffn_backward)
def _moe_ffn_backward_flops(grad_shape, x_shape, token_shape, weight_shape, offsets_shape, w1_shape, *args, **kwargs):
    rows, (_, hidden, width) = token_shape[0], w1_shape
    return 4 * 2 * rows * hidden * width  # input and weight gradients of both matmuls
