"""Dense vs MoE on equal terms: same data, token budget and seed, matched active parameters.

Trains each variant with train.py (one process each, so peak memory is per run), then writes
<out>/report.md with a table (parameters, FLOPs per token, val loss and perplexity, tokens/s,
peak memory, wall time), val loss against tokens and against time (PNG), and an expert-usage
heatmap per MoE variant. All runs share one W&B group.

    python scripts/compare.py                                     # small default, ~10 min on 2 CPU cores
    python scripts/compare.py --variants dense,moe:8:2,moe:16:1:swish data=shakespeare trainer.max_steps=2000
    python scripts/compare.py --match none model.moe.hidden_size=256   # keep the configured expert width
    python scripts/compare.py --variants moe:8:2,moe:32:8,moe:31:7:num_shared_experts=1   # fine-grained, shared
    python scripts/compare.py --variants dense,moe:8:2 --seeds 3   # means over seeds and a verdict with a 95% CI

A variant is ``dense`` or ``moe:E:K[:activation][:key=value...]`` where key is any model.moe key,
e.g. ``moe:16:4:num_shared_experts=1:router=sigmoid`` or ``moe:8:2:load_balance=aux_free``.
Matching (``--match active``, the default): each expert is 4*n_embd/(K + shared experts) wide, so
the experts a token uses hold as many parameters as the dense FFN; fine-grained variants (more,
narrower experts, e.g. moe:32:8 against moe:8:2) are matched the same way. Everything else is a
train.py override applied to every variant.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from hydra.errors import HydraException

from moe_gpt.analysis import flops_per_token, routing_report
from moe_gpt.checkpoints import load_model
from moe_gpt.compose import compose_run_config, merge_overrides
from moe_gpt.config import ACTIVATIONS, ConfigError, MoEConfig, RunConfig
from moe_gpt.cpu_memory import reuse_freed_cpu_memory
from moe_gpt.data import DataError, TokenDataModule
from moe_gpt.expert_usage import usage_heatmap_png
from moe_gpt.outcomes import EXIT_BAD_INPUT, one_line
from moe_gpt.verdict import paired_difference, spread, verdict

REPO = Path(__file__).resolve().parents[1]
SMALL_DEFAULT = ["trainer.max_steps=100", "trainer.val_check_interval=25", "trainer.limit_val_batches=10"]
HEATMAP_WINDOWS = 16  # validation windows routed for each usage heatmap


@dataclass
class Variant:
    name: str
    overrides: list[str]


VARIANT_FORMAT = (
    "'dense' or 'moe:E:K[:activation][:key=value...]', e.g. moe:8:2, moe:4:1:swish or moe:16:4:num_shared_experts=1"
)
MOE_KEYS = {field.name for field in fields(MoEConfig)}


def parse_variant(spec: str, n_embd: int, match: str) -> Variant:
    """``dense`` or ``moe:E:K[:activation][:key=value...]`` (any model.moe key) -> the overrides that build it."""
    if spec == "dense":
        return Variant("dense", ["model=dense"])
    parts = spec.split(":")
    if parts[0] != "moe" or len(parts) < 3 or not (parts[1].isdigit() and parts[2].isdigit()):
        raise ConfigError(f"variant {spec!r} is not {VARIANT_FORMAT}")
    experts, top_k = int(parts[1]), int(parts[2])
    if experts < 1 or top_k < 1:
        raise ConfigError(f"variant {spec!r}: E and K must be at least 1, e.g. moe:8:2")
    overrides = ["model=moe", f"model.moe.num_experts={experts}", f"model.moe.top_k={top_k}"]
    settings = dict(_variant_setting(spec, part) for part in parts[3:])
    overrides += [f"model.moe.{key}={value}" for key, value in settings.items()]
    if match == "active":
        # Every expert a token uses (its top_k routed ones and the shared ones) is equally wide,
        # so the token's active FFN width equals the dense FFN's 4 * n_embd.
        active = top_k + int(settings.get("num_shared_experts", 0))
        if (4 * n_embd) % active:
            raise ConfigError(
                f"variant {spec}: 4*n_embd={4 * n_embd} is not divisible by the {active} experts a token uses; "
                "use --match none"
            )
        overrides.append(f"model.moe.hidden_size={4 * n_embd // active}")
    return Variant(spec.replace(":", "-").replace("=", "-"), overrides)


def _variant_setting(spec: str, part: str) -> tuple[str, str]:
    """``swish`` (an activation) or ``key=value`` for a model.moe key."""
    if "=" not in part:
        if part not in ACTIVATIONS:
            raise ConfigError(
                f"variant {spec!r}: {part!r} is neither an activation ({', '.join(ACTIVATIONS)}) nor key=value"
            )
        return "activation", part
    key, value = part.split("=", 1)
    settable = sorted(MOE_KEYS - {"num_experts", "top_k"})  # those two are E and K of moe:E:K
    if key not in settable:
        raise ConfigError(f"variant {spec!r}: {key!r} is not a model.moe key to set here; the keys: {', '.join(settable)}")
    if key == "num_shared_experts" and not value.isdigit():
        raise ConfigError(f"variant {spec!r}: num_shared_experts={value} must be a whole number")
    return key, value


def train_variant(variant: Variant, base: list[str], run_dir: Path, group: str) -> dict:
    """Run train.py for one variant; its metrics.json, or a failure with its reason."""
    command = [
        sys.executable,
        str(REPO / "train.py"),
        *base,
        *variant.overrides,
        f"hydra.run.dir={run_dir}",
        f"logger.group={group}",
    ]
    print(f"[compare] {variant.name}: {' '.join(command[2:])}", flush=True)
    result = subprocess.run(command, cwd=REPO, env=os.environ, stderr=subprocess.PIPE, text=True)
    if result.returncode != 0:
        return {"status": "failed", "reason": failure_reason(run_dir, result.stderr)}
    return {"status": "ok", **json.loads((run_dir / "metrics.json").read_text())}


def failure_reason(run_dir: Path, stderr: str) -> str:
    """train.py's own record of why the run failed (failure.json), else the last line it printed
    (bad input writes no record: the run never claimed its folder)."""
    try:
        return json.loads((run_dir / "failure.json").read_text())["reason"]
    except (OSError, ValueError, KeyError):
        return next((line for line in reversed(stderr.splitlines()) if line.strip()), "no output")


def run_variant(
    variant: Variant, seed: int, base: list[str], run_dir: Path, run_config: RunConfig, out_dir: Path, group: str
) -> dict:
    """Train one variant with one seed; its row of the report (and its heatmap, for the first MoE run)."""
    result = train_variant(Variant(variant.name, [*variant.overrides, f"seed={seed}"]), base, run_dir, group)
    row = {"variant": variant.name, "seed": seed, **result}
    row["train_gflops_per_token"] = flops_per_token(run_config.model)["train_flops_per_token"] / 1e9
    heatmap = out_dir / f"usage_{variant.name}.png"
    if result["status"] == "ok" and run_config.model.use_moe and not heatmap.exists():
        usage_heatmap(run_dir, run_config, heatmap)
    return row


def usage_heatmap(run_dir: Path, run: RunConfig, out_path: Path) -> None:
    """Route a few validation windows through the best checkpoint and draw layer x expert shares."""
    model = load_model(run_dir / "checkpoints" / "best.ckpt")
    datamodule = TokenDataModule(run.data, block_size=run.model.block_size, seed=run.seed)
    datamodule.setup("validate")
    count = min(HEATMAP_WINDOWS, len(datamodule.val_dataset))
    idx = torch.stack([datamodule.val_dataset[i][0] for i in range(count)])
    report = routing_report(model, idx)
    out_path.write_bytes(usage_heatmap_png([layer["expert_share"] for layer in report["moe_layers"]]))


def plot_curves(rows: list[dict], out_dir: Path) -> None:
    """Val loss against tokens and against time: one line per variant, the mean over its seeds, with a
    band from the lowest to the highest seed when there are several."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for x_key, label, filename in (
        ("tokens", "training tokens", "val_loss_vs_tokens.png"),
        ("seconds", "training seconds", "val_loss_vs_time.png"),
    ):
        fig, ax = plt.subplots(figsize=(6, 4))
        for variant, histories in histories_by_variant(rows).items():
            x, mean, low, high = curve_over_seeds(histories, x_key)
            ax.plot(
                x, mean, marker="o", label=variant if len(histories) == 1 else f"{variant} ({len(histories)} seeds)"
            )
            if len(histories) > 1:
                ax.fill_between(x, low, high, alpha=0.2)
        ax.set_xlabel(label)
        ax.set_ylabel("validation loss")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.savefig(out_dir / filename, bbox_inches="tight", dpi=100)
        plt.close(fig)


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


