"""The one command runner of both CLIs: `capsweep` (sweeps/cli.py) and `capsweep report` (analysis/cli.py).
Standard library only, so the analysis side can use it without reaching up into sweeps.

Why: the two CLIs had their own argparse subclass, their own literal exit codes and two copies of the
CAPSWEEP_DEBUG handling, and they printed the same kind of failure differently. Here, once:
- a CapsweepError (capsmodels/errors.py) is one line, `<prog>: error: <message>`, and its exit code;
- Ctrl-C is `<prog>: error: interrupted`, exit 130;
- an unexpected error inside `one_line_failures()` (the commands that read a store: a server that
  fails mid-read is not a bug to show a traceback for) is one line naming its type, exit 1, unless
  CAPSWEEP_DEBUG is set; elsewhere it propagates with its traceback (a real failure of a sweep).
Every line goes through `redact`: a tracking URI's password never reaches the terminal.
"""
from __future__ import annotations

import argparse
import sys
from contextlib import contextmanager
from typing import Callable, Iterator, NoReturn

from capsmodels.contract import redact
from capsmodels.errors import (EXIT_BAD_INPUT, EXIT_FAILED, EXIT_INTERRUPTED, CapsweepError, debug, one_line)

DEBUG_HINT = " (set CAPSWEEP_DEBUG=1 for the traceback)"


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one line (`<prog>: error: ... (see <prog> --help)`, exit 2), not usage +
    error. Subparsers made with `parser_class=OneLineParser` say their own prog (`capsweep run`)."""

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: error: {' '.join(message.split())} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(EXIT_BAD_INPUT)


def parsed(parse: Callable[[], argparse.Namespace]) -> argparse.Namespace | int:
    """What `parse()` returns (argparse and the command's own checks, which may call `parser.error`), or
    the exit code when parsing ended the command: a one-line error (2), --help or --version (0)."""
    try:
        return parse()
    except SystemExit as e:
        return int(e.code) if isinstance(e.code, int) else EXIT_BAD_INPUT


def fail(prog: str, message: str, code: int = EXIT_BAD_INPUT) -> int:
    """`<prog>: error: <message>` on one line of stderr (a URI's password masked); returns `code`."""
    print(f"{prog}: error: {redact(message)}", file=sys.stderr)
    return code


@contextmanager
def one_line_failures(what: str = "", hint: bool = True) -> Iterator[None]:
    """Inside: an unexpected error becomes a CapsweepError (exit 1) whose line is `<what><Type>: <message>`
    (and the CAPSWEEP_DEBUG hint); with CAPSWEEP_DEBUG set it raises as it is, traceback and all.
    CapsweepErrors and Ctrl-C pass through unchanged."""
    try:
        yield
    except CapsweepError:
        raise
    except Exception as e:  # noqa: BLE001 - a store, network or disk that fails while reading: one line
        if debug():
            raise
        raise CapsweepError(f"{what}{type(e).__name__}: {one_line(e)}" + (DEBUG_HINT if hint else ""),
                            exit_code=EXIT_FAILED) from e


def run_command(prog: str, body: Callable[[], int | None], *, failures_as_line: bool = False) -> int:
    """Run one command's body and return its exit code: the body's own, 0 for None; a CapsweepError's
    line and code; 130 on Ctrl-C. failures_as_line: every unexpected error is one line too (one_line_failures)."""
    try:
        if failures_as_line:
            with one_line_failures():
                return body() or 0
        return body() or 0
    except CapsweepError as e:
        return fail(prog, str(e), e.exit_code)
    except KeyboardInterrupt:
        return fail(prog, "interrupted", EXIT_INTERRUPTED)
