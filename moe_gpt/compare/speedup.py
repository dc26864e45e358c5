"""How much sooner a variant gets there: the tokens, steps and training seconds each variant needs to reach the
first variant's final validation loss, and the speed-up factors that follow.

Per seed, the target is the first variant's final val loss. Each run's validation history (with its
final point) is read as a piecewise-linear curve, and the first place it reaches the target is
interpolated between the two validations around it: tokens, step and seconds alike. A run that
never gets there is "not reached". The speed-up of a candidate is the first variant's amount
divided by the candidate's (2.0: it got there with half the tokens), per seed; its mean gets a 95%
t-interval over the seeds where it was reached. A run already at the target at its first validation
got there somewhere before it: its amount is an upper bound and its speed-up a lower bound, marked
"≥" in the table (validate more often, ``trainer.val_check_interval``, to place it).
"""

from __future__ import annotations

from typing import Any, Optional

from moe_gpt.compare.verdict import mean_interval
from moe_gpt.reporting import markdown_table

AXES = {"tokens": "tokens", "steps": "step", "seconds": "seconds"}  # report name -> the history entry's key
EARLY = "reached_at_first_validation"  # the amounts are upper bounds, the speed-ups lower bounds
COLUMNS = [f"{axis}_to_target" for axis in AXES] + [f"speedup_{axis}" for axis in AXES] + [EARLY]  # report.csv's


def reach(history: list[dict[str, float]], target: float) -> Optional[dict[str, float]]:
    """Tokens, steps and seconds where the val loss first reaches ``target`` (linear between validations);
    None when it never does. Reached at the first validation: that validation's values."""
    previous = None
    for point in history:
        if point["val_loss"] <= target:
            if previous is None:
                return {axis: float(point[key]) for axis, key in AXES.items()}
            share = (previous["val_loss"] - target) / (previous["val_loss"] - point["val_loss"])
            return {axis: previous[key] + share * (point[key] - previous[key]) for axis, key in AXES.items()}
        previous = point
    return None


def full_history(row: dict[str, Any]) -> list[dict[str, float]]:
    """The run's validation history ending at its final val loss (a run whose last step is no validation
    step validated once more at the end, which the history does not hold)."""
    history = list(row.get("val_history") or [])
    if not history or history[-1]["step"] < row["steps"]:
        final = {"step": row["steps"], "tokens": row["train_tokens"], "seconds": row["train_seconds"]}
        history.append({**final, "val_loss": row["val_loss"]})
    return history


def add_speedups(rows: list[dict[str, Any]]) -> None:
    """Each finished run's ``COLUMNS``: to the first variant's final val loss of the same seed, and the factors."""
    finished = [row for row in rows if row["status"] == "ok"]
    if not finished:
        return
    baseline_name = rows[0]["variant"]
    baselines = {row["seed"]: row for row in finished if row["variant"] == baseline_name}
    for row in finished:
        baseline = baselines.get(row["seed"])
        if baseline is None:
            continue
        target = baseline["val_loss"]
        history = full_history(row)
        candidate, reference = reach(history, target), reach(full_history(baseline), target)
        row[EARLY] = history[0]["val_loss"] <= target
        for axis in AXES:
            row[f"{axis}_to_target"] = candidate[axis] if candidate else None
            reached = candidate is not None and reference is not None and candidate[axis] > 0
            row[f"speedup_{axis}"] = reference[axis] / candidate[axis] if reached else None


def speedup_table(rows: list[dict[str, Any]]) -> str:
    """Per variant after the first: in how many seeds it reached the target, and each factor's mean (95% CI)."""
    variants = list(dict.fromkeys(row["variant"] for row in rows))
    header = ["variant", "reached", "tokens to target (M)"] + [f"speed-up in {axis} (95% CI)" for axis in AXES]
    body = []
    for variant in variants[1:]:
        runs = [row for row in rows if row["variant"] == variant and row["status"] == "ok" and "speedup_tokens" in row]
        reached = [row for row in runs if row["speedup_tokens"] is not None]
        line = [variant, f"{len(reached)}/{len(runs)} seeds" if runs else "no seed with a baseline"]
        if not reached:
            body.append(line + ["not reached"] + [""] * len(AXES))
            continue
        bound = "≥" if any(row.get(EARLY) for row in reached) else ""
        line.append(f"{'≤' if bound else ''}{sum(row['tokens_to_target'] for row in reached) / len(reached) / 1e6:.3f}")
        line += [bound + factor_cell([row[f"speedup_{axis}"] for row in reached]) for axis in AXES]
        body.append(line)
    table = markdown_table(header, body)
    if any(row.get(EARLY) for row in rows if row["variant"] != variants[0]):
        table += (
            "\n\n≥: some seed was already at the target at its first validation, so it got there sooner than this "
            "says; validate more often (trainer.val_check_interval) to place it."
        )
    return table


def factor_cell(factors: list[float]) -> str:
    result = mean_interval(factors)
    interval = "" if result.low is None else f" ({result.low:.2f} to {result.high:.2f})"
    return f"{result.mean:.2f}x{interval}"


def mark_target(ax: Any, rows: list[dict[str, Any]], x_key: str) -> None:
    """On a val-loss curve: the target (the first variant's final val loss, mean over seeds) as a dashed line, and
    where each variant reaches it (mean over the seeds that did) as a cross."""
    baseline_name = rows[0]["variant"] if rows else None
    targets = [row["val_loss"] for row in rows if row["variant"] == baseline_name and row["status"] == "ok"]
    if not targets:
        return
    target = sum(targets) / len(targets)
    ax.axhline(target, linestyle="--", color="grey", linewidth=1, label=f"target: {baseline_name}'s final val loss")
    axis = "tokens" if x_key == "tokens" else "seconds"
    for variant in dict.fromkeys(row["variant"] for row in rows):
        points = [row[f"{axis}_to_target"] for row in rows if row["variant"] == variant and row.get(f"{axis}_to_target")]
        if points:
            ax.plot([sum(points) / len(points)], [target], marker="x", markersize=10, color="black")
