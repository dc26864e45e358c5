"""Expert pruning: which experts stay, that unused experts go without changing the model, and that the result loads.

The main oracle: experts that no token can choose (their aux_free selection bias is far below any
score) contribute nothing, so removing them must leave the logits as they were.
"""

import json
import logging
import re
import subprocess
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from moe_gpt.model.analysis import routing_report
from moe_gpt.weights.safe_load import load_model, model_config, read_checkpoint
from moe_gpt.compose import compose_run_config, merge_overrides
from moe_gpt.config import ConfigError, GPTConfig, MoEConfig
from moe_gpt.weights.init_from import initial_weights
from moe_gpt.model.gpt import GPT
from moe_gpt.weights.prune import (
    PER_EXPERT_KEYS,
    experts_to_keep,
    measure,
    prune_experts,
    pruned_checkpoint,
)
from moe_gpt.training.resume import Resume, saved_overrides
from moe_gpt.training.run import RunRecord, train
from tests.helpers import TINY, error_lines, folder_state, script_main, train_main

# Per MoE layer, the experts of a 6-expert model that no token can choose, and so the ones to keep.
NEVER_CHOSEN = [[0, 2, 5], [1, 2, 3]]
KEPT = [[1, 3, 4], [0, 4, 5]]


def small(gpt: dict | None = None, **moe) -> GPTConfig:
    """A 2-layer, 32-wide MoE GPT with 6 experts and aux_free balancing; ``gpt`` changes GPTConfig fields."""
    moe_config = MoEConfig(**{"num_experts": 6, "top_k": 2, "load_balance": "aux_free", **moe})
    settings = dict(block_size=16, vocab_size=100, n_layer=2, n_head=2, n_embd=32, use_moe=True, moe=moe_config)
    return GPTConfig(**{**settings, **(gpt or {})})


def model_with_unreachable_experts(config: GPTConfig) -> GPT:
    """Random weights; in MoE layer i the experts NEVER_CHOSEN[i] sit 1000 below every score, so none is chosen.

    With the sigmoid router the other experts get small distinct biases: they decide among the
    reachable experts, so a bias moved to the wrong expert would change the routing and the logits.
    Softmax scores are renormalised over the kept experts, which would move them against nonzero
    biases (prune.py's docstring): there the reachable experts' biases stay 0.
    """
    torch.manual_seed(0)
    model = GPT(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():  # nonzero biases and gains: any weight left behind shows
            parameter.normal_(0.0, 0.1)
        for layer, unreachable in zip(model.moe_layers(), NEVER_CHOSEN):
            bias = layer.router.selection_bias  # a buffer: still 0
            if config.moe.router == "sigmoid":
                bias.uniform_(-0.05, 0.05)
            bias[unreachable] = -1000.0
    return model


def tokens(vocab: int = 100, batch: int = 3, length: int = 16) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def logits(model: GPT, idx: torch.Tensor) -> torch.Tensor:
    return model(idx).logits


# --- which experts stay -------------------------------------------------------------------------


def test_experts_to_keep_takes_the_most_used_per_layer_with_ties_to_the_lower_index():
    shares = [[0.1, 0.4, 0.2, 0.3], [0.25, 0.25, 0.25, 0.25], [0.0, 0.5, 0.0, 0.5]]
    assert experts_to_keep(shares, 2) == [[1, 3], [0, 1], [1, 3]]
    assert experts_to_keep(shares, 3) == [[1, 2, 3], [0, 1, 2], [0, 1, 3]]
    assert experts_to_keep([[0.7, 0.1, 0.2]], 1) == [[0]]


@pytest.mark.parametrize("keep", [0, 4, -1])
def test_keep_outside_one_to_e_minus_one_is_a_one_line_error_naming_the_flag(keep):
    with pytest.raises(ConfigError) as error:
        experts_to_keep([[0.25] * 4], keep)
    assert str(error.value).startswith(f"--keep {keep} must be between 1 and 3") and "\n" not in str(error.value)


# --- pruning the model --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "config",
    [
        small(),
        small(router="sigmoid"),
        small(router="noisy", num_shared_experts=1),  # eval: no noise; the shared expert stays
        small({"bias": False}, router="sigmoid", top_k=1, normalize_top_k=False),  # sigmoid weights stand alone
        small({"n_layer": 3}, every_n_layers=2, router="sigmoid"),  # dense blocks between MoE blocks
    ],
    ids=["softmax", "sigmoid", "noisy-shared", "no-bias-top1", "dense-blocks"],
)
def test_pruning_experts_no_token_chooses_leaves_the_logits_unchanged(config):
    model = model_with_unreachable_experts(config)
    idx = tokens()
    for layer, unreachable in zip(routing_report(model, idx)["moe_layers"], NEVER_CHOSEN):
        assert all(layer["expert_share"][expert] == 0 for expert in unreachable)  # the premise holds
    kept = KEPT[: len(model.moe_layers())]
    pruned = prune_experts(model, kept)
    assert pruned.config.moe.num_experts == 3 and not pruned.training
    assert all(layer.experts.c_fc_weight.shape[0] == 3 for layer in pruned.moe_layers())
    torch.testing.assert_close(logits(pruned, idx), logits(model, idx), rtol=0, atol=1e-5)


