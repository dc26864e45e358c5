"""The comparison report from known runs: sections per budget, verdicts, failures, CSV and curves."""

import csv

from moe_gpt.compare.plan import Budget
from moe_gpt.compare.report import ReportContext, write_report
from tests.helpers import assert_drawn_plot

BUDGETS = [Budget("tokens"), Budget("time", 2.0)]


def finished(budget: str, variant: str, seed: int, val_loss: float) -> dict:
    history = [
        {"step": step, "tokens": 2048 * step, "seconds": 0.9 * step, "val_loss": val_loss + 1 / step}
        for step in (40, 80, 120)
    ]
    return {
        "budget": budget,
        "variant": variant,
        "seed": seed,
        "status": "ok",
        "params_total": 8.8e6 if variant != "dense" else 7.2e6,
        "params_active": 7.2e6,
        "train_gflops_per_token": 0.044,
        "steps": 120,
        "train_tokens": 245760,
        "train_seconds": 108.0,
        "val_loss": val_loss,
        "val_ppl": 2.718**val_loss,
        "tokens_per_sec": 2275.0,
        "mfu": None,
        "peak_memory_mb": 1200.0,
        "wall_time_s": 130.0,
        "val_history": history,
    }


def known_rows() -> list[dict]:
    """Under equal tokens MoE is better by 0.05 on every seed (with a little noise); under equal
    time the two are the same up to noise; one dense seed of the time budget failed."""
    noise = {1: 0.004, 2: -0.003, 3: 0.001}
    rows = [finished("tokens", "dense", s, 4.0 + noise[s]) for s in noise]
    rows += [finished("tokens", "moe-8-2", s, 3.95 + noise[s] + noise[s] / 4) for s in noise]
    rows += [finished("time-2min", "dense", s, 4.0 + noise[s]) for s in (1, 2)]
    rows.append(
        {"budget": "time-2min", "variant": "dense", "seed": 3, "status": "failed", "reason": "Diverged: loss | nan"}
    )
    rows += [finished("time-2min", "moe-8-2", s, 4.0 - noise[s]) for s in noise]
    return rows


def test_the_report_gives_each_budget_its_table_verdict_and_curves(tmp_path):
    for budget in BUDGETS:
        (tmp_path / budget.name).mkdir()
    context = ReportContext("python scripts/compare.py", "matched", [1, 2, 3], eval_data=None)
    printed = write_report(known_rows(), BUDGETS, tmp_path, context)
    report = (tmp_path / "report.md").read_text()
    tokens, time = report.split("## Equal time (2 min of training for each variant)")
    assert "## Equal tokens" in tokens and "| dense | 3/3 | 7.20 | 120 | 1.8 | 4.0007 ± 0.0035 |" in tokens
    assert "moe-8-2 beats dense: val loss lower by 0.0498 (95% CI" in tokens and "3 seeds" in tokens
    assert "| dense | 2/3 |" in time and "no difference shown between moe-8-2 and dense" in time
    assert "2 seeds" in time  # paired only over the seeds where both finished
    assert "held-out loss" not in report  # no --eval-data, no column
    for budget in BUDGETS:
        for name in ("val_loss_vs_tokens.png", "val_loss_vs_time.png"):
            assert_drawn_plot(tmp_path / budget.name / name)
            assert f"]({budget.name}/{name})" in report
    rows = list(csv.DictReader((tmp_path / "report.csv").open()))
    assert len(rows) == 12 and rows[8]["status"] == "failed" and rows[8]["reason"] == "Diverged: loss | nan"
    assert printed.endswith(f"{tmp_path / 'report.md'}\n{tmp_path / 'report.csv'}")


def test_one_seed_lists_every_run_with_its_numbers_and_a_failure_with_its_reason(tmp_path):
    (tmp_path / "tokens").mkdir()
    rows = [finished("tokens", "dense", 1, 4.0), finished("tokens", "moe-8-2", 1, 3.9)]
    rows[1]["held_out_loss"] = 5.25
    rows.append({"budget": "tokens", "variant": "moe-4-1", "seed": 1, "status": "failed", "reason": "a | b"})
    context = ReportContext("python scripts/compare.py", "matched", [1], eval_data="shakespeare")
    write_report(rows, BUDGETS[:1], tmp_path, context)
    report = (tmp_path / "report.md").read_text()
    assert "| dense | 7.20 | 7.20 | 0.0440 | 120 | 0.25 | 1.8 | 4.0000 |" in report
    assert "| held-out loss |" in report and "| 5.2500 |" in report and "| n/a |" in report  # dense has none
    assert "| moe-4-1 | failed: a \\| b |" in report  # a pipe in a reason does not split the cell
    assert "from one seed, so no confidence interval" in report
