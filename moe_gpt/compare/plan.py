"""What a comparison trains, and which of its runs a re-run can keep.

A comparison trains every variant with every seed under every budget:

- ``tokens``: every variant trains the configured ``trainer.max_steps`` (equal tokens);
- ``time=<minutes>``: every variant trains for that many minutes of training (validation excluded).
  The step count comes from the variant's own measured speed (its token-budget runs, or a short
  calibration run), so each run still completes its learning-rate schedule; the table shows the
  steps and training time each variant got.

Each run has its own folder ``<out>/<budget>/<variant>/seed-<s>/``. When a comparison is run again
into the same folder, a finished run is kept, an interrupted one resumes from its ``last.ckpt``,
and a run recorded with different settings stops the comparison (nothing is overwritten).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import yaml

from moe_gpt.compose import override_key
from moe_gpt.config import ConfigError
from moe_gpt.training.run_folder import (
    FolderRefused,
    checkpoint_path,
    has_checkpoints,
    is_locked,
    read_record,
    run_outcome,
    write_json,
)
from moe_gpt.compare.variants import Variant

BUDGET_FORMAT = "'tokens' or 'time=<minutes>', e.g. --budget tokens --budget time=5"
CALIBRATION_STEPS = 20  # steps timed to learn a variant's speed when no token-budget run has
STATE_FILE = "compare.json"  # the step counts chosen for time budgets, so a re-run trains the same runs


@dataclass(frozen=True)
class Budget:
    kind: str  # tokens | time
    minutes: Optional[float] = None

    @property
    def name(self) -> str:
        return "tokens" if self.kind == "tokens" else f"time-{self.minutes:g}min"

    @property
    def title(self) -> str:
        if self.kind == "tokens":
            return "Equal tokens"
        return f"Equal time ({self.minutes:g} min of training for each variant)"


def parse_budget(spec: str) -> Budget:
    if spec == "tokens":
        return Budget("tokens")
    kind, _, value = spec.partition("=")
    try:
        minutes = float(value)
    except ValueError:
        minutes = math.nan
    if kind != "time" or not (math.isfinite(minutes) and minutes > 0):
        raise ConfigError(f"budget {spec!r} is not {BUDGET_FORMAT} (minutes above 0)")
    return Budget("time", minutes)


def parse_budgets(specs: list[str]) -> list[Budget]:
    # Equal tokens first: its runs time each variant for the time budgets.
    budgets = sorted(dict.fromkeys(parse_budget(spec) for spec in specs), key=lambda budget: budget.kind != "tokens")
    if not budgets:
        raise ConfigError(f"no budget given; use {BUDGET_FORMAT}")
    return budgets


@dataclass(frozen=True)
class PlannedRun:
    budget: Budget
    variant: Variant
    seed: int
    run_dir: Path
    overrides: list[str]  # train.py's overrides for this run (its folder and resume excepted)


def plan_run(
    out_dir: Path, budget: Budget, variant: Variant, seed: int, base: list[str], steps: Optional[int]
) -> PlannedRun:
    """One run; ``steps`` replaces trainer.max_steps (time budgets)."""
    overrides = [*base, *variant.overrides, f"seed={seed}"]
    if steps is not None:
        overrides.append(f"trainer.max_steps={steps}")
    if variant.teacher_variant is not None:  # distill:<variant>: its run of this budget and seed, trained before
        teacher = checkpoint_path(run_folder(out_dir, budget, variant.teacher_variant, seed), "best.ckpt")
        overrides.append(f"distill.teacher={teacher}")
    return PlannedRun(budget, variant, seed, run_folder(out_dir, budget, variant.name, seed), overrides)


def run_folder(out_dir: Path, budget: Budget, variant_name: str, seed: int) -> Path:
    return out_dir / budget.name / variant_name / f"seed-{seed}"


def calibration_run(out_dir: Path, variant: Variant, seed: int, base: list[str]) -> PlannedRun:
    """A short run that times a variant's training steps (for a time budget without a token-budget run)."""
    overrides = [*base, *variant.overrides, f"seed={seed}", f"trainer.max_steps={CALIBRATION_STEPS}", "logger=none"]
    return PlannedRun(Budget("tokens"), variant, seed, out_dir / "calibration" / variant.name, overrides)


def seconds_per_step(finished: list[dict[str, Any]]) -> float:
    """Median over finished runs of the training seconds one optimizer step took (this session's
    tokens/s, so a resumed run counts only the steps it timed)."""
    return statistics.median((run["train_tokens"] / run["steps"]) / run["tokens_per_sec"] for run in finished)


def steps_for_minutes(minutes: float, step_seconds: float) -> int:
    return max(1, round(60 * minutes / step_seconds))


def what_to_do(run: PlannedRun) -> str:
    """``train`` (nothing there), ``keep`` (finished, or failed: a re-run would fail the same way),
    or ``resume`` (interrupted or killed after a checkpoint)."""
    if not run.run_dir.is_dir():
        return "train"
    if is_locked(run.run_dir):
        raise FolderRefused(
            f"a process is training in {run.run_dir} right now (a run left by a compare.py that was killed?); "
            "wait for it to finish, then run the same command again"
        )
    recorded = recorded_overrides(run.run_dir)
    if recorded is not None and by_key(recorded) != by_key(run.overrides):
        was, now = by_key(recorded), by_key(run.overrides)
        changed = [
            f"{now.get(key, key + ' unset')} (was {was.get(key, 'unset')})"
            for key in {**was, **now}
            if was.get(key) != now.get(key)
        ]
        raise ConfigError(
            f"{run.run_dir} holds a run with other settings: {', '.join(changed)}; "
            "choose a new --out, or delete that folder to retrain it"
        )
    status = run_outcome(run.run_dir)["status"]
    if status in ("ok", "failed"):
        return "keep"
    return "resume" if has_checkpoints(run.run_dir) else "train"


def by_key(overrides: list[str]) -> dict[str, str]:
    """What a list of overrides sets, key by key (the last one wins, as in Hydra)."""
    return {override_key(override): override for override in overrides}


def recorded_overrides(run_dir: Path) -> Optional[list[str]]:
    """The overrides train.py recorded for the run in ``run_dir`` (``resume`` left out), if it got that far."""
    path = run_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return None
    return [item for item in yaml.safe_load(path.read_text()) or [] if override_key(item) != "resume"]


def load_state(out_dir: Path) -> dict[str, Any]:
    path = out_dir / STATE_FILE
    return read_record(path) if path.is_file() else {"time_steps": {}}


def save_state(out_dir: Path, state: dict[str, Any]) -> None:
    write_json(out_dir / STATE_FILE, state)
