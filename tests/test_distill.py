"""Distillation through train.py: a frozen teacher checkpoint, the student's losses, its refusals and resumes.

The teacher is the TINY MoE checkpoint (2 layers, 32 wide, 4 experts); students are TINY runs.
"""

import os
import signal
import shutil
from pathlib import Path

import lightning as L
import pytest
import torch

from moe_gpt.compose import compose_run_config
from moe_gpt.config import ConfigError, DistillConfig
from moe_gpt.errors import Interrupted
from moe_gpt.model.gpt import GPT
from moe_gpt.training.run import RunRecord, train
from moe_gpt.weights.gather import checkpoint_usage, expert_weights
from moe_gpt.weights.safe_load import model_config, model_state_dict, read_checkpoint
from moe_gpt.weights.teacher import TEACHER_RECORD, load_teacher
from tests.helpers import TINY, csv_column, error_lines, folder_state, run_train_cli, train_main
from tests.test_checkpoint_safety import with_flipped_bytes
from tests.test_fsdp import TWO_PROCESSES

STUDENT = TINY + ["logger=csv", "trainer.max_steps=4", "trainer.val_check_interval=2"]


def student_args(teacher: Path, run_dir: Path, corpus_overrides: list[str], *extra: str) -> list[str]:
    return STUDENT + corpus_overrides + [f"distill.teacher={teacher}", f"hydra.run.dir={run_dir}", *extra]


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]


def teacher_with_experts(teacher: Path, folder: Path, hidden_size: int, identical: bool) -> Path:
    """A copy of the teacher checkpoint with fresh experts ``hidden_size`` wide (all equal to expert 0 if ``identical``)."""
    checkpoint = torch.load(teacher, weights_only=True)
    config = checkpoint["hyper_parameters"]["model_config"]
    config["moe"] = {**config["moe"], "hidden_size": hidden_size}
    torch.manual_seed(hidden_size)
    fresh = GPT(model_config(checkpoint)).state_dict()
    for key in list(checkpoint["state_dict"]):
        if ".mlp.experts." in key:
            tensor = fresh[key.removeprefix("model.")]
            if "bias" in key:  # built as zeros; nonzero so that the gathered biases are checked too
                tensor.normal_(std=0.02)
            if identical:
                tensor[1:] = tensor[0]
            checkpoint["state_dict"][key] = tensor
    path = folder / f"experts-{hidden_size}-{'identical' if identical else 'fresh'}.ckpt"
    torch.save(checkpoint, path)
    return path


def gathered_student(teacher_path: Path) -> tuple[GPT, GPT]:
    """(the dense TINY student gathered from ``teacher_path``, the teacher), both in eval mode."""
    student_config = compose_run_config(TINY + ["model=dense"]).model
    teacher = load_teacher(DistillConfig(teacher=str(teacher_path), init="experts"), student_config)
    student = GPT(student_config).eval()
    student.load_state_dict(teacher.student_weights(student_config))
    return student, teacher.model


@pytest.mark.parametrize("hidden_size", [128, 64, 32])  # 1, 2 and 4 expert-wide slices of the 128-wide dense MLP
def test_a_dense_student_gathered_from_identical_experts_computes_the_teachers_logits(
    tiny_moe_checkpoint, tmp_path, hidden_size
):
    student, teacher = gathered_student(teacher_with_experts(tiny_moe_checkpoint, tmp_path, hidden_size, identical=True))
    idx = torch.randint(student.config.vocab_size, (3, student.config.block_size))
    with torch.no_grad():
        torch.testing.assert_close(student(idx).logits, teacher(idx).logits, rtol=1e-5, atol=1e-5)


