"""Shared by the tests that train: a tiny run config, and ways to run train.py."""

import atexit
import contextlib
import csv
import functools
import json
import hashlib
import importlib
import io
import logging
import itertools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

from moe_gpt.compare.run_process import run_train_py, start
from moe_gpt.compose import compose_run_config
from moe_gpt.training.run import train

REPO = Path(__file__).resolve().parents[1]
TINY = [
    "model/size=mini",
    "model.n_layer=2",
    "model.n_embd=32",
    "model.n_head=2",
    "model.block_size=32",
    "model.moe.num_experts=4",
    "data.batch_size=4",
    "trainer.max_steps=6",
    "trainer.val_check_interval=3",
    "trainer.limit_val_batches=2",
    "trainer.log_every_n_steps=1",
    "optim.warmup_steps=2",
    "logger.expert_stats_every_n_steps=2",
    "logger.heatmap_every_n_steps=2",
    # Seconds per run that no tiny-run test looks at (the end-to-end test turns the summary back on).
    "trainer.num_sanity_val_steps=0",
    "trainer.enable_model_summary=false",
]


# Where the background train.py processes print: a folder in the temporary folder as it was at import,
# before any test moved TMPDIR, made at the first process and removed when this process exits.
TEMPORARY_FOLDER = tempfile.gettempdir()
_numbers = itertools.count()


@functools.cache
def printed_folder() -> Path:
    folder = Path(tempfile.mkdtemp(prefix="moe-gpt-tests-", dir=TEMPORARY_FOLDER))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


class TrainPy:
    """``python train.py <args>`` in the background, with the part of subprocess.Popen's interface the tests use.

    It is forked from the server of moe_gpt/compare/run_process.py, which imported train.py's modules once,
    so it starts at once instead of after about 7 s of imports: the process compare.py runs for each run.
    ``new_session``: it and the processes it starts are a process group of their own (``os.killpg(pid, ...)``
    reaches them all)."""

    def __init__(self, args: list[str], cwd: Path, env: dict[str, str], new_session: bool = False):
        number = next(_numbers)
        self._stdout, stderr = (printed_folder() / f"{number}.{stream}" for stream in ("stdout", "stderr"))
        target = train_py_in_a_session_of_its_own if new_session else run_train_py
        self._process = start(target, (list(args),), self._stdout, stderr, cwd=cwd, env=env)
        self.pid = self._process.pid
        self.stderr = open(stderr, errors="replace")  # read it once the process has ended, as a pipe

    @property
    def returncode(self) -> int | None:
        return self._process.exitcode

    def poll(self) -> int | None:
        return self._process.exitcode

    def wait(self, timeout: float | None = None) -> int:
        self._process.join(timeout)
        if self._process.exitcode is None:
            raise subprocess.TimeoutExpired("train.py", timeout)
        return self._process.exitcode

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        self.wait(timeout)
        return self._stdout.read_text(errors="replace"), self.stderr.read()

    def send_signal(self, signum: int) -> None:
        os.kill(self.pid, signum)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def train_py_in_a_session_of_its_own(argv: list[str]) -> None:
    os.setsid()
    run_train_py(argv)


