"""Warnings are for settings worth changing: none fires on a command the README shows (composed with its exact
overrides, every job of its sweeps and every choice of the Optuna search included)."""

import itertools
import re
import shlex

import pytest
import yaml

from moe_gpt.compare.variants import parse_variants
from moe_gpt.compose import compose_run_config
from moe_gpt.config import run_warnings
from tests.helpers import REPO

COMMAND = re.compile(r"^(?:\$ )?python (train\.py|scripts/compare\.py)\b(.*)$")


def readme_commands() -> list[tuple[str, list[str]]]:
    """(script, arguments) of every train.py and compare.py command in the README, in its code blocks and in
    its text, comments dropped; commands with a ``<placeholder>`` are left out (they need the reader's own run)."""
    readme = (REPO / "README.md").read_text()
    lines = [line for block in re.findall(r"```bash\n(.*?)```", readme, re.S) for line in block.splitlines()]
    lines += re.findall(r"`(python [^`]+)`", readme)
    commands = []
    for line in lines:
        match = COMMAND.match(line.split("   #")[0].strip())
        if match and "<" not in line:
            # An optional override in brackets (``[trainer.strategy=fsdp]``) is checked as given.
            commands.append((match.group(1), shlex.split(re.sub(r"\[(\w[\w.]*=\w+)\]", r"\1", match.group(2)))))
    return commands


def jobs(arguments: list[str]) -> list[list[str]]:
    """The overrides of each job: a sweep (``-m key=a,b``) is every combination; Hydra's own keys are left out."""
    overrides = [arg for arg in arguments if "=" in arg and not arg.startswith(("hydra", "-"))]
    choices = [[f"{o.split('=')[0]}={v}" for v in o.split("=", 1)[1].split(",")] if "[" not in o else [o] for o in overrides]
    return [list(job) for job in itertools.product(*choices)]


def optuna_jobs() -> list[list[str]]:
    """The Optuna search's trials that can differ in a warning: every number of experts with every top_k (the
    others' choices, and the two ends of the continuous ranges, taken in turn)."""
    search = yaml.safe_load((REPO / "configs" / "hparams_search" / "moe_optuna.yaml").read_text())
    options = {
        key: [f"{key}={value}" for value in re.findall(r"[\w.+-]+", re.sub(r"^.*?(choice|interval)\(", "", space))]
        for key, space in search["hydra"]["sweeper"]["params"].items()
    }
    routed = list(itertools.product(options.pop("model.moe.num_experts"), options.pop("model.moe.top_k")))
    others = [itertools.cycle(values) for values in options.values()]
    return [["hparams_search=moe_optuna", *pair, *(next(values) for values in others)] for pair in routed]


def compare_jobs(arguments: list[str]) -> list[list[str]]:
    base = [arg for arg in arguments if "=" in arg and not arg.startswith("-")] or ["experiment=compare_small"]
    config = compose_run_config(base)
    return [base + variant.overrides for variant in parse_variants(config.compare.variants, config.model.n_embd, "active")]


def every_checked_job() -> list[list[str]]:
    """Every job of the README's commands, and of the Optuna search its sweeps link to (docs/sweeps.md)."""
    found = optuna_jobs()
    for script, arguments in readme_commands():
        found += jobs(arguments) if script == "train.py" else compare_jobs(arguments)
    return found


def test_the_readme_shows_the_commands_this_test_checks():
    commands = readme_commands()
    assert ("train.py", ["model.moe.num_experts=16", "model.moe.top_k=1", "model.moe.activation=swish"]) in commands
    assert ("train.py", ["-m", "model.moe.num_experts=4,8,16"]) in commands
    assert any(script == "scripts/compare.py" for script, _ in commands)
    assert len(optuna_jobs()) == 3 * 2 and "model.moe.num_experts=16" in optuna_jobs()[-1]


@pytest.mark.parametrize("overrides", every_checked_job(), ids=" ".join)
def test_no_warning_fires_on_a_readme_command(overrides):
    assert run_warnings(compose_run_config(overrides)) == []
