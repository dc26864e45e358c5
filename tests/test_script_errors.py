"""Every entry point's answer to a malformed command line: one line naming the problem, exit code 2.

In-process (``main(argv)``): the wrapper every main shares (moe_gpt/cli/common.py) decides the exit
code and the printed line; tests/test_entry_points.py checks that the scripts pass it on.
"""

import importlib

import pytest

from moe_gpt.cli.common import entry_point
from moe_gpt.config import ConfigError
from moe_gpt.errors import CommandFailed

ENTRY_POINTS = [
    ("analyze", ["nonsense"], "argument command: invalid choice: 'nonsense'"),
    ("bench_moe", ["--tokens", "many"], "argument --tokens: invalid int value: 'many'"),
    ("bench_train_step", ["model.moe.nope=1"], "Could not override 'model.moe.nope'"),
    ("compare", ["--match", "biggest"], "argument --match: invalid choice: 'biggest'"),
    ("export_hf", [], "the following arguments are required: --checkpoint, --out"),
    ("fetch_tokenizer", ["--dir"], "argument --dir: expected one argument"),
    ("generate", ["--checkpoint"], "argument --checkpoint: expected one argument"),
    ("prune_experts", ["x.ckpt"], "the following arguments are required: --keep"),
    ("summarize_sweep", [], "the following arguments are required: sweep_dir"),
    ("train", ["model.moe.nope=1"], "Could not override 'model.moe.nope'"),
]


@pytest.mark.parametrize("name, argv, message", ENTRY_POINTS, ids=[name for name, _, _ in ENTRY_POINTS])
def test_every_entry_point_answers_a_malformed_command_line_with_one_line_and_exit_2(name, argv, message, capsys):
    code = importlib.import_module(f"moe_gpt.cli.{name}").main(argv)
    captured = capsys.readouterr()
    assert code == 2 and captured.out == ""
    [line] = captured.err.strip().splitlines()
    assert line.startswith("error: ") and message in line, line


def test_help_prints_the_usage_and_returns_0(capsys):
    assert importlib.import_module("moe_gpt.cli.generate").main(["--help"]) == 0
    assert "--max-new-tokens" in capsys.readouterr().out


@entry_point(runs_model=False)
def failing_command(argv: list[str]) -> None:
    raise {"input": ConfigError, "outside": CommandFailed}[argv[0]](f"{argv[0]} is wrong\n(a second line)")


@pytest.mark.parametrize("kind, code", [("input", 2), ("outside", 1)])
def test_a_command_error_is_one_line_with_its_exit_code(kind, code, capsys):
    assert failing_command([kind]) == code
    assert capsys.readouterr().err == f"error: {kind} is wrong (a second line)\n"


def test_overrides_may_come_before_between_and_after_the_options(capsys):
    # compare.py's options are checked before anything trains: a refused --seeds shows that the whole
    # command line was read (argparse's plain parse refuses the overrides after an option instead).
    argv = ["experiment=compare_small", "--seeds", "0", "model.dropout=0.1", "--budget", "tokens", "seed=3"]
    assert importlib.import_module("moe_gpt.cli.compare").main(argv) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert "unrecognized arguments" not in line and "--seeds" in line, line
