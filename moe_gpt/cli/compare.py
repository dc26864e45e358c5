"""Dense vs MoE on equal terms: the same data and seeds, matched parameters, equal tokens or equal time.

Trains every variant with every seed under every budget with train.py (one process per run, so
peak memory is per run) and writes <out>/report.md and report.csv: per budget a table (parameters,
FLOPs per token, steps, training time, val loss and perplexity, tokens/s, MFU, peak memory), each
variant against the first with a 95% confidence interval paired by seed and a verdict that names
a winner only when the interval excludes zero, and val loss against tokens and against training
time (a band over seeds); plus an expert-usage heatmap per MoE variant. All runs share a W&B group.

    python scripts/compare.py                                   # dense, moe:4:1, moe:8:2: 4.5 min on 2 CPU cores
    python scripts/compare.py experiment=dense_vs_moe_cpu       # the preset: a verdict with error bars, ~33 min
    python scripts/compare.py --variants dense,moe:8:2 --seeds 3 --budget tokens --budget time=5
    python scripts/compare.py --match total --variants dense,moe:8:2   # equal total instead of active parameters
    python scripts/compare.py --eval-data shakespeare            # also every best checkpoint on a held-out corpus
    python scripts/compare.py --out outputs/compare/mine         # run again: finished runs are kept

A variant is ``dense`` or ``moe:E:K[:activation][:key=value...]`` where key is any model.moe key,
e.g. ``moe:16:4:num_shared_experts=1:router=sigmoid``. Matching (moe_gpt/compare/variants.py): ``active``
(each expert 4*n_embd/(K + shared) wide), ``total`` (4*n_embd/(E + shared)) or ``none``. Budgets
(moe_gpt/compare/plan.py): ``tokens`` (trainer.max_steps for all) and ``time=<minutes>``. Every other
argument is a train.py override applied to every variant. Flags override the ``compare`` keys of
the config (an ``experiment`` preset sets them); without ``experiment=``, ``experiment=compare_small``.
Exit status: 0 with a report (a failed run is a row of it), 2 for bad input (one line).
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch
from hydra.errors import HydraException

from moe_gpt.model.analysis import flops_per_token, routing_report
from moe_gpt.weights.safe_load import load_model
from moe_gpt.compare.plan import (
    STATE_FILE,
    Budget,
    PlannedRun,
    calibration_run,
    load_state,
    parse_budgets,
    plan_run,
    save_state,
    seconds_per_step,
    steps_for_minutes,
    what_to_do,
)
from moe_gpt.compare.report import ReportContext, write_report
from moe_gpt.compose import compose_run_config, merge_overrides, override_key
from moe_gpt.config import PROJECT_ROOT, CompareConfig, ConfigError, RunConfig
from moe_gpt.training.console import tidy_lightning_logging
from moe_gpt.training.cpu_memory import reuse_freed_cpu_memory
from moe_gpt.data import DataError, TokenDataModule
from moe_gpt.training.expert_usage import usage_heatmap_png
from moe_gpt.compare.held_out import eval_data_config, held_out_loss
from moe_gpt.errors import EXIT_BAD_INPUT, Interrupted, one_line
from moe_gpt.cli.common import ArgumentParser
from moe_gpt.training.preemption import stop_signals_raise
from moe_gpt.training.run_folder import folder_lock, read_record, run_outcome, write_json
from moe_gpt.compare.variants import MATCH_RULES, MATCHING, Variant, parse_variants

DEFAULT_EXPERIMENT = "experiment=compare_small"
HEATMAP_WINDOWS = 16  # validation windows routed for each usage heatmap
HELD_OUT_FILE = "held_out.json"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="train.py overrides applied to every variant")
    parser.add_argument("--variants", help="comma-separated variants (default: compare.variants)")
    parser.add_argument("--seeds", type=int, help="seeds per variant: seed, seed+1, ...; 3+ for a verdict")
    parser.add_argument("--budget", action="append", help="tokens or time=<minutes>; repeat for both")
    parser.add_argument("--match", choices=MATCHING, help="parameter matching (default: compare.match)")
    parser.add_argument("--eval-data", help="a data option (e.g. shakespeare) or a local file/folder to evaluate on")
    parser.add_argument("--out", help="report folder (default: outputs/compare/compare-<date_time>); reused runs")
    return parser.parse_args(argv)


def settings(args: argparse.Namespace, configured: CompareConfig) -> CompareConfig:
    """The config's ``compare`` keys, with the flags given on the command line instead."""
    return CompareConfig(
        variants=args.variants.split(",") if args.variants is not None else configured.variants,
        seeds=args.seeds if args.seeds is not None else configured.seeds,
        budgets=args.budget or configured.budgets,
        match=args.match or configured.match,
        eval_data=args.eval_data if args.eval_data is not None else configured.eval_data,
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    reuse_freed_cpu_memory()
    tidy_lightning_logging()
    try:
        with stop_signals_raise():
            compare(args)
    except (ConfigError, DataError, HydraException) as error:
        print(f"error: {one_line(error)}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    except Interrupted as stop:
        # Interrupted's own message speaks of one run's step; this process ran many.
        name = signal.Signals(stop.signum).name
        print(
            f"compare.py: stopped by {name}; run the same command again to go on (finished runs are kept)",
            file=sys.stderr,
        )
        sys.exit(stop.exit_code)


def compare(args: argparse.Namespace) -> None:
    given = args.overrides
    base = given if any(override_key(o) == "experiment" for o in given) else [DEFAULT_EXPERIMENT, *given]
    run_config = compose_run_config(base)
    chosen = settings(args, run_config.compare)
    variants = parse_variants(chosen.variants, run_config.model.n_embd, chosen.match)  # all checked first
    budgets = parse_budgets(chosen.budgets)
    seeds = [run_config.seed + i for i in range(chosen.seeds)]
    configs = {variant.name: compose_run_config(base + variant.overrides) for variant in variants}
    eval_data = eval_data_config(chosen.eval_data, run_config.data) if chosen.eval_data else None
    out_dir = (
        Path(args.out).resolve()
        if args.out
        else PROJECT_ROOT / "outputs" / "compare" / time.strftime("compare-%Y-%m-%d_%H-%M-%S")
    )
    base = merge_overrides([f"logger.group={out_dir.name}"], base)  # one W&B group, stable when re-run; yours wins
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / STATE_FILE).is_file():
        raise ConfigError(f"--out {out_dir} is not empty and holds no comparison ({STATE_FILE}); choose a new folder")
    with folder_lock(
        out_dir, f"another compare.py is writing {out_dir} right now; wait for it or choose another --out"
    ):
        save_state(out_dir, load_state(out_dir))  # marks the folder as a comparison's
        rows = []
        for budget in budgets:
            runs, untimed = plan_budget(budget, variants, seeds, base, out_dir, rows)
            rows += [train_and_report(run, configs[run.variant.name], out_dir, eval_data, chosen) for run in runs]
            rows += [
                {"budget": budget.name, "variant": name, "seed": seed, "status": "failed", "reason": reason}
                for name, reason in untimed.items()
                for seed in seeds
            ]
        context = ReportContext(
            " ".join(["python scripts/compare.py", *sys.argv[1:]]), MATCH_RULES[chosen.match], seeds, chosen.eval_data
        )
        print(write_report(rows, budgets, out_dir, context))


def plan_budget(
    budget: Budget, variants: list[Variant], seeds: list[int], base: list[str], out_dir: Path, done: list[dict]
) -> tuple[list[PlannedRun], dict[str, str]]:
    """The runs of one budget, every one checked against what ``out_dir`` already holds, and the
    variants a time budget could not time (with why)."""
    steps: dict[str, Optional[int]] = {variant.name: None for variant in variants}
    untimed: dict[str, str] = {}
    if budget.kind == "time":
        steps, untimed = time_budget_steps(budget, variants, seeds[0], base, out_dir, done)
    runs = [
        plan_run(out_dir, budget, v, seed, base, steps[v.name]) for v in variants if v.name in steps for seed in seeds
    ]
    for run in runs:
        what_to_do(run)  # a folder with other settings stops the comparison before anything trains
    return runs, untimed


def time_budget_steps(
    budget: Budget, variants: list[Variant], seed: int, base: list[str], out_dir: Path, done: list[dict]
) -> tuple[dict[str, int], dict[str, str]]:
    """Steps that take each variant ``budget.minutes`` of training, from its measured speed, chosen
    once per comparison folder (compare.json) so a re-run trains exactly the same runs; and the
    variants that could not be timed (their runs failed), with the reason."""
    state = load_state(out_dir)
    chosen = state["time_steps"].setdefault(budget.name, {})
    untimed = {}
    for variant in variants:
        if variant.name in chosen:
            continue
        finished = [row for row in done if row["variant"] == variant.name and row["status"] == "ok"]
        if not finished:
            calibration = calibration_run(out_dir, variant, seed, base)
            timed = train(calibration)
            if timed["status"] != "ok":
                untimed[variant.name] = f"could not time it: {timed['reason']}"
                continue
            finished = [timed]
        chosen[variant.name] = steps_for_minutes(budget.minutes, seconds_per_step(finished))
        print(f"[compare] {budget.name}: {variant.spec} gets {chosen[variant.name]} steps", flush=True)
    save_state(out_dir, state)
    return chosen, untimed


def train(run: PlannedRun) -> dict[str, Any]:
    """Run train.py for ``run`` (or keep what it left, or resume it); its outcome."""
    action = what_to_do(run)
    if action == "keep":
        print(f"[compare] keeping {run.run_dir} (finished earlier; delete the folder to retrain it)", flush=True)
        return run_outcome(run.run_dir)
    extra = ["resume=last"] if action == "resume" else []
    command = [sys.executable, str(PROJECT_ROOT / "train.py"), *run.overrides, *extra, f"hydra.run.dir={run.run_dir}"]
    print(f"[compare] {action} {run.run_dir}: {' '.join(command[2:])}", flush=True)
    # From the folder compare.py was started in, so data.paths mean what they mean to train.py.
    process = subprocess.Popen(command, env=os.environ, stderr=subprocess.PIPE, text=True)
    try:
        _, stderr = process.communicate()
    except Interrupted as stop:
        process.send_signal(stop.signum)  # the run saves last.ckpt and stops; a re-run resumes it
        process.wait()
        raise
    outcome = run_outcome(run.run_dir)
    if process.returncode != 0 and outcome["status"] == "incomplete":
        # Bad input writes no record (the run never claimed its folder): its last line says why.
        last = next((line for line in reversed(stderr.splitlines()) if line.strip()), "no output")
        last = re.sub(r"^\[[^]]*\]\[[^]]*\]\[\w+\] - ", "", last)  # the message, without the log line's prefix
        return {"status": "failed", "reason": last}
    return outcome


def train_and_report(
    run: PlannedRun, run_config: RunConfig, out_dir: Path, eval_data, chosen: CompareConfig
) -> dict[str, Any]:
    """Train one run; its row of the report (with its held-out loss, and a heatmap for the first MoE run)."""
    row = {"budget": run.budget.name, "variant": run.variant.name, "seed": run.seed, **train(run)}
    row["train_gflops_per_token"] = flops_per_token(run_config.model)["train_flops_per_token"] / 1e9
    if row["status"] != "ok":
        return row
    best = run.run_dir / "checkpoints" / "best.ckpt"
    if eval_data is not None:
        row["held_out_loss"] = held_out(run.run_dir, best, eval_data, chosen.eval_data, run_config)
    heatmap = out_dir / f"usage_{run.variant.name}.png"
    if run_config.model.use_moe and not heatmap.exists():
        usage_heatmap(best, run_config, heatmap)
    return row


def held_out(run_dir: Path, best: Path, eval_data, spec: str, run_config: RunConfig) -> float:
    """The best checkpoint's loss on the held-out corpus, kept in the run folder for re-runs."""
    path = run_dir / HELD_OUT_FILE
    cached = read_record(path) if path.is_file() else {}
    if cached.get("eval_data") == spec:
        return cached["loss"]
    result = held_out_loss(best, eval_data, run_config.trainer.limit_val_batches, run_config.trainer)
    write_json(path, {"eval_data": spec, "checkpoint": str(best), **result})
    return result["loss"]


def usage_heatmap(checkpoint: Path, run: RunConfig, out_path: Path) -> None:
    """Route a few validation windows through the best checkpoint and draw layer x expert shares."""
    model = load_model(checkpoint)
    datamodule = TokenDataModule(run.data, block_size=run.model.block_size, seed=run.seed)
    datamodule.setup("validate")
    count = min(HEATMAP_WINDOWS, len(datamodule.val_dataset))
    idx = torch.stack([datamodule.val_dataset[i][0] for i in range(count)])
    report = routing_report(model, idx)
    out_path.write_bytes(usage_heatmap_png([layer["expert_share"] for layer in report["moe_layers"]]))


if __name__ == "__main__":
    main()
