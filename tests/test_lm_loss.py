"""The chunked output layer + cross-entropy equals the plain path in loss and gradients."""

import pytest
import torch
import torch.nn.functional as F

from moe_gpt.config import GPTConfig, MoEConfig
from moe_gpt.model.lm_loss import IGNORE_INDEX, chunked_lm_loss
from moe_gpt.model.gpt import GPT

VOCAB = 96
GPT2_VOCAB, GPT2_PADDED_VOCAB = 50257, 50304


def plain_loss(hidden, weight, targets, vocab_size=VOCAB):
    """Cross-entropy over the logits of the first ``vocab_size`` weight rows: the rest are padding."""
    return F.cross_entropy((hidden @ weight.t())[:, :vocab_size], targets, ignore_index=IGNORE_INDEX)


def inputs(tokens=37, width=16, vocab=VOCAB, padding=0, ignored=(3, 4, 20)):
    """float64 hidden states, an output weight of ``vocab + padding`` rows, and targets below ``vocab``."""
    torch.manual_seed(0)
    hidden = torch.randn(tokens, width, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(vocab + padding, width, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(vocab, (tokens,))
    targets[list(ignored)] = IGNORE_INDEX
    return hidden, weight, targets


def loss_and_grads(loss_fn, hidden, weight, targets, scale=1.0):
    hidden.grad = weight.grad = None
    loss = loss_fn(hidden, weight, targets)
    (scale * loss).backward()
    return loss.detach(), hidden.grad.clone(), weight.grad.clone()


@pytest.mark.parametrize("chunk_size", [1, 5, 37, 64])  # one token, uneven chunks, exact, one chunk
def test_loss_and_gradients_equal_cross_entropy(chunk_size):
    hidden, weight, targets = inputs()
    expected = loss_and_grads(plain_loss, hidden, weight, targets, scale=3.0)
    chunked = loss_and_grads(lambda *a: chunked_lm_loss(*a, chunk_size, VOCAB), hidden, weight, targets, scale=3.0)
    for got, want in zip(chunked, expected):
        torch.testing.assert_close(got, want.to(got.dtype), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("chunk_size", [5, 64])
def test_padded_weight_rows_take_no_probability_and_get_exactly_zero_gradient(chunk_size):
    hidden, weight, targets = inputs(padding=32)
    with torch.no_grad():
        weight[VOCAB:] *= 10  # padding rows that would dominate the softmax if they were in it
    expected = loss_and_grads(plain_loss, hidden, weight, targets, scale=3.0)
    chunked = loss_and_grads(lambda *a: chunked_lm_loss(*a, chunk_size, VOCAB), hidden, weight, targets, scale=3.0)
    for got, want in zip(chunked, expected):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-9)
    grad_weight = chunked[2]
    assert not grad_weight[VOCAB:].any() and grad_weight[:VOCAB].abs().sum(1).all()


def test_without_gradients_padded_weight_rows_take_no_probability_either():
    hidden, weight, targets = inputs(padding=32)
    with torch.no_grad():
        weight[VOCAB:] *= 10
        loss = chunked_lm_loss(hidden, weight, targets, 8, VOCAB)
        torch.testing.assert_close(loss, plain_loss(hidden, weight, targets))


def test_without_gradients_only_the_loss_is_computed():
    hidden, weight, targets = inputs()
    with torch.no_grad():
        loss = chunked_lm_loss(hidden, weight, targets, 8, VOCAB)
        torch.testing.assert_close(loss, plain_loss(hidden, weight, targets))
    assert not loss.requires_grad


def test_all_targets_ignored_is_zero_loss_and_zero_gradients():
    hidden, weight, targets = inputs(tokens=4, ignored=(0, 1, 2, 3))
    loss, grad_hidden, grad_weight = loss_and_grads(lambda *a: chunked_lm_loss(*a, 2, VOCAB), hidden, weight, targets)
    assert loss.item() == 0 and not grad_hidden.any() and not grad_weight.any()


def test_bf16_autocast_runs_the_matmuls_in_bf16_and_stays_close():
    hidden, weight, targets = inputs()
    hidden, weight = (t.detach().float().requires_grad_() for t in (hidden, weight))
    expected = loss_and_grads(plain_loss, hidden, weight, targets)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        chunked = loss_and_grads(lambda *a: chunked_lm_loss(*a, 8, VOCAB), hidden, weight, targets)
    assert chunked[1].dtype == torch.float32 and chunked[2].dtype == torch.float32
    for got, want in zip(chunked, expected):
        torch.testing.assert_close(got, want, rtol=0.05, atol=0.02)


@pytest.mark.parametrize("use_moe", [False, True])
def test_model_training_loss_and_every_gradient_match_the_full_logits_path(use_moe):
    def run(chunk_size):
        config = GPTConfig(
            block_size=16, n_layer=2, n_head=2, n_embd=32, use_moe=use_moe, moe=MoEConfig(4, 2), loss_chunk_size=chunk_size
        )
        torch.manual_seed(0)
        model = GPT(config)
        idx = torch.randint(config.vocab_size, (3, 16))
        targets = idx.roll(-1, dims=1)
        targets[:, -1] = IGNORE_INDEX
        out = model(idx, targets)
        out.loss.backward()
        return out, {name: p.grad for name, p in model.named_parameters()}

    chunked, chunked_grads = run(10)
    full, full_grads = run(0)
    assert chunked.logits is None and full.logits.shape == (3, 16, GPT2_VOCAB)
    torch.testing.assert_close(chunked.loss, full.loss, rtol=1e-5, atol=1e-6)
    assert chunked_grads.keys() == full_grads.keys()
    for name, grad in chunked_grads.items():
        torch.testing.assert_close(grad, full_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    for grads in (chunked_grads, full_grads):  # tied: the embedding's padded rows are never looked up either
        assert not grads["transformer.wte.weight"][GPT2_VOCAB:].any()


def test_fp16_autocast_keeps_the_small_softmax_gradients():
    # Per-token gradients of ~1/(50k * tokens) underflow in float16; the weight gradient must keep them.
    torch.manual_seed(0)
    hidden = torch.randn(512, 16, requires_grad=True)
    weight = (0.02 * torch.randn(GPT2_PADDED_VOCAB, 16)).requires_grad_()
    targets = torch.randint(GPT2_VOCAB, (512,))
    _, _, want = loss_and_grads(lambda *a: plain_loss(*a, GPT2_VOCAB), hidden, weight, targets)
    with torch.autocast("cpu", dtype=torch.float16):
        _, _, got = loss_and_grads(lambda *a: chunked_lm_loss(*a, 128, GPT2_VOCAB), hidden, weight, targets)
    assert not got[GPT2_VOCAB:].any()
    untargeted = torch.ones(GPT2_PADDED_VOCAB, dtype=torch.bool)
    untargeted[targets] = False  # rows whose whole gradient is the small softmax part
    got, want = got[untargeted], want[untargeted]
    assert (got - want).norm() / want.norm() < 0.05
