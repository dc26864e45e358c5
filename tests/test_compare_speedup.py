"""compare.py's distillation variant, the share of the teacher's gain a student keeps, and the speed-up to the
first variant's final val loss: on synthetic histories, and in a tiny real comparison."""

import csv
import math

import pytest

from moe_gpt.cli.compare import main as compare_main
from moe_gpt.compare.distilled import gain_kept_sentences, share_kept
from moe_gpt.compare.plan import Budget, plan_run
from moe_gpt.compare.speedup import add_speedups, reach, speedup_table
from moe_gpt.compare.variants import parse_variants
from moe_gpt.compose import compose_run_config
from moe_gpt.config import ConfigError
from tests.conftest import REPO_ROOT
from tests.helpers import TINY
from tests.test_evaluate import TASK, TASKS

# val loss 4.0 -> 3.0 -> 2.0 at steps 10, 20, 30 (1,000 tokens and 2 seconds a step)
HISTORY = [{"step": s, "tokens": 1000 * s, "seconds": 2.0 * s, "val_loss": loss} for s, loss in ((10, 4.0), (20, 3.0), (30, 2.0))]


def test_the_point_a_curve_reaches_a_loss_is_interpolated_between_validations():
    assert reach(HISTORY, 2.5) == {"tokens": 25000.0, "steps": 25.0, "seconds": 50.0}
    assert reach(HISTORY, 3.0) == {"tokens": 20000.0, "steps": 20.0, "seconds": 40.0}
    assert reach(HISTORY, 5.0) == {"tokens": 10000.0, "steps": 10.0, "seconds": 20.0}  # at the first validation
    assert reach(HISTORY, 1.9) is None  # not reached


def run_row(variant, seed, history, **extra):
    last = history[-1]
    return {
        "variant": variant, "seed": seed, "status": "ok", "val_history": history, "val_loss": last["val_loss"],
        "steps": last["step"], "train_tokens": last["tokens"], "train_seconds": last["seconds"], **extra,
    }  # fmt: skip


def scaled(history, time_factor, loss_shift=0.0):
    """The same curve, ``time_factor`` times as fast (and ``loss_shift`` lower)."""
    return [
        {**p, "tokens": p["tokens"] / time_factor, "step": p["step"] / time_factor, "seconds": p["seconds"] / time_factor,
         "val_loss": p["val_loss"] + loss_shift}
        for p in history
    ]  # fmt: skip


def test_speedups_per_seed_their_mean_with_an_interval_and_not_reached():
    rows = [run_row("dense", seed, HISTORY) for seed in (1, 2, 3)]
    # twice as fast with seed 1, 3 with seed 2, 4 with seed 3 (extended to keep its length the same)
    rows += [run_row("moe", seed, scaled(HISTORY, factor)) for seed, factor in ((1, 2.0), (2, 3.0), (3, 4.0))]
    rows += [run_row("worse", seed, scaled(HISTORY, 1.0, loss_shift=0.5)) for seed in (1, 2, 3)]
    add_speedups(rows)
    assert [row["speedup_tokens"] for row in rows[:3]] == [1.0, 1.0, 1.0]
    assert [row["speedup_seconds"] for row in rows[3:6]] == pytest.approx([2.0, 3.0, 4.0])
    assert [row["steps_to_target"] for row in rows[3:6]] == pytest.approx([15.0, 10.0, 7.5])
    assert all(row["speedup_steps"] is None and row["tokens_to_target"] is None for row in rows[6:])
    table = speedup_table(rows)
    assert "| moe | 3/3 seeds | 0.011 | 3.00x (0.52 to 5.48) |" in table
    assert "| worse | 0/3 seeds | not reached |" in table
    assert "≥" not in table


def test_a_target_reached_at_the_first_validation_gives_a_speed_up_marked_as_a_lower_bound():
    rows = [run_row("dense", seed, HISTORY) for seed in (1, 2)]
    rows += [run_row("student", seed, scaled(HISTORY, 1.0, loss_shift=-2.5)) for seed in (1, 2)]  # 1.5 at step 10
    add_speedups(rows)
    assert [row["reached_at_first_validation"] for row in rows] == [False, False, True, True]
    assert rows[2]["speedup_steps"] == 3.0  # 30 steps against at most 10
    table = speedup_table(rows)
    assert "| student | 2/2 seeds | ≤0.010 | ≥3.00x (3.00 to 3.00) |" in table
    assert "already at the target at its first validation" in table


