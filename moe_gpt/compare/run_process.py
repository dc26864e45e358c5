"""A comparison run's process: train.py's own ``main``, forked from a server that imported train.py's modules once.

``python train.py`` spends about 7 s on a 2-core CPU importing torch, Lightning, Hydra and what
Lightning's torchmetrics pulls in (transformers, scipy) before its first step, and a comparison trains
its runs one after another. The standard library's forkserver imports them once, in a fresh interpreter
started for it, and forks each run from there: the run starts at once and is still a process of its own
(its own memory, its records written by train.py, a signal or ``kill -9`` reaching it alone). Not a fork of
the comparison's own process: that one may have run torch already (held-out evaluation, or the tests
that call compare's main in-process), and torch's thread pools do not survive a fork.
"""

from __future__ import annotations

import atexit
import multiprocessing
import os
import runpy
import sys
import traceback
from pathlib import Path
from typing import Any, Callable, Optional

from moe_gpt.config import PROJECT_ROOT
from moe_gpt.errors import Interrupted

TRAIN_SCRIPT = PROJECT_ROOT / "train.py"
# What train.py imports before its first step: imported by the server, once.
PRELOADED = ["moe_gpt.cli.train", "moe_gpt.training.run"]


def run_train_py(argv: list[str]) -> None:
    """``python train.py <argv>``, in this process: the script run as the program, which ends it with train.py's
    exit code (SystemExit)."""
    sys.argv = [str(TRAIN_SCRIPT), *argv]  # Lightning starts a multi-process run's other processes from sys.argv
    runpy.run_path(str(TRAIN_SCRIPT), run_name="__main__")


def run_passing_signals_on(target: Callable[..., Optional[int]], args: tuple[Any, ...], output: Path) -> int:
    """``target(*args)`` in a process of its own, forked from the server, with this process's environment and
    working folder and everything it prints in ``output``; its exit code (minus the signal that ended it, as
    for a subprocess). A stop signal this process gets while it runs (as Interrupted, see
    moe_gpt/training/preemption.py) is sent to it, which is awaited; then it is raised again."""
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_bytes(b"")  # there even when the process ends before it prints
    processes = multiprocessing.get_context("forkserver")
    processes.set_forkserver_preload(PRELOADED)  # takes effect when the server starts: the first run
    process = processes.Process(target=_as_a_program, args=(target, args, str(output), dict(os.environ)))
    process.start()
    try:
        process.join()
    except Interrupted as stop:
        os.kill(process.pid, stop.signum)
        process.join()
        raise
    return process.exitcode


def _as_a_program(target: Callable[..., Optional[int]], args: tuple[Any, ...], output: str, environment: dict[str, str]) -> None:
    """The forked process's body: ``target(*args)`` ended as the interpreter ends a program."""
    os.environ.clear()
    os.environ.update(environment)  # the comparison's as it is now; the server's is the one it started with
    _print_into(output)
    try:
        code = target(*args) or 0
    except SystemExit as stop:
        code = stop.code
    except BaseException:  # noqa: BLE001 - a program's uncaught error: its traceback, exit code 1
        traceback.print_exc()
        code = 1
    # What the interpreter runs at exit (W&B ends its run there); a forked process skips it.
    atexit._run_exitfuncs()
    raise SystemExit(code)


def _print_into(path: str) -> None:
    """Send this process's stdout and stderr, Python's and every library's, to the file at ``path``."""
    sys.stdout.flush()
    sys.stderr.flush()
    file = os.open(path, os.O_WRONLY | os.O_APPEND)
    os.dup2(file, sys.stdout.fileno())
    os.dup2(file, sys.stderr.fileno())
    os.close(file)
    # Line by line, as train.py's log is read while it runs and a killed run keeps what it printed.
    sys.stdout.reconfigure(line_buffering=True)
    sys.stderr.reconfigure(line_buffering=True)
