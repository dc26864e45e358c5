"""The output layer and its cross-entropy, a chunk of tokens at a time.

With GPT-2's 50k-token vocabulary the logits are the largest tensors in training: for the mini
model a 2,048-token batch has 412 MB of float32 logits, and autograd keeps them, their
log-softmax and their gradient alive at once. Here the loss never holds more than one chunk of
logits: the forward pass computes each chunk's loss *and* its gradients with respect to the hidden
states and the output weight right away (softmax minus one-hot is the whole gradient of
cross-entropy), so backward only scales what was stored. Same FLOPs as the plain path (one matmul
forward, two for the gradients), less memory traffic; tests hold it to ``F.cross_entropy``.

Distillation (``soft_targets``: a teacher's final hidden states and output weight) goes through
the same loop: each chunk's teacher logits are computed beside the student's, so neither model's
full logits exist at once, and the gradient of alpha * CE + (1 - alpha) * T^2 * KL(teacher_T ||
student_T) with respect to the student's logits is alpha * (softmax - one-hot) + (1 - alpha) * T *
(softmax(z / T) - teacher's softmax(z_t / T)).

The output weight has padded rows (the vocabulary rounded up to a multiple of 64, for fast matmul
tiles) that are no tokens: their logits are computed with the rest, then set to -inf, so they take
no probability and get exactly zero gradient.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

IGNORE_INDEX = -1  # targets with this value add nothing to the loss (as F.cross_entropy's ignore_index)


@dataclass(frozen=True)
class SoftTargets:
    """What a student learns from besides the labels: a teacher's logits, given as its final hidden states and
    output weight so they too are computed a chunk at a time."""

    hidden: Tensor  # (N, C_teacher): the teacher's final hidden states (after ln_f), no gradient
    weight: Tensor  # (V, C_teacher): the teacher's output embedding, padded as the student's
    alpha: float  # weight of the labels' cross-entropy; 1 - alpha weighs T^2 * KL
    temperature: float  # T


@dataclass(frozen=True)
class LMLosses:
    loss: Tensor  # what training minimises: the cross-entropy, or alpha * ce + (1 - alpha) * T^2 * kl
    ce: Tensor  # mean cross-entropy against the targets (no gradient when distilling: ``loss`` has it)
    kl: Optional[Tensor]  # mean KL(teacher_T || student_T) over the counted targets; None without soft targets


def chunked_lm_loss(hidden: Tensor, weight: Tensor, targets: Tensor, chunk_size: int, vocab_size: int) -> Tensor:
    """Mean cross-entropy of ``hidden @ weight.T`` against ``targets``, over targets not IGNORE_INDEX.

    hidden: (N, C) final hidden states; weight: (V, C) output embedding whose first ``vocab_size``
    rows are tokens and the rest padding; targets: (N,) token ids below ``vocab_size``.
    Under autocast the matmuls run in the autocast dtype and the softmax in float32, as in the plain path.
    """
    return chunked_losses(hidden, weight, targets, chunk_size, vocab_size).loss


def chunked_losses(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    chunk_size: int,
    vocab_size: int,
    soft_targets: Optional[SoftTargets] = None,
) -> LMLosses:
    """``chunked_lm_loss``, and with ``soft_targets`` the distillation loss and its two terms."""
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        loss, terms = _LossAndGradients.apply(hidden, weight, targets, chunk_size, vocab_size, soft_targets)
    else:
        sums = _chunk_loop(hidden, weight, targets, chunk_size, vocab_size, soft_targets, gradients=False)
        loss, terms = _mean_losses(sums.ce, sums.kl, targets, soft_targets)
    if soft_targets is None:
        return LMLosses(loss, loss, None)
    return LMLosses(loss, terms[0], terms[1])


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


def _chunk_kl_sum(
    logits: Tensor, teacher_logits: Tensor, counted: Tensor, temperature: float, vocab_size: int
) -> tuple[Tensor, Tensor]:
    """Summed KL(teacher_T || student_T) of one chunk's counted tokens, and d(that sum)/d(logits / T) per token:
    softmax(logits / T) - softmax(teacher_logits / T), over the real tokens only (the padded columns, -inf in
    both, would give 0 * (-inf + inf) = NaN)."""
    log_student = torch.log_softmax(logits[:, :vocab_size] / temperature, dim=-1)
    log_teacher = torch.log_softmax(teacher_logits[:, :vocab_size] / temperature, dim=-1)
    teacher = log_teacher.exp()
    kl_sum = ((teacher * (log_teacher - log_student)).sum(dim=-1) * counted).sum()
    return kl_sum, log_student.exp_().sub_(teacher)


def _counted_total(targets: Tensor) -> Tensor:
    # All targets ignored gives 0 (F.cross_entropy gives nan): nothing to learn is not an error.
    return (targets != IGNORE_INDEX).sum().clamp(min=1)


@dataclass
class _Sums:
    ce: Tensor  # summed cross-entropy of the counted targets
    kl: Tensor  # summed KL (0 without soft targets)
    grad_hidden: Optional[Tensor] = None  # d(summed loss)/d(hidden), when gradients were asked for
    grad_weight: Optional[Tensor] = None  # d(summed loss)/d(weight)


def _chunk_loop(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    chunk_size: int,
    vocab_size: int,
    soft: Optional[SoftTargets],
    gradients: bool,
) -> _Sums:
    """The one pass over the chunks: summed losses, and (``gradients``) the summed loss's gradients computed on
    the spot, so backward only scales them."""
    dtype = _compute_dtype(hidden)
    # float16 cannot hold softmax probabilities of ~1/50k scaled by 1/tokens (GradScaler scales
    # the loss only after this), so its gradient matmuls run in float32; bfloat16 has the range.
    grad_dtype = torch.float32 if dtype == torch.float16 else dtype
    weight_c = weight.to(dtype)
    teacher_weight = soft.weight.to(dtype) if soft is not None else None
    sums = _Sums(*(hidden.new_zeros((), dtype=_softmax_dtype(dtype)) for _ in range(2)))
    if gradients:
        weight_g = weight.to(grad_dtype)
        sums.grad_hidden = torch.empty_like(hidden)
        sums.grad_weight = torch.zeros_like(weight, dtype=_softmax_dtype(weight.dtype))
        rows = torch.arange(chunk_size, device=hidden.device)
    for start, hidden_chunk, safe_targets, counted in _chunks(hidden, targets, chunk_size):
        n = len(safe_targets)
        logits = _chunk_logits(hidden_chunk.to(dtype), weight_c, vocab_size)
        loss_sum, log_normalizer = _chunk_loss_sum(logits, safe_targets, counted)
        sums.ce += loss_sum
        if soft is not None:
            teacher_logits = _chunk_logits(soft.hidden[start : start + n].to(dtype), teacher_weight, vocab_size)
            kl_sum, kl_grad = _chunk_kl_sum(logits, teacher_logits, counted, soft.temperature, vocab_size)
            sums.kl += kl_sum
        if not gradients:
            continue
        # d(summed cross-entropy)/d(logits) = softmax - one_hot(target) for counted targets, in place;
        # the division by the number of counted targets happens once, after the loop.
        grad_logits = logits.sub_(log_normalizer[:, None]).exp_()
        grad_logits[rows[:n], safe_targets] -= 1
        if soft is not None:
            # d(T^2 * KL)/d(logits) = T * kl_grad; at alpha=1 this adds exact zeros (plain training, bit for bit).
            grad_logits.mul_(soft.alpha)[:, :vocab_size].add_(kl_grad, alpha=(1 - soft.alpha) * soft.temperature)
        grad_logits = grad_logits.mul_(counted[:, None]).to(grad_dtype)
        sums.grad_hidden[start : start + n] = grad_logits @ weight_g
        sums.grad_weight += grad_logits.t() @ hidden_chunk.to(grad_dtype)
    return sums


def _mean_losses(
    ce_sum: Tensor, kl_sum: Tensor, targets: Tensor, soft: Optional[SoftTargets]
) -> tuple[Tensor, Tensor]:
    """The loss to minimise, and (ce, kl) as one tensor for logging."""
    counted_total = _counted_total(targets)
    ce, kl = ce_sum / counted_total, kl_sum / counted_total
    if soft is None:
        return ce, torch.stack([ce, kl])
    return soft.alpha * ce + (1 - soft.alpha) * soft.temperature**2 * kl, torch.stack([ce, kl])


class _LossAndGradients(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size, vocab_size, soft):
        sums = _chunk_loop(hidden, weight, targets, chunk_size, vocab_size, soft, gradients=True)
        counted_total = _counted_total(targets)
        grad_weight = sums.grad_weight.div_(counted_total).to(weight.dtype)
        ctx.save_for_backward(sums.grad_hidden.div_(counted_total), grad_weight)
        loss, terms = _mean_losses(sums.ce, sums.kl, targets, soft)
        ctx.mark_non_differentiable(terms)  # logged only: the gradient is the loss's
        return loss, terms

    @staticmethod
    def backward(ctx, grad_output: Tensor, _grad_terms: Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad_output, grad_weight * grad_output, None, None, None, None
