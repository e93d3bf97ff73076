"""The head's tracking server as cluster.yaml sets it up, on a real PostgreSQL: its database commands,
its unit's `mlflow server` line (backend URI with its named driver, workers, pool settings) with the
`cluster` extra installed, its health-check start command, and a sweep that logs through it while the
server is killed and restarted (the test tests/sweeps/test_reliability.py runs on SQLite).

Adapted to this machine, and nothing else: the PostgreSQL socket folder (/var/run/postgresql -> the test
server's), the OS user (ubuntu -> the user running the tests), the port (5000 -> a free one) and the
artifact folder. PostgreSQL comes from tests/conftest.py's session fixture (Debian's package, initdb +
pg_ctl in a temp folder, the head's max_connections).
"""
from __future__ import annotations

import getpass
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import click
import pytest
from mlflow.tracking import MlflowClient

from tests.helpers import pg as pg_helpers
from tests.helpers.cluster import (LocalSSH, assert_outage_survived, launcher_steps, load_cluster, local_shell_env,
                                   mlflow_unit, run_like_ray)
from tests.helpers.sweep import background_sweep, children, env_for_subprocess, wait_for, write_spec
from tests.helpers.procs import free_port

SOCKET = "/var/run/postgresql"
ENGINE_LOG = "Create SQLAlchemy engine with pool options"
ENGINES_PER_PROCESS = 3      # tracking, model registry, workspace stores (measured: MLflow 3.17)




def _flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def _with_flag(argv: list[str], name: str, value: str) -> list[str]:
    out = list(argv)
    out[out.index(name) + 1] = value
    return out


class HeadServer:
    """The unit's ExecStart, started and killed here; `up()` waits with the head's own start command."""

    def __init__(self, cfg: dict, sock: str, port: int, work: Path):
        argv, self.unit_env = mlflow_unit(cfg)
        argv = [a.replace(SOCKET, sock) for a in argv]
        self.argv = _with_flag(_with_flag(argv, "--port", str(port)), "--artifacts-destination", str(work / "artifacts"))
        self.workers = int(_flag(argv, "--workers"))
        self.port, self.work, self.logs, self.proc = port, work, [], None
        (self.health,) = [s for s in launcher_steps(cfg, cfg["head_node_type"])
                          if s.stage == "start" and "/health" in s.command]
        self.env = env_for_subprocess(**self.unit_env)

    def start(self) -> None:
        log = self.work / f"mlflow-{len(self.logs)}.log"
        self.logs.append(log)
        with open(log, "wb") as out:
            self.proc = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "server", *self.argv],
                                         env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    def up(self) -> None:
        """The head's start command that polls /health (up to 90 x 2 s), run as Ray runs it."""
        ssh = LocalSSH(execute=True, env=local_shell_env(self.work / "home"))
        command = self.health.command.replace("127.0.0.1:5000", f"127.0.0.1:{self.port}")
        try:
            run_like_ray(command, ssh, **self.health.kwargs)
        except click.ClickException:
            pytest.fail(f"the MLflow server did not come up: {ssh.calls[-1][3][-1000:]}\n"
                        f"{self.logs[-1].read_text()[-3000:]}")

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def _results_reported(storage: Path) -> int:
    """Epoch results Tune has written so far (result.json lines over all trials)."""
    return sum(len(p.read_text().splitlines()) for p in storage.glob("*/result.json"))


@pytest.fixture
def head_tools():
    """curl for the health check; sudo for the database commands when root (as written: sudo -u postgres)."""
    reason = pg_helpers.ensure_debian_packages({"curl": "curl", **({"sudo": "sudo"} if pg_helpers.is_root() else {})})
    if reason:
        pytest.skip(reason)


