"""How a command ends when it does not finish: its exception types and the exit codes they give.

| exit code | meaning                                                                |
|-----------|------------------------------------------------------------------------|
| 0         | done (``train.py``: trained to ``trainer.max_steps``; ``metrics.json`` written) |
| 1         | a bug: Python's traceback; or a failure outside the input (network, a child process): one line |
| 2         | bad input (config, data, checkpoint): one line, nothing trained        |
| 3         | diverged: a non-finite loss or weight; checkpoints keep the last good state |
| 128 + N   | stopped by signal N (130 Ctrl-C, 143 SIGTERM) after saving ``last.ckpt`` |
"""

from __future__ import annotations

import signal
from typing import Optional

EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_DIVERGED = 3


class CommandFailed(Exception):
    """Something outside the user's input stopped a command (the network, a child process);
    the message is one line that says what failed and what to check."""


class Diverged(Exception):
    """Training produced a non-finite loss or weight; the message names the step and what to change."""

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step


class Interrupted(BaseException):
    """A stop signal (SIGTERM, SIGINT, ...) ended the run.

    A BaseException, like KeyboardInterrupt: no ``except Exception`` on the way up may swallow it.
    ``step`` is the optimizer step saved in ``last.ckpt``, or None when training had not started.
    """

    def __init__(self, signum: int, step: Optional[int]):
        name = signal.Signals(signum).name
        where = "before training started" if step is None else f"at step {step}; checkpoints/last.ckpt holds it"
        super().__init__(f"stopped by {name} {where}")
        self.signum, self.step = signum, step

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # the shell's convention for a process ended by a signal


def one_line(error: BaseException) -> str:
    """The error's message as one line, for a terminal, a log line or ``failure.json``.

    Hydra's composition errors span several lines (available options, the config search path)
    and keep OmegaConf's explanation in their cause: both are folded into one line.
    """
    from hydra.errors import HydraException

    lines = [line.strip() for line in str(error).strip().splitlines()]
    if isinstance(error, HydraException):
        end = next((i for i, line in enumerate(lines) if line.startswith(("Config search path", "See https://"))), None)
        lines = lines[:end]
        if error.__cause__ is not None and str(error.__cause__).strip():
            lines = [lines[0].rstrip(".") + ":", str(error.__cause__).strip().splitlines()[0]]
    text = " ".join(line for line in lines if line)
    return text or type(error).__name__
