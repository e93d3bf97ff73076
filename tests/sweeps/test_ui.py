"""`capsweep ui` serves the MLflow UI on the sweep store, bound to 127.0.0.1 only; a busy port is one
line and exit 2 before anything starts; the address is printed once /health answers; a signal to
capsweep stops the server's whole process group (sweeps/ui.py)."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import urllib.request

import sys
import textwrap
import time

import pytest

from sweeps import ui
from tests.helpers.sweep import ROOT, capsweep_cmd, env_for_subprocess
from tests.helpers.procs import alive, descendants, free_port, kill_group, listening_addresses, read_until










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

    from mlflow import MlflowClient

    from tests.helpers.browser import _run, chromium
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("capsweep", tags={"mlflow.experimentKind": "custom_model_development"})
    client.set_terminated(client.create_run(exp, run_name="my-sweep-parent").info.run_id)
    port = free_port()
    proc = subprocess.Popen(capsweep_cmd("ui", "--tracking-uri", uri, "--port", str(port)), cwd=tmp_path,
                            env=env_for_subprocess(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        lines = read_until(proc.stderr, "MLflow UI on", "error")     # sweeps/ui.py: START_TIMEOUT_S
        m = re.search(r"MLflow UI on (\S+) for", lines[-1])
        assert m, lines
        assert lines[0].startswith("capsweep: starting the MLflow UI")     # said at once, before the wait
        address = m.group(1)
        assert address == f"http://127.0.0.1:{port}/#/experiments/{exp}?workflowType=machine_learning"
        assert serving(port)                 # the address comes only once /health answers: no wait here
        listeners = listening_addresses(port)
        assert listeners and set(listeners) == {"127.0.0.1"}, listeners
        # one uvicorn worker and no job runner (sweeps/ui.py): a few processes, all below capsweep
        server = descendants(proc.pid)
        print(f"processes under capsweep ui: {len(server)}")
        assert 2 <= len(server) <= 6, server

        binary, why = chromium()
        if binary is not None:
            dom = _run(binary, ["--window-size=1400,900", "--virtual-time-budget=25000", "--dump-dom",
                                address]).stdout
            assert "my-sweep-parent" in dom, dom[-3000:]
            assert "Detect Issues" not in dom          # the GenAI overview's button

        # SIGTERM to capsweep alone (not its group): it passes it on; nothing it started keeps serving
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(60) == 0
        assert alive(server) == set(), alive(server)
        assert listening_addresses(port) == [] and not serving(port)
        if binary is None:
            pytest.skip(why)
    finally:
        kill_group(proc, signal.SIGKILL, 30)


def test_a_busy_port_is_one_line_and_exit_2_before_anything_starts(tmp_path):
    """A real listener on the port: `capsweep ui` says so in one line, exits 2, creates no store and
    starts no server (it used to print its success line, then MLflow's error, and exit 0)."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        db = tmp_path / "mlflow.db"
        t0 = time.monotonic()
        proc = subprocess.run(capsweep_cmd("ui", "--tracking-uri", f"sqlite:///{db}", "--port", str(port)),
                              cwd=tmp_path, env=env_for_subprocess(), capture_output=True, text=True, timeout=120)
        took = time.monotonic() - t0
    print(f"refused in {took:.1f} s: {proc.stderr!r}")
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("capsweep: error: --port: ")
    assert f"{port} on 127.0.0.1 is in use" in proc.stderr and proc.stdout == ""
    assert not db.exists()


# A stand-in server for the signal and failure paths of sweeps/ui.py: a real HTTP server answering
# /health, with a child process of its own (as uvicorn has workers), each writing its pid to a file.
FAKE_SERVER = textwrap.dedent("""
    import http.server, subprocess, sys
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    open(sys.argv[2], "w").write(f"{child.pid}")
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/health" else 404); self.end_headers(); self.wfile.write(b"OK")
        def log_message(self, *a): pass
    print("serving", flush=True)
    http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
""")

DRIVER = textwrap.dedent("""
    import sys
    from sweeps import ui
    port, pids = sys.argv[1], sys.argv[2]
    cmd = [sys.executable, "-c", open(sys.argv[3]).read(), port, pids]
    code = ui.serve(cmd, f"http://127.0.0.1:{port}", lambda: print("READY", flush=True), poll_s=0.1)
    print("EXIT", code, flush=True)
""")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_stops_the_servers_whole_group(tmp_path, sig):
    """Ctrl-C (SIGINT) and SIGTERM to the process running ui.serve reach the server and the server's
    own child; serve returns 0 and nothing is left."""
    port, pids = free_port(), tmp_path / "child.pid"
    (tmp_path / "server.py").write_text(FAKE_SERVER)
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, str(port), str(pids), str(tmp_path / "server.py")],
                            cwd=ROOT, env=env_for_subprocess(), stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        assert proc.stdout.readline().strip() == "READY"
        assert serving(port)
        below = descendants(proc.pid)
        grandchild = int(pids.read_text())
        assert grandchild in below and len(below) == 2
        os.kill(proc.pid, sig)
        assert proc.stdout.readline().split() == ["EXIT", "0"]
        assert proc.wait(30) == 0
        assert alive(below) == set() and not serving(port)
    finally:
        kill_group(proc, signal.SIGKILL, 30)


def test_a_server_that_dies_or_never_answers_is_one_error_and_nothing_is_left(tmp_path):
    """A server that exits before it answers: UIError (exit 1) naming its error line, not a success line.
    One that never answers: UIError after the bound, and its process group is gone."""
    ready = []
    dies = [sys.executable, "-c", "import sys; print('starting'); print('OSError: [Errno 98] Address already "
            "in use'); print('bye'); sys.exit(3)"]
    with pytest.raises(ui.UIError) as e:
        ui.serve(dies, f"http://127.0.0.1:{free_port()}", lambda: ready.append(1), poll_s=0.05)
    assert e.value.code == 1 and ready == []
    assert str(e.value) == ("the MLflow server exited with code 3 before it answered: OSError: [Errno 98] "
                            "Address already in use")
    pid_file = tmp_path / "mute.pid"
    mute = [sys.executable, "-c", f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); "
            "time.sleep(600)"]
    with pytest.raises(ui.UIError) as e:
        ui.serve(mute, f"http://127.0.0.1:{free_port()}", lambda: ready.append(1), start_timeout=1.0, poll_s=0.05)
    assert e.value.code == 1 and "did not answer" in str(e.value) and ready == []
    assert alive({int(pid_file.read_text())}) == set()


def test_port_problem_names_a_busy_port_and_a_foreign_address():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert ui.port_problem("127.0.0.1", port).startswith(f"--port: {port} on 127.0.0.1 is in use")
    assert ui.port_problem("127.0.0.1", port) is None            # closed again: free
    assert ui.port_problem("192.0.2.1", port).startswith("--host: cannot listen on 192.0.2.1")   # TEST-NET-1
