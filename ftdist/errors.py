"""ftdist's own error types, below every package in the layer order so that each can raise them.

The command line (ftdist/cli.py) is the one place that turns them into what the user sees: one line,
`ftdist: error: ...` (with the rank on ranks other than 0), exit code 2 for a UserError and 1 for a RunError,
the traceback in the run's error.log.
"""

from __future__ import annotations

import os
import sys


class UserError(ValueError):
    """A problem with what the user gave (a recipe key, a file, an argument, a damaged or crafted file): the
    message names it and says what would do. Exit code 2."""

    exit_code = 2


class RunError(RuntimeError):
    """A failure of the run itself, not of its input (a rank that never came, an actor that died). Exit code 1."""

    exit_code = 1


def error_prefix() -> str:
    rank = os.environ.get("RANK")
    return f"ftdist: error (rank {rank}): " if rank not in (None, "0") else "ftdist: error: "


def print_error(message: str) -> None:
    """The one form of an error on the terminal: one line (a message's own line breaks are joined)."""
    print(error_prefix() + " ".join(str(message).split("\n")), file=sys.stderr, flush=True)