TABLE_COLUMNS = [
    ("variant", "variant", "{}"),
    ("params_total", "total params (M)", "{:.2f}"),
    ("params_active", "active params (M)", "{:.2f}"),
    ("train_gflops_per_token", "train GFLOPs/token", "{:.4f}"),
    ("val_loss", "val loss", "{:.4f}"),
    ("val_ppl", "val ppl", "{:.2f}"),
    ("tokens_per_sec", "tokens/s", "{:.0f}"),
    ("peak_memory_mb", "peak memory (MiB)", "{:.0f}"),
    ("wall_time_s", "wall time (s)", "{:.0f}"),
]


def table_row(row: dict) -> list[str]:
    if row["status"] != "ok":
        return [row["variant"]] + [f"failed: {row['reason']}"] + [""] * (len(TABLE_COLUMNS) - 2)
    scaled = {**row, "params_total": row["params_total"] / 1e6, "params_active": row["params_active"] / 1e6}
    return [fmt.format(scaled[key]) for key, _, fmt in TABLE_COLUMNS]


def write_report(rows: list[dict], out_dir: Path, command: str, match: str, seeds: list[int]) -> str:
    table = aggregated_table(rows) if len(seeds) > 1 else run_table(rows)
    rule = (
        "each expert is 4*n_embd/(top_k + shared experts) wide, so the experts a token uses hold as many parameters "
        "as the dense FFN"
        if match == "active"
        else "none: experts keep the configured width"
    )
    verdicts = "\n".join(f"- {sentence}" for sentence in verdict_sentences(rows))
    heatmaps = "\n".join(f"![{name}](usage_{name}.png)" for name in moe_variants_with_heatmaps(out_dir, rows))
    report = (
        f"# Dense vs MoE\n\nCommand: `{command}`\n\nActive-parameter matching: {rule}. Same data, token budget and "
        f"seeds ({', '.join(map(str, seeds))}) for every variant; val loss is pure cross-entropy on the held-out split."
        f"\n\n{table}\n\nVerdict (val loss against the first variant, paired by seed):\n\n{verdicts}\n\n"
        "![val loss vs tokens](val_loss_vs_tokens.png) ![val loss vs time](val_loss_vs_time.png)\n\n"
        f"Expert usage (share of token-slots per layer and expert, best checkpoint, validation text):\n\n{heatmaps}\n"
    )
    (out_dir / "report.md").write_text(report)
    with open(out_dir / "report.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["status", "seed"] + [key for key, _, _ in TABLE_COLUMNS])
        for row in rows:
            writer.writerow([row["status"], row["seed"]] + [row.get(key, "") for key, _, _ in TABLE_COLUMNS])
    return f"{table}\n\n{verdicts}"


def markdown_table(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(cells) + " |" for cells in body])


