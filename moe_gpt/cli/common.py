"""What every command-line entry point shares: one way to end, whatever the command.

Every ``main(argv=None) -> int`` is an ``@entry_point``: it returns the exit code (scripts and
console scripts turn it into the process's), so tests call ``main(argv)`` in-process and read it.
Bad input of any kind (a malformed command line, a config, data or run-folder error) ends as one
line ``error: <what is wrong and what to do>`` on stderr and exit code 2; a failure outside the
input (the network, a child process) as one such line and exit code 1.
"""

from __future__ import annotations

import argparse
import functools
import sys
from typing import TYPE_CHECKING, Callable, NoReturn, Optional

from hydra.errors import HydraException

from moe_gpt.config import ConfigError
from moe_gpt.data.errors import DataError
from moe_gpt.errors import EXIT_BAD_INPUT, EXIT_FAILED, CommandFailed, one_line

if TYPE_CHECKING:
    import torch

# Bad input, as train.py also treats it. A refused run folder (FolderRefused) is a ConfigError.
USER_ERRORS = (ConfigError, DataError, HydraException)

Main = Callable[[Optional[list[str]]], int]


class UsageError(ConfigError):
    """A malformed command line; the message names the problem and where the help is."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are the project's bad input: one line through ``entry_point``
    (argparse's own error prints the whole usage first and exits on the spot)."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message}; see {self.prog} --help")

    def parse_args(self, args=None, namespace=None):  # type: ignore[override]
        # train.py overrides may come before, between and after the options (`compare.py experiment=x --seeds 3
        # model.dropout=0.1`); plain parse_args takes one run of positionals and refuses the rest.
        # argparse cannot intermix with subcommands (analyze.py), which keep the plain parse.
        if self._subparsers is None:
            return self.parse_intermixed_args(args, namespace)
        return super().parse_args(args, namespace)


def entry_point(*, runs_model: bool) -> Callable[[Callable[[list[str]], Optional[int]]], Main]:
    """Make ``command(argv) -> exit code or None (0)`` a ``main(argv=None) -> int``.

    ``runs_model``: the command trains or runs a model, so freed CPU memory is kept for reuse
    (moe_gpt/training/cpu_memory.py) before it starts.
    """

    def decorate(command: Callable[[list[str]], Optional[int]]) -> Main:
        @functools.wraps(command)
        def main(argv: Optional[list[str]] = None) -> int:
            if runs_model:
                from moe_gpt.training.cpu_memory import reuse_freed_cpu_memory

                reuse_freed_cpu_memory()
            try:
                return command(sys.argv[1:] if argv is None else list(argv)) or 0
            except USER_ERRORS as error:
                return print_error(error, EXIT_BAD_INPUT)
            except CommandFailed as error:
                return print_error(error, EXIT_FAILED)
            except SystemExit as stop:
                # argparse's --help and Hydra's own exits (train.py's jobs) end the command this way.
                if stop.code is None or isinstance(stop.code, int):
                    return stop.code or 0
                raise

        return main

    return decorate


def print_error(error: BaseException, exit_code: int) -> int:
    """``error: <one line>`` on stderr; returns ``exit_code``."""
    print(f"error: {one_line(error)}", file=sys.stderr)
    return exit_code


def resolve_device(name: str) -> "torch.device":
    """``--device``'s value as a torch device, refused in one line when it names none or no GPU is here."""
    import torch  # here: the commands that run no model need not import it

    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device {name!r} is not a device name; use cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: no CUDA GPU is available here; use --device cpu")
    return device
