"""Check the GPU path in one command (``make gpu-check``): a table on the console and ``gpu_check.json``.

  (a) the expert operator: grouped_mm in bfloat16 against the float32 per-expert loop, on the MoE
      model's own shapes: the relative error of the output and of every gradient, each below 2e-2;
  (b) GPT-2 small dense and MoE 8x2 (experts matched on active parameters, as compare.py matches
      them), bf16-mixed, compiled, at the GPU preset's batch (experiment=dense_vs_moe_gpu on the
      stdlib corpus): tokens/s, MFU and step time over the steps after the warm-up, peak memory;
  (c) the MoE model under trainer.strategy=fsdp (FSDP2) in one process for a few steps, uncompiled,
      or "not available in this version" where that strategy is not FSDP2 or is refused;
  (d) for every model trained, the loss falls: the mean of its last few steps' losses below the first few's.
Goals, one H100 in bf16: dense at least 45% MFU, the MoE step at most 1.2x the dense step (printed
met / missed; they do not change the exit status). Every model trains through train.py's own path
(moe_gpt.training.run.train) in a temporary run folder, deleted afterwards.

Without a CUDA GPU (or with --tiny) the same parts run at a tiny size on the CPU in float32 without
compiling, in seconds. Exit status 0 when every check passed, 1 when one failed, 2 for bad input.

    python scripts/gpu_check.py                         # the full check on a GPU; the tiny one on a CPU
    python scripts/gpu_check.py --steps 20 data.batch_size=16 --out runs/gpu_check.json   # train.py overrides
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
import traceback
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional

from moe_gpt.cli.common import USER_ERRORS, ArgumentParser, UsageError, entry_point
from moe_gpt.compare.variants import parse_variant
from moe_gpt.compose import compose_run_config, merge_overrides
from moe_gpt.config import ConfigError, RunConfig
from moe_gpt.errors import EXIT_FAILED, Interrupted, one_line
from moe_gpt.reporting import MFU_FORMAT, cell, markdown_table
from moe_gpt.training.run_folder import write_json

if TYPE_CHECKING:  # torch and Lightning are imported where they are used: --help answers at once
    import lightning as L

GOAL_DENSE_MFU = 0.45  # at least, GPT-2 small dense, bf16, one H100
GOAL_MOE_STEP_RATIO = 1.2  # at most, MoE 8x2 step time over the dense step time
MOE_VARIANT = "moe:8:2"
NOT_AVAILABLE = "not available in this version"
# Every model trains this way: no logger, no sanity validation and no model summary (whose forward pass
# on one sequence would compile the model a second time), validation only after the last step.
QUIET = ["logger=none", "trainer.num_sanity_val_steps=0", "trainer.enable_model_summary=false"]


@dataclass(frozen=True)
class Scale:
    """The size the check runs at: the real one on a GPU, a tiny one on a CPU."""

    name: str
    overrides: list[str]  # train.py overrides that every model starts from
    steps: int  # training steps per model in (b)
    warmup_steps: int  # untimed steps first (compilation)
    fsdp_steps: int  # training steps in (c)
    operator_device: str


GPU = Scale(
    "gpu",
    # The GPU preset (GPT-2 small, trainer=gpu, compile, its batch of 32 x 1,024 tokens) on a corpus every
    # machine has, with a warm-up that fits a short run.
    ["experiment=dense_vs_moe_gpu", "data=stdlib", "optim.warmup_steps=10", "trainer.limit_val_batches=4"],
    steps=30,
    warmup_steps=5,
    fsdp_steps=10,
    operator_device="cuda",
)
TINY = Scale(
    "tiny",
    ["model.n_layer=2", "model.n_embd=32", "model.n_head=2", "model.block_size=32", "data.batch_size=4",
     "data.max_documents=30", "optim.warmup_steps=2", "trainer.limit_val_batches=1"],  # fmt: skip
    steps=6,
    warmup_steps=2,
    fsdp_steps=4,
    operator_device="cpu",
)


class NotFSDP2(ConfigError):
    """trainer.strategy=fsdp gave a strategy other than FSDP2 (Lightning's ModelParallelStrategy)."""


def require_fsdp2() -> L.Callback:
    """A callback that stops a run before its first step unless its strategy is FSDP2 (Lightning's
    ModelParallelStrategy, which trainer.strategy=fsdp builds: moe_gpt/training/sharding.py).

    Its class is made here, where Lightning is imported, rather than when this module is imported."""
    import lightning as L
    from lightning.pytorch.strategies import ModelParallelStrategy

    class RequireFSDP2(L.Callback):
        def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
            if not isinstance(trainer.strategy, ModelParallelStrategy):
                name = type(trainer.strategy).__name__
                raise NotFSDP2(f"trainer.strategy=fsdp is Lightning's {name} here, not FSDP2")

    return RequireFSDP2()


@dataclass(frozen=True)
class Plan:
    """What the check trains, every config composed (and so checked) before anything runs."""

    scale: Scale
    dense: RunConfig
    moe: RunConfig
    moe_name: str  # moe-8-2, as compare.py names it
    fsdp: RunConfig  # the MoE model under trainer.strategy=fsdp
    peak_flops: Optional[float]  # --peak-tflops, for a device Lightning's table does not know


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="gpu_check.json", help="where the JSON report goes (default: %(default)s)")
    parser.add_argument("--steps", type=int, help=f"steps per model in (b) (GPU: {GPU.steps}, tiny: {TINY.steps})")
    parser.add_argument("--fsdp-steps", type=int, help=f"steps in (c) (GPU: {GPU.fsdp_steps}, tiny: {TINY.fsdp_steps})")
    parser.add_argument("--tiny", action="store_true", help="the tiny CPU version even where a GPU is present")
    parser.add_argument("--peak-tflops", type=float, help="the device's peak TFLOP/s, where Lightning's table has none")
    return parser.parse_known_args(argv)