def test_half_width_experts_are_dealt_by_usage_into_two_slices_each_scaled_by_its_groups_share(
    tiny_moe_checkpoint, tmp_path
):
    path = teacher_with_experts(tiny_moe_checkpoint, tmp_path, 64, identical=False)
    student, teacher = gathered_student(path)
    usage = checkpoint_usage(read_checkpoint(path), 4)[1]  # layer 1's token-slots per expert
    weights = usage / usage.sum()
    ranked = sorted(range(4), key=lambda e: -float(weights[e]))
    groups = [ranked[0::2], ranked[1::2]]  # the 1st and 3rd most used; the 2nd and 4th
    experts = teacher.transformer.h[1].mlp.experts
    expected_fc, expected_proj, expected_bias = [], [], 0
    for group in groups:
        share = float(weights[group].sum())
        within = [float(weights[e]) / share for e in group]
        expected_fc.append(sum(w * experts.c_fc_weight[e] for w, e in zip(within, group)))
        expected_proj.append(share * sum(w * experts.c_proj_weight[e] for w, e in zip(within, group)))
        expected_bias = expected_bias + share * sum(w * experts.c_proj_bias[e] for w, e in zip(within, group))
    mlp = student.transformer.h[1].mlp
    torch.testing.assert_close(mlp.c_fc.weight, torch.cat(expected_fc, 0))
    torch.testing.assert_close(mlp.c_proj.weight, torch.cat(expected_proj, 1))
    torch.testing.assert_close(mlp.c_proj.bias, expected_bias)


@pytest.mark.parametrize("hidden_size, reason", [(48, "48 wide"), (16, "16 wide")])  # 128/48 is no whole number; 8 slices > 4 experts
def test_experts_whose_width_does_not_slice_the_dense_mlp_are_refused_in_one_line(
    tiny_moe_checkpoint, tmp_path, hidden_size, reason
):
    path = teacher_with_experts(tiny_moe_checkpoint, tmp_path, hidden_size, identical=False)
    with pytest.raises(ConfigError, match=f"experts are {reason}; the dense MLP .* use distill.init=scratch"):
        gathered_student(path)


def test_the_dense_mlp_is_the_usage_weighted_mean_of_the_experts_or_their_plain_mean_without_counts(
    tiny_moe_checkpoint,
):
    checkpoint = read_checkpoint(tiny_moe_checkpoint)
    usage = checkpoint_usage(checkpoint, 4)
    assert usage is not None and usage.shape == (2, 4)  # TINY counts usage; the checkpoint keeps the counts
    counted, source = expert_weights(usage, 2, 4)
    torch.testing.assert_close(counted, usage / usage.sum(1, keepdim=True))
    assert source.startswith("usage-weighted")
    del checkpoint["callbacks"]["ExpertUsageLogger"]
    uniform, source = expert_weights(checkpoint_usage(checkpoint, 4), 2, 4)
    assert torch.equal(uniform, torch.full((2, 4), 0.25, dtype=torch.float64)) and source.startswith("uniform")

    student_config = compose_run_config(TINY + ["model=dense"]).model
    teacher = load_teacher(DistillConfig(teacher=str(tiny_moe_checkpoint), init="experts"), student_config)
    gathered = teacher.student_weights(student_config)
    experts = model_state_dict(checkpoint)["transformer.h.1.mlp.experts.c_fc_weight"]  # (E, H, C)
    expected = torch.tensordot(counted[1].float(), experts, dims=1)
    torch.testing.assert_close(gathered["transformer.h.1.mlp.c_fc.weight"], expected)
    assert not any(".router." in key for key in gathered)


