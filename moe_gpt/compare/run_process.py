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
from multiprocessing.process import BaseProcess
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


def start(
    target: Callable[..., Optional[int]],
    args: tuple[Any, ...],
    output: Path,
    errors: Optional[Path] = None,
    cwd: Optional[Path] = None,
    env: Optional[dict[str, str]] = None,
) -> BaseProcess:
    """``target(*args)`` in a process of its own, forked from the server, ended as the interpreter ends a
    program (exit code, traceback, exit handlers). Its stdout goes to the file ``output``, its stderr there
    too or to ``errors``; it runs in ``cwd`` with ``env`` (this process's folder and environment by default)."""
    for path in {output, errors or output}:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")  # there even when the process ends before it prints
    processes = multiprocessing.get_context("forkserver")
    processes.set_forkserver_preload(PRELOADED)  # takes effect when the server starts: the first run
    where = (str(output), str(errors or output), str(cwd or Path.cwd()), dict(os.environ if env is None else env))
    process = processes.Process(target=_as_a_program, args=(target, args, *where))
    process.start()
    return process


def run_passing_signals_on(target: Callable[..., Optional[int]], args: tuple[Any, ...], output: Path) -> int:
    """``target(*args)`` started as ``start`` does, everything it prints in ``output``, to its end; its exit code
    (minus the signal that ended it, as for a subprocess). A stop signal this process gets while it runs (as
    Interrupted, see moe_gpt/training/preemption.py) is sent to it, which is awaited; then it is raised again."""
    process = start(target, args, output)
    try:
        process.join()
    except Interrupted as stop:
        os.kill(process.pid, stop.signum)
        process.join()
        raise
    return process.exitcode


def _as_a_program(
    target: Callable[..., Optional[int]], args: tuple[Any, ...], output: str, errors: str, cwd: str, env: dict[str, str]
) -> None:
    """The forked process's body: ``target(*args)`` ended as the interpreter ends a program."""
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)  # as it is now where the process was started; the server's is from the server's start
    _print_into(output, errors)
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


def _print_into(output: str, errors: str) -> None:
    """Send this process's stdout and stderr, Python's and every library's, to the files at these paths."""
    for stream, path in ((sys.stdout, output), (sys.stderr, errors)):
        stream.flush()
        file = os.open(path, os.O_WRONLY | os.O_APPEND)
        os.dup2(file, stream.fileno())
        os.close(file)
        # Line by line, as train.py's log is read while it runs and a killed run keeps what it printed.
        stream.reconfigure(line_buffering=True)
