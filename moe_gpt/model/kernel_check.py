"""The expert operator against its float32 reference, as ``make gpu-check`` runs it.

One set of experts, one routing and one batch of tokens go through two paths: the operator under
autocast in ``dtype`` (how a ``bf16-mixed`` run calls it: float32 weights cast on the way in) and
the per-expert ``loop`` in float32. Each result, the output and the gradient of every input (the
tokens, the routing weights, each weight and bias), is compared as a relative error:
``‖candidate − reference‖ / ‖reference‖`` over the whole tensor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from moe_gpt.model.dispatch import plan_dispatch
from moe_gpt.model.experts import Experts

# What bfloat16's 8-bit mantissa allows after two matmuls (tests/test_mixed_precision.py holds every expert
# path to the same); float32 rounding alone is ~1e-7.
BF16_TOLERANCE = 2e-2


@dataclass(frozen=True)
class OperatorCase:
    """The shapes checked: ``tokens`` tokens of width ``n_embd``, each routed to ``top_k`` of ``num_experts``
    experts ``hidden`` wide."""

    n_embd: int
    hidden: int
    num_experts: int
    top_k: int
    tokens: int


def operator_errors(case: OperatorCase, device: str, impl: str, dtype: torch.dtype) -> dict[str, float]:
    """Relative error of the ``impl`` operator in ``dtype`` against the float32 ``loop``, per result:
    ``output``, then ``<input> grad`` for the tokens, the routing weights and each parameter."""
    generator = torch.Generator(device).manual_seed(0)
    experts = Experts(case.num_experts, case.n_embd, case.hidden, "gelu", 0.0, bias=True).to(device)
    for parameter in experts.parameters():  # zero biases would hide a bias bug
        torch.nn.init.normal_(parameter, std=0.02, generator=generator)
    x = torch.randn(case.tokens, case.n_embd, device=device, generator=generator)
    # Distinct random experts per token, weighted by a softmax over them (what a top-k router hands on).
    experts_TK = torch.rand(case.tokens, case.num_experts, device=device, generator=generator).topk(case.top_k).indices
    logits_TK = torch.randn(case.tokens, case.top_k, device=device, generator=generator)
    target = torch.randn(case.tokens, case.n_embd, device=device, generator=generator)
    reference = _results(experts, "loop", None, x, experts_TK, logits_TK, target)
    candidate = _results(experts, impl, dtype, x, experts_TK, logits_TK, target)
    return {name: _relative_error(candidate[name], want) for name, want in reference.items()}


def _results(
    experts: Experts, impl: str, dtype, x: Tensor, experts_TK: Tensor, logits_TK: Tensor, target: Tensor
) -> dict[str, Tensor]:
    """The output and every gradient of ``(output * target).sum()``, in float32."""
    experts.impl = impl
    experts.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    weights_TK = logits_TK.softmax(-1).requires_grad_()
    dispatch = plan_dispatch(experts_TK, weights_TK, experts.num_experts)
    with torch.autocast(x.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        out = experts(x, dispatch)
    (out.float() * target).sum().backward()
    gradients = {f"{name} grad": parameter.grad for name, parameter in experts.named_parameters()}
    return {"output": out.detach().float(), "input grad": x.grad, "routing weight grad": weights_TK.grad, **gradients}


def _relative_error(got: Tensor, want: Tensor) -> float:
    if not torch.isfinite(got).all():
        return float("inf")
    return ((got.float() - want).norm() / want.norm()).item()
