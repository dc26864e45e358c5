"""scripts/compare.py: variant parsing, active-parameter matching, and a tiny real comparison.

The command runs in-process (``moe_gpt.cli.compare.main(argv)``), except where a signal to compare.py
is the subject; it still starts one train.py process per run, by design.
"""

import csv
import json
import signal
import subprocess
import sys
import time

import pytest

from moe_gpt.cli.compare import main as compare_main
from moe_gpt.model.analysis import parameter_counts
from moe_gpt.compare.plan import (
    Budget,
    parse_budgets,
    plan_run,
    seconds_per_step,
    steps_for_minutes,
    what_to_do,
)
from moe_gpt.compose import compose_run_config, merge_overrides
from moe_gpt.config import ConfigError
from moe_gpt.training.run_folder import folder_lock, write_json
from moe_gpt.compare.variants import parse_variant, parse_variants
from tests.helpers import REPO, TINY


def test_dense_variant_is_the_dense_model():
    assert parse_variant("dense", 128, "active").overrides == ["model=dense"]


def test_moe_variant_sets_experts_top_k_activation_and_matched_width():
    variant = parse_variant("moe:8:2:swish", 128, "active")
    assert variant.name == "moe-8-2-swish"
    assert variant.overrides == [
        "model=moe",
        "model.moe.num_experts=8",
        "model.moe.top_k=2",
        "model.moe.activation=swish",
        "model.moe.hidden_size=256",
    ]
    assert "model.moe.hidden_size=256" not in parse_variant("moe:8:2", 128, "none").overrides


@pytest.mark.parametrize("spec", ["moe", "moe:8", "moe:x:2", "sparse:8:2"])
def test_malformed_variant_is_an_error(spec):
    with pytest.raises(ConfigError, match="moe:E:K"):
        parse_variant(spec, 128, "active")


@pytest.mark.parametrize(
    "spec,message",
    [
        ("moe:8:2:gelu:extra", "neither an activation"),
        ("moe:8:2:num_experts=4", "not a model.moe key to set here"),
        ("moe:8:2:expert_count=4", "not a model.moe key"),
        ("moe:8:2:num_shared_experts=x", "must be a whole number"),
        ("moe:8:3:num_shared_experts=0", "not divisible by the 3 experts"),
    ],
)
def test_bad_variant_options_are_errors_naming_the_option(spec, message):
    with pytest.raises(ConfigError, match=message):
        parse_variant(spec, 128, "active")


def test_variant_options_become_moe_overrides_and_shared_experts_count_in_the_matched_width():
    variant = parse_variant("moe:16:3:swish:num_shared_experts=1:router=sigmoid", 128, "active")
    assert variant.name == "moe-16-3-swish-num_shared_experts-1-router-sigmoid"
    assert variant.overrides[3:] == [
        "model.moe.activation=swish",
        "model.moe.num_shared_experts=1",
        "model.moe.router=sigmoid",
        "model.moe.hidden_size=128",  # 4 * 128 / (3 routed + 1 shared)
    ]


@pytest.mark.parametrize("spec", ["moe:4:1", "moe:8:2", "moe:16:4", "moe:32:8", "moe:15:3:num_shared_experts=1"])
def test_matched_variants_have_the_dense_active_parameter_count(spec):
    dense = compose_run_config(["model=dense"]).model
    moe = compose_run_config(parse_variant(spec, dense.n_embd, "active").overrides).model
    router = moe.n_layer * moe.n_embd * moe.moe.num_experts
    active_experts = moe.moe.top_k + moe.moe.num_shared_experts
    extra_output_biases = moe.n_layer * (active_experts - 1) * moe.n_embd  # each active expert has its own
    assert (
        parameter_counts(moe)["params_active"]
        == parameter_counts(dense)["params_active"] + router + extra_output_biases
    )


def test_user_overrides_replace_defaults_for_the_same_key():
    merged = merge_overrides(
        ["trainer.max_steps=100", "trainer.limit_val_batches=10"], ["trainer.max_steps=7", "data=text"]
    )
    assert merged == ["trainer.limit_val_batches=10", "trainer.max_steps=7", "data=text"]


def compare_command(out, *args) -> list[str]:
    return [sys.executable, str(REPO / "scripts" / "compare.py"), "--out", str(out), *args]


