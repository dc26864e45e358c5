"""Progressive growth (MoE GPT -> MoE GPT with m times the experts) and MoE -> MoE ``init_from``."""

import logging
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch

from moe_gpt.weights.safe_load import load_model
from moe_gpt.config import ConfigError, GPTConfig, MoEConfig
from moe_gpt.weights.grow import check_growable, grow_experts
from moe_gpt.weights.init_from import check_compatible, initial_weights
from moe_gpt.model.gpt import GPT
from moe_gpt.training.run import train

TINY = GPTConfig(block_size=16, vocab_size=100, n_layer=2, n_head=2, n_embd=32, use_moe=True)
# conftest's tiny_run_config model, made MoE with 2 experts: what the trained source checkpoint holds.
TINY_RUN_MOE = GPTConfig(
    block_size=32, n_layer=2, n_head=2, n_embd=32, use_moe=True, moe=MoEConfig(num_experts=2, top_k=1)
)
# With the default growth_noise=0.01, per token, the largest logit change is under this share of the logits' std on
# at least MOST_TOKENS of the tokens (grow.py's docstring gives the measured numbers).
DEFAULT_NOISE_LOGIT_SHARE = 0.02
MOST_TOKENS = 0.9


def random_moe(**moe_settings) -> GPT:
    """A TINY MoE GPT with biases and a shared expert, whose weights are all random and far from their init."""
    torch.manual_seed(0)
    model = GPT(replace(TINY, moe=MoEConfig(num_shared_experts=1, **moe_settings))).eval()
    with torch.no_grad():  # nonzero biases and gains: a weight left behind by the growth changes the logits
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.1)
        for layer in model.moe_layers():
            layer.router.gate.weight.normal_(0.0, 1.0)  # decided routing, so a wrong choice shows in the logits
            if layer.router.selection_bias is not None:
                layer.router.selection_bias.normal_(0.0, 0.1)  # as large as the probabilities it is added to
    return model


def grown(source: GPT, copies: int, generator: torch.Generator | None = None, **moe_changes) -> GPT:
    moe = source.config.moe
    moe_changes = {"num_experts": copies * moe.num_experts, "top_k": copies * moe.top_k, **moe_changes}
    run_config = replace(source.config, moe=replace(moe, **moe_changes))
    model = GPT(run_config).eval()
    model.load_state_dict(grow_experts(source, run_config, generator))  # strict: every key and shape of the run
    return model


def logits(model: GPT) -> torch.Tensor:
    idx = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model(idx).logits


def one_line_error(call) -> str:
    with pytest.raises(ConfigError) as error:
        call()
    assert "\n" not in str(error.value)
    return str(error.value)


ROUTINGS = [
    {"router": "softmax"},
    {"router": "softmax", "normalize_top_k": False},  # copies' p/m add up to p without renormalising too
    {"router": "sigmoid"},
    {"router": "softmax", "load_balance": "aux_free"},
    {"router": "sigmoid", "load_balance": "aux_free"},
    {"router": "noisy", "load_balance": "variance"},
]


@pytest.mark.parametrize("routing", ROUTINGS, ids=lambda r: "-".join(map(str, r.values())))
@pytest.mark.parametrize("num_experts,top_k,copies", [(1, 1, 2), (2, 1, 2), (4, 2, 2), (4, 1, 3), (2, 2, 4)])
def test_without_noise_the_grown_model_computes_what_the_source_did(routing, num_experts, top_k, copies):
    source = random_moe(num_experts=num_experts, top_k=top_k, **routing)
    model = grown(source, copies, growth_noise=0.0)
    assert model.config.moe.num_experts == copies * num_experts
    torch.testing.assert_close(logits(model), logits(source), rtol=0, atol=1e-5)


def test_dense_blocks_and_shared_experts_are_kept_as_they_are():
    source = random_moe(num_experts=2, top_k=1, every_n_layers=2)
    model = grown(source, 2, growth_noise=0.0)
    grown_state = model.state_dict()
    for key, tensor in source.state_dict().items():
        if ".mlp.experts." not in key and ".mlp.router." not in key:
            assert torch.equal(grown_state[key], tensor), key
    torch.testing.assert_close(logits(model), logits(source), rtol=0, atol=1e-5)


