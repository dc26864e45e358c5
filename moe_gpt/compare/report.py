"""The report of a comparison: per budget a table, verdicts with confidence intervals and curves.

A row is one run: its budget, variant and seed, its status, and (when it finished) its
``metrics.json`` numbers, plus ``held_out_loss`` with ``--eval-data``. With one seed the table has
a line per run; with several, a line per variant (means, and the val loss as mean ± std). Each MoE
variant also gets a picture of how its best checkpoint routes validation windows (``usage_heatmap``).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from moe_gpt.compare.plan import Budget
from moe_gpt.config import RunConfig
from moe_gpt.model.analysis import routing_report
from moe_gpt.training.expert_usage import usage_heatmap_png
from moe_gpt.weights.prune import validation_batches
from moe_gpt.weights.safe_load import load_model
from moe_gpt.reporting import MFU_FORMAT, cell, curves_figure, markdown_table, save_figure, write_csv, write_reported
from moe_gpt.compare.verdict import paired_difference, spread, verdict
from moe_gpt.compare import speedup
from moe_gpt.compare.distilled import gain_kept_sentences

# (key, title, format) for the one-seed table; "" formats are computed cells.
RUN_COLUMNS = [
    ("variant", "variant", "{}"),
    ("params_total", "total params (M)", "{:.2f}"),
    ("params_active", "active params (M)", "{:.2f}"),
    ("train_gflops_per_token", "train GFLOPs/token", "{:.4f}"),
    ("steps", "steps", "{}"),
    ("train_tokens", "train tokens (M)", "{:.2f}"),
    ("train_minutes", "train time (min)", "{:.1f}"),
    ("val_loss", "val loss", "{:.4f}"),
    ("val_ppl", "val ppl", "{:.2f}"),
    ("held_out_loss", "held-out loss", "{:.4f}"),
    ("tokens_per_sec", "tokens/s", "{:.0f}"),
    ("mfu", "MFU", MFU_FORMAT),
    ("peak_memory_mb", "peak memory (MiB)", "{:.0f}"),
]
CSV_COLUMNS = [
    "budget",
    "variant",
    "seed",
    "status",
    "reason",
    "params_total",
    "params_active",
    "train_gflops_per_token",
    "steps",
    "train_tokens",
    "train_seconds",
    "val_loss",
    "val_ppl",
    "held_out_loss",
    "tokens_per_sec",
    "mfu",
    "peak_memory_mb",
    "wall_time_s",
    *speedup.COLUMNS,  # to the first variant's final val loss (speedup.py)
]
MILLIONS = ("params_total", "params_active", "train_tokens")
HEATMAP_WINDOWS = 16  # validation windows routed for each usage heatmap
SPEEDUP_TITLE = (
    "Speed-up to the first variant's final val loss (per seed; interpolated between validations; the crosses on "
    "the curves):"
)


@dataclass(frozen=True)
class ReportContext:
    command: str
    match_rule: str
    seeds: list[int]
    eval_data: Optional[str]
    teachers: dict[str, str] = field(default_factory=dict)  # distill:<variant> students -> their teacher variant


def variants_of(rows: list[dict]) -> list[str]:
    return list(dict.fromkeys(row["variant"] for row in rows))


def run_table(rows: list[dict], with_held_out: bool) -> str:
    columns = [column for column in RUN_COLUMNS if with_held_out or column[0] != "held_out_loss"]
    body = []
    for row in rows:
        if row["status"] != "ok":
            body.append([row["variant"], cell(f"{row['status']}: {row['reason']}")] + [""] * (len(columns) - 2))
            continue
        shown = {**row, "train_minutes": row["train_seconds"] / 60}
        shown.update({key: row[key] / 1e6 for key in MILLIONS})
        body.append([cell(shown.get(key), fmt, missing="n/a") for key, _, fmt in columns])
    return markdown_table([title for _, title, _ in columns], body)


def aggregated_table(rows: list[dict], with_held_out: bool) -> str:
    """One line per variant over its finished seeds: losses as mean ± std, the rest as means."""
    header = ["variant", "seeds ok", "active params (M)", "steps", "train time (min)", "val loss (mean ± std)"]
    header += ["held-out loss (mean ± std)"] if with_held_out else []
    header += ["val ppl", "tokens/s", "MFU"]
    body = []
    for variant in variants_of(rows):
        runs = [row for row in rows if row["variant"] == variant]
        ok = [row for row in runs if row["status"] == "ok"]
        if not ok:
            failed = [f"0/{len(runs)}", cell(f"{runs[0]['status']}: {runs[0]['reason']}")]
            body.append([variant, *failed] + [""] * (len(header) - 3))
            continue
        line = [variant, f"{len(ok)}/{len(runs)}", f"{ok[0]['params_active'] / 1e6:.2f}"]
        line += [f"{mean(ok, 'steps'):.0f}", f"{mean(ok, 'train_seconds') / 60:.1f}", mean_and_std(ok, "val_loss")]
        line += [mean_and_std(ok, "held_out_loss")] if with_held_out else []
        line += [
            f"{mean(ok, 'val_ppl'):.2f}",
            f"{mean(ok, 'tokens_per_sec'):.0f}",
            cell(mean(ok, "mfu"), MFU_FORMAT, missing="n/a"),
        ]
        body.append(line)
    return markdown_table(header, body)


def mean(rows: list[dict], key: str) -> Optional[float]:
    values = [row[key] for row in rows if row.get(key) is not None]
    return statistics.fmean(values) if values else None


def mean_and_std(rows: list[dict], key: str) -> str:
    values = [row[key] for row in rows if row.get(key) is not None]
    if not values:
        return "n/a"
    result = spread(values)
    return f"{result.mean:.4f}" + ("" if result.std is None else f" ± {result.std:.4f}")


def verdict_sentences(rows: list[dict], metric: str, label: str, higher_is_better: bool = False) -> list[str]:
    """Each variant against the first on ``metric`` (lower is better unless ``higher_is_better``), over the
    seeds where both have it."""
    variants = variants_of(rows)
    values = {(row["variant"], row["seed"]): row.get(metric) for row in rows if row["status"] == "ok"}
    values = {key: value for key, value in values.items() if value is not None}
    sentences = []
    for candidate in variants[1:]:
        seeds = [seed for (name, seed) in values if name == candidate and (variants[0], seed) in values]
        if not seeds:
            sentences.append(f"{candidate} vs {variants[0]}: no seed where both finished")
            continue
        difference = paired_difference(
            [values[candidate, seed] for seed in seeds], [values[variants[0], seed] for seed in seeds]
        )
        sentences.append(verdict(candidate, variants[0], difference, metric=label, higher_is_better=higher_is_better))
    return sentences


def plot_curves(rows: list[dict], folder: Path) -> list[str]:
    """Val loss against tokens and against training time (the whole run, and its second half zoomed): one line
    per variant, the mean over its seeds, with a band from the lowest to the highest seed when there are several."""
    files = []
    for x_key, label, filename in (
        ("tokens", "training tokens", "val_loss_vs_tokens.png"),
        ("seconds", "training seconds (validation excluded)", "val_loss_vs_time.png"),
    ):
        title = f"{folder.name}: validation loss, mean over seeds (band: lowest to highest seed)"
        save_figure(curves_figure(lambda ax: draw_variants(ax, rows, x_key), label, "validation loss", title,
                                  tokens_axis=x_key == "tokens"), folder / filename)  # fmt: skip
        files.append(filename)
    return files


def draw_variants(ax, rows: list[dict], x_key: str) -> None:
    for variant, histories in histories_by_variant(rows).items():
        x, average, low, high = curve_over_seeds(histories, x_key)
        name = variant if len(histories) == 1 else f"{variant} ({len(histories)} seeds)"
        ax.plot(x, average, marker="o", label=name)
        if len(histories) > 1:
            ax.fill_between(x, low, high, alpha=0.2)
    speedup.mark_target(ax, rows, x_key)


def histories_by_variant(rows: list[dict]) -> dict[str, list[list[dict]]]:
    grouped: dict[str, list[list[dict]]] = {}
    for row in rows:
        if row["status"] == "ok" and row.get("val_history"):
            grouped.setdefault(row["variant"], []).append(row["val_history"])
    return grouped


def curve_over_seeds(histories: list[list[dict]], x_key: str) -> tuple[list[float], ...]:
    """Point i of every seed's history (the same validation step): mean x, and mean, min and max loss."""
    points = min(len(history) for history in histories)
    x = [statistics.fmean(history[i][x_key] for history in histories) for i in range(points)]
    losses = [[history[i]["val_loss"] for history in histories] for i in range(points)]
    return x, [statistics.fmean(v) for v in losses], [min(v) for v in losses], [max(v) for v in losses]


