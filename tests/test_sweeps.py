"""Sweeps: real Hydra multirun of train.py (basic, Optuna and submitit launchers), failed jobs, the summary."""

import csv
import json
import math
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir

from moe_gpt.config import register_schema
from tests.helpers import REPO, TINY, assert_drawn_plot, train_main

SHORT = ["trainer.max_steps=2", "trainer.val_check_interval=2", "trainer.limit_val_batches=1", "logger=none"]


def run_sweep(args: list[str], tmp_path: Path, corpus_overrides: list[str]) -> Path:
    """``train.py -m`` on the tiny model; returns the sweep directory (jobs in 0/, 1/, ...)."""
    sweep_dir = tmp_path / "sweep"
    result = train_main(["-m", *TINY, *SHORT, *corpus_overrides, *args, f"hydra.sweep.dir={sweep_dir}"])
    assert result.returncode == 0, result.stderr[-3000:]
    return sweep_dir


def summarize(load_script, sweep_dir: Path, capsys) -> tuple[str, list[dict]]:
    """Run scripts/summarize_sweep.py; returns what it printed and the CSV rows."""
    load_script("summarize_sweep").main([str(sweep_dir)])
    with open(sweep_dir / "summary.csv", newline="") as handle:
        return capsys.readouterr().out, list(csv.DictReader(handle))


def assert_plots_written(sweep_dir: Path) -> None:
    for name in ("val_ppl_vs_experts.png", "tokens_per_sec_vs_experts.png"):
        assert_drawn_plot(sweep_dir / name)


@pytest.mark.slow
def test_grid_sweep_runs_every_job_and_the_summary_lists_them(tmp_path, corpus_overrides, load_script, capsys):
    sweep_dir = run_sweep(["model.moe.num_experts=2,4", "model.moe.top_k=1,2"], tmp_path, corpus_overrides)
    printed, rows = summarize(load_script, sweep_dir, capsys)

    assert {(row["experts"], row["top_k"]) for row in rows} == {("2", "1"), ("2", "2"), ("4", "1"), ("4", "2")}
    assert all(row["status"] == "ok" and math.isfinite(float(row["val_ppl"])) for row in rows)
    markdown = (sweep_dir / "summary.md").read_text()
    assert markdown.count("| ok |") == 4 and "4 jobs: 4 ok" in markdown
    assert "| job | model | experts | top_k | activation | val_loss | val_ppl |" in printed
    assert_plots_written(sweep_dir)


def test_failed_jobs_are_recorded_and_the_rest_of_the_sweep_completes(tmp_path, corpus_overrides, load_script, capsys):
    # top_k=9 > num_experts=4 fails config validation; block_size=100000 fails in the data setup,
    # after the W&B run has started. Hydra orders the jobs (block_size, top_k): 100000/9, 100000/1, 32/9, 32/1.
    args = ["model.moe.top_k=9,1", "model.block_size=100000,32", "logger=wandb"]
    sweep_dir = run_sweep(args, tmp_path, corpus_overrides)

    failure = json.loads((sweep_dir / "0" / "failure.json").read_text())
    assert failure["status"] == "failed" and failure["error_type"] == "ConfigError"
    assert failure["reason"] == "model.moe.top_k=9 must be between 1 and model.moe.num_experts=4"
    assert "model.moe.top_k=9" in failure["overrides"] and "model.block_size=100000" in failure["overrides"]
    assert json.loads((sweep_dir / "1" / "failure.json").read_text())["error_type"] == "DataError"
    assert (sweep_dir / "3" / "metrics.json").is_file()
    # The failed job closed its W&B run: the next job got a run of its own instead of joining it.
    assert len(list((sweep_dir / "3" / "wandb").glob("offline-run-*"))) == 1

    printed, rows = summarize(load_script, sweep_dir, capsys)
    assert [row["status"] for row in rows] == ["failed", "failed", "failed", "ok"]
    assert rows[1]["reason"].startswith("DataError: the train split has")
    assert rows[1]["model.block_size"] == "100000"  # a swept key gets its own column
    assert "ConfigError: model.moe.top_k=9 must be between 1" in printed and "4 jobs: 1 ok, 3 failed" in printed
    assert "| tokens_per_sec | mfu | wall_time_s |" in printed  # training-only throughput and MFU
    assert float(rows[3]["tokens_per_sec"]) > 0 and rows[3]["mfu"] == ""  # no known peak on a CPU
    assert_plots_written(sweep_dir)


