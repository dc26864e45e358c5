"""Sparse upcycling (dense GPT -> MoE GPT) and training from ``init_from``."""

import json
import logging
from dataclasses import replace

import pytest
import torch
from transformers import GPT2LMHeadModel

from moe_gpt.weights.safe_load import load_model
from moe_gpt.compose import compose_run_config
from moe_gpt.config import ConfigError, GPTConfig, MoEConfig, TrainerConfig
from moe_gpt.weights.init_from import check_compatible, initial_weights
from moe_gpt.model.gpt import GPT, MLP
from moe_gpt.training.run import train
from moe_gpt.weights.upcycle import upcycle

TINY = GPTConfig(block_size=16, vocab_size=100, n_layer=2, n_head=2, n_embd=32, use_moe=False)
# The run model of conftest's tiny_run_config, made MoE: the size of the hf_gpt2_dir and tiny_checkpoint models.
TINY_RUN_MOE = GPTConfig(block_size=32, n_layer=2, n_head=2, n_embd=32, use_moe=True, moe=MoEConfig(num_experts=4))


def random_dense() -> GPT:
    torch.manual_seed(0)
    model = GPT(TINY).eval()
    with torch.no_grad():  # nonzero biases and gains: a weight left behind by the upcycling changes the logits
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.1)
    return model


def logits(model: GPT) -> torch.Tensor:
    idx = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model(idx).logits


@pytest.mark.parametrize(
    "num_experts,top_k,every_n_layers", [(1, 1, 1), (2, 1, 1), (4, 2, 1), (8, 3, 1), (4, 4, 1), (4, 2, 2)]
)
def test_upcycled_model_computes_what_the_dense_model_did(num_experts, top_k, every_n_layers):
    dense = random_dense()
    moe = upcycle(dense, MoEConfig(num_experts=num_experts, top_k=top_k, every_n_layers=every_n_layers))
    assert moe.config.use_moe and len(moe.moe_layers()) == 2 // every_n_layers and not moe.training
    torch.testing.assert_close(logits(moe), logits(dense), rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def default_size_dense() -> tuple[GPT, torch.Tensor, torch.Tensor]:
    """The default mini model made dense, with random weights, a batch of tokens and its logits.

    A 1024-token vocabulary instead of GPT-2's keeps the test fast: upcycling never touches the embeddings.
    """
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=1024, use_moe=False)).eval()
    with torch.no_grad():  # nonzero biases and gains: a weight left behind by the upcycling changes the logits
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.05)
    idx = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model, idx, model(idx).logits


def decided_routers(model: GPT) -> None:
    """Router weights far from their init: routing is exact whatever it chooses, so make it choose unevenly."""
    with torch.no_grad():
        for layer in model.moe_layers():
            layer.router.gate.weight.normal_(0.0, 1.0)  # top_p then keeps one expert for some tokens, two for others
            if layer.router.selection_bias is not None:
                layer.router.selection_bias.normal_(0.0, 0.1)


ROUTERS = [
    {"router": "softmax"},
    {"router": "noisy"},
    {"router": "sigmoid"},
    {"router": "softmax", "top_p": 0.5},
    {"router": "sigmoid", "top_p": 0.5},
    {"router": "noisy", "top_p": 0.5},
]
LAYOUTS = [{}, {"every_n_layers": 2}, {"first_k_dense": 1}]


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda layout: "-".join(f"{k}={v}" for k, v in layout.items()) or "all")
@pytest.mark.parametrize("load_balance", ["switch", "aux_free"])
@pytest.mark.parametrize("num_groups", [1, 2])
@pytest.mark.parametrize("num_shared_experts", [0, 1])
@pytest.mark.parametrize("routing", ROUTERS, ids=lambda r: "-".join(map(str, r.values())))
def test_upcycling_the_default_model_is_exact_in_every_routing_and_layout(
    default_size_dense, routing, num_shared_experts, num_groups, load_balance, layout
):
    dense, idx, dense_logits = default_size_dense
    moe = MoEConfig(
        num_shared_experts=num_shared_experts, num_groups=num_groups, load_balance=load_balance, **routing, **layout
    )
    model = upcycle(dense, moe)
    assert (model.config.moe.num_experts, model.config.moe.top_k) == (8, 2) and model.config.n_embd == 128
    decided_routers(model)
    with torch.no_grad():
        torch.testing.assert_close(model(idx).logits, dense_logits, rtol=0, atol=1e-5)