def test_a_distilled_run_logs_its_losses_and_keeps_the_teacher_frozen_and_out_of_its_checkpoint(
    tiny_moe_checkpoint, corpus_overrides, tmp_path
):
    teacher_before = model_state_dict(read_checkpoint(tiny_moe_checkpoint))
    seen = []

    class TeacherProbe(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            model = pl_module.teacher.model
            seen.append((model.training, any(p.requires_grad or p.grad is not None for p in model.parameters())))

    args = student_args(tiny_moe_checkpoint, tmp_path / "run", corpus_overrides, "model=dense", "trainer.max_steps=2")
    train(compose_run_config(args, run_dir=str(tmp_path / "run")), RunRecord(callbacks=[TeacherProbe()]))
    assert seen == [(False, False)] * 2  # eval mode, no gradient, at every step
    run_dir = tmp_path / "run"
    for column in ("train/kl_loss", "train/lm_loss", "train/distill_loss"):
        assert len(csv_column(run_dir, column)) == 2, column
    ce, kl = dict(csv_column(run_dir, "train/lm_loss")), dict(csv_column(run_dir, "train/kl_loss"))
    for step, mixed in csv_column(run_dir, "train/distill_loss"):  # alpha=0.5, T=2 (the defaults)
        assert mixed == pytest.approx(0.5 * ce[step] + 0.5 * 4 * kl[step], rel=1e-5)
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert all(key.startswith("model.") for key in checkpoint["state_dict"])
    assert checkpoint["state_dict"].keys() == {"model." + key for key in GPT(compose_run_config(args).model).state_dict()}
    assert checkpoint[TEACHER_RECORD]["size"] == tiny_moe_checkpoint.stat().st_size
    teacher_after = model_state_dict(read_checkpoint(tiny_moe_checkpoint))
    assert all(torch.equal(teacher_before[key], teacher_after[key]) for key in teacher_before)


def test_alpha_one_trains_exactly_as_without_a_teacher(tiny_moe_checkpoint, corpus_overrides, tmp_path):
    short = ["trainer.max_steps=2", "trainer.val_check_interval=2"]
    plain = tmp_path / "plain"
    assert train_main(STUDENT + corpus_overrides + short + [f"hydra.run.dir={plain}"]).returncode == 0
    distilled = tmp_path / "distilled"
    args = student_args(tiny_moe_checkpoint, distilled, corpus_overrides, "distill.alpha=1.0", *short)
    assert train_main(args).returncode == 0
    expected, got = weights(plain), weights(distilled)
    assert expected.keys() == got.keys() and all(torch.equal(expected[key], got[key]) for key in expected)
    for column in ("train/loss", "val/loss"):
        assert csv_column(distilled, column) == csv_column(plain, column), column


def refused_teachers(tiny_moe_checkpoint: Path, folder: Path) -> list[tuple[list[str], str]]:
    """(overrides, what the one line says) for teachers that cannot teach the TINY student."""
    missing = folder / "missing.ckpt"
    damaged = with_flipped_bytes(tiny_moe_checkpoint, folder)
    return [
        ([f"distill.teacher={missing}"], f"distill.teacher={missing}: checkpoint {missing} does not exist"),
        ([f"distill.teacher={damaged}"], f"distill.teacher={damaged}: checkpoint {damaged} is damaged"),
        (
            [f"distill.teacher={tiny_moe_checkpoint}", "model.vocab_size=50304"],
            "has model.vocab_size=50257 but the student has 50304; distil only between models of the same tokenizer",
        ),
        (
            [f"distill.teacher={tiny_moe_checkpoint}", "model.block_size=64"],
            "was trained on 32-token windows but the student has model.block_size=64",
        ),
        (
            [f"distill.teacher={tiny_moe_checkpoint}", "distill.init=experts"],
            "distill.init=experts builds a dense student; set model=dense",
        ),
    ]


def test_a_teacher_that_cannot_teach_is_one_line_before_any_data_is_read_and_writes_nothing(
    tiny_moe_checkpoint, tmp_path
):
    folder = tmp_path / "inputs"
    folder.mkdir()
    for overrides, message in refused_teachers(tiny_moe_checkpoint, folder):
        before = folder_state(tmp_path)
        # A corpus that does not exist: had any data been read first, that would be the error.
        args = TINY + ["data=text", f"data.paths=[{tmp_path}/nowhere/*.txt]", f"hydra.run.dir={tmp_path / 'run'}"]
        result = train_main(args + overrides)
        errors = error_lines(result.stderr)
        assert result.returncode == 2 and len(errors) == 1 and message in errors[0], result.stderr[-2000:]
        assert folder_state(tmp_path) == before


def stop_after_step(step: int) -> L.Callback:
    """SIGTERM to this process once ``step`` is done: the run saves last.ckpt at its step end and stops."""

    class Stop(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == step:
                os.kill(os.getpid(), signal.SIGTERM)

    return Stop()


@pytest.mark.slow  # four runs: about 35 s on 2 cores
def test_a_stopped_distillation_resumes_exactly_and_refuses_a_changed_or_missing_teacher(
    tiny_moe_checkpoint, corpus_overrides, tmp_path
):
    teacher = tmp_path / "teacher.ckpt"
    shutil.copy(tiny_moe_checkpoint, teacher)
    extra = ["model.dropout=0.1", "checkpoint.every_n_steps=1", "trainer.max_steps=6", "trainer.val_check_interval=3"]
    straight = tmp_path / "straight"
    assert train_main(student_args(teacher, straight, corpus_overrides, *extra)).returncode == 0
    stopped = tmp_path / "stopped"
    args = student_args(teacher, stopped, corpus_overrides, *extra)
    with pytest.raises(Interrupted):
        train(compose_run_config(args, run_dir=str(stopped)), RunRecord(overrides=args, callbacks=[stop_after_step(2)]))
    assert torch.load(stopped / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] in (2, 3)

    torch.save(torch.load(tiny_moe_checkpoint, weights_only=True) | {"note": 1}, teacher)  # same teacher, other file
    before = folder_state(stopped)
    result = train_main([f"hydra.run.dir={stopped}", "resume=last"])
    assert result.returncode == 2 and "is not the file this run was distilled from" in error_lines(result.stderr)[0]
    teacher.unlink()
    result = train_main([f"hydra.run.dir={stopped}", "resume=last"])
    assert result.returncode == 2 and f"checkpoint {teacher} does not exist" in error_lines(result.stderr)[0]
    assert folder_state(stopped) == before

    shutil.copy(tiny_moe_checkpoint, teacher)
    assert train_main([f"hydra.run.dir={stopped}", "resume=last"]).returncode == 0
    expected, got = weights(straight), weights(stopped)
    assert all(torch.equal(expected[key], got[key]) for key in expected)
    for column in ("train/loss", "train/kl_loss", "val/loss"):
        assert csv_column(stopped, column) == csv_column(straight, column), column


def test_distill_init_experts_trains_a_dense_student_and_says_how_it_weighted_the_experts(
    tiny_moe_checkpoint, corpus_overrides, tmp_path
):
    args = student_args(tiny_moe_checkpoint, tmp_path / "run", corpus_overrides, "model=dense", "distill.init=experts")
    result = train_main(args + ["trainer.max_steps=2", "trainer.val_check_interval=2"])
    assert result.returncode == 0, result.stderr[-2000:]
    assert "each dense MLP is the usage-weighted" in result.stderr


@pytest.mark.slow  # two processes of train.py, and one alone
def test_two_fsdp_processes_distil_like_one_process_with_twice_the_batch(tiny_moe_checkpoint, corpus_overrides, tmp_path):
    runs = {"alone": ["data.batch_size=4"], "fsdp": TWO_PROCESSES}
    for name, extra in runs.items():
        args = student_args(tiny_moe_checkpoint, tmp_path / name, corpus_overrides, "model=dense", *extra)
        result = run_train_cli(args, cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
    for column in ("train/loss", "train/kl_loss", "val/loss"):
        expected, actual = csv_column(tmp_path / "alone", column), csv_column(tmp_path / "fsdp", column)
        assert [step for step, _ in actual] == [step for step, _ in expected], column
        assert [value for _, value in actual] == pytest.approx([value for _, value in expected], rel=1e-4), column
    checkpoint = read_checkpoint(tmp_path / "fsdp" / "checkpoints" / "last.ckpt")
    assert TEACHER_RECORD in checkpoint and all(key.startswith("model.") for key in checkpoint["state_dict"])