def random_default_moe(n_embd: int, router: str) -> GPT:
    """The default mini MoE GPT at width n_embd, with random weights whose activations keep their scale at any width."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_embd=n_embd, moe=MoEConfig(router=router))).eval()
    std = 0.1 * (32 / n_embd) ** 0.5  # 0.1 at width 32, as random_moe
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, std)
        for layer in model.moe_layers():
            layer.router.gate.weight.normal_(0.0, 10 * std)  # decided routing, as a trained router's
    return model


# 128: the default mini model; 32 and 256 show the share does not grow with the width.
@pytest.mark.parametrize("n_embd,router", [(32, "softmax"), (128, "softmax"), (128, "sigmoid"), (256, "softmax")])
def test_with_the_default_noise_most_tokens_logits_move_by_under_2_percent_at_any_width(n_embd, router):
    source = random_default_moe(n_embd, router)
    model = grown(source, 2, torch.Generator().manual_seed(0))  # 8 -> 16 experts, top_k 2 -> 4
    idx = torch.randint(0, source.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        source_logits, grown_logits = source(idx).logits, model(idx).logits
    per_token = (grown_logits - source_logits).abs().amax(dim=-1) / source_logits.std()
    assert per_token.median() > 1e-3  # the copies are not the experts again
    # Tokens whose near-tied routing the noise flips may move further; most must not.
    assert (per_token < DEFAULT_NOISE_LOGIT_SHARE).float().mean() >= MOST_TOKENS


def test_each_copy_gets_noise_relative_to_the_row_it_perturbs():
    source = random_moe(num_experts=4, top_k=2)
    with torch.no_grad():  # rows spanning 100x in scale, as a trained layer's units and experts may
        for layer in source.moe_layers():
            rows = layer.experts.c_fc_weight.shape[0] * layer.experts.c_fc_weight.shape[1]
            layer.experts.c_fc_weight.mul_(torch.logspace(-1, 1, rows).view(4, -1, 1))
    model = grown(source, 2, torch.Generator().manual_seed(0))
    for source_layer, layer in zip(source.moe_layers(), model.moe_layers()):
        for name in ("c_fc_weight", "c_proj_weight", "c_fc_bias", "c_proj_bias"):
            before, after = getattr(source_layer.experts, name), getattr(layer.experts, name)
            assert torch.equal(after[0::2], before)  # copy 0 of every expert is the expert itself
            ratio = ((after[1::2] - before).std(dim=-1) / before.std(dim=-1)).flatten()
            for rows in ratio.chunk(2):  # growth_noise=0.01 of each row's own std: the small rows as the large ones
                assert rows.mean().item() == pytest.approx(0.01, rel=0.15), name


def test_the_same_generator_grows_the_same_weights():
    source = random_moe(num_experts=2, top_k=1)
    first, second = (grown(source, 2, torch.Generator().manual_seed(3)).state_dict() for _ in range(2))
    assert all(torch.equal(first[key], second[key]) for key in first)


def test_router_rows_are_copied_and_the_softmax_selection_bias_is_scaled():
    source = random_moe(num_experts=4, top_k=1, router="noisy", load_balance="aux_free")
    model = grown(source, 3)
    source_routers, routers = ([layer.router for layer in m.moe_layers()] for m in (source, model))
    for source_router, router in zip(source_routers, routers):
        for expert in range(4):
            for copy in range(3):
                assert torch.equal(router.gate.weight[3 * expert + copy], source_router.gate.weight[expert])
                assert torch.equal(router.noise.weight[3 * expert + copy], source_router.noise.weight[expert])
                # Softmax scores of the copies are p/3: the bias shrinks with them, keeping the ranking.
                assert router.selection_bias[3 * expert + copy] == source_router.selection_bias[expert] / 3


def test_the_sigmoid_selection_bias_is_copied_unchanged():
    source = random_moe(num_experts=2, top_k=1, router="sigmoid", load_balance="aux_free")
    model = grown(source, 2)
    for source_layer, layer in zip(source.moe_layers(), model.moe_layers()):
        assert torch.equal(layer.router.selection_bias, source_layer.router.selection_bias.repeat_interleave(2))


SOURCE_4_EXPERTS = replace(TINY, moe=MoEConfig(num_experts=4, top_k=1))


@pytest.mark.parametrize(
    "moe_changes,message",
    [
        ({"num_experts": 6}, "so set model.moe.num_experts to a multiple of 4 (e.g. 8)"),
        ({"num_experts": 8, "top_k": 1}, "every copy of its former top_k=1 experts, so set model.moe.top_k=2"),
        ({"num_experts": 8, "top_k": 3}, "so set model.moe.top_k=2"),
        ({"num_experts": 2}, "prune the source with scripts/prune_experts.py, or set model.moe.num_experts=4"),
        ({"num_experts": 8, "top_k": 2, "router": "sigmoid", "normalize_top_k": False}, "normalize_top_k=true"),
        ({"num_experts": 8, "top_k": 2, "hidden_size": 64}, "hidden_size=64; set model.moe.hidden_size=128"),
        ({"num_experts": 8, "top_k": 2, "every_n_layers": 2}, "this run has model.moe.every_n_layers=2"),
        ({"num_experts": 8, "top_k": 2, "num_shared_experts": 1}, "this run has model.moe.num_shared_experts=1"),
    ],
)
def test_what_cannot_be_grown_is_a_one_line_error_naming_the_key(moe_changes, message):
    run = replace(SOURCE_4_EXPERTS, moe=replace(SOURCE_4_EXPERTS.moe, **moe_changes))
    assert message in one_line_error(lambda: check_compatible(SOURCE_4_EXPERTS, run, "source.ckpt"))
    assert message in one_line_error(lambda: grow_experts(GPT(SOURCE_4_EXPERTS), run))


def test_growing_into_as_many_experts_or_a_dense_model_is_refused():
    same = SOURCE_4_EXPERTS
    assert "nothing to grow" in one_line_error(lambda: check_growable(same, same, "source.ckpt"))
    dense = replace(TINY, use_moe=False)
    assert "needs an MoE source and an MoE run" in one_line_error(lambda: check_growable(dense, SOURCE_4_EXPERTS, "x"))


# --- init_from: checkpoints of MoE models into MoE runs --------------------------------------------------------


def save_as_checkpoint(model: GPT, path: Path) -> Path:
    """What a training checkpoint holds of the model: enough for init_from, written without training."""
    state = {f"model.{key}": tensor for key, tensor in model.state_dict().items()}
    torch.save({"state_dict": state, "hyper_parameters": {"model_config": asdict(model.config)}}, path)
    return path


def moe_run(num_experts: int, top_k: int, **moe_settings) -> GPTConfig:
    return replace(TINY_RUN_MOE, moe=MoEConfig(num_experts=num_experts, top_k=top_k, **moe_settings))


@pytest.fixture(scope="module")
def trained_moe_checkpoint(tmp_path_factory, tiny_run_config) -> Path:
    """``last.ckpt`` of a 2-expert top-1 tiny MoE GPT after 2 steps of the real Trainer."""
    run_dir = tmp_path_factory.mktemp("moe_source")
    train(tiny_run_config(run_dir, model=TINY_RUN_MOE))
    return run_dir / "checkpoints" / "last.ckpt"


def lm_loss(model: GPT) -> float:
    idx = torch.randint(0, 50257, (2, 33), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model.eval()(idx[:, :-1], idx[:, 1:]).lm_loss.item()


def test_init_from_a_trained_moe_grows_it_with_the_same_loss(trained_moe_checkpoint, tiny_run_config, tmp_path, caplog):
    cfg = tiny_run_config(tmp_path, model=moe_run(4, 2, growth_noise=0.0), init_from=str(trained_moe_checkpoint))
    with caplog.at_level(logging.INFO, logger="moe_gpt.weights.init_from"):
        state = initial_weights(cfg)
    assert "growing its 2 experts per MoE layer into 4 (each split into 2 copies" in caplog.text
    model = GPT(cfg.model)
    model.load_state_dict(state)
    assert lm_loss(model) == pytest.approx(lm_loss(load_model(trained_moe_checkpoint)), abs=1e-5)


def test_training_a_grown_moe_starts_and_finishes(trained_moe_checkpoint, tiny_run_config, tmp_path):
    metrics = train(tiny_run_config(tmp_path, model=moe_run(4, 2), init_from=str(trained_moe_checkpoint)))
    assert metrics["model"] == "moe" and metrics["steps"] == 2
    trained = load_model(tmp_path / "checkpoints" / "last.ckpt")
    assert trained.config.moe.num_experts == 4 and trained.moe_layers()[0].experts.c_fc_weight.shape[0] == 4


def test_init_from_an_moe_with_more_experts_points_to_pruning(tiny_run_config, tmp_path):
    source = save_as_checkpoint(GPT(moe_run(4, 2)), tmp_path / "four.ckpt")
    cfg = tiny_run_config(tmp_path / "run", model=moe_run(2, 1), init_from=str(source))
    message = one_line_error(lambda: initial_weights(cfg))
    assert message.startswith(f"init_from={source} has model.moe.num_experts=4")
    assert "scripts/prune_experts.py" in message


def test_switching_to_a_noisy_aux_free_router_trains_from_the_moe_weights(
    trained_moe_checkpoint, tiny_run_config, tmp_path, caplog
):
    run = moe_run(2, 1, router="noisy", load_balance="aux_free")
    cfg = tiny_run_config(tmp_path, model=run, init_from=str(trained_moe_checkpoint))
    with caplog.at_level(logging.INFO, logger="moe_gpt.weights.grow"):
        state = initial_weights(cfg)
    assert "mlp.router.noise.weight, mlp.router.selection_bias start from a fresh init" in caplog.text
    assert state.keys() == GPT(run).state_dict().keys()
    assert torch.equal(state["transformer.h.0.mlp.router.selection_bias"], torch.zeros(2))  # the run's own init
    assert state["transformer.h.0.mlp.router.noise.weight"].std().item() == pytest.approx(0.02, rel=0.3)
    source = load_model(trained_moe_checkpoint).state_dict()
    assert all(torch.equal(state[key], tensor) for key, tensor in source.items())
    assert train(cfg)["steps"] == 2  # training/run.py's strict load takes the state dict


@pytest.mark.parametrize("settings", [{"router": "noisy"}, {"load_balance": "aux_free"}])
def test_router_extras_the_run_lacks_are_dropped(tiny_run_config, tmp_path, caplog, settings):
    source_model = GPT(moe_run(2, 1, **settings))
    source = save_as_checkpoint(source_model, tmp_path / "source.ckpt")
    run = moe_run(2, 1)  # softmax, switch: neither noise weights nor a selection bias
    with caplog.at_level(logging.INFO, logger="moe_gpt.weights.grow"):
        state = initial_weights(tiny_run_config(tmp_path / "run", model=run, init_from=str(source)))
    assert "dropped its mlp.router." in caplog.text
    assert state.keys() == GPT(run).state_dict().keys()
    assert all(torch.equal(tensor, source_model.state_dict()[key]) for key, tensor in state.items())


def test_growing_also_reconciles_router_extras(tiny_run_config, tmp_path):
    source = save_as_checkpoint(GPT(moe_run(2, 1, router="noisy")), tmp_path / "noisy.ckpt")
    run = moe_run(4, 2, load_balance="aux_free")  # loses the noise weights, gains a selection bias
    state = initial_weights(tiny_run_config(tmp_path / "run", model=run, init_from=str(source)))
    GPT(run).load_state_dict(state)  # strict