def run_table(rows: list[dict]) -> str:
    return markdown_table([title for _, title, _ in TABLE_COLUMNS], [table_row(row) for row in rows])


def aggregated_table(rows: list[dict]) -> str:
    """One line per variant: val loss as mean ± std over its seeds, the other columns as means."""
    header = ["variant", "seeds ok", "active params (M)", "val loss (mean ± std)", "val ppl (mean)", "tokens/s (mean)"]
    body = []
    for variant in dict.fromkeys(row["variant"] for row in rows):
        runs = [row for row in rows if row["variant"] == variant]
        ok = [row for row in runs if row["status"] == "ok"]
        if not ok:
            body.append([variant, f"0/{len(runs)}", "", f"failed: {runs[0]['reason']}", "", ""])
            continue
        loss = spread([row["val_loss"] for row in ok])
        std = "" if loss.std is None else f" ± {loss.std:.4f}"
        body.append(
            [
                variant,
                f"{len(ok)}/{len(runs)}",
                f"{ok[0]['params_active'] / 1e6:.2f}",
                f"{loss.mean:.4f}{std}",
                f"{statistics.fmean(row['val_ppl'] for row in ok):.2f}",
                f"{statistics.fmean(row['tokens_per_sec'] for row in ok):.0f}",
            ]
        )
    return markdown_table(header, body)


