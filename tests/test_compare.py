"""scripts/compare.py: variant parsing, active-parameter matching, and a tiny real comparison."""

import csv
import json
import subprocess
import sys

import pytest

from moe_gpt.analysis import parameter_counts
from moe_gpt.compose import compose_run_config, merge_overrides
from moe_gpt.config import ConfigError
from tests.helpers import REPO, TINY

sys.path.insert(0, str(REPO / "scripts"))
from compare import parse_variant  # noqa: E402


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


@pytest.mark.slow
def test_tiny_comparison_writes_report_table_and_plots(tmp_path, corpus_overrides):
    out = tmp_path / "report"
    variants = "dense,moe:4:2,moe:3:1:num_shared_experts=1:router=sigmoid"
    command = [sys.executable, str(REPO / "scripts" / "compare.py"), "--out", str(out), "--variants", variants]
    result = subprocess.run(
        command + TINY + corpus_overrides + ["logger=csv"], capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = list(csv.DictReader((out / "report.csv").open()))
    shared = "moe-3-1-num_shared_experts-1-router-sigmoid"
    assert [(r["variant"], r["status"]) for r in rows] == [("dense", "ok"), ("moe-4-2", "ok"), (shared, "ok")]
    assert rows[0]["params_active"] == rows[0]["params_total"] and rows[1]["params_active"] < rows[1]["params_total"]
    # Matched: the shared variant's 1 routed + 1 shared expert hold the dense FFN's weights (+ router, biases).
    assert abs(int(rows[2]["params_active"]) - int(rows[0]["params_active"])) < 0.01 * int(rows[0]["params_active"])
    for name in (
        "report.md",
        "val_loss_vs_tokens.png",
        "val_loss_vs_time.png",
        "usage_moe-4-2.png",
        f"usage_{shared}.png",
    ):
        assert (out / name).is_file(), name
    assert "| moe-4-2 |" in (out / "report.md").read_text()


@pytest.mark.slow
def test_a_variant_that_diverges_is_reported_with_the_reason_train_py_recorded(tmp_path, corpus_overrides):
    out = tmp_path / "report"
    variants = "dense,moe:4:2:z_loss_coef=1e300"  # an infinite training loss at the first step
    command = [sys.executable, str(REPO / "scripts" / "compare.py"), "--out", str(out), "--variants", variants]
    result = subprocess.run(
        command + TINY + corpus_overrides + ["logger=none"], capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stderr[-3000:]  # a failed variant is a row of the report, not a crash
    rows = list(csv.DictReader((out / "report.csv").open()))
    assert [(r["variant"], r["status"]) for r in rows] == [("dense", "ok"), ("moe-4-2-z_loss_coef-1e300", "failed")]
    recorded = json.loads((out / "moe-4-2-z_loss_coef-1e300" / "failure.json").read_text())["reason"]
    assert recorded.startswith("training diverged") and f"failed: {recorded}" in (out / "report.md").read_text()


@pytest.mark.slow
def test_a_comparison_over_seeds_reports_means_and_a_verdict_with_a_confidence_interval(tmp_path, corpus_overrides):
    out = tmp_path / "report"
    command = [sys.executable, str(REPO / "scripts" / "compare.py"), "--out", str(out), "--variants", "dense,moe:4:2"]
    result = subprocess.run(
        command + ["--seeds", "2"] + TINY + corpus_overrides + ["logger=none", "seed=7"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = list(csv.DictReader((out / "report.csv").open()))
    assert [(r["variant"], r["seed"], r["status"]) for r in rows] == [
        ("dense", "7", "ok"),
        ("dense", "8", "ok"),
        ("moe-4-2", "7", "ok"),
        ("moe-4-2", "8", "ok"),
    ]
    assert rows[0]["val_loss"] != rows[1]["val_loss"]  # the seeds really differ
    for seed in (7, 8):
        assert f"seed={seed}" in (out / "moe-4-2" / f"seed-{seed}" / ".hydra" / "overrides.yaml").read_text()
    report = (out / "report.md").read_text()
    assert "| dense | 2/2 |" in report and "val loss (mean ± std)" in report
    assert "95% CI" in report and "2 seeds" in report
    assert (out / "val_loss_vs_tokens.png").is_file() and (out / "usage_moe-4-2.png").is_file()


def test_zero_seeds_is_a_one_line_error(tmp_path):
    command = [sys.executable, str(REPO / "scripts" / "compare.py"), "--out", str(tmp_path / "r"), "--seeds", "0"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        "error: --seeds 0 must be at least 1 (3 or more give a confidence interval worth reading)"
    ]
    assert not (tmp_path / "r").exists()


def test_comparison_refuses_a_non_empty_output_directory(tmp_path):
    (tmp_path / "report.md").write_text("an earlier report")
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "compare.py"), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2 and "is not empty" in result.stderr
    assert (tmp_path / "report.md").read_text() == "an earlier report"


def test_zero_experts_or_top_k_in_a_variant_is_an_error():
    for spec in ("moe:0:1", "moe:8:0"):
        with pytest.raises(ConfigError, match="at least 1"):
            parse_variant(spec, 128, "active")


@pytest.mark.parametrize(
    "args, message",
    [(["--variants", "dense,moe:4:1,dense"], "lists a variant twice"), (["model.moe.nope=1"], "nope")],
)
def test_bad_comparison_input_is_one_line_and_creates_nothing(tmp_path, args, message):
    out = tmp_path / "report"
    command = [sys.executable, str(REPO / "scripts" / "compare.py"), "--out", str(out), *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not out.exists()