def _database_commands(cfg: dict, sock: str, user: str) -> list[tuple[str, dict]]:
    """The head's role and database commands, adapted: as root they run with `sudo -u postgres`
    as written; otherwise this user owns the test server and runs them itself."""
    steps = [s for s in launcher_steps(cfg, cfg["head_node_type"])
             if s.stage == "setup" and ("createuser" in s.command or "createdb" in s.command)]
    assert len(steps) == 2
    out = []
    for s in steps:
        command = re.sub(r"\bubuntu\b", user, s.command.replace(SOCKET, sock))
        if not pg_helpers.is_root():
            command = command.replace("sudo -u postgres ", "")
        out.append((command, s.kwargs))
    return out


def test_head_tracking_server_on_postgres_survives_a_kill_mid_sweep(postgres, cluster_extra, head_tools, tmp_path):
    cfg = load_cluster()
    user = getpass.getuser()
    ssh = LocalSSH(execute=True, env=local_shell_env(tmp_path / "home"))
    for _ in range(2):                                      # a second `ray up` runs them again
        for command, kwargs in _database_commands(cfg, postgres.socket_dir, user):
            try:
                run_like_ray(command, ssh, **kwargs)
            except click.ClickException:
                pytest.fail(f"{command}\n{ssh.calls[-1][3]}")
    assert postgres.sql("SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = 'mlflow'") == user

    server = HeadServer(cfg, postgres.socket_dir, free_port(), tmp_path)
    assert server.argv[server.argv.index("--backend-store-uri") + 1].startswith("postgresql+psycopg:///mlflow?host=/")
    uri = f"http://127.0.0.1:{server.port}"
    spec = write_spec(tmp_path / "pg.yaml", "pgoutage", "model.depth: {grid: [0, 1]}", seeds="[0]", epochs=6,
                      tracking_uri=uri)
    client = MlflowClient(uri)
    storage = tmp_path / "ray_results" / "pgoutage"
    try:
        server.start()
        server.up()
        with background_sweep("run", str(spec), "--num-cpus", "2", cwd=tmp_path, env=env_for_subprocess(),
                              capture=True) as sweep:
            wait_for(lambda: any("epoch" in r.data.metrics for r in children(client)), timeout=180,
                     what="first epoch logged")
            server.kill()                                  # the server dies mid-sweep ...
            at_kill = _results_reported(storage)

            def reported_while_down() -> bool:
                assert sweep.poll() is None, "the sweep exited while the server was down"
                return _results_reported(storage) > at_kill
            wait_for(reported_while_down, timeout=180, what="an epoch reported while the server is down")
            server.start()                                 # ... and comes back on the same database
            server.up()
            out, _ = sweep.communicate(timeout=400)
        assert_outage_survived(client, out, sweep.returncode, epochs=6)
    finally:
        server.kill()

    # the rows are in PostgreSQL, written as the OS user through the socket (peer authentication)
    assert postgres.sql("SELECT count(*) FROM metrics WHERE key = 'val_acc'", db="mlflow", superuser=False) == "12"
    assert postgres.sql("SELECT count(*) FROM runs", db="mlflow", superuser=False) == "3"
    # the connection budget holds: every engine the server opened used the unit's pool settings, no
    # process opened more than ENGINES_PER_PROCESS, and all of them together stay below max_connections
    pool, overflow = (int(server.unit_env[f"MLFLOW_SQLALCHEMYSTORE_{k}"]) for k in ("POOL_SIZE", "MAX_OVERFLOW"))
    for log in server.logs:
        engines = re.findall(ENGINE_LOG + r" (\{.*\})", log.read_text())
        assert engines and set(engines) == {f"{{'pool_size': {pool}, 'max_overflow': {overflow}}}"}, log
        assert len(engines) <= (server.workers + 1) * ENGINES_PER_PROCESS, (len(engines), log)
    max_conn = int(postgres.sql("SHOW max_connections"))
    reserved = int(postgres.sql("SHOW superuser_reserved_connections"))
    budget = (server.workers + 1) * ENGINES_PER_PROCESS * (pool + overflow)
    assert budget <= max_conn - reserved, (budget, max_conn, reserved)
    print(f"MLflow on PostgreSQL: {server.workers} workers, {len(engines)} engines in the last server; "
          f"at most {budget} connections of {max_conn - reserved}")