def make_plan(args: argparse.Namespace, overrides: list[str], run_root: Path) -> Plan:
    import torch

    scale = TINY if args.tiny or not torch.cuda.is_available() else GPU
    steps = scale.steps if args.steps is None else args.steps
    fsdp_steps = scale.fsdp_steps if args.fsdp_steps is None else args.fsdp_steps
    for option, value in (("--steps", steps), ("--fsdp-steps", fsdp_steps)):
        if value <= scale.warmup_steps:
            raise UsageError(f"{option}={value} must be more than the {scale.warmup_steps} warm-up steps")
    if args.peak_tflops is not None and args.peak_tflops <= 0:
        raise UsageError(f"--peak-tflops={args.peak_tflops} must be positive")
    base = merge_overrides(scale.overrides, overrides)  # the user's overrides win
    n_embd = compose_run_config(base).model.n_embd
    moe = parse_variant(MOE_VARIANT, n_embd, "active")
    fsdp = [*moe.overrides, "trainer.strategy=fsdp", "compile=false"]  # compiling again would not fit the 8 minutes
    return Plan(
        scale=scale,
        dense=compose_run_config(for_steps(merge_overrides(base, ["model=dense"]), steps), str(run_root / "dense")),
        moe=compose_run_config(for_steps(merge_overrides(base, moe.overrides), steps), str(run_root / moe.name)),
        moe_name=moe.name,
        fsdp=compose_run_config(for_steps(merge_overrides(base, fsdp), fsdp_steps), str(run_root / "fsdp")),
        peak_flops=args.peak_tflops * 1e12 if args.peak_tflops else None,
    )


def for_steps(overrides: list[str], steps: int) -> list[str]:
    """Train ``steps`` steps and validate once, after the last (which the run's summary reports)."""
    return merge_overrides(overrides, [*QUIET, f"trainer.max_steps={steps}", f"trainer.val_check_interval={steps + 1}"])


# ------------------------------------------------------------------------------------ the parts
def check_operator(plan: Plan) -> dict[str, Any]:
    """(a): on the MoE model's shapes and batch, grouped_mm in bfloat16 against the float32 loop."""
    import torch

    from moe_gpt.model.kernel_check import BF16_TOLERANCE, OperatorCase, operator_errors

    model, batch = plan.moe.model, plan.moe.data.batch_size * plan.moe.model.block_size
    case = OperatorCase(model.n_embd, model.ffn_hidden_size, model.moe.num_experts, model.moe.top_k, batch)
    errors = operator_errors(case, plan.scale.operator_device, "grouped_mm", torch.bfloat16)
    return {
        "impl": "grouped_mm", "dtype": "bfloat16", "reference": "loop, float32", "device": plan.scale.operator_device,
        "case": asdict(case), "tolerance": BF16_TOLERANCE, "relative_errors": errors,
        "passed": all(error < BF16_TOLERANCE for error in errors.values()),
    }  # fmt: skip


