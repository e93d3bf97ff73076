"""`capsweep ui`: the MLflow UI on the sweep store, run as a child process group that capsweep owns.

Why not `subprocess.call(["mlflow", "ui", ...])`: with the port taken, that printed our success line,
then MLflow's "Address already in use", and exited 0; it printed the address tens of seconds before the
server answered; and a SIGTERM to capsweep left the MLflow server, its uvicorn workers and its job
runner serving. Here:

- the port is tried before anything starts: taken (or an address this machine does not have) is one
  line and exit 2;
- the server starts in its own session (process group). Its output is held back while it starts and
  the address is printed only once `/health` answers (bounded wait); a server that dies or never
  answers is one line naming its last words and exit 1, and nothing of it is left;
- SIGINT (Ctrl-C), SIGTERM and SIGHUP to capsweep are passed on to the whole group as SIGTERM; what has
  not exited after a grace period is killed. Nothing started by `capsweep ui` outlives it.

MLflow's job runner (GenAI scorers and trace roll-ups: a runner and seven huey consumers) is off unless
the user sets MLFLOW_SERVER_ENABLE_JOB_EXECUTION, and one uvicorn worker serves: a capsweep store needs
neither, and on a 2-core laptop each extra process slows the start.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections import deque
from typing import Callable, Optional

from capsmodels.errors import CapsweepError, debug

START_TIMEOUT_S = 300.0     # a busy 2-core machine took ~75 s to answer with MLflow's defaults
GRACE_S = 15.0              # after SIGTERM, before SIGKILL
DEFAULT_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


class UIError(CapsweepError, RuntimeError):
    """The UI did not start; `code` is the exit status (2 bad input, 1 the server failed). One line."""

    def __init__(self, msg: str, code: int):
        super().__init__(msg, exit_code=code)

    @property
    def code(self) -> int:
        """The exit status, as ui.serve's callers read it (the same as exit_code)."""
        return self.exit_code


def port_problem(host: str, port: int) -> Optional[str]:
    """Why `host:port` cannot be listened on now (None: it can). Binds a socket as uvicorn does
    (SO_REUSEADDR, so a port in TIME_WAIT counts as free) and closes it at once."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        return f"--host: {host!r} is not an address of this machine ({e.strerror})"
    for family, kind, proto, _, addr in infos[:1]:
        with socket.socket(family, kind, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(addr)
            except OSError as e:
                if e.errno in (98, 48):      # EADDRINUSE (Linux, macOS)
                    return (f"--port: {port} on {host} is in use (another MLflow UI?); stop it or pass "
                            "--port with a free port")
                return f"--host: cannot listen on {host}:{port} ({e.strerror or e})"
    return None


def healthy(base: str, timeout: float = 2.0, path: str = "/health") -> bool:
    """The server at `base` answers GET `path` with 200."""
    try:
        with urllib.request.urlopen(f"{base}{path}", timeout=timeout) as r:
            return r.status == 200
    except OSError:
        return False


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:          # a process of the group that is not ours any more: not our business
        return False


def stop_group(proc: subprocess.Popen, grace: float = GRACE_S) -> None:
    """SIGTERM to the child's whole process group; SIGKILL to whatever is left after `grace` s."""
    pgid = proc.pid
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + grace
    try:
        proc.wait(max(0.1, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pass
    while _group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if _group_alive(pgid):
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        pass


class _Output:
    """The server's merged stdout/stderr, read by a thread: held back (the last lines kept) until the
    server is ready, then passed through to our stderr, so a start that fails says one line."""

    def __init__(self, stream, passthrough: bool):
        self.last: deque[str] = deque(maxlen=50)
        self.ready = passthrough
        self._thread = threading.Thread(target=self._pump, args=(stream,), daemon=True)
        self._thread.start()

    def _pump(self, stream) -> None:
        for line in stream:
            if self.ready:
                sys.stderr.write(line)
                sys.stderr.flush()
            else:
                self.last.append(line.rstrip())

    def last_words(self) -> str:
        """The server's most telling last line: an error line if there is one, else its last line."""
        lines = [l for l in self.last if l.strip()]
        errors = [l for l in lines if any(w in l for w in ("Error", "error", "in use", "Errno"))]
        text = (errors or lines or ["(no output)"])[-1]
        return " ".join(text.split())[:300]

    def join(self, timeout: float = 2.0) -> None:
        self._thread.join(timeout)


def serve(cmd: list[str], base: str, on_ready: Callable[[], None], start_timeout: float = START_TIMEOUT_S,
          env: Optional[dict] = None, poll_s: float = 0.5, health_path: str = "/health",
          what: str = "the MLflow server") -> int:
    """Run the server `cmd` until it exits or capsweep gets SIGINT/SIGTERM/SIGHUP; `on_ready` is called
    once `base` + `health_path` answers. Returns 0 when stopped by a signal or when the server exits 0 on its own;
    raises UIError when it does not come up."""
    env = {**DEFAULT_ENV, **(env if env is not None else os.environ)}
    proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, errors="replace", start_new_session=True)
    out = _Output(proc.stdout, passthrough=debug())
    stopped: list[int] = []

    def forward(signum, frame):    # noqa: ARG001 - signal handler signature
        stopped.append(signum)

    handled = [s for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)]
    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {s: signal.signal(s, forward) for s in handled}
    try:
        deadline = time.monotonic() + start_timeout
        while not stopped:
            if proc.poll() is not None:
                out.join()
                raise UIError(f"{what} exited with code {proc.returncode} before it answered: "
                              f"{out.last_words()}", 1)
            if healthy(base, path=health_path):
                break
            if time.monotonic() > deadline:
                raise UIError(f"{what} did not answer {base}{health_path} within {start_timeout:.0f} s; "
                              f"its last output: {out.last_words()}", 1)
            time.sleep(poll_s)
        if stopped:
            return 0
        out.ready = True
        on_ready()
        while not stopped and proc.poll() is None:
            time.sleep(poll_s)
        if stopped:
            return 0
        return proc.returncode or 0
    finally:
        stop_group(proc)
        out.join()
        for s, h in previous.items():
            signal.signal(s, h)
