"""Local Ray nodes for the multi-node tests: a free block of ports, node processes and their signals, the dashboard's state API."""
from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

BIN = Path(sys.executable).parent          # the venv: its `ray` and `mlflow`, and `python` for the job


# ---- a real two-node cluster on this machine ------------------------------------------------------
def port_block(n: int = 160) -> int:
    """A base b with ports b..b+n-1 all free on every interface (Ray's GCS and raylet bind '*')."""
    rng = random.Random(os.getpid() ^ int(time.time()))
    for _ in range(50):
        base = rng.randrange(20000, 32000 - n)
        socks = []
        try:
            for p in range(base, base + n):
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                socks.append(s)
                s.bind(("0.0.0.0", p))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free block of ports")


def popen(argv: list[str], env: dict, log: Path) -> subprocess.Popen:
    with open(log, "wb") as out:
        return subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def signal_all(groups: list[int], folder: str, sig: int) -> None:
    for g in groups:
        try:
            os.killpg(g, sig)
        except (ProcessLookupError, PermissionError):
            pass
    for pid in pids_under(folder):
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def pids_under(folder: str) -> list[int]:
    """Processes whose cwd or command line lies in `folder` (the job driver included)."""
    folder = folder.rstrip("/") + "/"
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            cwd = os.readlink(d / "cwd")
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if (cwd + "/").startswith(folder) or folder in cmd:
            found.append(int(d.name))
    return found


def listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


class Dashboard:
    """Ray's dashboard REST API (Jobs + State) with the cluster's token: the calls `ray job status`,
    `ray job logs` and `ray list nodes/actors` make, without Ray client state in this process."""

    def __init__(self, url: str, token: str):
        self.url, self.token = url, token

    def get(self, path: str, timeout: float = 10):
        req = urllib.request.Request(self.url + path, headers={"Authorization": f"Bearer {self.token}"})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())

    def up(self) -> bool:
        try:
            return self.get("/api/version", timeout=2)["ray_version"] != ""
        except OSError:
            return False

    def state(self, kind: str, **params) -> list[dict]:
        q = urllib.parse.urlencode({"limit": 10000, **params})
        return self.get(f"/api/v0/{kind}?{q}")["data"]["result"]["result"]

    def alive_nodes(self) -> set[str]:
        return {n["node_id"] for n in self.state("nodes") if n["state"] == "ALIVE"}

    def job(self, submission_id: str) -> dict:
        return self.get(f"/api/jobs/{submission_id}")

    def logs(self, submission_id: str) -> str:
        return self.get(f"/api/jobs/{submission_id}/logs")["logs"]

    def stop(self, submission_id: str) -> None:
        req = urllib.request.Request(f"{self.url}/api/jobs/{submission_id}/stop", method="POST",
                                     headers={"Authorization": f"Bearer {self.token}"})
        urllib.request.urlopen(req, timeout=10).close()


def is_trial(actor: dict) -> bool:
    """A Tune function-trial actor. Ray names its class `ImplicitFunc` or, depending on how the driver
    was started, by its qualified name `wrap_function.<locals>.ImplicitFunc`."""
    return actor["class_name"].rsplit(".", 1)[-1] == "ImplicitFunc"
