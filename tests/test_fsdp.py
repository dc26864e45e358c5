"""trainer.strategy=fsdp (FSDP2, moe_gpt/training/sharding.py): the training of one process, checkpoints that
every consumer reads on one process, exact resumes.

Runs of two processes are train.py processes of their own (Lightning starts the second by re-running the
command line); the others use a gloo process group of one process in this one, removed after each test.
"""

import json

import pytest
import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.utils._pytree import tree_leaves

from moe_gpt.cli.gpu_check import process_as_before
from moe_gpt.compare.held_out import held_out_loss
from moe_gpt.compose import compose_run_config
from moe_gpt.config import TrainerConfig
from moe_gpt.training.lit_module import GPTLightningModule
from moe_gpt.training.sharding import full_optimizer_state, load_full_state, shard_gpt
from moe_gpt.weights.init_from import initial_weights
from moe_gpt.weights.safe_load import model_state_dict, read_checkpoint
from tests.helpers import (
    TINY,
    csv_column,
    error_lines,
    kill_all_at_first_checkpoint_then_resume,
    metrics_of,
    script_main,
    train_main,
    train_tiny_run,
)

TWO_PROCESSES = ["data.batch_size=2", "trainer.devices=2", "trainer.strategy=fsdp"]
SHARE = "moe/layer0/expert0_share"


# --------------------------------------------------------------------- one process, in this one
@pytest.fixture
def mesh(tmp_path):
    """A one-process gloo group and its mesh (FSDP2 needs one); the process is as before after the test."""
    with process_as_before():
        rendezvous = f"file://{tmp_path / 'rendezvous'}"
        torch.distributed.init_process_group("gloo", init_method=rendezvous, rank=0, world_size=1)
        yield init_device_mesh("cpu", (1,))


def tiny_module(seed: int = 0) -> GPTLightningModule:
    cfg = compose_run_config(TINY)  # the MoE model
    torch.manual_seed(seed)
    return GPTLightningModule(cfg.model, cfg.optim, max_steps=cfg.trainer.max_steps)


def train_step(module: GPTLightningModule, optimizer: torch.optim.Optimizer, seed: int) -> None:
    config = module.model.config
    batch = torch.randint(0, config.vocab_size, (2, config.block_size), generator=torch.Generator().manual_seed(seed))
    module.model(batch, batch).loss.backward()
    optimizer.step()
    optimizer.zero_grad()


def adamw(module: GPTLightningModule) -> torch.optim.Optimizer:
    return module.configure_optimizers()["optimizer"]  # decaying matrices, then the rest, as in a run


def test_bf16_mixed_gathers_each_block_in_bf16_and_each_router_in_float32(mesh):
    plain, model = tiny_module().model, tiny_module().model
    shard_gpt(model, mesh, "bf16-mixed")
    seen = {}

    def record(name: str, module: torch.nn.Module, linear: torch.nn.Linear) -> None:
        # Runs after fully_shard's own hooks, so it sees the gathered weights.
        module.register_forward_pre_hook(lambda *_: seen.__setitem__(name, linear.weight.dtype))

    attention, router = model.transformer.h[0].attn.c_attn, model.moe_layers()[0].router
    record("attention", attention, attention)
    record("router", router, router.gate)  # the router reads its gate's weight without calling the gate
    idx = torch.randint(0, model.config.vocab_size, (2, model.config.block_size))
    with torch.autocast("cpu", torch.bfloat16):  # Lightning's bf16-mixed stays on around FSDP2's policy
        loss, expected = model(idx, idx).loss, plain(idx, idx).loss
    loss.backward()

    assert seen == {"attention": torch.bfloat16, "router": torch.float32}
    assert loss.item() == pytest.approx(expected.item(), rel=2e-2)  # bf16's bound in tests/test_mixed_precision.py
    # AdamW steps float32 shards with gradients reduced in float32.
    assert {(p.dtype, p.grad.dtype) for p in model.parameters()} == {(torch.float32, torch.float32)}


def test_every_sharded_modules_output_shows_its_tensors_to_torchs_pytree():
    # torch 2.11's FSDP2 finds the tensors to hook (and so to gather the weights again before their
    # backward) with torch's pytree; an unregistered dataclass hid them and the backward met freed weights.
    model = tiny_module().model
    idx = torch.randint(0, model.config.vocab_size, (2, model.config.block_size))
    block_out = model.transformer.h[0](model.transformer.wte(idx))
    router_out = model.moe_layers()[0].router(block_out.x.flatten(0, 1))
    for output in (model(idx), block_out, router_out):
        tensors = [leaf for leaf in tree_leaves(output) if isinstance(leaf, torch.Tensor)]
        fields = [value for value in vars(output).values() if isinstance(value, torch.Tensor)]
        assert len(tensors) == len(fields) > 0 and all(any(t is f for t in tensors) for f in fields), type(output)


