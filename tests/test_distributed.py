"""Several processes (DDP on the CPU, gloo): the same training as one process, and numbers counted once for all."""

import json

import pytest
import torch

from tests.helpers import TINY, csv_column, metrics_of, train_main, train_tiny_run


def train_cli(args: list[str], run_dir) -> dict:
    train_tiny_run(args, run_dir)
    return metrics_of(run_dir)


# aux_free on: its bias update reads the load summed over processes, so it is part of what must agree.
AUX_FREE = ["model.moe.router=sigmoid", "model.moe.load_balance=aux_free", "model.moe.bias_update_rate=0.01"]


@pytest.fixture(scope="module")
def alone_and_ddp(tmp_path_factory, corpus_overrides):
    """One process with batch 4, and two DDP processes with batch 2 each: one pair of runs for every test here."""
    root = tmp_path_factory.mktemp("ddp")
    alone = train_cli(corpus_overrides + AUX_FREE + ["data.batch_size=4"], root / "alone")
    ddp = train_cli(
        corpus_overrides + AUX_FREE + ["data.batch_size=2", "trainer.devices=2", "trainer.strategy=ddp"], root / "ddp"
    )
    return root, alone, ddp


@pytest.mark.slow
def test_two_processes_train_like_one_process_with_twice_the_batch(alone_and_ddp):
    root, alone, ddp = alone_and_ddp
    assert (ddp["world_size"], alone["world_size"]) == (2, 1)
    # Each step saw the same windows: the losses agree up to float summation order.
    for column in ("train/loss", "val/loss"):
        expected, actual = csv_column(root / "alone", column), csv_column(root / "ddp", column)
        assert [step for step, _ in actual] == [step for step, _ in expected]
        assert [loss for _, loss in actual] == pytest.approx([loss for _, loss in expected], rel=1e-4), column
    # Expert shares are summed over both processes' tokens before they are logged.
    share = "moe/layer0/expert0_share"
    assert [s for _, s in csv_column(root / "ddp", share)] == pytest.approx(
        [s for _, s in csv_column(root / "alone", share)], abs=0.02
    )
    # One metrics.json, written once, counting both processes' tokens.
    assert ddp["train_tokens"] == alone["train_tokens"] == 6 * 4 * 32
    assert [h["tokens"] for h in ddp["val_history"]] == [h["tokens"] for h in alone["val_history"]]


@pytest.mark.slow
def test_aux_free_bias_moves_alike_with_two_processes_and_with_one(alone_and_ddp):
    """The bias update reads the load summed over processes, so every process (and one alone) moves it alike."""
    root, _, _ = alone_and_ddp
    biases = {}
    for name in ("alone", "ddp"):
        state = torch.load(root / name / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
        biases[name] = [tensor for key, tensor in sorted(state.items()) if key.endswith("selection_bias")]
    assert len(biases["ddp"]) == 2 and any(bias.abs().sum() > 0 for bias in biases["ddp"])
    for alone, ddp in zip(biases["alone"], biases["ddp"]):
        assert torch.equal(alone, ddp)


def test_a_sweep_with_several_processes_per_job_is_refused_with_how_to_run_it(tmp_path, corpus_overrides):
    sweep_dir = tmp_path / "sweep"
    args = ["-m", *TINY, *corpus_overrides, "trainer.devices=2", "trainer.strategy=ddp", "model.moe.top_k=1,2"]
    result = train_main([*args, "logger=none", f"hydra.sweep.dir={sweep_dir}"])
    assert result.returncode == 0  # a sweep records a failed job and goes on
    for job in ("0", "1"):
        failure = json.loads((sweep_dir / job / "failure.json").read_text())
        assert failure["reason"].startswith(
            "-m with 2 processes per job: Lightning starts the extra processes by re-running"
        )
        assert "run each job without -m, or sweep with hydra/launcher=slurm" in failure["reason"]