def run_compare(capsys, out, *args) -> tuple[int, str, str]:
    """compare.py's main in-process; its exit code, stdout and stderr."""
    code = compare_main(["--out", str(out), *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def report_rows(out) -> list[dict]:
    return list(csv.DictReader((out / "report.csv").open()))


@pytest.mark.slow
def test_tiny_comparison_writes_report_table_and_plots(tmp_path, corpus_overrides, capsys):
    out = tmp_path / "report"
    variants = "dense,moe:4:2,moe:3:1:num_shared_experts=1:router=sigmoid"
    code, _, stderr = run_compare(capsys, out, "--variants", variants, *TINY, *corpus_overrides, "logger=csv")
    assert code == 0, stderr[-3000:]
    rows = report_rows(out)
    shared = "moe-3-1-num_shared_experts-1-router-sigmoid"
    assert [(r["budget"], r["variant"], r["status"]) for r in rows] == [
        ("tokens", "dense", "ok"),
        ("tokens", "moe-4-2", "ok"),
        ("tokens", shared, "ok"),
    ]
    assert rows[0]["params_active"] == rows[0]["params_total"] and rows[1]["params_active"] < rows[1]["params_total"]
    # Matched: the shared variant's 1 routed + 1 shared expert hold the dense FFN's weights (+ router, biases).
    assert abs(int(rows[2]["params_active"]) - int(rows[0]["params_active"])) < 0.01 * int(rows[0]["params_active"])
    for name in (
        "report.md",
        "tokens/val_loss_vs_tokens.png",
        "tokens/val_loss_vs_time.png",
        "usage_moe-4-2.png",
        f"usage_{shared}.png",
        "tokens/dense/seed-1337/metrics.json",
    ):
        assert (out / name).is_file(), name
    report = (out / "report.md").read_text()
    assert "## Equal tokens" in report and "| moe-4-2 |" in report and "| MFU |" in report
    # Each run is forked from a server that imported Lightning before logging was set up: its log is still
    # a fresh train.py's, Lightning's own lines included, each once.
    log = (out / "tokens/dense/seed-1337/train.log").read_text()
    assert log.count("Seed set to 1337") == 1 and log.count("`Trainer.fit` stopped") == 1


@pytest.mark.slow
def test_a_run_of_two_processes_trains_from_the_forked_train_py_as_from_a_fresh_one(tmp_path, corpus_overrides, capsys):
    # Lightning starts the second process by running sys.argv again: the forked run must hand it train.py's.
    out = tmp_path / "report"
    two = ["trainer.devices=2", "trainer.strategy=ddp", "data.batch_size=2", "trainer.max_steps=2"]
    code, _, stderr = run_compare(capsys, out, "--variants", "dense", *TINY, *corpus_overrides, *two, "logger=none")
    assert code == 0, stderr[-3000:]
    [row] = report_rows(out)
    assert row["status"] == "ok" and int(row["train_tokens"]) == 2 * 2 * 2 * 32  # steps x processes x batch x block
    output = (out / "tokens/dense/seed-1337/output.log").read_text()
    assert "GLOBAL_RANK: 0, MEMBER: 1/2" in output and "GLOBAL_RANK: 1, MEMBER: 2/2" in output


@pytest.mark.slow
def test_a_variant_that_diverges_is_reported_with_the_reason_train_py_recorded(tmp_path, corpus_overrides, capsys):
    out = tmp_path / "report"
    variants = "dense,moe:4:2:z_loss_coef=1e300"  # an infinite training loss at the first step
    code, stdout, stderr = run_compare(capsys, out, "--variants", variants, *TINY, *corpus_overrides, "logger=none")
    assert code == 0, stderr[-3000:]  # a failed variant is a row of the report, not a crash
    rows = report_rows(out)
    assert [(r["variant"], r["status"]) for r in rows] == [("dense", "ok"), ("moe-4-2-z_loss_coef-1e300", "failed")]
    failure = out / "tokens" / "moe-4-2-z_loss_coef-1e300" / "seed-1337" / "failure.json"
    recorded = json.loads(failure.read_text())["reason"]
    assert recorded.startswith("training diverged") and recorded in (out / "report.md").read_text()
    # Two lines per run on the console (started, and finished or failed); each run's own output in its folder.
    dense = out / "tokens" / "dense" / "seed-1337"
    console = stdout[: stdout.index("## ")].splitlines() if "## " in stdout else stdout.splitlines()
    runs = [line for line in console if line.startswith("[compare] ")]
    assert len(runs) == 4 and runs[1].startswith(f"[compare] finished {dense}: val loss ")
    assert runs[3].startswith(f"[compare] failed {failure.parent}: Diverged: training diverged")
    assert "run finished" not in stdout + stderr and "Trainable params" not in stdout + stderr
    assert "run finished" in (dense / "output.log").read_text()
    assert f"continue: python scripts/compare.py --out {out} " in (dense / "summary.txt").read_text()


@pytest.mark.slow
def test_seeds_a_time_budget_and_held_out_data_give_verdicts_and_a_rerun_keeps_finished_runs(
    tmp_path, corpus_overrides, capsys
):
    # The time budget: each variant's speed is measured first, then every seed trains the steps it gives. The
    # equal-tokens budget runs in the other comparisons here; a report with both: test_comparison_report.py.
    out, held_out = tmp_path / "report", tmp_path / "held_out.txt"
    held_out.write_text((REPO / "README.md").read_text())
    args = ["--variants", "dense,moe:4:2", "--seeds", "2", "--budget", "time=0.05"]
    args += ["--eval-data", str(held_out), *TINY, *corpus_overrides, "logger=none", "seed=7"]
    code, _, stderr = run_compare(capsys, out, *args)
    assert code == 0, stderr[-3000:]
    rows = report_rows(out)
    time_budget_steps = json.loads((out / "compare.json").read_text())["time_steps"]["time-0.05min"]
    assert [(r["budget"], r["variant"], r["seed"], r["status"]) for r in rows] == [
        ("time-0.05min", variant, seed, "ok") for variant in ("dense", "moe-4-2") for seed in ("7", "8")
    ]
    assert rows[0]["val_loss"] != rows[1]["val_loss"]  # the seeds really differ
    assert all(row["held_out_loss"] for row in rows)
    for row in rows:  # every time-budget run trained the steps its variant's measured speed gives
        assert int(row["steps"]) == time_budget_steps[row["variant"]]
    for seed in (7, 8):
        overrides = (out / "time-0.05min" / "moe-4-2" / f"seed-{seed}" / ".hydra" / "overrides.yaml").read_text()
        assert f"seed={seed}" in overrides
    report = (out / "report.md").read_text()
    assert "## Equal time (0.05 min of training for each variant)" in report and "## Equal tokens" not in report
    assert "| dense | 2/2 |" in report and "val loss (mean ± std)" in report and "held-out loss (mean ± std)" in report
    assert "95% CI" in report and "2 seeds" in report and "held-out loss on" in report
    assert (out / "time-0.05min" / "val_loss_vs_time.png").is_file() and (out / "usage_moe-4-2.png").is_file()

    code, stdout, stderr = run_compare(capsys, out, *args)
    assert code == 0, stderr[-3000:]
    assert stdout.count("[compare] keeping") == 4 and "train.py" not in stdout
    assert report_rows(out) == rows

    code, _, stderr = run_compare(capsys, out, *args, "model.dropout=0.1")
    assert code == 2 and len(stderr.strip().splitlines()) == 1
    assert "holds a run with other settings: model.dropout=0.1 (was unset); choose a new --out" in stderr


@pytest.mark.slow
def test_a_stopped_comparison_resumes_its_interrupted_run_when_run_again(
    tmp_path, corpus_overrides, capsys, monkeypatch
):
    out = tmp_path / "report"
    args = ["--variants", "dense", *TINY, *corpus_overrides, "logger=none", "trainer.max_steps=30"]
    args += ["checkpoint.every_n_steps=5"]
    # Started from another folder with a relative --out: the runs go where the report goes.
    process = subprocess.Popen(
        compare_command("report", *args), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    last = out / "tokens" / "dense" / "seed-1337" / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 300
    while not last.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)  # to compare.py only: it passes the signal on to the run
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 143, stderr[-3000:]
    assert "run the same command again" in stderr.strip().splitlines()[-1]
    stopped = json.loads((last.parent.parent / "failure.json").read_text())
    assert stopped["status"] == "interrupted" and 0 < stopped["step"] < 30

    monkeypatch.chdir(tmp_path)  # the same relative --out, in-process
    code, stdout, stderr = run_compare(capsys, "report", *args)
    assert code == 0, stderr[-3000:]
    assert "[compare] resume" in stdout and "resume=last" in stdout
    assert [(r["status"], r["steps"]) for r in report_rows(out)] == [("ok", "30")]


def test_zero_seeds_is_a_one_line_error(tmp_path, capsys):
    code, _, stderr = run_compare(capsys, tmp_path / "r", "--seeds", "0")
    assert code == 2 and stderr.strip().splitlines() == [
        "error: compare.seeds=0 (--seeds) must be at least 1; 3 or more give a confidence interval worth reading"
    ]
    assert not (tmp_path / "r").exists()


def test_comparison_refuses_a_non_empty_output_directory(tmp_path, capsys):
    (tmp_path / "report.md").write_text("an earlier report")
    code, _, stderr = run_compare(capsys, tmp_path)
    assert code == 2 and "is not empty and holds no comparison" in stderr
    assert (tmp_path / "report.md").read_text() == "an earlier report"


def test_a_comparison_folder_another_compare_is_writing_is_refused(tmp_path, capsys):
    out = tmp_path / "report"
    out.mkdir()
    (out / "compare.json").write_text('{"time_steps": {}}')  # as the live comparison marked it
    # An flock conflicts between two opened files even within one process: this is the live compare.py's lock.
    with folder_lock(out, busy_message="held"):
        code, stdout, stderr = run_compare(capsys, out, "--variants", "dense")
    assert code == 2 and stderr.strip().splitlines() == [
        f"error: another compare.py is writing {out} right now; wait for it or choose another --out"
    ]
    assert "[compare]" not in stdout and sorted(path.name for path in out.iterdir()) == [".lock", "compare.json"]


def test_a_rerun_keeps_failed_runs_and_reports_their_recorded_reasons_without_training(tmp_path, capsys):
    out = tmp_path / "report"
    out.mkdir()
    (out / "compare.json").write_text('{"time_steps": {}}')  # an earlier comparison into this folder
    reasons = {"dense": "training diverged at step 3", "moe-4-2": "out of memory"}
    for variant, reason in reasons.items():
        run_dir = out / "tokens" / variant / "seed-1337"
        run_dir.mkdir(parents=True)
        write_json(run_dir / "failure.json", {"status": "failed", "error_type": "Diverged", "reason": reason})
    code, stdout, stderr = run_compare(capsys, out, "--variants", "dense,moe:4:2")
    assert code == 0, stderr
    assert stdout.count("[compare] keeping") == 2 and "train.py" not in stdout  # a re-run would fail the same way
    assert [(row["variant"], row["status"], row["reason"]) for row in report_rows(out)] == [
        (variant, "failed", f"Diverged: {reason}") for variant, reason in reasons.items()
    ]
    assert "Diverged: out of memory" in (out / "report.md").read_text()


def test_zero_experts_or_top_k_in_a_variant_is_an_error():
    for spec in ("moe:0:1", "moe:8:0"):
        with pytest.raises(ConfigError, match="at least 1"):
            parse_variant(spec, 128, "active")


@pytest.mark.parametrize(
    "args, message",
    [
        (["--variants", "dense,moe:4:1,dense"], "give at least one, and each once"),
        (["model.moe.nope=1"], "nope"),
        (["--budget", "time=0"], "budget 'time=0' is not 'tokens' or 'time=<minutes>'"),
        (["--budget", "steps=100"], "budget 'steps=100' is not"),
        (["--eval-data", "no_such_corpus"], "--eval-data no_such_corpus: neither a data option (fineweb_edu,"),
        (["experiment=no_such_preset"], "no_such_preset"),
    ],
)
def test_bad_comparison_input_is_one_line_and_creates_nothing(tmp_path, args, message, capsys):
    out = tmp_path / "report"
    code, _, stderr = run_compare(capsys, out, *args)
    assert code == 2 and message in stderr
    assert len(stderr.strip().splitlines()) == 1 and not out.exists()


@pytest.mark.parametrize("spec", ["moe:4:1", "moe:8:2", "moe:7:1:num_shared_experts=1"])
def test_total_matching_gives_moe_the_dense_models_parameters(spec):
    dense = compose_run_config(["model=dense"]).model
    variant = parse_variant(spec, dense.n_embd, "total")
    moe = compose_run_config(variant.overrides).model
    experts = moe.moe.num_experts + moe.moe.num_shared_experts
    assert moe.moe.hidden_size == 4 * dense.n_embd // experts
    router = moe.n_layer * moe.n_embd * moe.moe.num_experts
    extra_output_biases = moe.n_layer * (experts - 1) * moe.n_embd  # each expert has its own
    assert (
        parameter_counts(moe)["params_total"] == parameter_counts(dense)["params_total"] + router + extra_output_biases
    )
    assert parameter_counts(moe)["params_active"] < parameter_counts(dense)["params_active"]


def test_budgets_parse_with_equal_tokens_first_and_time_budgets_get_steps_from_measured_speed():
    budgets = parse_budgets(["time=2.5", "tokens", "tokens"])
    assert [budget.name for budget in budgets] == ["tokens", "time-2.5min"]
    assert budgets[1].minutes == 2.5
    finished = [{"train_tokens": 2048 * 10, "steps": 10, "tokens_per_sec": 2048 / s} for s in (0.5, 0.6, 2.0)]
    assert seconds_per_step(finished) == pytest.approx(0.6)  # the median: one slow run does not decide
    assert steps_for_minutes(2.5, 0.6) == 250 and steps_for_minutes(0.001, 10.0) == 1


def test_every_preset_composes_and_its_variants_parse():
    for preset in sorted(path.stem for path in (REPO / "configs" / "experiment").glob("*.yaml")):
        run = compose_run_config([f"experiment={preset}"])
        variants = parse_variants(run.compare.variants, run.model.n_embd, run.compare.match)
        assert parse_budgets(run.compare.budgets) and len(variants) >= 2, preset
        for variant in variants:
            compose_run_config([f"experiment={preset}", *variant.overrides])  # every run's config validates


def test_the_gpu_preset_is_gpt2_small_on_a_hub_corpus_and_the_cpu_preset_has_error_bars():
    gpu = compose_run_config(["experiment=dense_vs_moe_gpu"])
    assert (gpu.model.n_layer, gpu.model.n_embd, gpu.model.block_size) == (12, 768, 1024)
    assert gpu.trainer.accelerator == "gpu" and gpu.data.corpus == "hub"
    cpu = compose_run_config(["experiment=dense_vs_moe_cpu"])
    assert cpu.trainer.accelerator == "cpu" and cpu.data.corpus == "stdlib" and cpu.compare.seeds >= 3
    assert {budget.kind for budget in parse_budgets(cpu.compare.budgets)} == {"tokens", "time"}


def test_a_comparison_refuses_a_folder_that_holds_a_run_with_other_settings(tmp_path):
    run = plan_run(tmp_path, Budget("tokens"), parse_variant("dense", 128, "active"), 1, ["trainer.max_steps=5"], None)
    (run.run_dir / ".hydra").mkdir(parents=True)
    (run.run_dir / ".hydra" / "overrides.yaml").write_text("- trainer.max_steps=9\n- model=dense\n- seed=1\n")
    with pytest.raises(ConfigError, match=r"trainer.max_steps=5 \(was trainer.max_steps=9\)"):
        what_to_do(run)
    (run.run_dir / ".hydra" / "overrides.yaml").write_text("- trainer.max_steps=5\n- model=dense\n- seed=1\n")
    assert what_to_do(run) == "train"  # the same settings, nothing recorded yet


def test_a_run_folder_in_use_stops_the_comparison_before_anything_trains(tmp_path):
    run = plan_run(tmp_path, Budget("tokens"), parse_variant("dense", 128, "active"), 1, ["seed=1"], None)
    with folder_lock(run.run_dir, busy_message="held by a run"):  # as a train.py left by a killed compare.py
        with pytest.raises(ConfigError, match="a process is training in .* right now"):
            what_to_do(run)
    assert what_to_do(run) == "train"


@pytest.mark.slow
def test_a_damaged_checkpoint_to_resume_is_a_row_with_train_pys_one_line_reason(tmp_path, corpus_overrides, capsys):
    out = tmp_path / "report"
    args = ["--variants", "dense", *TINY, *corpus_overrides, "logger=none"]
    code, _, stderr = run_compare(capsys, out, *args)
    assert code == 0, stderr[-3000:]
    run_dir = out / "tokens" / "dense" / "seed-1337"
    (run_dir / "metrics.json").unlink()  # as if killed (-9) after its last checkpoint ...
    (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"not a checkpoint")  # ... which the disk then damaged

    code, _, stderr = run_compare(capsys, out, *args)
    assert code == 0, stderr[-3000:]
    [row] = report_rows(out)
    assert row["status"] == "failed" and row["reason"].startswith("checkpoint "), row["reason"]  # no log prefix
    assert (run_dir / "checkpoints" / "last.ckpt").read_bytes() == b"not a checkpoint"  # left for the user