def budget_section(budget: Budget, rows: list[dict], out_dir: Path, context: ReportContext) -> tuple[str, str]:
    """The report's section for one budget, and the lines to print."""
    with_held_out = context.eval_data is not None
    table = aggregated_table(rows, with_held_out) if len(context.seeds) > 1 else run_table(rows, with_held_out)
    sentences = verdict_sentences(rows, "val_loss", "val loss")
    if with_held_out:
        sentences += verdict_sentences(rows, "held_out_loss", f"held-out loss on {context.eval_data}")
    sentences += gain_kept_sentences(rows, context.teachers)
    verdicts = "\n".join(f"- {sentence}" for sentence in sentences)
    speedup.add_speedups(rows)  # before the plots, which mark where each variant reaches the target
    speedups = f"{SPEEDUP_TITLE}\n\n{speedup.speedup_table(rows)}"
    plots = plot_curves(rows, out_dir / budget.name)
    images = " ".join(f"![{name}]({budget.name}/{name})" for name in plots)
    section = (
        f"## {budget.title}\n\n{table}\n\nVerdict (against the first variant, paired by seed):\n\n{verdicts}\n\n"
        f"{speedups}\n\n{images}\n"
    )
    downstream = downstream_section(rows)
    return section + downstream, f"{budget.title}\n\n{table}\n\n{verdicts}\n\n{speedups}" + downstream