def verdict_sentences(rows: list[dict]) -> list[str]:
    """Each variant against the first, over the seeds where both finished."""
    variants = list(dict.fromkeys(row["variant"] for row in rows))
    losses = {(row["variant"], row["seed"]): row["val_loss"] for row in rows if row["status"] == "ok"}
    sentences = []
    for candidate in variants[1:]:
        seeds = [seed for (name, seed) in losses if name == candidate and (variants[0], seed) in losses]
        if not seeds:
            sentences.append(f"{candidate} vs {variants[0]}: no seed where both finished")
            continue
        difference = paired_difference(
            [losses[candidate, seed] for seed in seeds], [losses[variants[0], seed] for seed in seeds]
        )
        sentences.append(verdict(candidate, variants[0], difference))
    return sentences


def moe_variants_with_heatmaps(out_dir: Path, rows: list[dict]) -> list[str]:
    return [name for name in dict.fromkeys(row["variant"] for row in rows) if (out_dir / f"usage_{name}.png").is_file()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="train.py overrides applied to every variant")
    parser.add_argument("--variants", default="dense,moe:4:1,moe:8:2", help="comma-separated variants")
    parser.add_argument("--match", choices=["active", "none"], default="active")
    parser.add_argument("--out", default=None, help="report directory (default: outputs/compare/compare-<date_time>)")
    parser.add_argument("--seeds", type=int, default=1, help="seeds per variant (seed, seed+1, ...); 3+ for a verdict")
    args = parser.parse_args()
    reuse_freed_cpu_memory()
    try:
        run(args)
    except (ConfigError, DataError, HydraException) as error:
        print(f"error: {one_line(error)}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)


def run(args: argparse.Namespace) -> None:
    name = time.strftime("compare-%Y-%m-%d_%H-%M-%S")
    out_dir = Path(args.out) if args.out else REPO / "outputs" / "compare" / name
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ConfigError(f"--out {out_dir} is not empty; choose a new directory so earlier reports are kept")
    base = merge_overrides(SMALL_DEFAULT, args.overrides)
    n_embd = compose_run_config(base).model.n_embd
    variants = [
        parse_variant(spec, n_embd, args.match) for spec in args.variants.split(",")
    ]  # all checked before training
    names = [v.name for v in variants]
    if len(set(names)) < len(names):
        raise ConfigError(
            f"--variants {args.variants} lists a variant twice; give each once (runs would share a directory)"
        )
    if args.seeds < 1:
        raise ConfigError(
            f"--seeds {args.seeds} must be at least 1 (3 or more give a confidence interval worth reading)"
        )
    configs = {v.name: compose_run_config(base + v.overrides) for v in variants}
    first_seed = configs[variants[0].name].seed
    seeds = [first_seed + i for i in range(args.seeds)]
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for variant in variants:
        for seed in seeds:
            run_dir = out_dir / variant.name if len(seeds) == 1 else out_dir / variant.name / f"seed-{seed}"
            rows.append(run_variant(variant, seed, base, run_dir, configs[variant.name], out_dir, group=name))
    plot_curves(rows, out_dir)
    command = "python scripts/compare.py " + " ".join(sys.argv[1:])
    print(write_report(rows, out_dir, command.strip(), args.match, seeds))
    print(f"[compare] report: {out_dir / 'report.md'}")


if __name__ == "__main__":
    main()
