"""trainer.expert_parallel (moe_gpt/model/expert_parallel.py, moe_gpt/training/sharding.py): each process holds
E/N experts, tokens travel to them and back, and training is the data-parallel run's.

In this process: the exchange over a gloo group of one. In processes of their own (several processes): the
gradients of two expert-parallel processes against one process, and train.py runs of two processes.
"""

import pytest
import torch
import torch.distributed
import torch.multiprocessing

from moe_gpt.cli.gpu_check import process_as_before
from moe_gpt.compose import compose_run_config
from moe_gpt.model.gpt import GPT
from moe_gpt.training.sharding import expert_mesh, shard_gpt
from moe_gpt.weights.safe_load import read_checkpoint
from tests.helpers import TINY, csv_column, error_lines, kill_all_at_first_checkpoint_then_resume, script_main
from tests.helpers import train_main, train_tiny_run

# Every option whose meaning expert parallelism must keep, at once: capacity (tokens dropped), top_p (slots
# unused), shared experts, biases in the experts (on by default), the sigmoid router's aux_free balancing.
OPTIONS = [
    "model.moe.capacity_factor=0.5",
    "model.moe.top_p=0.25",
    "model.moe.num_shared_experts=1",
    "model.moe.router=sigmoid",
    "model.moe.load_balance=aux_free",
    "model.moe.bias_update_rate=0.01",
]
EXPERTS_PER_RANK = "experts per rank: 2 of 4 (33,408 of 66,816 expert parameters), expert groups of 2 process(es)"


def tiny_gpt(options: list[str]) -> GPT:
    cfg = compose_run_config(TINY + options)
    torch.manual_seed(0)
    return GPT(cfg.model)


def batches(model: GPT, count: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    config = model.config
    return [torch.randint(0, config.vocab_size, (2, config.block_size), generator=generator) for _ in range(count)]


def data_parallel_reference(options: list[str], processes: int) -> dict[str, torch.Tensor]:
    """The gradients data parallelism gives: each process's batch through the whole model, losses averaged."""
    model = tiny_gpt(options)
    for idx in batches(model, processes):
        (model(idx, idx).loss / processes).backward()
    return {name: p.grad for name, p in model.named_parameters()}


def full_gradients(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.full_tensor() for name, p in model.named_parameters()}


# ------------------------------------------------------------------------- a group of one, in this process
@pytest.fixture
def group_of_one(tmp_path):
    with process_as_before():
        torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'rdv'}", rank=0, world_size=1)
        yield expert_mesh("cpu", 1, 1)


def test_the_exchange_over_one_process_gives_the_plain_models_loss_and_gradients(group_of_one):
    model = tiny_gpt(OPTIONS)
    shard_gpt(model, group_of_one, "32-true")
    assert model.moe_layers()[0].experts.parallel is not None  # the exchange runs, over a group of one
    (idx,) = batches(model, 1)
    loss = model(idx, idx).loss
    loss.backward()
    plain = tiny_gpt(OPTIONS)
    expected = plain(idx, idx).loss
    expected.backward()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(full_gradients(model), {name: p.grad for name, p in plain.named_parameters()})


# -------------------------------------------------------------------------- processes of their own
def _expert_parallel_gradients(rank: int, processes: int, expert_parallel: int, options: list[str], out: str) -> None:
    """One process of an expert-parallel group: its batch forward and backward; rank zero saves every gradient."""
    rendezvous = f"file://{out}/rendezvous"
    torch.distributed.init_process_group("gloo", init_method=rendezvous, rank=rank, world_size=processes)
    model = tiny_gpt(options)
    shard_gpt(model, expert_mesh("cpu", processes, expert_parallel), "32-true")
    idx = batches(model, processes)[rank]
    model(idx, idx).loss.backward()
    gradients = full_gradients(model)
    local = {p.to_local().shape[0] for layer in model.moe_layers() for p in layer.experts.parameters()}
    if rank == 0:
        torch.save({"gradients": gradients, "experts_held": local}, f"{out}/gradients.pt")
    torch.distributed.destroy_process_group()


@pytest.mark.slow  # two processes of their own
def test_two_expert_parallel_processes_give_the_data_parallel_gradients(tmp_path):
    torch.multiprocessing.spawn(_expert_parallel_gradients, args=(2, 2, OPTIONS, str(tmp_path)), nprocs=2)
    saved = torch.load(tmp_path / "gradients.pt", weights_only=True)
    assert saved["experts_held"] == {2}  # of 4
    expected = data_parallel_reference(OPTIONS, 2)
    assert any(name.endswith("experts.c_fc_weight") for name in expected)
    torch.testing.assert_close(saved["gradients"], expected)


# ---------------------------------------------------------------------------------- train.py runs
def train_cli(args: list[str], run_dir) -> str:
    result = train_tiny_run(args, run_dir)
    return result.stdout + result.stderr


EXPERT_PARALLEL = ["data.batch_size=2", "trainer.devices=2", "trainer.strategy=fsdp", "trainer.expert_parallel=2"]