def test_pruning_experts_tokens_do_choose_changes_the_logits():
    """The oracle above can fail: removing a used expert is visible in the logits."""
    model = model_with_unreachable_experts(small())
    pruned = prune_experts(model, [[0, 1, 3], KEPT[1]])  # layer 0 drops expert 4, which tokens use
    assert not torch.allclose(logits(pruned, tokens()), logits(model, tokens()), atol=1e-3)


def test_kept_experts_carry_their_own_weights_and_everything_else_is_copied_exactly():
    model = model_with_unreachable_experts(small(router="sigmoid", num_shared_experts=1))  # sigmoid: distinct biases
    kept = [[4, 1, 3], [5, 0, 2]]  # not sorted: expert i of the pruned layer is kept[i]
    pruned = prune_experts(model, kept)
    x = torch.randn(5, 32, generator=torch.Generator().manual_seed(2))
    for source, target, experts in zip(model.moe_layers(), pruned.moe_layers(), kept):
        for new, old in enumerate(experts):
            assert torch.equal(target.experts.expert_forward(new, x), source.experts.expert_forward(old, x))
            assert torch.equal(target.router.gate.weight[new], source.router.gate.weight[old])
            assert target.router.selection_bias[new] == source.router.selection_bias[old]
    per_expert = tuple(f".mlp.{name}" for name in PER_EXPERT_KEYS)
    source_state = model.state_dict()
    for key, tensor in pruned.state_dict().items():
        if not key.endswith(per_expert):
            assert torch.equal(tensor, source_state[key]), key


def test_top_k_and_min_experts_per_token_shrink_to_what_is_left_and_train_mode_stays():
    model = GPT(small(top_k=3, top_p=0.8, min_experts_per_token=3)).train()
    pruned = prune_experts(model, [[0, 1], [2, 3]])
    moe = pruned.config.moe
    assert (moe.num_experts, moe.top_k, moe.min_experts_per_token) == (2, 2, 2)
    assert pruned.training


@pytest.mark.parametrize(
    "kept,groups,reason",
    [
        ([[0, 3], [2, 4]], (2, 1), None),  # one expert from each group of 3 in every layer: the groups stay
        ([[0, 1], [3, 4]], (1, 1), "MoE layer 0 keeps [2, 0] experts from its 2 groups, not 1 from each"),
        ([[0, 1, 3], [0, 3, 4]], (1, 1), "--keep 3 is not divisible by model.moe.num_groups=2"),
    ],
)
def test_group_limited_routing_stays_only_where_the_kept_experts_still_form_the_groups(kept, groups, reason, caplog):
    model = GPT(small(num_groups=2, topk_groups=1, top_k=1))
    with caplog.at_level(logging.WARNING, logger="moe_gpt.weights.prune"):
        pruned = prune_experts(model, kept)
    assert (pruned.config.moe.num_groups, pruned.config.moe.topk_groups) == groups
    if reason is None:
        assert "group-limited" not in caplog.text
    else:
        assert "turns off group-limited routing" in caplog.text and reason in caplog.text


