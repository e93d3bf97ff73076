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


def serving(port: int) -> bool:
    """The MLflow UI on `port` answers its health check."""
    try:
        return urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).status == 200
    except OSError:
        return False


def test_ui_binds_loopback_only_and_its_address_opens_the_runs(tmp_path):
    """`capsweep ui` listens on 127.0.0.1 only (the kernel's socket tables). MLflow 3's UI opens an
    experiment on its GenAI traces overview; `capsweep ui` prints the address that opens the capsweep
    experiment's runs. Checked in a real headless Chromium: the page at the printed address lists the
    sweep's parent run and shows the "Runs" view, not "Traces". (One UI process for both: its start
    is most of the test's time.)"""
    import re

    import pytest
    from mlflow import MlflowClient

    from tests.browser_helpers import _run, chromium
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("capsweep", tags={"mlflow.experimentKind": "custom_model_development"})
    client.set_terminated(client.create_run(exp, run_name="my-sweep-parent").info.run_id)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(capsweep_cmd("ui", "--tracking-uri", uri, "--port", str(port)), cwd=tmp_path,
                            env=env_for_subprocess(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        line = proc.stderr.readline()
        m = re.search(r"MLflow UI on (\S+) for", line)
        assert m, line
        address = m.group(1)
        assert address == f"http://127.0.0.1:{port}/#/experiments/{exp}?workflowType=machine_learning"

        wait_for(lambda: serving(port), timeout=120, interval=1, what="MLflow UI")
        listeners = listening_addresses(port)
        assert listeners and set(listeners) == {"127.0.0.1"}, listeners

        binary, why = chromium()
        if binary is None:
            pytest.skip(why)
        dom = _run(binary, ["--window-size=1400,900", "--virtual-time-budget=25000", "--dump-dom", address]).stdout
        assert "my-sweep-parent" in dom, dom[-3000:]
        assert "Detect Issues" not in dom          # the GenAI overview's button
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
