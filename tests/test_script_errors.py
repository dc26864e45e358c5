"""Every script's answer to a malformed command line: one line naming the problem, exit code 2."""

import subprocess
import sys

import pytest

from tests.helpers import REPO


@pytest.mark.parametrize(
    "script, args",
    [
        ("compare.py", ["--match", "biggest"]),
        ("summarize_sweep.py", []),
        ("generate.py", ["--checkpoint"]),
        ("analyze.py", ["nonsense"]),
        ("prune_experts.py", ["x.ckpt"]),
        ("export_hf.py", []),
    ],
)
def test_every_script_answers_a_malformed_command_line_with_one_line_and_exit_2(script, args):
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / script), *args], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert result.stderr.startswith("error: ") and f"see {script} --help" in result.stderr
