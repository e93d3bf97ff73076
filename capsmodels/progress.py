"""What a long command says while it works: a status line for `capsweep report` and `capsweep eval`, and
the overall line `capsweep run` prints as each trial ends. Standard library only (sweeps imports it too).

Why: `report` and `eval` printed nothing for 6-15 s (imports, the store, the figures), and `run` had
only Ray Tune's trial table, with no count of what is done nor an estimate of what is left.

The status line is for a person at a terminal: it is written to stderr only when stderr is a terminal
(or CAPSWEEP_PROGRESS=1), rewritten in place with the time spent, and erased before the command's own
output. Piped output, logs and the one-line errors of bad input stay as they were.
"""
from __future__ import annotations

import os
import sys
import threading
import time
from typing import Optional, TextIO

PROGRESS_ENV = "CAPSWEEP_PROGRESS"       # 1: the status line also when stderr is not a terminal; 0: never


def wanted(stream: TextIO) -> bool:
    env = os.environ.get(PROGRESS_ENV)
    if env is not None:
        return env not in ("", "0")
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


class Status:
    """`status("drawing the figures")` shows `capsweep report: drawing the figures ... 3.2 s` on one line,
    the seconds counting up (a thread redraws it every `tick` s); `status.done()` erases it. A no-op
    when the stream is not a terminal (see the module docstring)."""

    def __init__(self, prog: str, stream: Optional[TextIO] = None, enabled: Optional[bool] = None,
                 tick: float = 0.5):
        self.prog, self.stream = prog, stream or sys.stderr
        self.enabled = wanted(self.stream) if enabled is None else enabled
        self.t0 = time.monotonic()
        self.what: Optional[str] = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._tick = tick

    def __call__(self, what: str) -> None:
        if not self.enabled:
            return
        with self._lock:
            self.what = what
            self._draw()
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()

    def _draw(self) -> None:
        self.stream.write(f"\r\033[K{self.prog}: {self.what} ... {time.monotonic() - self.t0:.1f} s")
        self.stream.flush()

    def _run(self) -> None:
        while not self._stop.wait(self._tick):
            with self._lock:
                if self.what is not None:
                    self._draw()

    def done(self) -> None:
        """Erase the line (the command's own output follows)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.enabled and self.what is not None:
            with self._lock:
                self.stream.write("\r\033[K")
                self.stream.flush()
                self.what = None

    def __enter__(self) -> "Status":
        return self

    def __exit__(self, *exc) -> None:
        self.done()


def duration(seconds: float) -> str:
    """'45 s', '3 min 05 s', '2 h 10 min'."""
    s = int(round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {(s % 3600) // 60:02d} min"


def sweep_line(ended: int, total: int, counts: dict[str, int], running: int, elapsed: float,
               ended_here: int) -> str:
    """`capsweep run`'s overall line after a trial ends: done / planned, by status, running, the time this
    driver has run and what is left at its pace so far (trials ended by this driver per second; a resumed
    sweep's earlier trials do not count towards the pace)."""
    by = ", ".join(f"{n} {k}" for k, n in counts.items() if n)
    line = f"capsweep: {ended}/{total} trials ended" + (f" ({by})" if by else "") + f", {running} running; " \
           f"{duration(elapsed)} elapsed"
    left = max(0, total - ended)
    if left == 0:
        return line
    if ended_here > 0 and elapsed > 0:
        return line + f", about {duration(left * elapsed / ended_here)} left"
    return line
