"""The benchmark scripts run end to end on tiny sizes and print the ratios they promise."""

import os
import subprocess
import sys

import pytest

from tests.helpers import REPO, script_main


def run_script(name: str, *args: str) -> str:
    result = script_main(name, list(args))
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


@pytest.mark.slow
def test_importing_the_package_changes_no_environment_variable():
    # Only a fresh interpreter imports the package for the first time.
    probe = "import os; before = dict(os.environ); import moe_gpt.model.gpt, moe_gpt.training.run; print(dict(os.environ) == before)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "True"


def test_keeping_freed_memory_applies_on_linux_unless_turned_off():
    # The setting is read once per process (an allocator setting), so each value needs a process of its own.
    probe = "from moe_gpt.training.cpu_memory import reuse_freed_cpu_memory; print(reuse_freed_cpu_memory())"
    for value, expected in (("1", "True"), ("0", "False")):
        env = {**os.environ, "MOE_GPT_KEEP_FREED_MEMORY": value}
        out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True, cwd=REPO)
        assert out.stdout.strip() == expected


@pytest.mark.slow
def test_train_step_benchmark_prints_a_ratio_row_per_setting():
    # Slow by design: each setting is timed in worker processes of its own (allocator settings are per process).
    tiny = ["model.n_layer=1", "model.n_embd=32", "model.n_head=2", "model.block_size=16", "data.batch_size=2"]
    out = run_script("bench_train_step", "--steps", "1", "--rounds", "1", *tiny)
    rows = {line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith("| ")}
    assert {"defaults", "freed memory returned", "huge pages instead", "full logits"} <= rows.keys()
    assert "| 1.00x |" in rows["defaults"]


def test_a_train_step_benchmark_worker_times_each_step_after_the_warm_up():
    from moe_gpt.cli.bench_train_step import time_steps

    tiny = ["model.n_layer=1", "model.n_embd=32", "model.n_head=2", "model.block_size=16", "data.batch_size=2"]
    measured = time_steps(tiny, steps=3)
    assert len(measured["seconds"]) == 3 and all(seconds > 0 for seconds in measured["seconds"])
    assert measured["peak_mb"] > 0


def test_moe_layer_benchmark_prints_a_row_per_setting():
    out = run_script("bench_moe", "--tokens", "64", "--n-embd", "32", "--settings", "2:1", "4:2", "--repeats", "1")
    rows = [line for line in out.splitlines() if line.startswith("| 2 | 1 |") or line.startswith("| 4 | 2 |")]
    assert len(rows) == 2 and all(line.count("x |") == 3 for line in rows)
