"""Every entry point as a user starts it: one real process each, plus the console scripts pyproject installs.

The behaviour of each command is tested in-process through its ``main(argv)``; these tests check
only what a process adds: the wrapper script runs that main and passes its exit code on.
"""

import importlib
import json
import os
import subprocess
import sys
import tomllib

import pytest

from tests.helpers import REPO

# script -> (arguments, exit code, text its output holds): the cheapest real thing each can do.
RUNS = {
    "train.py": (["model.moe.nope=1"], 2, "error: Could not override 'model.moe.nope'"),
    "scripts/analyze.py": (["config", "model=dense"], 0, '"model": "dense"'),
    "scripts/bench_moe.py": (["--help"], 0, "usage: bench_moe.py"),
    "scripts/bench_train_step.py": (["--help"], 0, "usage: bench_train_step.py"),
    "scripts/compare.py": (["--match", "biggest"], 2, "invalid choice: 'biggest'"),
    "scripts/evaluate.py": (["--checkpoint", "x.ckpt", "--tasks", ","], 2, "error: --tasks is empty"),
    "scripts/export_hf.py": (["--help"], 0, "usage: export_hf.py"),
    "scripts/fetch_tokenizer.py": (["--dir", str(REPO / "data" / "tokenizer")], 0, "already present and verified"),
    "scripts/generate.py": (["--help"], 0, "usage: generate.py"),
    "scripts/gpu_check.py": (["--help"], 0, "usage: gpu_check.py"),
    "scripts/make_next_line_task.py": (["--out", "x", "--questions", "0"], 2, "error: --questions 0 must be at least 1"),
    "scripts/prune_experts.py": (["--help"], 0, "usage: prune_experts.py"),
    "scripts/summarize_sweep.py": (["--help"], 0, "usage: summarize_sweep.py"),
}
# What takes seconds to import: a command imports them only once its arguments are checked.
HEAVY_MODULES = ("torch", "lightning", "datasets", "transformers", "lm_eval", "wandb", "matplotlib")
# Imports every command module in turn; prints, per module, the heavy packages its import loaded.
HEAVY_IMPORTS_BY_MODULE = """
import importlib, json, sys
heavy, loaded = set(json.loads(sys.argv[1])), {}
for name in json.loads(sys.argv[2]):
    before = set(sys.modules)
    importlib.import_module(f"moe_gpt.cli.{name}")
    loaded[name] = sorted({module.split(".")[0] for module in set(sys.modules) - before} & heavy)
print(json.dumps(loaded))
"""


def console_scripts() -> dict[str, str]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]


def cli_modules_with_main() -> set[str]:
    names = {path.stem for path in (REPO / "moe_gpt" / "cli").glob("*.py")} - {"__init__", "common"}
    return {name for name in names if callable(getattr(importlib.import_module(f"moe_gpt.cli.{name}"), "main", None))}


def test_every_command_is_a_console_script_named_after_its_module_and_has_a_wrapper_script():
    commands = cli_modules_with_main()
    assert console_scripts() == {f"moe-gpt-{name.replace('_', '-')}": f"moe_gpt.cli.{name}:main" for name in commands}
    wrappers = {path.removeprefix("scripts/").removesuffix(".py") for path in RUNS}
    assert wrappers == commands  # train.py's wrapper sits at the top, the others in scripts/


def test_no_command_module_imports_torch_lightning_or_the_like_until_it_runs():
    # A fresh interpreter, since this process has imported all of them already.
    names = sorted(path.stem for path in (REPO / "moe_gpt" / "cli").glob("*.py"))
    result = subprocess.run(
        [sys.executable, "-c", HEAVY_IMPORTS_BY_MODULE, json.dumps(HEAVY_MODULES), json.dumps(names)],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    loaded = json.loads(result.stdout)
    assert set(loaded) == set(names)
    offenders = {f"moe_gpt.cli.{name}": heavy for name, heavy in loaded.items() if heavy}
    assert not offenders, f"importing these command modules imports (module: heavy packages) {offenders}"


# Runs compare.py's main with a bad variant; prints its exit code and the heavy packages it imported.
BAD_COMPARISON = """
import contextlib, io, json, sys
from moe_gpt.cli.compare import main
with contextlib.redirect_stderr(io.StringIO()) as err:
    code = main(["--variants", "dense,moe:4:0", "--out", sys.argv[2]])
heavy = sorted({name.split(".")[0] for name in sys.modules} & set(json.loads(sys.argv[1])))
print(json.dumps([code, err.getvalue().strip(), heavy]))
"""


def test_compare_refuses_a_bad_variant_before_it_imports_lightning(tmp_path):
    # A fresh interpreter, to see what the refusal imported; it answers in about a second, not after Lightning's 6.
    result = subprocess.run(
        [sys.executable, "-c", BAD_COMPARISON, json.dumps(HEAVY_MODULES), str(tmp_path / "out")],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    code, error, heavy = json.loads(result.stdout)
    assert code == 2 and "moe:4:0" in error and len(error.splitlines()) == 1
    assert heavy == [] and not (tmp_path / "out").exists()


@pytest.mark.slow  # twelve interpreters that import torch: ~3-5 s each on 2 cores
@pytest.mark.parametrize("script", sorted(RUNS))
def test_every_wrapper_script_runs_its_command_and_passes_its_exit_code_on(script):
    args, code, text = RUNS[script]
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "offline"}
    result = subprocess.run(
        [sys.executable, str(REPO / script), *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == code, result.stderr[-2000:]
    assert text in result.stdout + result.stderr
    if code == 2:  # bad input: exactly one line
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    if script == "scripts/analyze.py":
        assert json.loads(result.stdout)["params_total"] > 0