def test_a_run_whose_last_step_is_no_validation_step_ends_its_curve_at_its_final_loss():
    baseline = run_row("dense", 1, HISTORY)
    baseline.update(steps=35, train_tokens=35000, train_seconds=70.0, val_loss=1.5)  # validated once more at the end
    candidate = run_row("moe", 1, scaled(HISTORY, 1.0, loss_shift=-0.5))  # reaches 1.5 at its last validation
    add_speedups([baseline, candidate])
    assert baseline["steps_to_target"] == 35 and candidate["steps_to_target"] == 30
    assert candidate["speedup_tokens"] == pytest.approx(35 / 30)


def final_losses(**by_variant: tuple[float, ...]) -> list[dict]:
    """Report rows of seeds 1, 2, 3 with these final val losses (``student`` is the variant distill-moe)."""
    return [
        {"variant": "distill-moe" if name == "student" else name, "seed": seed, "status": "ok", "val_loss": value}
        for name, values in by_variant.items()
        for seed, value in zip((1, 2, 3), values)
    ]


def test_the_share_of_the_teachers_gain_a_student_keeps_per_seed_and_its_interval():
    assert share_kept(dense=4.0, teacher=3.0, student=3.7) == pytest.approx(0.3)
    assert math.isnan(share_kept(dense=3.0, teacher=3.0, student=2.9))
    rows = final_losses(dense=(4.0, 4.1, 3.9), moe=(3.0, 3.1, 2.9), student=(3.7, 3.6, 3.7))
    (sentence,) = gain_kept_sentences(rows, {"distill-moe": "moe"})
    assert sentence.startswith("distill-moe keeps 33% of moe's val-loss gain over dense (95% CI")
    assert sentence.endswith("3 seeds; per seed: 30%, 50%, 20%)")


def test_seeds_where_the_teacher_is_no_better_than_dense_have_no_gain_to_keep_and_are_left_out():
    rows = final_losses(dense=(4.0, 4.0, 4.0), moe=(3.0, 4.2, 3.0), student=(3.7, 3.9, 3.5))
    (sentence,) = gain_kept_sentences(rows, {"distill-moe": "moe"})
    assert sentence.startswith("distill-moe keeps 40% of moe's val-loss gain over dense (95% CI")
    assert sentence.endswith("3 seeds; moe no better than dense in 1 of them; per seed: 30%, n/a, 50%)")
    for row in rows[3:6]:
        row["val_loss"] = 4.5
    (sentence,) = gain_kept_sentences(rows, {"distill-moe": "moe"})
    assert sentence == "distill-moe: moe is no better than dense in any seed, so there is no gain to keep"


def test_a_distill_variant_is_a_dense_student_taught_by_an_earlier_variants_run_of_the_same_seed(tmp_path):
    dense, moe, student = parse_variants(["dense", "moe:4:2", "distill:moe:4:2:alpha=0.7"], 32, "active")
    assert (student.name, student.teacher_variant) == ("distill-moe-4-2-alpha-0.7", "moe-4-2")
    assert student.overrides == ["model=dense", "distill.alpha=0.7"]
    run = plan_run(tmp_path, Budget("tokens"), student, 8, ["logger=none"], None)
    teacher = tmp_path / "tokens" / "moe-4-2" / "seed-8" / "checkpoints" / "best.ckpt"
    assert run.overrides[-1] == f"distill.teacher={teacher}"


def test_a_taught_variant_gathered_from_its_teachers_experts_composes_before_its_teacher_is_trained():
    *_, student = parse_variants(["dense", "moe:4:2", "distill:moe:4:2:init=experts"], 32, "active")
    config = compose_run_config(TINY + student.shared_overrides)  # what compare.py composes before any run
    assert (config.distill.init, config.distill.teacher, config.model.use_moe) == ("experts", "moe-4-2", False)


def test_a_student_that_cannot_be_gathered_from_its_teacher_variant_is_one_line_before_anything_trains(tmp_path, capsys):
    out = tmp_path / "report"
    args = ["--out", str(out), "--variants", "dense,moe:4:2:swish,distill:moe:4:2:swish:init=experts", *TINY]
    assert compare_main(args) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert "variant 'distill:moe:4:2:swish:init=experts'" in line and "activation=swish" in line, line
    assert not out.exists()


