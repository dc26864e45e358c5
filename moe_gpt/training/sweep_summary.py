"""A Hydra sweep of train.py as one table (Markdown and CSV) and two plots (``scripts/summarize_sweep.py``).

A job is any directory under the sweep directory with ``.hydra/overrides.yaml``. Its outcome is
``metrics.json`` (it finished) or ``failure.json`` (it raised; train.py writes it), the newer one
when an earlier attempt left the other; with neither, the job is still running or was killed.
Besides the model columns, the table has a column for every override that differs between jobs.
"""

from __future__ import annotations

from collections import defaultdict
from functools import partial
from pathlib import Path
from typing import Any, Optional

import yaml

from moe_gpt.config import ConfigError
from moe_gpt.reporting import MFU_FORMAT, cell, markdown_table, plot, write_csv, write_reported
from moe_gpt.training.run_folder import run_outcome

METRIC_COLUMNS = ["val_loss", "val_ppl", "params_total", "params_active", "tokens_per_sec", "mfu", "wall_time_s"]
MODEL_COLUMNS = ["model", "experts", "top_k", "activation"]
# Swept keys that the model columns already show.
SHOWN_BY_MODEL_COLUMNS = {"model", "model.moe.num_experts", "model.moe.top_k", "model.moe.activation"}
CELL_FORMATS = {
    "val_loss": "{:.4f}",
    "val_ppl": "{:.1f}",
    "tokens_per_sec": "{:.0f}",  # training only: validation and sanity checks excluded
    "mfu": MFU_FORMAT,  # empty where the device's peak is unknown (CPUs)
    "wall_time_s": "{:.1f}",
}
PLOTS = [
    ("val_ppl", "validation perplexity", "val_ppl_vs_experts.png"),
    ("tokens_per_sec", "training tokens/s", "tokens_per_sec_vs_experts.png"),
]


class SummaryError(ConfigError):
    """The sweep directory cannot be summarised; the one-line message says why."""


def find_job_dirs(sweep_dir: Path) -> list[Path]:
    # rglob, not iterdir: a swept value containing "/" nests the job directory deeper.
    jobs = sorted(path.parent.parent for path in sweep_dir.rglob(".hydra/overrides.yaml"))
    if not jobs:
        raise SummaryError(f"no job directories (with .hydra/overrides.yaml) under {sweep_dir}; pass a sweep directory")
    return jobs


def overrides_by_key(job_dir: Path) -> dict[str, str]:
    overrides = yaml.safe_load((job_dir / ".hydra" / "overrides.yaml").read_text()) or []
    return dict(override.split("=", 1) for override in overrides)


def model_cells(job_dir: Path) -> dict[str, Any]:
    model = yaml.safe_load((job_dir / ".hydra" / "config.yaml").read_text())["model"]
    if not model["use_moe"]:
        return {"model": "dense", "experts": None, "top_k": None, "activation": None}
    moe = model["moe"]
    return {"model": "moe", "experts": moe["num_experts"], "top_k": moe["top_k"], "activation": moe["activation"]}


def job_number(job_dir: Path) -> int:
    return yaml.safe_load((job_dir / ".hydra" / "hydra.yaml").read_text())["hydra"]["job"]["num"]


def varying_keys(overrides: list[dict[str, str]]) -> list[str]:
    """Override keys whose value is not the same in every job, in command-line order."""
    keys = list(dict.fromkeys(key for job in overrides for key in job))
    return [key for key in keys if len({job.get(key) for job in overrides}) > 1]


def collect_rows(sweep_dir: Path) -> tuple[list[str], list[dict[str, Any]]]:
    """The swept keys that get a column, and one row per job ordered by job number."""
    job_dirs = find_job_dirs(sweep_dir)
    overrides = [overrides_by_key(job_dir) for job_dir in job_dirs]
    swept = [key for key in varying_keys(overrides) if key not in SHOWN_BY_MODEL_COLUMNS]
    rows = []
    for job_dir, job_overrides in zip(job_dirs, overrides):
        outcome = run_outcome(job_dir)
        row = {"job": job_number(job_dir), **{key: job_overrides.get(key) for key in swept}, **model_cells(job_dir)}
        row.update({key: outcome.get(key) for key in METRIC_COLUMNS + ["status", "reason"]})
        row.update(
            dir=str(job_dir.relative_to(sweep_dir)), overrides=" ".join(f"{k}={v}" for k, v in job_overrides.items())
        )
        rows.append(row)
    return swept, sorted(rows, key=lambda row: row["job"])