def test_shared_experts_start_silent_the_first_reading_the_dense_features():
    dense = random_dense()
    model = upcycle(dense, MoEConfig(num_experts=4, num_shared_experts=2))
    shared, mlp = model.transformer.h[0].mlp.shared_experts, dense.transformer.h[0].mlp
    assert torch.equal(shared.c_fc.weight[:128], mlp.c_fc.weight) and torch.equal(shared.c_fc.bias[:128], mlp.c_fc.bias)
    # The second shared expert keeps its GPT-2 init: a copy of the first would get the same updates forever.
    assert shared.c_fc.weight[128:].std().item() == pytest.approx(0.02, rel=0.2)
    assert not shared.c_proj.weight.any() and not shared.c_proj.bias.any()


@pytest.mark.parametrize("key", ["capacity_factor", "eval_capacity_factor"])
def test_a_capacity_that_drops_slots_is_refused_naming_the_key(key):
    with pytest.raises(ConfigError) as error:
        upcycle(random_dense(), MoEConfig(num_experts=8, top_k=2, **{key: 1.25}))
    message = str(error.value)
    assert message.startswith(f"model.moe.{key}=1.25 drops token-slots") and "null (dropless) or >= 4" in message
    assert "\n" not in message


def test_a_capacity_too_large_to_drop_anything_is_exact():
    dense = random_dense()
    moe = upcycle(dense, MoEConfig(num_experts=8, top_k=2, capacity_factor=4.0, eval_capacity_factor=4.0))
    torch.testing.assert_close(logits(moe), logits(dense), rtol=1e-4, atol=1e-5)


def test_without_normalized_top_k_the_upcycled_model_differs_with_a_warning(caplog):
    dense = random_dense()
    with caplog.at_level(logging.WARNING, logger="moe_gpt.weights.upcycle"):
        moe = upcycle(dense, MoEConfig(num_experts=4, top_k=2, normalize_top_k=False))
    assert "model.moe.normalize_top_k=false: each upcycled MLP's output is scaled" in caplog.text
    assert not torch.allclose(logits(moe), logits(dense), rtol=1e-4, atol=1e-5)


def test_experts_copy_the_dense_mlp_the_router_starts_fresh_and_dense_blocks_stay():
    dense = random_dense()
    moe = upcycle(dense, MoEConfig(num_experts=4, every_n_layers=2))
    assert isinstance(moe.transformer.h[0].mlp, MLP)  # (0 + 1) % 2 != 0: stays dense
    experts, mlp = moe.transformer.h[1].mlp.experts, dense.transformer.h[1].mlp
    for expert in range(4):
        assert torch.equal(experts.c_fc_weight[expert], mlp.c_fc.weight)
        assert torch.equal(experts.c_proj_bias[expert], mlp.c_proj.bias)
    router = moe.transformer.h[1].mlp.router.gate.weight
    assert router.std().item() == pytest.approx(0.02, rel=0.2)  # GPT-2's init, not the dense weights' 0.1


@pytest.mark.parametrize(
    "model,moe,message",
    [
        (replace(TINY, use_moe=True), MoEConfig(), "already has MoE layers"),
        (TINY, MoEConfig(hidden_size=64), "model.moe.hidden_size=64"),
        (TINY, MoEConfig(activation="relu"), "model.moe.activation=relu"),
    ],
)
def test_upcycle_refuses_what_it_cannot_copy_with_a_one_line_error(model, moe, message):
    with pytest.raises(ConfigError) as error:
        upcycle(GPT(model), moe)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_init_from_a_hf_directory_upcycles_into_the_run_model(hf_gpt2_dir, tiny_run_config, tmp_path):
    state = initial_weights(tiny_run_config(tmp_path, model=TINY_RUN_MOE, init_from=str(hf_gpt2_dir)))
    GPT(TINY_RUN_MOE).load_state_dict(state)  # strict: every key and shape of the run's model
    hf_state = GPT2LMHeadModel.from_pretrained(hf_gpt2_dir).state_dict()
    assert torch.equal(state["transformer.wpe.weight"], hf_state["transformer.wpe.weight"])
    for expert in range(4):  # HF's Conv1D holds (in, out)
        assert torch.equal(state["transformer.h.1.mlp.experts.c_fc_weight"][expert], hf_state["transformer.h.1.mlp.c_fc.weight"].t())