@pytest.mark.parametrize(
    "config,kept,message",
    [
        (small(), [[0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 4, 5]], "--keep 6 must be between 1 and 5"),
        (small(), [[0, 1]], "1 lists of experts to keep were given for 2 MoE layers"),
        (small(), [[0, 1], [0, 1, 2]], "MoE layer 1 keeps 3 experts but layer 0 keeps 2"),
        (small(), [[0, 0], [0, 1]], "MoE layer 0: [0, 0] are not distinct experts between 0 and 5"),
        (small(), [[0, 6], [0, 1]], "MoE layer 0: [0, 6] are not distinct experts between 0 and 5"),
        (small({"use_moe": False}), [[0]], "the model is dense"),
        (small(num_experts=1, top_k=1), [[0], [0]], "the model has 1 expert per MoE layer: there is nothing to prune"),
    ],
)
def test_prune_refuses_what_it_cannot_do_with_one_line(config, kept, message):
    with pytest.raises(ConfigError) as error:
        prune_experts(GPT(config), kept)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_measure_weighs_every_token_once_across_uneven_batches():
    model = model_with_unreachable_experts(small())
    idx = torch.randint(0, 100, (3, 17), generator=torch.Generator().manual_seed(3))
    x, y = idx[:, :-1], idx[:, 1:]
    result = measure(model, [(x[:2], y[:2]), (x[2:], y[2:])])
    with torch.no_grad():
        expected = F.cross_entropy(model(x).logits.flatten(0, 1), y.flatten()).item()
    assert result.loss == pytest.approx(expected, rel=1e-5)
    report = routing_report(model, x)["moe_layers"]
    for shares, layer in zip(result.shares, report):  # the same windows in one batch
        assert shares == pytest.approx(layer["expert_share"], abs=1e-6)


# --- the pruned checkpoint ----------------------------------------------------------------------


@pytest.fixture(scope="session")
def moe_checkpoint(tmp_path_factory, corpus_overrides) -> Path:
    """``last.ckpt`` of a tiny 4-expert MoE run (2 real training steps) that records its overrides, as train.py's do."""
    overrides = merge_overrides(TINY + corpus_overrides, ["logger=none", "trainer.max_steps=2"])
    run_dir = tmp_path_factory.mktemp("moe_run")
    train(compose_run_config(overrides, run_dir=str(run_dir)), RunRecord(overrides=overrides))
    return run_dir / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="session")
def pruned_file(moe_checkpoint, tmp_path_factory) -> Path:
    """The tiny MoE checkpoint with experts 1 and 2 of each layer kept, saved as the script saves it."""
    checkpoint = read_checkpoint(moe_checkpoint)
    pruned = prune_experts(load_model(moe_checkpoint), [[1, 2], [1, 2]])
    path = tmp_path_factory.mktemp("pruned") / "pruned.ckpt"
    torch.save(pruned_checkpoint(checkpoint, pruned), path)
    return path


def test_pruned_checkpoint_keeps_the_layout_and_the_run_record_but_no_training_state(moe_checkpoint, pruned_file):
    source, result = read_checkpoint(moe_checkpoint), read_checkpoint(pruned_file)
    for entry in ("optimizer_states", "lr_schedulers", "loops", "callbacks", "global_step", "epoch", "progress"):
        assert entry in source and entry not in result, entry
    assert result["hyper_parameters"]["optim_config"] == source["hyper_parameters"]["optim_config"]
    config = model_config(result)
    assert config == replace(model_config(source), moe=replace(model_config(source).moe, num_experts=2))
    assert result["hyper_parameters"]["model_config"] == asdict(config)  # plain values
    assert all(key.startswith("model.") for key in result["state_dict"])
    # The record's overrides now compose the pruned model: tools that rebuild the run get weights that fit.
    overrides = saved_overrides(Resume(pruned_file, result))
    assert "model.moe.num_experts=2" in overrides and "model.moe.num_experts=4" not in overrides
    assert compose_run_config(overrides).model == config
    assert result["run"]["config"]["model"] == asdict(config)
    assert result["run"]["config"]["data"] == source["run"]["config"]["data"]


