"""The one base of every error capsweep reports to its user, and the exit codes they carry. Standard
library only: capsmodels, analysis and sweeps all raise through it (sweeps -> analysis -> capsmodels).

Why one base: the commands used to catch 13 exception classes on 5 unrelated bases and map each to an
exit code by isinstance, in two CLIs that disagreed on the mapping. An error that is the user's to fix
now says so itself: it is a CapsweepError, its message is one line, and it carries the exit code the
command returns (capsmodels/command.py prints it and returns the code). Anything else is a bug or a
failing library, which the command runner reports as a failure (exit 1).

Each subclass keeps the standard base it had (ValueError, RuntimeError, LookupError), so code that
catches those goes on catching them.
"""
from __future__ import annotations

import os
from typing import Optional

# the exit codes of every capsweep command (README, "Exit codes")
EXIT_OK = 0
EXIT_FAILED = 1            # a sweep, report or store that failed while running
EXIT_BAD_INPUT = 2         # bad input or a refused start: one line naming the field, nothing started
EXIT_INTERRUPTED = 130     # Ctrl-C; a sweep continues with --resume

DEBUG_ENV = "CAPSWEEP_DEBUG"     # set: an unexpected error raises with its traceback instead of one line


class CapsweepError(Exception):
    """An error whose message is one line for the user and whose `exit_code` the command returns.
    The class sets the usual code (bad input, 2); one raise may give another (`exit_code=1`: the same
    kind of error met while running, e.g. a store that fails at the end of training)."""
    exit_code: int = EXIT_BAD_INPUT

    def __init__(self, *args, exit_code: Optional[int] = None):
        super().__init__(*args)
        if exit_code is not None:
            self.exit_code = exit_code


def one_line(e: BaseException | str, limit: int = 300) -> str:
    """An exception's message on one line (library messages span several), cut at `limit` with '...'."""
    msg = " ".join(str(e).split())
    return msg[:limit] + ("..." if len(msg) > limit else "")


def debug() -> bool:
    """CAPSWEEP_DEBUG is set: show the traceback of an unexpected error (the one place it is read)."""
    return bool(os.environ.get(DEBUG_ENV))