def cells(columns: list[str], row: dict[str, Any]) -> list[str]:
    return [
        cell(row[column], CELL_FORMATS[column]) if column in CELL_FORMATS else cell(short(row[column]))
        for column in columns
    ]


def short(value: Any) -> Any:
    """A swept value with a fraction in 4 significant digits (an Optuna learning rate, 0.0012345678 -> 0.001235);
    anything else as it is. The CSV keeps every digit."""
    if isinstance(value, float) or (isinstance(value, str) and any(mark in value for mark in ".eE")):
        try:
            return f"{float(value):.4g}"
        except ValueError:
            return value
    return value


def series_label(row: dict[str, Any], swept: list[str]) -> str:
    return ", ".join([f"top_k={row['top_k']}", *(f"{key}={row[key]}" for key in swept)])


def plot_against_experts(rows: list[dict[str, Any]], swept: list[str], metric: str, label: str, path: Path) -> None:
    """One line per top_k (and per value of any other swept key); dense runs as dashed levels."""
    finished = [row for row in rows if row["status"] == "ok"]
    series: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for row in finished:
        if row["model"] == "moe":
            series[series_label(row, swept)].append((row["experts"], row[metric]))
    with plot(path, "experts per MoE layer", label) as ax:
        for name, points in sorted(series.items()):
            experts, values = zip(*sorted(points))
            ax.plot(experts, values, marker="o", label=name)
        for row in finished:
            if row["model"] == "dense":
                ax.axhline(row[metric], linestyle="--", color="gray", label=f"dense (job {row['job']})")
        ax.set_xscale("log", base=2)  # expert counts are usually powers of two
        ticks = sorted({row["experts"] for row in finished if row["model"] == "moe"})
        ax.set_xticks(ticks, [str(tick) for tick in ticks])
        ax.minorticks_off()


def optuna_best(sweep_dir: Path) -> Optional[str]:
    """The Optuna sweeper's best trial, when this sweep was one."""
    results_path = sweep_dir / "optimization_results.yaml"
    if not results_path.is_file():
        return None
    results = yaml.safe_load(results_path.read_text())
    return f"Optuna best value {results['best_value']:.4f} with {results['best_params']}"


def status_counts(rows: list[dict[str, Any]]) -> str:
    counts = {
        status: sum(row["status"] == status for row in rows) for status in ("ok", "failed", "interrupted", "incomplete")
    }
    return f"{len(rows)} jobs: " + ", ".join(f"{n} {status}" for status, n in counts.items() if n)


def summarize(sweep_dir: Path, out_dir: Path) -> str:
    """Write the table and the plots; returns the text to print."""
    swept, rows = collect_rows(sweep_dir)
    columns = ["job", *swept, *MODEL_COLUMNS, *METRIC_COLUMNS, "status", "reason"]
    table = markdown_table(columns, [cells(columns, row) for row in rows])
    footer = [line for line in (status_counts(rows), optuna_best(sweep_dir)) if line]
    out_dir.mkdir(parents=True, exist_ok=True)
    report = "\n\n".join([f"# Sweep {sweep_dir}", table, *footer]) + "\n"
    written = [
        write_reported(out_dir / "summary.md", lambda path: path.write_text(report)),
        # Unrounded values, plus each job's directory and full override list for scripts.
        write_reported(out_dir / "summary.csv", partial(write_csv, columns=[*columns, "dir", "overrides"], rows=rows)),
    ]
    if any(row["status"] == "ok" and row["model"] == "moe" for row in rows):
        for metric, label, name in PLOTS:
            written.append(write_reported(out_dir / name, partial(plot_against_experts, rows, swept, metric, label)))
    else:
        written.append("no plots: no MoE job finished")
    return "\n".join([table, "", *footer, "", "wrote:", *written])