def test_init_from_a_trained_checkpoint_keeps_its_weights(tiny_checkpoint, tiny_run_config, tmp_path):
    source = load_model(tiny_checkpoint)
    state = initial_weights(tiny_run_config(tmp_path, init_from=str(tiny_checkpoint)))  # dense run from dense
    assert state.keys() == source.state_dict().keys()
    assert all(torch.equal(state[key], value) for key, value in source.state_dict().items())


@pytest.mark.parametrize(
    "change,key",
    [
        ({"n_embd": 64}, "model.n_embd"),
        ({"n_layer": 3}, "model.n_layer"),
        ({"n_head": 4}, "model.n_head"),
        ({"block_size": 16}, "model.block_size"),
        ({"vocab_size": 1000}, "model.vocab_size"),
    ],
)
def test_init_from_a_model_of_another_size_is_a_one_line_error_naming_the_key(
    hf_gpt2_dir, tiny_run_config, tmp_path, change, key
):
    cfg = tiny_run_config(tmp_path, model=replace(TINY_RUN_MOE, **change), init_from=str(hf_gpt2_dir))
    with pytest.raises(ConfigError) as error:
        initial_weights(cfg)
    assert f"this run has {key}={change[key.split('.')[-1]]}" in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize(
    "run,message",
    [
        (replace(TINY_RUN_MOE, use_moe=False), "is an MoE model; start a dense run from a dense one"),
        (replace(TINY_RUN_MOE, moe=MoEConfig(num_experts=8)), "model.moe.num_experts=4 but this run has model.moe.num_experts=8"),
        (replace(TINY_RUN_MOE, moe=MoEConfig(num_experts=4, hidden_size=64)), "model.moe.hidden_size=128 but this run has model.moe.hidden_size=64"),
    ],
)
def test_an_moe_source_must_match_the_run_moe_layers(run, message):
    with pytest.raises(ConfigError, match=message):
        check_compatible(TINY_RUN_MOE, run, "source.ckpt")


def test_missing_init_from_source_is_a_one_line_error(tiny_run_config, tmp_path):
    cfg = tiny_run_config(tmp_path, init_from="/nonexistent/last.ckpt")
    with pytest.raises(ConfigError) as error:
        initial_weights(cfg)
    assert str(error.value).startswith("init_from=/nonexistent/last.ckpt: ") and "\n" not in str(error.value)


def test_init_from_is_ignored_with_a_log_line_when_resuming(hf_gpt2_dir, tiny_run_config, tiny_checkpoint, tmp_path, caplog):
    trainer = TrainerConfig(accelerator="cpu", devices=1, max_steps=3, val_check_interval=3, limit_val_batches=1)
    cfg = tiny_run_config(tmp_path, init_from=str(hf_gpt2_dir), resume=str(tiny_checkpoint), trainer=trainer)
    with caplog.at_level(logging.WARNING, logger="moe_gpt.training.run"):
        assert train(cfg)["steps"] == 3  # continued the checkpoint's 2 steps
    assert f"init_from={hf_gpt2_dir} ignored: resuming" in caplog.text


def test_init_from_is_a_command_line_key():
    assert compose_run_config([]).init_from is None
    assert compose_run_config(["init_from=gpt2"], run_dir="x").init_from == "gpt2"


def test_training_an_moe_model_upcycled_from_a_hf_gpt2(hf_gpt2_dir, tiny_run_config, tmp_path):
    metrics = train(tiny_run_config(tmp_path, model=TINY_RUN_MOE, init_from=str(hf_gpt2_dir)))
    assert metrics["model"] == "moe" and metrics["steps"] == 2
    assert json.loads((tmp_path / "metrics.json").read_text())["model"] == "moe"
    trained = load_model(tmp_path / "checkpoints" / "last.ckpt")
    hf_wpe = GPT2LMHeadModel.from_pretrained(hf_gpt2_dir).transformer.wpe.weight
    # Two AdamW steps at lr <= 1e-3 move a weight by ~2e-3; a fresh init would be ~0.1 away.
    assert (trained.transformer.wpe.weight - hf_wpe).abs().max() < 0.01


def test_init_from_refuses_to_upcycle_into_a_run_that_drops_slots(hf_gpt2_dir, tiny_run_config, tmp_path):
    run = replace(TINY_RUN_MOE, moe=MoEConfig(num_experts=4, top_k=2, capacity_factor=1.0))
    with pytest.raises(ConfigError, match=r"^model\.moe\.capacity_factor=1\.0 drops token-slots .* or >= 2 to upcycle$"):
        initial_weights(tiny_run_config(tmp_path, model=run, init_from=str(hf_gpt2_dir)))
