"""The local Ray a sweep starts is guarded (issue 18, item 8).

Ray 2.60 cannot bind a local Ray to 127.0.0.1: `ray.init` turns a loopback node address into the
machine's own (`services.resolve_ip_for_localhost`) and its gcs_server and raylet listen on every
interface. What guards them is token authentication, which a new local Ray turns on: this test starts
the local Ray exactly as `capsweep run` does (`runner.init_ray`), in a process whose home has no token
yet, and calls the GCS and the raylet over the machine's network address: a call without the token,
or with a wrong one, is refused (UNAUTHENTICATED); the same call with the token succeeds; the token
file capsweep's run created is readable by its owner only.
"""
from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest

from tests.helpers.sweep import ROOT, env_for_subprocess

DRIVER = """
import json, sys
from sweeps.runner import init_ray
init_ray(None, 1)
import ray
node = ray.nodes()[0]
print(json.dumps({"gcs": ray.get_runtime_context().gcs_address, "ip": node["NodeManagerAddress"],
                  "raylet": node["NodeManagerPort"]}), flush=True)
sys.stdin.read()      # until the test closes it
"""


@pytest.fixture(scope="module")
def local_ray(tmp_path_factory):
    import json
    home = tmp_path_factory.mktemp("home")
    env = env_for_subprocess(HOME=str(home))
    for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS"):
        env.pop(k, None)
    proc = subprocess.Popen([sys.executable, "-c", DRIVER], cwd=ROOT, env=env, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        line = proc.stdout.readline()
        assert line, proc.stderr.read()[-3000:]
        yield json.loads(line), home
    finally:
        proc.stdin.close()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()


def _calls(address: str, token: str):
    """(GCS answer, raylet answer) for each of: no token, a wrong token, the token."""
    import grpc
    from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc, node_manager_pb2, node_manager_pb2_grpc
    gcs_address, raylet_address = address
    gcs = gcs_service_pb2_grpc.NodeInfoGcsServiceStub(grpc.insecure_channel(gcs_address))
    raylet = node_manager_pb2_grpc.NodeManagerServiceStub(grpc.insecure_channel(raylet_address))
    out = []
    for md in ([], [("authorization", "Bearer not-the-token")], [("authorization", f"Bearer {token}")]):
        row = []
        for call in (lambda: gcs.GetClusterId(gcs_service_pb2.GetClusterIdRequest(), metadata=md, timeout=10),
                     lambda: raylet.GetNodeStats(node_manager_pb2.GetNodeStatsRequest(), metadata=md, timeout=10)):
            try:
                call()
                row.append("OK")
            except grpc.RpcError as e:
                row.append(e.code().name)
        out.append(row)
    return out


def test_the_local_ray_answers_only_with_its_token(local_ray):
    info, home = local_ray
    assert not info["ip"].startswith("127.")       # reachable on the machine's address, not loopback only
    token_file = home / ".ray" / "auth_token"
    token = token_file.read_text().strip()
    assert token and stat.S_IMODE(token_file.stat().st_mode) == 0o600
    got = _calls((info["gcs"], f"{info['ip']}:{info['raylet']}"), token)
    assert got == [["UNAUTHENTICATED", "UNAUTHENTICATED"], ["UNAUTHENTICATED", "UNAUTHENTICATED"], ["OK", "OK"]]


def test_turning_token_authentication_off_is_warned_about(monkeypatch, capsys):
    from sweeps.runner import _warn_if_local_ray_is_open
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    _warn_if_local_ray_is_open()
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    _warn_if_local_ray_is_open()
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "RAY_AUTH_MODE=disabled" in err and "all of this machine's network" in err
