"""The GPT-2 around the FFNs: blocks, weight tying, init, losses, caches, parameter counts."""

import json
import math

import pytest
import torch

from moe_gpt.config import GPTConfig, MoEConfig
from moe_gpt.model.intermediate import to_jsonable
from moe_gpt.model.gpt import GPT, MLP, Block
from moe_gpt.model.moe import MoELayer

GPT2_VOCAB = 50257  # padded to 50304 inside the model


def tiny(use_moe=True, **kwargs) -> GPTConfig:
    moe = kwargs.pop("moe", MoEConfig(num_experts=4, top_k=2))
    return GPTConfig(block_size=16, n_layer=2, n_head=2, n_embd=32, use_moe=use_moe, moe=moe, **kwargs)


def test_dense_and_moe_models_differ_only_in_ffns():
    torch.manual_seed(0)
    dense, moe = GPT(tiny(use_moe=False)), GPT(tiny(use_moe=True))
    non_ffn = lambda model: {k: v.shape for k, v in model.state_dict().items() if ".mlp." not in k}
    assert non_ffn(dense) == non_ffn(moe)
    assert all(isinstance(b.mlp, MLP) for b in dense.transformer.h)
    assert all(isinstance(b.mlp, MoELayer) for b in moe.transformer.h)


def test_moe_every_n_layers_alternates_blocks():
    model = GPT(GPTConfig(n_layer=4, n_head=2, n_embd=32, use_moe=True, moe=MoEConfig(num_experts=2, top_k=1, every_n_layers=2)))
    assert [b.is_moe for b in model.transformer.h] == [False, True, False, True]


def test_input_and_output_embeddings_are_tied():
    model = GPT(tiny())
    assert model.lm_head.weight is model.transformer.wte.weight


def test_vocabulary_is_padded_to_a_multiple_of_64():
    assert GPT(tiny()).lm_head.weight.shape[0] == 50304


def test_logits_cover_the_real_vocabulary_only():
    model = GPT(tiny())
    idx = torch.randint(0, GPT2_VOCAB, (2, 5))
    assert model(idx).logits.shape == (2, 5, GPT2_VOCAB)


@pytest.mark.parametrize("loss_chunk_size", [7, 0], ids=["chunked", "full-logits"])
def test_padded_vocabulary_rows_neither_change_the_loss_nor_get_gradient(loss_chunk_size):
    torch.manual_seed(0)
    model = GPT(tiny(use_moe=False, loss_chunk_size=loss_chunk_size))
    idx = torch.randint(0, GPT2_VOCAB, (2, 16))
    padding = model.lm_head.weight[GPT2_VOCAB:]
    with torch.no_grad():
        padding.zero_()
        zero_padding_loss = model(idx, targets=idx).lm_loss
        padding.normal_(0.0, 10.0)  # logits far above the real ones: they would take all the probability
    loss = model(idx, targets=idx).lm_loss
    loss.backward()
    torch.testing.assert_close(loss, zero_padding_loss)
    assert not model.lm_head.weight.grad[GPT2_VOCAB:].any()


def test_residual_projections_use_scaled_init():
    torch.manual_seed(0)
    config = GPTConfig(n_layer=8, n_head=4, n_embd=256, use_moe=False)
    model = GPT(config)
    assert model.transformer.h[0].attn.c_attn.weight.std().item() == pytest.approx(0.02, rel=0.05)
    scaled = 0.02 / math.sqrt(2 * 8)
    assert model.transformer.h[0].attn.c_proj.weight.std().item() == pytest.approx(scaled, rel=0.05)
    assert model.transformer.h[0].mlp.c_proj.weight.std().item() == pytest.approx(scaled, rel=0.05)


def test_expert_projections_use_scaled_init():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=8, n_head=4, n_embd=256, use_moe=True))
    experts = model.transformer.h[0].mlp.experts
    assert experts.c_fc_weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert experts.c_proj_weight.std().item() == pytest.approx(0.02 / math.sqrt(16), rel=0.05)


def test_training_loss_adds_weighted_router_losses():
    config = tiny(moe=MoEConfig(num_experts=4, top_k=2, aux_loss_coef=0.5, z_loss_coef=0.25))
    idx = torch.randint(0, 50257, (2, 16))
    out = GPT(config)(idx, targets=idx)
    torch.testing.assert_close(out.loss, out.lm_loss + 0.5 * out.aux_loss + 0.25 * out.z_loss)
    assert out.aux_loss > 0 and out.z_loss > 0


def test_dense_model_has_zero_router_losses():
    idx = torch.randint(0, 50257, (2, 16))
    out = GPT(tiny(use_moe=False))(idx, targets=idx)
    assert out.aux_loss.item() == 0.0 and out.z_loss.item() == 0.0
    torch.testing.assert_close(out.loss, out.lm_loss)


def test_initial_lm_loss_is_near_uniform():
    torch.manual_seed(0)
    idx = torch.randint(0, GPT2_VOCAB, (4, 16))
    out = GPT(tiny())(idx, targets=idx)
    assert abs(out.lm_loss.item() - math.log(GPT2_VOCAB)) < 1.0


def test_active_parameters_count_top_k_of_e_experts():
    model = GPT(tiny(moe=MoEConfig(num_experts=4, top_k=1)))
    per_expert = 32 * 128 + 128 + 128 * 32 + 32
    assert model.num_parameters() - model.num_active_parameters() == 2 * 3 * per_expert
    dense = GPT(tiny(use_moe=False))
    assert dense.num_parameters() == dense.num_active_parameters()


def test_block_unpacks_as_x_cache_intermediate_with_moe_intermediate():
    block = Block(tiny(), layer_index=0)
    x, cache, intermediate = block(torch.randn(2, 5, 32), use_cache=True, return_intermediate=True)
    assert x.shape == (2, 5, 32)
    assert cache[0].shape == (2, 2, 5, 16)
    assert intermediate["moe"]["top_k_indices"].shape == (10, 2)
    json.dumps(to_jsonable(intermediate))


def test_model_intermediate_has_one_entry_per_block():
    idx = torch.randint(0, 50257, (1, 8))
    out = GPT(tiny())(idx, return_intermediate=True)
    assert len(out.intermediate) == 2
    assert all("moe" in item for item in out.intermediate)
    json.dumps(to_jsonable(out.intermediate))


@pytest.mark.parametrize("use_moe", [False, True])
def test_kv_cache_gives_the_same_logits_as_a_full_pass(use_moe):
    torch.manual_seed(0)
    model = GPT(tiny(use_moe=use_moe)).eval()
    idx = torch.randint(0, 50257, (2, 12))
    full = model(idx).logits
    prefix = model(idx[:, :8], use_cache=True)
    step = model(idx[:, 8:10], use_cache=True, past_kv=prefix.cache)
    last = model(idx[:, 10:], use_cache=True, past_kv=step.cache)
    torch.testing.assert_close(torch.cat([prefix.logits, step.logits, last.logits], 1), full, rtol=1e-4, atol=1e-5)


def test_sequence_longer_than_block_size_is_an_error():
    with pytest.raises(ValueError, match="block_size=16"):
        GPT(tiny())(torch.zeros(1, 17, dtype=torch.long))
