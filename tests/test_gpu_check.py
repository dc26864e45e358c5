"""``make gpu-check`` on a CPU: its tiny version runs every part, prints the table and writes the report."""

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace

import lightning as L
import pytest
import torch

from moe_gpt.cli.gpu_check import NOT_AVAILABLE, make_plan, parse_args, train_fsdp
from moe_gpt.config import TrainerConfig
from moe_gpt.model.kernel_check import BF16_TOLERANCE
from moe_gpt.training.run import RunRecord, train
from moe_gpt.training.step_timer import StepTimer
from tests.helpers import REPO, script_main

GRADIENTS = [f"{name} grad" for name in ("input", "routing weight", "c_fc_weight", "c_proj_weight", "c_fc_bias", "c_proj_bias")]


def table(stdout: str) -> dict[tuple[str, str], list[str]]:
    """(part, measure) -> the row's other cells, for every row of the printed table."""
    rows = [line.strip("|").split("|") for line in stdout.splitlines() if line.startswith("| (")]
    return {(row[0].strip(), row[1].strip()): [cell.strip() for cell in row[2:]] for row in rows}


@pytest.fixture(scope="module")
def cpu_check(tmp_path_factory):
    """One run of the CPU version (its own token cache): the result, the table and the report."""
    folder = tmp_path_factory.mktemp("gpu_check")
    out = folder / "report" / "gpu_check.json"
    out.parent.mkdir()
    result = script_main("gpu_check", ["--out", str(out), f"data.cache_dir={folder / 'tokens'}"])
    assert result.returncode == 0, result.stderr[-3000:]
    return result, table(result.stdout), json.loads(out.read_text())


def test_the_cpu_version_prints_a_row_per_measure_of_every_part(cpu_check):
    _, rows, _ = cpu_check
    for name in ["output", *GRADIENTS]:
        assert rows[("(a) operator", name)][2] == "ok", name
    for model in ["dense", "moe-8-2"]:
        for measure in ["step time (after warm-up)", "tokens/s", "MFU", "peak memory", "warm-up (2 steps)"]:
            assert ("(b) " + model, measure) in rows
        assert rows[("(d) " + model, "loss, first -> last steps")][2] == "ok"
    assert rows[("(b) moe-8-2 / dense", "step time")][0].endswith("x")
    assert rows[("(b) dense", "MFU")][2].startswith("n/a")  # the goals are for a GPU
    assert rows[("(c) fsdp moe-8-2", "status, time")][0].startswith("ok")  # FSDP2 trains on the CPU too


def test_the_cpu_version_reports_small_operator_errors_and_falling_losses(cpu_check):
    _, _, report = cpu_check
    assert report["scale"] == "tiny" and report["passed"] is True
    operator = report["operator"]
    assert set(operator["relative_errors"]) == {"output", *GRADIENTS}
    # Above zero: bfloat16 against float32 rounds; zero would mean the reference was compared with itself.
    assert all(0 < error < BF16_TOLERANCE for error in operator["relative_errors"].values())
    for model in report["models"].values():
        assert model["status"] == "ok" and model["steps"] == 6 and len(model["losses"]) == 6
        assert model["step_seconds"] > 0 and model["tokens_per_sec"] > 0 and model["peak_memory_mb"] > 0
        assert model["loss_last"] < model["loss_first"] and model["loss_fell"]
    moe, dense = report["models"]["moe-8-2"], report["models"]["dense"]
    assert moe["params_total"] > moe["params_active"] and dense["params_total"] == dense["params_active"]
    assert report["goals"]["moe_over_dense_step"] == pytest.approx(moe["step_seconds"] / dense["step_seconds"])
    fsdp = report["fsdp"]
    assert fsdp["status"] == "ok" and fsdp["strategy"] == "FSDP2Strategy" and fsdp["loss_fell"]


def test_a_strategy_that_is_not_fsdp2_is_reported_as_not_available_and_leaves_the_process_as_it_was(tmp_path):
    # A strategy that is not FSDP2 (as trainer.strategy=fsdp was before this version: Lightning's FSDP1), played by DDP.
    args, overrides = parse_args([f"data.cache_dir={tmp_path / 'tokens'}"])
    plan = make_plan(args, overrides, tmp_path / "runs")
    plan = replace(plan, fsdp=replace(plan.fsdp, trainer=replace(plan.fsdp.trainer, strategy="ddp")))
    environment = dict(os.environ)
    result = train_fsdp(plan, warmup_steps=2)
    assert result["status"] == NOT_AVAILABLE and "DDPStrategy here, not FSDP2" in result["reason"]
    # No process group and none of its variables (LOCAL_RANK would make later runs of this process skip launching).
    assert not torch.distributed.is_initialized() and dict(os.environ) == environment


def test_too_few_steps_for_the_warm_up_is_one_line_and_writes_nothing(tmp_path):
    result = script_main("gpu_check", ["--steps", "2", "--out", str(tmp_path / "gpu_check.json")])
    assert result.returncode == 2
    assert result.stderr.strip() == "error: --steps=2 must be more than the 2 warm-up steps"
    assert not (tmp_path / "gpu_check.json").exists()


class SlowFirstStep(L.Callback):
    """A second more in the first step, as compiling adds to a compiled run's first step."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == 0:
            time.sleep(1.0)


def test_the_step_timer_leaves_the_warm_up_steps_out(tiny_run_config, tmp_path):
    timer = StepTimer(warmup_steps=1)
    trainer = TrainerConfig(accelerator="cpu", max_steps=4, val_check_interval=4, limit_val_batches=1,
                            num_sanity_val_steps=0, enable_model_summary=False)  # fmt: skip
    train(tiny_run_config(tmp_path, trainer=trainer), RunRecord(callbacks=[timer, SlowFirstStep()]))
    timing = timer.timing
    assert (timing.steps, timing.warmup_steps, len(timing.losses)) == (4, 1, 4)
    assert timing.warmup_seconds > 1.0 > timing.step_seconds > 0
    assert timing.tokens_per_sec == pytest.approx(4 * 32 / timing.step_seconds)  # batch 4 x 32 tokens per step
    assert timing.strategy == "SingleDeviceStrategy" and timing.peak_flops is None  # no known peak for a CPU
    assert timing.mfu() is None  # unless a peak is given (--peak-tflops)
    assert timing.mfu(1e12) == pytest.approx(timing.train_flops_per_token * timing.tokens_per_sec / 1e12)


@pytest.mark.slow  # its subject is a signal to a real process
def test_ctrl_c_stops_the_check_with_exit_code_130_and_writes_no_report(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1", "WANDB_MODE": "offline"}
    command = [sys.executable, str(REPO / "scripts" / "gpu_check.py"), "--out", str(out), f"data.cache_dir={tmp_path}"]
    process = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in process.stdout:  # until the first model starts training
        if line.startswith("== (b) dense"):
            break
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr[-2000:]
    assert "gpu check: stopped by SIGINT" in stderr and not out.exists()
