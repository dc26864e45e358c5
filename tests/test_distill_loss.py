"""The distillation loss, computed a chunk at a time, against a direct computation on small logits."""

import pytest
import torch
import torch.nn.functional as F

from moe_gpt.model.lm_loss import IGNORE_INDEX, SoftTargets, chunked_lm_loss, chunked_losses
from tests.test_lm_loss import VOCAB, inputs, loss_and_grads

TEACHER_WIDTH = 24  # the teacher is wider than the student: only the vocabulary is shared


def teacher(padding=0, alpha=0.3, temperature=2.0):
    torch.manual_seed(1)
    hidden, weight = torch.randn(37, TEACHER_WIDTH, dtype=torch.float64), torch.randn(VOCAB + padding, TEACHER_WIDTH)
    return SoftTargets(hidden, weight.double(), alpha, temperature)


def direct_loss(hidden, weight, targets, soft):
    """alpha * CE + (1 - alpha) * T^2 * KL(teacher_T || student_T) from the full logits, with F.kl_div."""
    student = (hidden @ weight.t())[:, :VOCAB]
    teacher_logits = (soft.hidden @ soft.weight.t())[:, :VOCAB]
    counted = targets != IGNORE_INDEX
    T = soft.temperature
    kl = F.kl_div(
        F.log_softmax(student[counted] / T, -1), F.log_softmax(teacher_logits[counted] / T, -1), log_target=True,
        reduction="batchmean",
    )  # fmt: skip
    ce = F.cross_entropy(student, targets, ignore_index=IGNORE_INDEX)
    return soft.alpha * ce + (1 - soft.alpha) * T**2 * kl, ce, kl


@pytest.mark.parametrize("chunk_size", [1, 5, 37, 64])  # one token, uneven chunks, exact, one chunk
@pytest.mark.parametrize("padding", [0, 32])
def test_distillation_loss_and_gradients_equal_the_direct_formula_in_any_chunking(chunk_size, padding):
    hidden, weight, targets = inputs(padding=padding)
    soft = teacher(padding)
    expected = loss_and_grads(lambda *a: direct_loss(*a, soft)[0], hidden, weight, targets, scale=3.0)
    chunked = loss_and_grads(
        lambda *a: chunked_losses(*a, chunk_size, VOCAB, soft).loss, hidden, weight, targets, scale=3.0
    )
    for got, want in zip(chunked, expected):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-9)
    assert not chunked[2][VOCAB:].any()  # padded rows: exactly zero gradient


def test_the_logged_terms_are_the_cross_entropy_and_the_kl_and_the_loss_is_their_weighted_sum():
    hidden, weight, targets = inputs()
    soft = teacher(alpha=0.25, temperature=3.0)
    losses = chunked_losses(hidden, weight, targets, 5, VOCAB, soft)
    _, ce, kl = direct_loss(hidden, weight, targets, soft)
    torch.testing.assert_close(losses.ce, ce.detach(), rtol=1e-9, atol=0)
    torch.testing.assert_close(losses.kl, kl.detach(), rtol=1e-9, atol=0)
    assert not losses.ce.requires_grad and not losses.kl.requires_grad and losses.loss.requires_grad
    with torch.no_grad():  # validation-style call: the same numbers without the gradients
        plain = chunked_losses(hidden, weight, targets, 5, VOCAB, soft)
    torch.testing.assert_close(plain.loss, losses.loss.detach(), rtol=1e-12, atol=0)


def test_alpha_one_is_the_plain_loss_and_gradients_bit_for_bit():
    hidden, weight, targets = inputs(padding=32)
    plain = loss_and_grads(lambda *a: chunked_lm_loss(*a, 5, VOCAB), hidden, weight, targets)
    distilled = loss_and_grads(
        lambda *a: chunked_losses(*a, 5, VOCAB, teacher(32, alpha=1.0)).loss, hidden, weight, targets
    )
    assert all(torch.equal(got, want) for got, want in zip(distilled, plain))


def test_a_student_equal_to_its_teacher_has_zero_kl():
    hidden, weight, targets = inputs()
    soft = SoftTargets(hidden.detach(), weight.detach(), 0.5, 2.0)
    assert chunked_losses(hidden, weight, targets, 7, VOCAB, soft).kl.abs() < 1e-12