@pytest.mark.slow
def test_two_expert_parallel_processes_train_like_one_process_and_leave_its_checkpoint(tmp_path, corpus_overrides):
    train_cli(corpus_overrides + ["data.batch_size=4"], tmp_path / "alone")
    printed = train_cli(corpus_overrides + EXPERT_PARALLEL, tmp_path / "ep")
    assert EXPERTS_PER_RANK in printed
    for column in ("train/loss", "val/loss"):
        expected, actual = csv_column(tmp_path / "alone", column), csv_column(tmp_path / "ep", column)
        assert [step for step, _ in actual] == [step for step, _ in expected], column
        assert [loss for _, loss in actual] == pytest.approx([loss for _, loss in expected], rel=1e-4), column
    # Usage summed over processes counts each slot once (a token near a tie may route differently, as under fsdp).
    shares = [[share for _, share in csv_column(tmp_path / run, "moe/layer0/expert0_share")] for run in ("ep", "alone")]
    assert shares[0] and shares[0] == pytest.approx(shares[1], abs=0.02)

    # The checkpoint holds every expert and its AdamW moments, laid out as one process's.
    path = tmp_path / "ep" / "checkpoints" / "last.ckpt"
    checkpoint, expected = read_checkpoint(path), read_checkpoint(tmp_path / "alone" / "checkpoints" / "last.ckpt")
    assert {k: v.shape for k, v in checkpoint["state_dict"].items()} == {
        k: v.shape for k, v in expected["state_dict"].items()
    }
    state, expected_state = checkpoint["optimizer_states"][0]["state"], expected["optimizer_states"][0]["state"]
    assert {n: {k: v.shape for k, v in s.items()} for n, s in state.items()} == {
        n: {k: v.shape for k, v in s.items()} for n, s in expected_state.items()
    }
    generated = script_main("generate", ["--checkpoint", str(path), "--prompt", "def", "--max-new-tokens", "3"])
    assert generated.returncode == 0 and generated.stdout.startswith("--- sample 1 ---\ndef"), generated.stderr
    # ... and a run of one process continues it.
    resumed = train_main(["resume=" + str(path), f"hydra.run.dir={tmp_path / 'one'}", "trainer.max_steps=7",
                          "trainer.devices=1", "trainer.strategy=auto", "trainer.expert_parallel=1", "logger=none"])  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert read_checkpoint(tmp_path / "one" / "checkpoints" / "last.ckpt")["global_step"] == 7


@pytest.fixture(scope="module")
def options_run(tmp_path_factory, corpus_overrides):
    """Two expert-parallel processes with every option on, dropout and accumulation, a checkpoint every step."""
    root = tmp_path_factory.mktemp("expert_parallel_options")
    args = [*corpus_overrides, *OPTIONS, "checkpoint.every_n_steps=1", "trainer.max_steps=8", "trainer.val_check_interval=4",
            "trainer.accumulate_grad_batches=2", "model.dropout=0.1"]  # fmt: skip
    train_cli(args + EXPERT_PARALLEL, root / "ep")
    return root, args


@pytest.mark.slow
def test_with_capacity_top_p_shared_experts_and_aux_free_expert_parallel_trains_as_fsdp_does(options_run):
    root, args = options_run
    train_cli(args + EXPERT_PARALLEL[:-1], root / "fsdp")  # the same processes and batches, every expert everywhere
    biases = [f"moe/layer0/expert{expert}_bias" for expert in range(4)]
    columns = ["train/loss", "val/loss", "moe/layer0/expert0_share", "moe/layer0/dropped_fraction", *biases]
    for column in columns:
        expected, actual = csv_column(root / "fsdp", column), csv_column(root / "ep", column)
        assert actual and [s for s, _ in actual] == [s for s, _ in expected], column
        assert [v for _, v in actual] == pytest.approx([v for _, v in expected], rel=1e-4, abs=1e-6), column
    # Every option was at work: slots dropped, fewer than top_k experts per token, biases moved.
    assert max(v for _, v in csv_column(root / "ep", "moe/layer0/dropped_fraction")) > 0
    assert min(v for _, v in csv_column(root / "ep", "moe/layer0/experts_per_token")) < 2
    assert any(v != 0 for column in biases for _, v in csv_column(root / "ep", column))


@pytest.mark.slow
def test_an_expert_parallel_run_killed_with_sigkill_resumes_exactly(options_run, tmp_path):
    root, args = options_run
    run_dir = tmp_path / "run"
    assert 1 <= kill_all_at_first_checkpoint_then_resume(TINY + args + EXPERT_PARALLEL + ["logger=csv"], run_dir, tmp_path) < 8

    weights, expected = (read_checkpoint(d / "checkpoints" / "last.ckpt")["state_dict"] for d in (run_dir, root / "ep"))
    assert weights.keys() == expected.keys()
    assert all(torch.equal(weights[key], expected[key]) for key in weights), "weights differ"
    for column in ("train/loss", "val/loss", "moe/layer0/expert0_share", "moe/layer0/expert0_bias"):
        assert csv_column(run_dir, column) == csv_column(root / "ep", column), column


# ------------------------------------------------------------------------------------------ refusals
@pytest.mark.parametrize(
    "overrides, message",
    [
        (["trainer.expert_parallel=2"], "trainer.expert_parallel=2 runs under FSDP2 only; add trainer.strategy=fsdp"),
        (
            ["trainer.expert_parallel=2", "trainer.strategy=fsdp"],
            "trainer.expert_parallel=2 must divide the process count (1); set trainer.devices to a multiple",
        ),
        (
            ["trainer.expert_parallel=3", "trainer.strategy=fsdp", "trainer.devices=3"],
            "trainer.expert_parallel=3 must divide model.moe.num_experts=4; each process holds an equal share",
        ),
        (
            ["trainer.expert_parallel=2", "model=dense"],
            "trainer.expert_parallel=2 needs an MoE model (model=moe); a dense model has no experts to spread",
        ),
        (["trainer.expert_parallel=0"], "trainer.expert_parallel=0 must be positive"),
    ],
)
def test_expert_parallel_settings_that_cannot_work_are_one_line_and_write_nothing(tmp_path, overrides, message):
    run_dir = tmp_path / "run"
    result = train_main([*TINY, *overrides, f"hydra.run.dir={run_dir}"])
    assert result.returncode == 2
    assert error_lines(result.stderr)[-1].endswith(message)
    assert not run_dir.exists()
