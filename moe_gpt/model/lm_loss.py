"""The output layer and its cross-entropy, a chunk of tokens at a time.

With GPT-2's 50k-token vocabulary the logits are the largest tensors in training: for the mini
model a 2,048-token batch has 412 MB of float32 logits, and autograd keeps them, their
log-softmax and their gradient alive at once. Here the loss never holds more than one chunk of
logits: the forward pass computes each chunk's loss *and* its gradients with respect to the hidden
states and the output weight right away (softmax minus one-hot is the whole gradient of
cross-entropy), so backward only scales what was stored. Same FLOPs as the plain path (one matmul
forward, two for the gradients), less memory traffic; tests hold it to ``F.cross_entropy``.

The output weight has padded rows (the vocabulary rounded up to a multiple of 64, for fast matmul
tiles) that are no tokens: their logits are computed with the rest, then set to -inf, so they take
no probability and get exactly zero gradient.
"""

from __future__ import annotations

import torch
from torch import Tensor

IGNORE_INDEX = -1  # targets with this value add nothing to the loss (as F.cross_entropy's ignore_index)


def chunked_lm_loss(hidden: Tensor, weight: Tensor, targets: Tensor, chunk_size: int, vocab_size: int) -> Tensor:
    """Mean cross-entropy of ``hidden @ weight.T`` against ``targets``, over targets not IGNORE_INDEX.

    hidden: (N, C) final hidden states; weight: (V, C) output embedding whose first ``vocab_size``
    rows are tokens and the rest padding; targets: (N,) token ids below ``vocab_size``.
    Under autocast the matmuls run in the autocast dtype and the softmax in float32, as in the plain path.
    """
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _LossAndGradients.apply(hidden, weight, targets, chunk_size, vocab_size)
    return _loss_only(hidden, weight, targets, chunk_size, vocab_size)


def _compute_dtype(tensor: Tensor) -> torch.dtype:
    device_type = tensor.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return tensor.dtype


def _chunks(hidden: Tensor, targets: Tensor, chunk_size: int):
    """(start, hidden chunk, target ids with ignored ones as 0, mask of counted targets) per chunk."""
    counted = targets != IGNORE_INDEX
    safe_targets = targets.clamp(min=0)
    for start in range(0, hidden.shape[0], chunk_size):
        end = start + chunk_size
        yield start, hidden[start:end], safe_targets[start:end], counted[start:end]


def _chunk_logits(hidden: Tensor, weight: Tensor, vocab_size: int) -> Tensor:
    logits = hidden @ weight.t()  # (n, V): the padded matmul keeps its fast shape
    logits = logits.to(_softmax_dtype(logits.dtype))
    logits[:, vocab_size:] = float("-inf")  # padding rows are no tokens: softmax 0, gradient 0
    return logits


def _softmax_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)  # bf16/fp16 -> float32; float64 stays


def _chunk_loss_sum(logits: Tensor, safe_targets: Tensor, counted: Tensor) -> tuple[Tensor, Tensor]:
    """Summed cross-entropy of one chunk's counted targets, and its log-sum-exp per token."""
    log_normalizer = torch.logsumexp(logits, dim=-1)
    target_logits = logits.gather(1, safe_targets[:, None]).squeeze(1)
    return ((log_normalizer - target_logits) * counted).sum(), log_normalizer


def _counted_total(targets: Tensor) -> Tensor:
    # All targets ignored gives 0 (F.cross_entropy gives nan): nothing to learn is not an error.
    return (targets != IGNORE_INDEX).sum().clamp(min=1)


def _loss_only(hidden: Tensor, weight: Tensor, targets: Tensor, chunk_size: int, vocab_size: int) -> Tensor:
    dtype = _compute_dtype(hidden)
    weight_c = weight.to(dtype)
    total = hidden.new_zeros((), dtype=_softmax_dtype(dtype))
    for _, hidden_chunk, safe_targets, counted in _chunks(hidden, targets, chunk_size):
        logits = _chunk_logits(hidden_chunk.to(dtype), weight_c, vocab_size)
        total += _chunk_loss_sum(logits, safe_targets, counted)[0]
    return total / _counted_total(targets)


class _LossAndGradients(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: Tensor, chunk_size: int, vocab_size: int) -> Tensor:
        dtype = _compute_dtype(hidden)
        # float16 cannot hold softmax probabilities of ~1/50k scaled by 1/tokens (GradScaler scales
        # the loss only after this), so its gradient matmuls run in float32; bfloat16 has the range.
        grad_dtype = torch.float32 if dtype == torch.float16 else dtype
        weight_c, weight_g = weight.to(dtype), weight.to(grad_dtype)
        total = hidden.new_zeros((), dtype=_softmax_dtype(dtype))
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros_like(weight, dtype=_softmax_dtype(weight.dtype))
        rows = torch.arange(chunk_size, device=hidden.device)
        for start, hidden_chunk, safe_targets, counted in _chunks(hidden, targets, chunk_size):
            n = len(safe_targets)
            logits = _chunk_logits(hidden_chunk.to(dtype), weight_c, vocab_size)
            loss_sum, log_normalizer = _chunk_loss_sum(logits, safe_targets, counted)
            total += loss_sum
            # d(summed loss)/d(logits) = softmax - one_hot(target) for counted targets, in place;
            # the division by the number of counted targets happens once, after the loop.
            grad_logits = logits.sub_(log_normalizer[:, None]).exp_()
            grad_logits[rows[:n], safe_targets] -= 1
            grad_logits = grad_logits.mul_(counted[:, None]).to(grad_dtype)
            grad_hidden[start : start + n] = grad_logits @ weight_g
            grad_weight += grad_logits.t() @ hidden_chunk.to(grad_dtype)
        counted_total = _counted_total(targets)
        ctx.save_for_backward(grad_hidden.div_(counted_total), grad_weight.div_(counted_total).to(weight.dtype))
        return total / counted_total

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad_output, grad_weight * grad_output, None, None, None
