"""Processes and ports: a free port, a process tree's pids, what listens where, and a real MLflow server."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from mlflow.tracking import MlflowClient

from tests.helpers.sweep import wait_for


def descendants(pid: int) -> set[int]:
    """Every live process below `pid`, from /proc (ppid links), zombies left out."""
    parent = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = open(f"/proc/{d}/stat").read()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2:].split()
            if fields[0] != "Z":
                parent[int(d)] = int(fields[1])
    out, frontier = set(), {pid}
    while frontier:
        frontier = {p for p, pp in parent.items() if pp in frontier} - out
        out |= frontier
    return out


def alive(pids: set[int]) -> set[int]:
    """The pids of `pids` that still run (not gone, not zombies)."""
    out = set()
    for p in pids:
        try:
            stat = open(f"/proc/{p}/stat").read()
        except OSError:
            continue
        if stat[stat.rindex(")") + 2] != "Z":
            out.add(p)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening_addresses(port: int) -> list[str]:
    """Addresses listening on `port`, read from the kernel's socket tables (/proc/net/tcp, tcp6)."""
    out = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = open(table).read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            ip_hex, port_hex = local.split(":")
            if state != "0A" or int(port_hex, 16) != port:      # 0A = LISTEN
                continue
            if len(ip_hex) == 8:
                out.append(socket.inet_ntop(socket.AF_INET, bytes.fromhex(ip_hex)[::-1]))
            else:
                raw = b"".join(bytes.fromhex(ip_hex[i:i + 8])[::-1] for i in range(0, 32, 8))
                out.append(socket.inet_ntop(socket.AF_INET6, raw))
    return out


def start_mlflow_server(db: Path, artifacts: Path, port: int) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{db}",
         "--artifacts-destination", str(artifacts), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    client = MlflowClient(f"http://127.0.0.1:{port}")

    def up():
        try:
            client.search_experiments(max_results=1)
            return True
        except Exception:  # noqa: BLE001
            if proc.poll() is not None:
                raise AssertionError("mlflow server exited")
            return False
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    try:
        wait_for(up, timeout=90, interval=1, what="mlflow server")
    finally:
        os.environ.pop("MLFLOW_HTTP_REQUEST_MAX_RETRIES", None)
    return proc


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def kill_group(proc: subprocess.Popen, sig: int = signal.SIGKILL, timeout: float = 30) -> None:
    """Signal the process group `proc` leads (started with start_new_session=True; a group already gone
    is fine), then wait for `proc` at most `timeout` seconds."""
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass
    proc.wait(timeout)


def read_until(stream, *markers: str) -> list[str]:
    """Lines of `stream` up to and including the first that holds any of `markers` (or to its end).
    Bounded by the process writing it: the commands these tests start give up after their own timeout."""
    lines = []
    for line in stream:
        lines.append(line)
        if any(m in line for m in markers):
            break
    return lines
