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
    python scripts/compare.py --eval-tasks arc_easy --eval-limit 200   # and its lm-eval scores (docs/evaluation.md)
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
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from moe_gpt.cli.common import ArgumentParser, entry_point
from moe_gpt.compare.downstream import EvalSettings, cached_scores, eval_settings, report_fields
from moe_gpt.compare.plan import STATE_FILE, Budget, PlannedRun, load_state, parse_budgets, save_state
from moe_gpt.compare.runner import plan_budget, runs_told_their_comparison, train
from moe_gpt.compare.variants import MATCH_RULES, MATCHING, Variant, parse_variants
from moe_gpt.compose import compose_run_config, merge_overrides, override_key
from moe_gpt.config import PROJECT_ROOT, CompareConfig, ConfigError, DataConfig, RunConfig, project_path
from moe_gpt.errors import Interrupted
from moe_gpt.training.run_folder import checkpoint_path, folder_lock

# Lightning, torch and datasets (the report's plots, held-out losses, FLOPs) are imported once the command
# line is parsed: --help and a malformed command line answer at once.

DEFAULT_EXPERIMENT = "experiment=compare_small"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="train.py overrides applied to every variant")
    parser.add_argument("--variants", help="comma-separated variants (default: compare.variants)")
    parser.add_argument("--seeds", type=int, help="seeds per variant: seed, seed+1, ...; 3+ for a verdict")
    parser.add_argument("--budget", action="append", help="tokens or time=<minutes>; repeat for both")
    parser.add_argument("--match", choices=MATCHING, help="parameter matching (default: compare.match)")
    parser.add_argument("--eval-data", help="a data option (e.g. shakespeare) or a local file/folder to evaluate on")
    parser.add_argument("--eval-tasks", help="lm-eval tasks every best checkpoint is scored on (docs/evaluation.md)")
    parser.add_argument("--eval-limit", type=int, help="with --eval-tasks: the first N documents of each task")
    parser.add_argument("--eval-include-path", help="with --eval-tasks: a folder of task YAML files")
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


@dataclass(frozen=True)
class Comparison:
    """What a compare.py command asks for, every part of it checked."""

    base: list[str]  # train.py overrides of every run
    chosen: CompareConfig
    variants: list[Variant]
    budgets: list[Budget]
    seeds: list[int]
    configs: dict[str, RunConfig]  # each variant's run config (before its seed and budget)
    eval_data: Optional[DataConfig]
    downstream: Optional[EvalSettings]
    out_dir: Path


@entry_point(runs_model=True)
def main(argv: list[str]) -> int:
    args = parse_args(argv)
    comparison = plan_comparison(args)  # every check of the input, before Lightning is imported
    from moe_gpt.training.console import tidy_lightning_logging
    from moe_gpt.training.preemption import stop_signals_raise

    tidy_lightning_logging()
    try:
        with stop_signals_raise():
            compare(comparison, " ".join(["python scripts/compare.py", *argv]))
    except Interrupted as stop:
        # Interrupted's own message speaks of one run's step; this process ran many.
        name = signal.Signals(stop.signum).name
        print(
            f"compare.py: stopped by {name}; run the same command again to go on (finished runs are kept)",
            file=sys.stderr,
        )
        return stop.exit_code
    return 0


def plan_comparison(args: argparse.Namespace) -> Comparison:
    """The comparison ``args`` asks for: every config composed, every variant, budget and evaluation setting
    checked, and the output folder able to take it, before anything trains."""
    given = args.overrides
    base = given if any(override_key(o) == "experiment" for o in given) else [DEFAULT_EXPERIMENT, *given]
    run_config = compose_run_config(base)
    chosen = settings(args, run_config.compare)
    variants = parse_variants(chosen.variants, run_config.model.n_embd, chosen.match)  # all checked first
    budgets = parse_budgets(chosen.budgets)
    configs = {variant.name: compose_run_config(base + variant.shared_overrides) for variant in variants}
    check_taught_variants(variants, configs)
    eval_data = held_out_data(chosen.eval_data, run_config.data) if chosen.eval_data else None
    downstream = downstream_settings(args, run_config)
    out_dir = (
        Path(args.out).resolve()
        if args.out
        else PROJECT_ROOT / "outputs" / "compare" / time.strftime("compare-%Y-%m-%d_%H-%M-%S")
    )
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / STATE_FILE).is_file():
        raise ConfigError(f"--out {out_dir} is not empty and holds no comparison ({STATE_FILE}); choose a new folder")
    base = merge_overrides([f"logger.group={out_dir.name}"], base)  # one W&B group, stable when re-run; yours wins
    seeds = [run_config.seed + i for i in range(chosen.seeds)]
    return Comparison(base, chosen, variants, budgets, seeds, configs, eval_data, downstream, out_dir)