def environment_for_train_py(extra: dict | None = None) -> dict[str, str]:
    return {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", **(extra or {})}


def run_train_cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """``python train.py <args>`` in a process of its own (see TrainPy), to its end."""
    process = TrainPy(args, cwd, environment_for_train_py({"HYDRA_FULL_ERROR": "0"}))
    stdout, stderr = process.communicate(timeout=600)
    return subprocess.CompletedProcess(args, process.returncode, stdout, stderr)


def run_main(main: Callable[[], int | None], argv: list[str]) -> subprocess.CompletedProcess:
    """A command's ``main()`` in this process, reading ``argv`` as its command line: its exit code and what it
    printed, as a subprocess would report them.

    A bug is not turned into exit code 1: its exception reaches the test with its traceback.
    """
    stdout, stderr = io.StringIO(), io.StringIO()
    root = logging.getLogger()
    handlers, level, saved_argv = list(root.handlers), root.level, sys.argv
    sys.argv = [main.__module__, *argv]  # every main() reads the command line when given no argv
    try:
        # Hydra points its console handler at sys.stderr when each run starts: the StringIO here.
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            code = main() or 0
    except SystemExit as stopped:
        code = stopped.code or 0
    finally:
        sys.argv = saved_argv
        # Hydra reconfigures the root logger for each run; later tests get pytest's logging back.
        root.handlers[:] = handlers
        root.setLevel(level)
    return subprocess.CompletedProcess(argv, code, stdout.getvalue(), stderr.getvalue())


def train_main(argv: list[str]) -> subprocess.CompletedProcess:
    """``python train.py <argv>``, in this process."""
    from moe_gpt.cli.train import main

    return run_main(main, argv)


def cli_module(name: str) -> ModuleType:
    """The module behind ``scripts/<name>.py`` (``moe_gpt.cli.<name>``)."""
    return importlib.import_module(f"moe_gpt.cli.{name}")


def script_main(name: str, argv: list[str]) -> subprocess.CompletedProcess:
    """``python scripts/<name>.py <argv>``, in this process."""
    return run_main(cli_module(name).main, argv)


def train_in_process(overrides: list[str], run_dir: Path) -> dict:
    return train(compose_run_config(overrides, run_dir=str(run_dir)))


def start_train_cli(args: list[str], cwd: Path, env: dict | None = None, new_session: bool = False) -> TrainPy:
    """train.py in the background (for sending it signals); what it prints to stderr is kept."""
    return TrainPy(args, cwd, environment_for_train_py(env), new_session)


def wait_for_file(path: Path, process: TrainPy, timeout: float = 300, containing: str = "") -> None:
    """Until ``path`` exists (and holds ``containing``), or fail if the process ends first."""
    deadline = time.monotonic() + timeout
    while not (path.exists() and containing in path.read_text(errors="replace")):
        if process.poll() is not None:
            raise AssertionError(f"train.py ended (code {process.returncode}) before {path} appeared:\n{process.stderr.read()[-3000:]}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"{path} did not appear within {timeout} s")
        time.sleep(0.01)


def train_tiny_run(args: list[str], run_dir: Path) -> subprocess.CompletedProcess:
    """A TINY run logged to CSV in ``run_dir``: in this process when it is one process, as ``python train.py``
    when it has several (Lightning starts the others by running the command line again, which needs one)."""
    argv = [*TINY, *args, "logger=csv", f"hydra.run.dir={run_dir}"]
    several = any(arg.startswith("trainer.devices=") and arg != "trainer.devices=1" for arg in args)
    result = run_train_cli(argv, cwd=run_dir.parent) if several else train_main(argv)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def metrics_of(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def kill_all_at_first_checkpoint_then_resume(args: list[str], run_dir: Path, cwd: Path) -> int:
    """train.py with ``args`` (and ``hydra.run.dir=run_dir``), ``kill -9`` of all its processes once it wrote
    ``last.ckpt``, then ``resume=last`` to the end; returns the killed run's last step. The processes are a
    session of their own, so that the kill takes them all, as when their machine goes down."""
    import signal

    from moe_gpt.weights.safe_load import read_checkpoint

    process = start_train_cli([*args, f"hydra.run.dir={run_dir}"], cwd=cwd, new_session=True)
    wait_for_file(run_dir / "checkpoints" / "last.ckpt", process)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    killed_at = read_checkpoint(run_dir / "checkpoints" / "last.ckpt")["global_step"]
    resumed = run_train_cli([f"hydra.run.dir={run_dir}", "resume=last"], cwd=cwd)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return killed_at


def csv_column(run_dir: Path, column: str) -> list[tuple[int, float]]:
    """(step, value) for every row of the run's CSV log that has ``column``."""
    with open(run_dir / "csv" / "metrics.csv", newline="") as handle:
        return [(int(row["step"]), float(row[column])) for row in csv.DictReader(handle) if row.get(column)]


def error_lines(stderr: str) -> list[str]:
    """What a failed run printed as errors: Hydra's log lines at ERROR, or train.py's own ``error:`` line."""
    return [line for line in stderr.splitlines() if "][ERROR]" in line or line.startswith("error:")]


def folder_state(folder: Path) -> dict[str, tuple[str, int]]:
    """Every file and folder below ``folder``: a file's SHA-256 and modification time ("dir" for a folder).
    Equal states mean nothing was written, created, changed or removed."""
    return {
        str(path.relative_to(folder)): (
            hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir",
            path.stat().st_mtime_ns,
        )
        for path in folder.rglob("*")
    }


def assert_drawn_plot(path: Path) -> None:
    """``path`` is a PNG with a plot drawn on it: a readable image of many grey levels, not an empty canvas."""
    from PIL import Image

    with Image.open(path) as picture:
        assert picture.format == "PNG" and picture.width > 300, path
        assert len(set(picture.convert("L").get_flattened_data())) > 10, f"{path} is blank"
