"""The benchmark scripts run end to end on tiny sizes and print the ratios they promise."""

import os
import subprocess
import sys

from tests.helpers import REPO


def run_script(name: str, *args: str, env: dict | None = None) -> str:
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / name), *args],
        cwd=REPO,
        env=env or os.environ,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def test_importing_the_package_turns_on_huge_pages_unless_the_user_chose():
    probe = "import moe_gpt, os; print(os.environ['THP_MEM_ALLOC_ENABLE'])"
    unset = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    for env, expected in ((unset, "1"), ({**unset, "THP_MEM_ALLOC_ENABLE": "0"}, "0")):
        out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
        assert out.stdout.strip() == expected


def test_train_step_benchmark_prints_a_ratio_row_per_setting():
    tiny = ["model.n_layer=1", "model.n_embd=32", "model.n_head=2", "model.block_size=16", "data.batch_size=2"]
    out = run_script("bench_train_step.py", "--steps", "1", "--rounds", "1", *tiny)
    rows = {line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith("| ")}
    assert {"defaults", "huge pages off", "full logits"} <= rows.keys()
    assert "| 1.00x |" in rows["defaults"]


def test_moe_layer_benchmark_prints_a_row_per_expert_count():
    out = run_script("bench_moe.py", "--tokens", "64", "--n-embd", "32", "--experts", "2", "4", "--repeats", "1")
    rows = [line for line in out.splitlines() if line.startswith("| 2 |") or line.startswith("| 4 |")]
    assert len(rows) == 2