def held_out_data(name: str, data: DataConfig) -> DataConfig:
    from moe_gpt.compare.held_out import eval_data_config  # imports Lightning: only where one is asked for

    return eval_data_config(name, data)


def compare(comparison: Comparison, command: str) -> None:
    """Train and report ``comparison``; ``command`` is how the report says it was run."""
    from moe_gpt.compare.report import ReportContext, write_report

    out_dir = comparison.out_dir
    with folder_lock(
        out_dir, f"another compare.py is writing {out_dir} right now; wait for it or choose another --out"
    ), runs_told_their_comparison(command):
        save_state(out_dir, load_state(out_dir))  # marks the folder as a comparison's
        rows = []
        for budget in comparison.budgets:
            runs, untimed = plan_budget(budget, comparison.variants, comparison.seeds, comparison.base, out_dir, rows)
            rows += [train_and_report(run, comparison) for run in runs]
            rows += [
                {"budget": budget.name, "variant": name, "seed": seed, "status": "failed", "reason": reason}
                for name, reason in untimed.items()
                for seed in comparison.seeds
            ]
        teachers = {variant.name: variant.teacher_variant for variant in comparison.variants if variant.teacher_variant}
        chosen = comparison.chosen
        context = ReportContext(command, MATCH_RULES[chosen.match], comparison.seeds, chosen.eval_data, teachers)
        print(write_report(rows, comparison.budgets, out_dir, context))


def check_taught_variants(variants: list[Variant], configs: dict[str, RunConfig]) -> None:
    """A student gathered from an earlier variant's experts fits that variant's shape, checked before
    anything trains (its teacher's runs would otherwise train first and the student fail after them)."""
    from moe_gpt.weights.gather import check_gatherable

    for variant in variants:
        if variant.teacher_variant is not None and configs[variant.name].distill.init == "experts":
            teacher = configs[variant.teacher_variant].model
            check_gatherable(teacher, configs[variant.name].model, f"variant {variant.spec!r}'s teacher")


def downstream_settings(args: argparse.Namespace, run_config: RunConfig) -> Optional[EvalSettings]:
    """``--eval-tasks``' settings (checked before anything trains), or None without it."""
    if args.eval_tasks is None:
        return None
    tokenizer_dir = project_path(run_config.data.tokenizer_dir)
    return eval_settings(
        args.eval_tasks, args.eval_limit, args.eval_include_path, "--eval-", tokenizer_dir=tokenizer_dir
    )


def train_and_report(run: PlannedRun, comparison: Comparison) -> dict[str, Any]:
    """Train one run; its row of the report (with its held-out loss and lm-eval scores, and a heatmap for the
    first MoE run)."""
    from moe_gpt.compare.held_out import cached_held_out_loss
    from moe_gpt.compare.report import usage_heatmap
    from moe_gpt.model.analysis import flops_per_token

    run_config = comparison.configs[run.variant.name]
    row = {"budget": run.budget.name, "variant": run.variant.name, "seed": run.seed, **train(run)}
    row["train_gflops_per_token"] = flops_per_token(run_config.model)["train_flops_per_token"] / 1e9
    if row["status"] != "ok":
        return row
    best = checkpoint_path(run.run_dir, "best.ckpt")
    if comparison.eval_data is not None:
        eval_data, eval_name = comparison.eval_data, comparison.chosen.eval_data
        row["held_out_loss"] = cached_held_out_loss(run.run_dir, best, eval_data, eval_name, run_config.trainer)
    if comparison.downstream is not None:
        row.update(report_fields(cached_scores(run.run_dir, best, comparison.downstream)))
    heatmap = comparison.out_dir / f"usage_{run.variant.name}.png"
    if run_config.model.use_moe and not heatmap.exists():
        usage_heatmap(best, run_config, heatmap)
    return row


if __name__ == "__main__":
    raise SystemExit(main())