def write_report(rows: list[dict], budgets: list[Budget], out_dir: Path, context: ReportContext) -> str:
    """report.md and report.csv in ``out_dir``; returns the text to print."""
    sections, printed = [], []
    for budget in budgets:
        section, text = budget_section(budget, [row for row in rows if row["budget"] == budget.name], out_dir, context)
        sections.append(section)
        printed.append(text)
    held_out = f" Held-out loss: every run's best checkpoint on {context.eval_data}." if context.eval_data else ""
    heatmaps = "\n".join(
        f"![{name}](usage_{name}.png)" for name in variants_of(rows) if (out_dir / f"usage_{name}.png").is_file()
    )
    report = (
        f"# Dense vs MoE\n\nCommand: `{context.command}`\n\nParameter matching: {context.match_rule}. Same data and "
        f"seeds ({', '.join(map(str, context.seeds))}) for every variant; val loss is pure cross-entropy on the "
        f"held-out split of the training corpus; tokens/s and training time exclude validation.{held_out}\n\n"
        + "\n".join(sections)
        + f"\n## Expert usage\n\nShare of token-slots per layer and expert (best checkpoint, validation text):\n\n{heatmaps}\n"
    )
    written = [
        write_reported(out_dir / "report.md", lambda path: path.write_text(report)),
        write_reported(out_dir / "report.csv", lambda path: write_csv(path, CSV_COLUMNS, rows)),
    ]
    return "\n\n".join(printed) + "\n\nwrote:\n" + "\n".join(written)


def usage_heatmap(checkpoint: Path, run: RunConfig, out_path: Path) -> None:
    """Route the first validation windows of the run's data through ``checkpoint``; draw each MoE
    layer's share of token-slots per expert into ``out_path`` (PNG)."""
    model = load_model(checkpoint)
    windows = torch.cat([x for x, _ in validation_batches(run, model.config.block_size, HEATMAP_WINDOWS)])
    report = routing_report(model, windows)
    title = f"expert usage of {out_path.stem.removeprefix('usage_')} (best checkpoint, validation text)"
    out_path.write_bytes(usage_heatmap_png([layer["expert_share"] for layer in report["moe_layers"]], title))


def downstream_section(rows: list[dict]) -> str:
    """With ``--eval-tasks``: each lm-eval score per variant (mean ± std over seeds) and its verdict; else ""."""
    flat = [{**row, **row.get("downstream", {})} for row in rows]  # "<task> <metric>" keys beside the others
    higher_is_better = {key: up for row in rows for key, up in row.get("downstream_higher_is_better", {}).items()}
    if not higher_is_better:
        return ""
    body = []
    for variant in variants_of(rows):
        ok = [row for row in flat if row["variant"] == variant and row["status"] == "ok"]
        body.append([variant, *(mean_and_std(ok, key) for key in higher_is_better)])
    sentences = [
        sentence
        for key, up in higher_is_better.items()
        for sentence in verdict_sentences(flat, key, f"lm-eval {key}", up)
    ]
    verdicts = "\n".join(f"- {sentence}" for sentence in sentences)
    table = markdown_table(["variant", *(f"{key} (mean ± std)" for key in higher_is_better)], body)
    return f"\nDownstream, lm-eval on the best checkpoints:\n\n{table}\n\n{verdicts}\n"