def test_a_distill_variant_takes_a_checkpoint_or_a_run_folder_and_refuses_a_teacher_that_is_neither(
    tiny_moe_checkpoint, tmp_path
):
    run_folder = tiny_moe_checkpoint.parent.parent
    (from_file,) = parse_variants([f"distill:{tiny_moe_checkpoint}"], 32, "active")
    assert from_file.name == f"distill-{run_folder.name}" and from_file.teacher_variant is None
    assert from_file.overrides == ["model=dense", f"distill.teacher={tiny_moe_checkpoint.resolve()}"]
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "best.ckpt").write_bytes(b"read by train.py, not here")
    (best,) = parse_variants([f"distill:{tmp_path}:temperature=4"], 32, "active")
    assert best.overrides[-1] == f"distill.teacher={tmp_path.resolve() / 'checkpoints' / 'best.ckpt'}"
    with pytest.raises(ConfigError, match="the teacher 'moe:8:2' is neither an earlier variant nor a checkpoint"):
        parse_variants(["dense", "distill:moe:8:2", "moe:8:2"], 32, "active")  # the teacher must come first


@pytest.mark.slow  # six runs of train.py, each scored by lm-eval
@pytest.mark.timeout(900)  # on a busy 2-core machine the MoE runs alone took 50 s
def test_a_tiny_three_way_comparison_reports_speed_ups_the_gain_kept_and_scores_that_a_rerun_reads_back(
    tmp_path, corpus_overrides, capsys, monkeypatch
):
    monkeypatch.chdir(REPO_ROOT)  # lm-eval reads the tiny task's data_files relative to the working directory
    out = tmp_path / "report"
    student = "distill-moe-4-2-init-experts"
    args = ["--out", str(out), "--variants", "dense,moe:4:2,distill:moe:4:2:init=experts", "--seeds", "2"]
    args += ["--eval-tasks", TASK, "--eval-include-path", str(TASKS)]
    short = ["logger=none", "trainer.max_steps=4", "trainer.val_check_interval=2"]
    assert compare_main(args + TINY + corpus_overrides + short) == 0
    printed, noted = capsys.readouterr()
    rows = list(csv.DictReader((out / "report.csv").open()))
    assert [(row["variant"], row["status"]) for row in rows] == [
        (variant, "ok") for variant in ("dense", "moe-4-2", student) for _ in (1, 2)
    ]
    for row in rows:
        assert {"tokens_to_target", "steps_to_target", "seconds_to_target", "speedup_tokens"} <= row.keys()
    assert all(float(row["speedup_steps"]) == 1.0 for row in rows[:2])
    overrides = (out / "tokens" / student / "seed-1338" / ".hydra" / "overrides.yaml").read_text()
    assert str(out / "tokens" / "moe-4-2" / "seed-1338" / "checkpoints" / "best.ckpt") in overrides
    assert "in 2 slice(s)" in (out / "tokens" / student / "seed-1338" / "train.log").read_text()  # 64-wide experts
    report = (out / "report.md").read_text()
    assert "Speed-up to the first variant's final val loss" in report and f"| {student} |" in report
    # 4 steps are too few for the teacher to beat dense reliably: either sentence is the report's
    assert f"- {student} keeps" in report or f"- {student}: moe-4-2 is no better than dense" in report
    assert "Speed-up to the first variant's final val loss" in printed

    assert f"| variant | {TASK} acc (mean ± std) | {TASK} acc_norm (mean ± std) |" in report
    assert f"lm-eval {TASK} acc" in report and "2 seeds" in report
    scored = sorted(out.glob("tokens/*/seed-*/lm_eval/results.json"))
    assert len(scored) == 6
    assert "it/s]" not in printed + noted  # lm-eval's progress bars are in each run's lm_eval/output.log
    assert "it/s]" in (out / "tokens" / "dense" / "seed-1337" / "lm_eval" / "output.log").read_text()
    stamps = {path: path.stat().st_mtime_ns for path in scored}
    assert compare_main(args + TINY + corpus_overrides + short) == 0
    assert {path: path.stat().st_mtime_ns for path in scored} == stamps  # read back, not evaluated again
    assert (out / "report.md").read_text() == report