def train_and_time(cfg: RunConfig, warmup_steps: int, peak: Optional[float], *callbacks: L.Callback) -> dict[str, Any]:
    """(b), (c) and (d) for one model: train it through train.py's path, and read the timer and the losses."""
    from moe_gpt.training.run import RunRecord, train
    from moe_gpt.training.step_timer import StepTimer

    timer = StepTimer(warmup_steps)
    fresh_device_memory()
    try:
        metrics = train(cfg, RunRecord(callbacks=[timer, *callbacks]))
    finally:
        shutil.rmtree(cfg.run_dir, ignore_errors=True)  # GPT-2 small's checkpoints take GBs
    timing = timer.timing
    if timing is None:
        raise RuntimeError(f"the run ended at step {metrics['steps']} of {cfg.trainer.max_steps}, untimed")
    first, last = loss_means(timing.losses)
    return {
        "strategy": timing.strategy, "steps": timing.steps, "warmup_steps": timing.warmup_steps,
        "warmup_seconds": timing.warmup_seconds, "step_seconds": timing.step_seconds,
        "tokens_per_sec": timing.tokens_per_sec,
        "mfu": timing.mfu(peak),
        "peak_memory_mb": metrics["peak_memory_mb"], "params_total": metrics["params_total"],
        "params_active": metrics["params_active"], "val_loss": metrics["val_loss"], "losses": timing.losses,
        "loss_first": first, "loss_last": last, "loss_fell": last < first, "passed": last < first,
    }  # fmt: skip


