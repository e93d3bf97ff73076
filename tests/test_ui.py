"""`capsweep ui` serves the MLflow UI on the sweep store, bound to 127.0.0.1 only."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import urllib.request

from tests.sweep_helpers import capsweep_cmd, env_for_subprocess, wait_for


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


def test_ui_binds_loopback_only(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(capsweep_cmd("ui", "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db", "--port", str(port)),
                            cwd=tmp_path, env=env_for_subprocess(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        def serving():
            try:
                return urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).status == 200
            except OSError:
                return False
        wait_for(serving, timeout=120, interval=1, what="MLflow UI")
        listeners = listening_addresses(port)
        assert listeners and set(listeners) == {"127.0.0.1"}, listeners
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
