"""Running a comparison's runs: each one ``train.py`` in its own process, and a time budget's step counts.

One process per run keeps peak memory per run (a comparison trains many models one after another)
and gives each run train.py's own records: ``metrics.json`` or ``failure.json`` in its folder. The
processes are forked from a server that imported train.py's modules once (moe_gpt/compare/run_process.py).
What a run prints goes to ``output.log`` in its folder; the console gets one line when it starts and one
when it ends (its val loss, or why it failed).
"""

from __future__ import annotations

import os
import re
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional

from moe_gpt.compare.plan import (
    Budget,
    PlannedRun,
    calibration_run,
    load_state,
    plan_run,
    save_state,
    seconds_per_step,
    steps_for_minutes,
    what_to_do,
)
from moe_gpt.compare.run_process import run_passing_signals_on, run_train_py
from moe_gpt.compare.variants import Variant
from moe_gpt.training.run_folder import folder_entries, run_outcome
from moe_gpt.training.summary import COMPARISON_ENV

OUTPUT_FILE = "output.log"  # in each run's folder: everything its train.py printed, every attempt
LOG_PREFIX = re.compile(r"^\[[^]]*\]\[[^]]*\]\[\w+\] - ")  # train.py's log line: [time][logger][LEVEL] -


def train_arguments(run: PlannedRun, resume: bool) -> list[str]:
    """train.py's arguments that train ``run`` into its folder (continuing its ``last.ckpt`` when ``resume``)."""
    extra = ["resume=last"] if resume else []
    return [*run.overrides, *extra, f"hydra.run.dir={run.run_dir}"]


def train(run: PlannedRun) -> dict[str, Any]:
    """Run train.py for ``run`` (or keep what it left, or resume it); its outcome.

    A stop signal that reaches this process (Interrupted) is passed on to the run, which saves
    ``last.ckpt`` and stops; then it is raised again, so a re-run resumes the run.
    """
    action = what_to_do(run)
    if action == "keep":
        print(f"[compare] keeping {run.run_dir} (finished earlier; delete the folder to retrain it)", flush=True)
        return run_outcome(run.run_dir)
    if action == "train":
        set_aside_an_earlier_attempt(run.run_dir)  # train.py refuses a folder with another attempt's files in it
    arguments = train_arguments(run, resume=action == "resume")
    print(f"[compare] {action} {run.run_dir}: {' '.join(arguments)}", flush=True)
    # Beside the folder while it trains: train.py accepts only an empty folder for a new run.
    output = run.run_dir.with_name(f".{run.run_dir.name}.{OUTPUT_FILE}")
    try:
        returncode = run_passing_signals_on(run_train_py, (arguments,), output)
    finally:
        kept = keep_output(output, run.run_dir)
    outcome = run_outcome(run.run_dir)
    if returncode != 0 and outcome["status"] == "incomplete":
        # Bad input writes no record (the run never claimed its folder), nor does a kill.
        outcome = {"status": "failed", "reason": why_it_ended(returncode, kept.read_text(errors="replace"))}
    print(ended_line(run.run_dir, outcome, kept), flush=True)
    return outcome


def ended_line(run_dir: Path, outcome: dict[str, Any], output: Path) -> str:
    if outcome["status"] == "ok":
        return f"[compare] finished {run_dir}: val loss {outcome['val_loss']:.4f} after {outcome['steps']} steps"
    return f"[compare] {outcome['status']} {run_dir}: {outcome['reason']} (its output: {output})"


def keep_output(output: Path, run_dir: Path) -> Path:
    """Append a run's output to ``output.log`` in its folder (made when train.py refused to claim it: a re-run
    sets such a folder aside); where it is now."""
    kept = run_dir / OUTPUT_FILE
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(kept, "ab") as file:
        file.write(output.read_bytes())
    output.unlink()
    return kept


@contextmanager
def runs_told_their_comparison(command: str) -> Iterator[None]:
    """Every run started inside the block knows the command of its comparison: its summary names it instead
    of train.py's own ``resume=last`` (the comparison resumes its runs itself)."""
    saved = os.environ.get(COMPARISON_ENV)
    os.environ[COMPARISON_ENV] = command
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(COMPARISON_ENV, None)
        else:
            os.environ[COMPARISON_ENV] = saved


def set_aside_an_earlier_attempt(run_dir: Path) -> Optional[Path]:
    """Move the files of an attempt that stopped before its first checkpoint out of the way (nothing is
    deleted); where they went, or None when ``run_dir`` holds nothing."""
    if not folder_entries(run_dir):
        return None
    attempt = 1
    while (aside := run_dir.with_name(f"{run_dir.name}.stopped-{attempt}")).exists():
        attempt += 1
    run_dir.rename(aside)
    print(f"[compare] {run_dir} holds an attempt that stopped before its first checkpoint: moved to {aside}", flush=True)
    return aside


def why_it_ended(returncode: int, output: str) -> str:
    """Why a run that wrote no record ended: the signal that killed it, or else its last line."""
    if returncode < 0:  # as a subprocess's: minus the signal
        name = signal.Signals(-returncode).name
        return f"train.py was killed by {name}; run the same command again to go on with it"
    return last_message(output)


def last_message(output: str) -> str:
    """The last non-empty line of a run's output, without the log line's prefix."""
    last = next((line for line in reversed(output.splitlines()) if line.strip()), "no output")
    return LOG_PREFIX.sub("", last)


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
    """Steps that take each variant ``budget.minutes`` of training, from its measured speed (its
    finished runs in ``done``, or a calibration run), chosen once per comparison folder (compare.json)
    so a re-run trains exactly the same runs; and the variants that could not be timed (their runs
    failed), with the reason."""
    state = load_state(out_dir)
    chosen = state["time_steps"].setdefault(budget.name, {})
    untimed = {}
    for variant in variants:
        if variant.name in chosen:
            continue
        finished = [row for row in done if row["variant"] == variant.name and row["status"] == "ok"]
        if not finished:
            timed = train(calibration_run(out_dir, variant, seed, base))
            if timed["status"] != "ok":
                untimed[variant.name] = f"could not time it: {timed['reason']}"
                continue
            finished = [timed]
        chosen[variant.name] = steps_for_minutes(budget.minutes, seconds_per_step(finished))
        print(f"[compare] {budget.name}: {variant.spec} gets {chosen[variant.name]} steps", flush=True)
    save_state(out_dir, state)
    return chosen, untimed