def loss_means(losses: list[float]) -> tuple[float, float]:
    """The mean loss of the first and of the last few steps (a sixth of them, 1 to 5)."""
    few = max(1, min(5, len(losses) // 6))
    return statistics.fmean(losses[:few]), statistics.fmean(losses[-few:])


def fresh_device_memory() -> None:
    """On a GPU each model's peak memory and compiled graphs are its own (the CPU's peak is the process's)."""
    import torch

    if torch.cuda.is_available():
        gc.collect()
        torch.compiler.reset()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def train_fsdp(plan: Plan, warmup_steps: int) -> dict[str, Any]:
    """(c): the MoE model under trainer.strategy=fsdp, or why that is not FSDP2 here."""
    with process_as_before():
        try:
            return train_and_time(plan.fsdp, warmup_steps, plan.peak_flops, require_fsdp2())
        except ConfigError as refused:  # the trainer settings check, or require_fsdp2's callback
            return {"status": NOT_AVAILABLE, "reason": one_line(refused), "passed": True}


@contextmanager
def process_as_before() -> Iterator[None]:
    """A distributed strategy sets up a process group and its variables (LOCAL_RANK, MASTER_PORT, ...) even for
    one process; both are undone after it, or a later run in this process would take itself for a launched one."""
    import torch

    environment, initialized = dict(os.environ), is_distributed()
    try:
        yield
    finally:
        if is_distributed() and not initialized:
            torch.distributed.destroy_process_group()
        for key in set(os.environ) - set(environment):
            del os.environ[key]
        os.environ.update(environment)


def is_distributed() -> bool:
    import torch

    return torch.distributed.is_available() and torch.distributed.is_initialized()


def run_part(name: str, work: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """One part, timed; a part that fails is recorded (its traceback on stderr) and the others still run."""
    print(f"== {name}", flush=True)
    started = time.perf_counter()
    try:
        result = {"status": "ok", **work()}
    except USER_ERRORS:
        raise  # bad input (an override that cannot train): one line and exit code 2, as train.py
    except Exception as error:  # noqa: BLE001 - reported in the table and the exit status, not raised
        traceback.print_exc()
        result = {"status": "failed", "reason": one_line(error), "passed": False}
    result["seconds"] = time.perf_counter() - started
    print(f"== {name}: {result['status']} in {result['seconds']:.1f} s", flush=True)
    return result


def run_check(plan: Plan) -> dict[str, Any]:
    """Every part in turn: the operator, then each model, then FSDP2."""
    warmup, peak = plan.scale.warmup_steps, plan.peak_flops
    operator = run_part("(a) expert operator", lambda: check_operator(plan))
    models = {name: run_part(f"(b) {name}", lambda cfg=cfg: train_and_time(cfg, warmup, peak))
              for name, cfg in (("dense", plan.dense), (plan.moe_name, plan.moe))}  # fmt: skip
    fsdp = run_part("(c) fsdp", lambda: train_fsdp(plan, warmup))
    return {"operator": operator, "models": models, "fsdp": fsdp}


# ----------------------------------------------------------------------------- goals and report
def goals(report: dict[str, Any], plan: Plan) -> dict[str, Any]:
    """The MoE / dense step-time ratio, and each goal met, missed or not applicable."""
    dense, moe, scale = report["models"]["dense"], report["models"][plan.moe_name], plan.scale
    ratio = moe["step_seconds"] / dense["step_seconds"] if "step_seconds" in moe and "step_seconds" in dense else None
    mfu = dense.get("mfu")
    no_mfu = "no known peak for this device: pass --peak-tflops" if "step_seconds" in dense else "dense did not train"
    return {
        "moe_over_dense_step": ratio,
        "dense_mfu": verdict(mfu is not None and mfu >= GOAL_DENSE_MFU, scale, no_mfu if mfu is None else None),
        "moe_step_ratio": verdict(ratio is not None and ratio <= GOAL_MOE_STEP_RATIO, scale,
                                  "a model did not train" if ratio is None else None),  # fmt: skip
    }


def verdict(met: bool, scale: Scale, unmeasured: Optional[str]) -> str:
    if scale is TINY:
        return "n/a (the goals are for GPT-2 small on a GPU)"
    if unmeasured:
        return f"n/a ({unmeasured})"
    return "met" if met else "missed"


def table_rows(report: dict[str, Any], moe_name: str) -> list[list[str]]:
    operator = report["operator"]
    rows = [["(a) operator", name, f"{error:.1e}", f"< {operator['tolerance']:.0e}", ok(error < operator["tolerance"])]
            for name, error in operator.get("relative_errors", {}).items()]  # fmt: skip
    rows += status_rows("(a) operator", operator)
    for name, model in report["models"].items():
        rows += model_rows(f"(b) {name}", model, report["goals"]["dense_mfu"] if name == "dense" else None)
    ratio = report["goals"]["moe_over_dense_step"]
    ratio_text = "" if ratio is None else f"{ratio:.2f}x"
    goal = f"<= {GOAL_MOE_STEP_RATIO}x"
    rows.append([f"(b) {moe_name} / dense", "step time", ratio_text, goal, report["goals"]["moe_step_ratio"]])
    rows += model_rows(f"(c) fsdp {moe_name}", report["fsdp"], None)
    for name, model in [*report["models"].items(), (f"fsdp {moe_name}", report["fsdp"])]:
        if "loss_first" in model:
            losses = f"{model['loss_first']:.3f} -> {model['loss_last']:.3f}"
            rows.append([f"(d) {name}", "loss, first -> last steps", losses, "falls", ok(model["loss_fell"])])
    return rows


def model_rows(part: str, model: dict[str, Any], mfu_goal: Optional[str]) -> list[list[str]]:
    if "step_seconds" not in model:
        return status_rows(part, model)
    mfu = "n/a" if model["mfu"] is None else MFU_FORMAT.format(model["mfu"])
    memory = f"{model['peak_memory_mb']:,.0f} MiB"
    return [
        [part, "step time (after warm-up)", f"{1000 * model['step_seconds']:.1f} ms", "", ""],
        [part, "tokens/s", f"{model['tokens_per_sec']:,.0f}", "", ""],
        [part, "MFU", mfu, f">= {GOAL_DENSE_MFU:.0%}" if mfu_goal else "", mfu_goal or ""],
        [part, "peak memory", memory, "", ""],
        [part, f"warm-up ({model['warmup_steps']} steps)", f"{model['warmup_seconds']:.1f} s", "", ""],
        *status_rows(part, model),
    ]


def status_rows(part: str, result: dict[str, Any]) -> list[list[str]]:
    status = result["status"] + (f": {result['reason']}" if "reason" in result else "")
    return [[part, "status, time", cell(f"{status}; {result['seconds']:.1f} s"), "", ""]]


def ok(passed: bool) -> str:
    return "ok" if passed else "FAILED"


def device_name(scale: Scale) -> str:
    import torch

    return torch.cuda.get_device_name() if scale is GPU else "cpu"


@entry_point(runs_model=True)
def main(argv: list[str]) -> int:
    args, overrides = parse_args(argv)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as run_root:
        plan = make_plan(args, overrides, Path(run_root))  # bad input: one line, before anything trains
        import torch

        from moe_gpt.training.console import tidy_lightning_logging
        from moe_gpt.training.preemption import stop_signals_raise

        tidy_lightning_logging()
        print(f"gpu check, {plan.scale.name} version, on {device_name(plan.scale)} (torch {torch.__version__})")
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)  # now, not after minutes of training
        try:
            with stop_signals_raise():
                report = run_check(plan)
        except Interrupted as stop:
            print(f"gpu check: stopped by {signal.Signals(stop.signum).name}; {out} not written", file=sys.stderr)
            return stop.exit_code
    report = {
        "scale": plan.scale.name, "device": device_name(plan.scale), "torch": torch.__version__,
        **report, "goals": goals(report, plan), "seconds": time.perf_counter() - started,
    }  # fmt: skip
    report["passed"] = all(part["passed"] for part in [report["operator"], *report["models"].values(), report["fsdp"]])
    print(markdown_table(["part", "measure", "value", "goal or check", "result"], table_rows(report, plan.moe_name)))
    write_json(out, report)
    print(f"{'passed' if report['passed'] else 'FAILED'} in {report['seconds']:.0f} s; wrote {out}")
    return 0 if report["passed"] else EXIT_FAILED


if __name__ == "__main__":
    raise SystemExit(main())