def test_a_sharded_model_saves_and_loads_the_state_of_one_unsharded_process(mesh, tmp_path):
    plain, sharded = tiny_module(), tiny_module()
    shard_gpt(sharded.model, mesh, "32-true")
    optimizers = adamw(plain), adamw(sharded)
    for module, optimizer in zip((plain, sharded), optimizers):
        train_step(module, optimizer, seed=1)

    # What the checkpoint holds: the unsharded model's keys and values, and its optimizer's state dict.
    weights = get_model_state_dict(sharded, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    assert weights.keys() == plain.state_dict().keys()
    torch.testing.assert_close(weights, plain.state_dict(), rtol=0, atol=0)
    saved, expected = full_optimizer_state(sharded, optimizers[1]), optimizers[0].state_dict()
    assert saved["param_groups"] == expected["param_groups"]
    torch.testing.assert_close(saved["state"], expected["state"])

    # A one-process checkpoint loads into a sharded model, and the next step is the one the plain model takes.
    resumed = tiny_module(seed=2)
    shard_gpt(resumed.model, mesh, "32-true")
    resumed_optimizer = adamw(resumed)
    torch.save({"state_dict": plain.state_dict(), "optimizer_states": [expected]}, tmp_path / "plain.ckpt")
    checkpoint = torch.load(tmp_path / "plain.ckpt", weights_only=True)
    load_full_state(resumed, [resumed_optimizer], checkpoint, strict=True)
    train_step(plain, optimizers[0], seed=3)
    train_step(resumed, resumed_optimizer, seed=3)
    full = get_model_state_dict(resumed, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    torch.testing.assert_close(full, plain.state_dict(), rtol=0, atol=0)


@pytest.mark.slow  # torch.compile on the CPU: seconds with inductor's cache warm, tens of seconds without
def test_a_model_compiled_in_place_then_sharded_gives_the_plain_models_loss_and_gradients(mesh):
    plain, sharded = tiny_module().model, tiny_module().model
    sharded.compile()  # as run.py does, before the trainer shards it: in place, so the keys stay
    shard_gpt(sharded, mesh, "32-true")
    idx = torch.randint(0, plain.config.vocab_size, (2, plain.config.block_size))
    try:
        losses = [model(idx, idx).loss for model in (plain, sharded)]
        for loss in losses:
            loss.backward()
    finally:
        torch.compiler.reset()
    torch.testing.assert_close(losses[1], losses[0])
    for (name, p), q in zip(plain.named_parameters(), sharded.parameters()):
        torch.testing.assert_close(q.grad.full_tensor(), p.grad, msg=name)


def test_fp16_mixed_precision_under_fsdp_is_one_line_and_writes_nothing(tmp_path, corpus_overrides):
    run_dir = tmp_path / "run"
    result = train_main([*TINY, *corpus_overrides, "trainer.strategy=fsdp", "trainer.precision=16-mixed", f"hydra.run.dir={run_dir}"])
    assert result.returncode == 2
    assert error_lines(result.stderr)[-1].endswith(
        "trainer.strategy=fsdp does not take trainer.precision=16-mixed (FSDP2 here runs 32-true, bf16-mixed and "
        "bf16-true); use trainer.precision=bf16-mixed, or trainer.strategy=ddp"
    )
    assert not run_dir.exists()


def test_a_dense_fsdp_run_of_one_process_exports_to_hugging_face(tmp_path, corpus_overrides):
    run_dir = tmp_path / "run"
    with process_as_before():  # the strategy's process group, even for one process
        result = train_main([*TINY, *corpus_overrides, "model=dense", "trainer.strategy=fsdp", "logger=none", f"hydra.run.dir={run_dir}"])
    assert result.returncode == 0, result.stderr[-3000:]
    exported = script_main("export_hf", ["--checkpoint", str(run_dir / "checkpoints" / "last.ckpt"), "--out", str(tmp_path / "hf")])
    assert exported.returncode == 0, exported.stderr
    assert (tmp_path / "hf" / "model.safetensors").is_file()


# ------------------------------------------------------------------------------ two processes
def last_weights(run_dir) -> dict[str, torch.Tensor]:
    return read_checkpoint(run_dir / "checkpoints" / "last.ckpt")["state_dict"]


def train_cli(args: list[str], run_dir) -> dict:
    train_tiny_run(args, run_dir)
    return metrics_of(run_dir)


@pytest.fixture(scope="module")
def alone_and_fsdp(tmp_path_factory, corpus_overrides):
    """One process with batch 4, and two FSDP2 processes with batch 2 each."""
    root = tmp_path_factory.mktemp("fsdp")
    metrics = {
        "alone": train_cli(corpus_overrides + ["data.batch_size=4"], root / "alone"),
        "fsdp": train_cli(corpus_overrides + TWO_PROCESSES, root / "fsdp"),
    }
    return root, metrics


@pytest.mark.slow
def test_two_fsdp_processes_train_like_one_process_with_twice_the_batch(alone_and_fsdp):
    root, metrics = alone_and_fsdp
    alone, fsdp = metrics["alone"], metrics["fsdp"]
    assert (fsdp["world_size"], alone["world_size"]) == (2, 1)
    for column in ("train/loss", "val/loss"):
        expected, actual = csv_column(root / "alone", column), csv_column(root / "fsdp", column)
        assert [step for step, _ in actual] == [step for step, _ in expected], column  # one row per step
        assert [loss for _, loss in actual] == pytest.approx([loss for _, loss in expected], rel=1e-4), column
    assert [s for _, s in csv_column(root / "fsdp", SHARE)] == pytest.approx([s for _, s in csv_column(root / "alone", SHARE)], abs=0.02)
    assert fsdp["train_tokens"] == alone["train_tokens"] == 6 * 4 * 32
    assert [h["tokens"] for h in fsdp["val_history"]] == [h["tokens"] for h in alone["val_history"]]
    # Rank zero alone writes, and a checkpoint is one file, as one process writes it.
    assert sorted(path.name for path in (root / "fsdp" / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]


@pytest.mark.slow
def test_an_fsdp_checkpoint_is_laid_out_as_one_processs_and_every_consumer_reads_it(
    alone_and_fsdp, corpus_overrides, tmp_path
):
    root, _ = alone_and_fsdp
    path = root / "fsdp" / "checkpoints" / "last.ckpt"
    checkpoint, expected = read_checkpoint(path), read_checkpoint(root / "alone" / "checkpoints" / "last.ckpt")
    assert checkpoint.keys() == expected.keys()
    assert {k: (v.shape, v.dtype, type(v)) for k, v in checkpoint["state_dict"].items()} == {
        k: (v.shape, v.dtype, type(v)) for k, v in expected["state_dict"].items()
    }
    optimizer, expected_optimizer = checkpoint["optimizer_states"][0], expected["optimizer_states"][0]
    assert optimizer["param_groups"] == expected_optimizer["param_groups"]
    assert {n: {k: v.shape for k, v in s.items()} for n, s in optimizer["state"].items()} == {
        n: {k: v.shape for k, v in s.items()} for n, s in expected_optimizer["state"].items()
    }
    assert len(checkpoint["callbacks"]["RNGStateCallback"]["per_process"]) == 2

    generated = script_main("generate", ["--checkpoint", str(path), "--prompt", "def", "--max-new-tokens", "3", "--seed", "0"])
    assert generated.returncode == 0 and generated.stdout.startswith("--- sample 1 ---\ndef"), generated.stderr
    analyzed = script_main("analyze", ["routing", "--checkpoint", str(path), "--text", "def main():\n    return 0\n", "--json"])
    assert analyzed.returncode == 0 and len(json.loads(analyzed.stdout)["moe_layers"]) == 2, analyzed.stderr
    pruned = script_main("prune_experts", [str(path), "--keep", "2", "--windows", "4", "--out", str(tmp_path / "pruned.ckpt")])
    assert pruned.returncode == 0, pruned.stderr
    started = initial_weights(compose_run_config([*TINY, f"init_from={path}"]))
    torch.testing.assert_close(started, model_state_dict(checkpoint), rtol=0, atol=0)
    data = compose_run_config([*TINY, *corpus_overrides]).data
    assert torch.isfinite(torch.tensor(held_out_loss(path, data, 2, TrainerConfig())["loss"]))


@pytest.mark.slow
def test_an_fsdp_run_killed_with_sigkill_resumes_into_the_same_run(tmp_path, corpus_overrides):
    # Dropout, accumulation, aux_free biases and last.ckpt at every step: every piece of state must come back.
    resumable = [
        *corpus_overrides, *TWO_PROCESSES, "checkpoint.every_n_steps=1", "trainer.max_steps=8",
        "trainer.val_check_interval=4", "trainer.accumulate_grad_batches=2", "model.dropout=0.1",
        "model.moe.router=sigmoid", "model.moe.load_balance=aux_free", "model.moe.bias_update_rate=0.01",
    ]  # fmt: skip
    uninterrupted = train_cli(resumable, tmp_path / "uninterrupted")

    run_dir = tmp_path / "run"
    assert 1 <= kill_all_at_first_checkpoint_then_resume(TINY + resumable + ["logger=csv"], run_dir, tmp_path) < 8

    weights, expected = (last_weights(d) for d in (run_dir, tmp_path / "uninterrupted"))
    assert weights.keys() == expected.keys() and any(key.endswith("selection_bias") for key in weights)
    assert all(torch.equal(weights[key], expected[key]) for key in weights), "weights differ"
    for column in ("train/loss", "val/loss", "lr/with_weight_decay", SHARE, "moe/layer0/expert0_bias"):
        assert csv_column(run_dir, column) == csv_column(tmp_path / "uninterrupted", column), column
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["train_tokens"] == uninterrupted["train_tokens"] == 8 * 2 * 4 * 32
