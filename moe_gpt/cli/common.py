"""What every command-line entry point shares: argparse's errors and bad input as one line with exit code 2."""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn

from moe_gpt.errors import EXIT_BAD_INPUT


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the project's rule for bad input: one line naming the problem, exit code 2
    (argparse's own error prints the whole usage first)."""

    def error(self, message: str) -> NoReturn:
        print(f"error: {message}; see {self.prog} --help", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