def test_unexpected_error_in_a_single_run_keeps_its_traceback_and_is_recorded(tmp_path, corpus_overrides, monkeypatch):
    # A bug cannot be asked for from the command line, so one is planted: training raises once the run owns its
    # folder, under the real Hydra CLI.
    def train(*args, **kwargs):
        raise RuntimeError("planted bug\nsecond line")

    monkeypatch.setattr("moe_gpt.training.run._train_in_claimed_dir", train)
    # Not a one-line exit: the exception itself leaves main(), so Python prints its traceback and exits 1.
    with pytest.raises(RuntimeError, match="^planted bug\nsecond line$"):
        train_main([*TINY, *SHORT, *corpus_overrides, f"hydra.run.dir={tmp_path}"])
    failure = json.loads((tmp_path / "failure.json").read_text())
    assert failure["error_type"] == "RuntimeError" and failure["reason"] == "planted bug"


def test_a_diverged_run_is_the_worst_objective_never_nan():
    from moe_gpt.cli.train import (
        sweep_objective,  # hydra-optuna-sweeper ends the whole study on a NaN
    )

    assert sweep_objective({"val_loss": float("nan")}) == math.inf
    assert sweep_objective({"val_loss": 2.5}) == 2.5


@pytest.mark.slow
def test_optuna_search_runs_its_trials_and_saves_the_best(tmp_path, corpus_overrides, load_script, capsys):
    # The preset numbers the job directories itself: named by overrides, they pass 255 characters.
    sweep_dir = run_sweep(["hparams_search=moe_optuna", "hydra.sweeper.n_trials=2"], tmp_path, corpus_overrides)

    best = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    # TINY sets model.moe.num_experts=4: a key given on the command line is fixed, not searched.
    assert set(best["best_params"]) == {
        "model.moe.top_k",
        "model.moe.activation",
        "optim.lr",
        "model.moe.aux_loss_coef",
    }
    assert 1e-4 <= best["best_params"]["optim.lr"] <= 3e-3 and math.isfinite(best["best_value"])
    assert (sweep_dir / "0" / "metrics.json").is_file() and (sweep_dir / "1" / "metrics.json").is_file()
    printed, rows = summarize(load_script, sweep_dir, capsys)
    assert all(row["status"] == "ok" for row in rows)
    assert min(float(row["val_loss"]) for row in rows) == pytest.approx(best["best_value"])
    assert "Optuna best value" in printed


@pytest.mark.slow
def test_submitit_local_launcher_runs_jobs_as_subprocesses(tmp_path, corpus_overrides, load_script, capsys):
    sweep_dir = run_sweep(["hydra/launcher=submitit_local", "model.moe.top_k=1,2"], tmp_path, corpus_overrides)

    assert list((sweep_dir / ".submitit").glob("*/*_result.pkl"))  # submitit ran and pickled each result
    _, rows = summarize(load_script, sweep_dir, capsys)
    assert [(row["top_k"], row["status"]) for row in rows] == [("1", "ok"), ("2", "ok")]
    assert_plots_written(sweep_dir)


def test_slurm_launcher_config_extends_the_submitit_schema():
    register_schema()
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["hydra/launcher=slurm"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (launcher.gpus_per_node, launcher.tasks_per_node, launcher.nodes) == (1, 1, 1)
    assert launcher.partition and launcher.timeout_min > 0 and launcher.mem_gb > 0
    assert launcher.max_num_timeout == 10 and launcher.signal_delay_s == 120  # requeue at the time limit
    assert launcher.mem_per_cpu is None  # a schema default, present because slurm.yaml extends it


def test_the_summary_table_shows_swept_fractions_in_four_significant_digits():
    from moe_gpt.training.sweep_summary import cells

    row = {"optim.lr": "0.0012345678901234", "model.moe.activation": "gelu", "data.batch_size": "16"}
    assert cells(list(row), row) == ["0.001235", "gelu", "16"]


def test_summary_of_a_directory_without_jobs_is_a_one_line_error(tmp_path, load_script, capsys):
    assert load_script("summarize_sweep").main([str(tmp_path)]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "no job directories" in error and str(tmp_path) in error