def test_pruned_checkpoint_loads_and_computes_what_the_pruned_model_did(moe_checkpoint, pruned_file):
    pruned = prune_experts(load_model(moe_checkpoint), [[1, 2], [1, 2]])
    idx = tokens(vocab=50257, length=32)
    torch.testing.assert_close(logits(load_model(pruned_file), idx), logits(pruned, idx), rtol=0, atol=0)


def test_a_training_run_starts_from_the_pruned_checkpoint(pruned_file, tmp_path):
    overrides = saved_overrides(Resume(pruned_file, read_checkpoint(pruned_file)))
    cfg = compose_run_config([*overrides, f"init_from={pruned_file}"], run_dir=str(tmp_path))
    state = initial_weights(cfg)
    GPT(cfg.model).load_state_dict(state)  # strict: every key and shape of the run's model
    assert all(torch.equal(state[k], v) for k, v in load_model(pruned_file).state_dict().items())
    assert train(cfg)["steps"] == 2  # the real path: train() calls initial_weights itself


def test_resuming_from_the_pruned_checkpoint_is_refused_with_one_line_pointing_to_init_from(pruned_file, tmp_path):
    result = train_main([f"resume={pruned_file}", f"hydra.run.dir={tmp_path / 'run'}"])
    assert result.returncode == 2
    (line,) = error_lines(result.stderr)
    assert line.endswith(
        f"resume={pruned_file}: {pruned_file} holds weights but no training state to continue; "
        f"start a new run from it with init_from={pruned_file}"
    )
    assert "Traceback" not in result.stderr


def test_generate_and_analyze_read_the_pruned_checkpoint(pruned_file, load_script, capsys):
    argv = ["--checkpoint", str(pruned_file), "--prompt", "def", "--max-new-tokens", "3", "--seed", "0"]
    assert load_script("generate").main(argv) == 0
    assert capsys.readouterr().out.startswith("--- sample 1 ---\ndef")
    analyzed = script_main("analyze", ["routing", "--checkpoint", str(pruned_file), "--text", "def main():\n    return 0\n", "--json"])
    assert analyzed.returncode == 0, analyzed.stderr
    report = json.loads(analyzed.stdout)
    assert [len(layer["expert_share"]) for layer in report["moe_layers"]] == [2, 2]


# --- the command line ---------------------------------------------------------------------------


def run_script(*args: str) -> subprocess.CompletedProcess:
    """``scripts/prune_experts.py <args>``, in this process."""
    return script_main("prune_experts", list(args))


@pytest.fixture
def checkpoint_copy(moe_checkpoint, tmp_path) -> Path:
    """The tiny MoE checkpoint in a folder of this test's own, where the default output goes."""
    path = tmp_path / "checkpoints" / "last.ckpt"
    path.parent.mkdir()
    path.write_bytes(moe_checkpoint.read_bytes())
    return path


def test_cli_prunes_reports_and_refuses_to_overwrite(checkpoint_copy):
    result = run_script(str(checkpoint_copy), "--keep", "3", "--windows", "8")
    assert result.returncode == 0, result.stderr[-2000:]
    out = checkpoint_copy.with_name("last-pruned-3.ckpt")
    lines = result.stdout.splitlines()
    assert lines[0] == f"{checkpoint_copy}: 4 -> 3 experts per MoE layer, by usage on 8 validation windows of data=e2e"
    assert lines[1].startswith("block 0: kept experts ") and lines[2].startswith("block 1: kept experts ")
    assert lines[3].startswith("parameters: ") and lines[4].startswith("val loss: ")
    assert lines[5].startswith("val perplexity: ") and lines[6] == f"wrote {out}"
    assert lines[7].startswith("train from it: python train.py ") and f"init_from={out}" in lines[7]
    assert load_model(out).config.moe.num_experts == 3
    before = folder_state(checkpoint_copy.parent)
    again = run_script(str(checkpoint_copy), "--keep", "3", "--windows", "8")
    assert again.returncode == 2
    assert again.stderr.strip().splitlines() == [
        f"error: --out {out} already exists; remove it or pass another --out (it is never overwritten)"
    ]
    assert folder_state(checkpoint_copy.parent) == before


def test_cli_report_matches_the_library(checkpoint_copy, tmp_path, load_script, capsys):
    """The printed shares and losses are what measure() gives on the same windows (main() in-process)."""
    out = tmp_path / "two.ckpt"
    argv = [str(checkpoint_copy), "--keep", "2", "--windows", "6", "--out", str(out)]
    assert load_script("prune_experts").main(argv) == 0
    printed = capsys.readouterr().out
    from moe_gpt.data import TokenDataModule

    run = compose_run_config(saved_overrides(Resume(checkpoint_copy, read_checkpoint(checkpoint_copy))))
    datamodule = TokenDataModule(run.data, block_size=32, seed=run.seed)
    datamodule.setup("validate")
    windows = [datamodule.val_dataset[i] for i in range(6)]
    x, y = torch.stack([w[0] for w in windows]), torch.stack([w[1] for w in windows])
    before, after = measure(load_model(checkpoint_copy), [(x, y)]), measure(load_model(out), [(x, y)])
    losses = re.search(r"^val loss: ([\d.]+) -> ([\d.]+)$", printed, re.MULTILINE)
    assert float(losses[1]) == pytest.approx(before.loss, abs=6e-5)  # batched differently: float rounding only
    assert float(losses[2]) == pytest.approx(after.loss, abs=6e-5)
    kept = experts_to_keep(before.shares, 2)
    for block in (0, 1):
        shares = ", ".join(f"{e} ({before.shares[block][e]:.1%})" for e in kept[block])
        assert f"block {block}: kept experts {shares}: " in printed


def test_cli_bad_keep_is_one_line_and_writes_nothing(checkpoint_copy):
    before = folder_state(checkpoint_copy.parent)
    result = run_script(str(checkpoint_copy), "--keep", "4")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: --keep 4 must be between 1 and 3 (the model has 4 experts per MoE layer)"
    ]
    assert folder_state(checkpoint_copy.parent) == before


def test_cli_refuses_a_dense_checkpoint_with_one_line(tiny_checkpoint):
    result = run_script(str(tiny_checkpoint), "--keep", "1")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: {tiny_checkpoint} is a dense model (model.use_moe=false): it has no experts to prune"
    ]


def test_other_bad_input_is_one_line_and_writes_nothing(checkpoint_copy, tmp_path, load_script, capsys):
    """main() in-process: the same code path as the command line, without starting another interpreter."""
    damaged = tmp_path / "damaged.ckpt"
    damaged.write_bytes(b"not a checkpoint")
    cases = [
        ([str(tmp_path / "missing.ckpt"), "--keep", "1"], f"checkpoint {tmp_path / 'missing.ckpt'} does not exist"),
        ([str(damaged), "--keep", "1"], f"checkpoint {damaged} is damaged or truncated"),
        ([str(checkpoint_copy), "--keep", "2", "--windows", "0"], "--windows 0 must be at least 1"),
        ([str(checkpoint_copy), "model.n_layer=3", "--keep", "2"], "model.n_layer=3: the model comes from the"),
        ([str(checkpoint_copy), "--keep", "2", "--out", str(tmp_path / "no" / "x.ckpt")], "its folder"),
        ([str(checkpoint_copy), "--keep", "2", "data.val_fraction=2"], "data.val_fraction=2.0 must be in (0, 1)"),
    ]
    before = folder_state(tmp_path)
    script = load_script("prune_experts")
    for argv, message in cases:
        assert script.main(argv) == 2, argv
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (argv, lines)
    assert folder_state(tmp_path) == before
