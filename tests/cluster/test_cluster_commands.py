"""cluster.yaml's commands as Ray's cluster launcher runs them (tests/helpers/cluster.py says how).

- every command, as `ray up` sends it to the head and the autoscaler to each worker type, must parse
  (`bash -n` on exactly the script the remote bash receives); the check is shown to catch the bug
  `- |-` caused (a here-document closed by `EOF)`) and a broken quote;
- the worker start commands, run alone as on a reused (stopped, then restarted) worker, leave /shared
  mounted and writable, and stop the node before `ray start` when it is not;
- the head's start command waits for MLflow's health check, failing loudly (the AMI pin:
  tests/cluster/test_cluster_launcher.py).

/shared on this machine: this container's kernel has no NFS (no `nfs`/`nfs4` in /proc/filesystems),
so the worker's NFS mount is replaced by a bind mount of a temp folder (`mount --bind EXPORT TARGET`
for `mount -t nfs4 ... "$RAY_HEAD_IP:/shared" /shared`, and /shared by a temp path everywhere); the
rest of each command (mkdir, mountpoint, the idempotence, the write check, Ray's wrapping and its stop
on failure) runs as written. The real /shared of the machine, if any, is never touched.
"""
from __future__ import annotations

import re
import subprocess

import click
import pytest
import yaml

from tests.helpers import pg as pg_helpers
from tests.helpers.cluster import (LocalSSH, cluster_requirements, launcher_calls, launcher_steps, load_cluster,
                                   local_shell_env, mlflow_unit, run_like_ray)
from tests.helpers.procs import free_port

RAY_CMD = re.compile(r"\bray (stop|start)\b")


@pytest.fixture(scope="module")
def cfg() -> dict:
    return load_cluster()


@pytest.mark.parametrize("node_type", ["head", "gpu_1x_a10g", "gpu_4x_a10g"])
def test_every_command_parses_as_ray_runs_it(cfg, node_type, cluster_extra):
    """What a new node of this type runs (initialization, setup, start), as Ray's own launcher sends it
    (`ray up` for the head, autoscaler v2 for a worker, tests/helpers/launcher.py), each script parsed by
    bash exactly as the node's bash receives it."""
    calls = [c for c in launcher_calls(cfg, node_type) if c[0] != "connect"]
    head = node_type == cfg["head_node_type"]
    expected = (len(cfg["initialization_commands"]) + len(cfg["head_setup_commands" if head else "worker_setup_commands"])
                + len(cfg["head_start_ray_commands" if head else "worker_start_ray_commands"]))
    assert len(calls) == expected
    for stage, command, _, returncode, output in calls:
        assert returncode == 0, f"{stage} command does not parse as Ray runs it:\n{command}\n{output}"
    # Ray's wrapping is in place: the start commands carry the launcher's exports and resources
    stage, command, kwargs, _, _ = calls[-1]
    assert stage == "start" and "ray start" in command and command.startswith("export ")
    assert "RAY_OVERRIDE_RESOURCES" in kwargs["environment_variables"]


ORIGINAL_HEREDOC = """
commands:
  - |-
    sudo tee /etc/systemd/system/mlflow.service > /dev/null <<'EOF'
    [Service]
    ExecStart=/home/ubuntu/venv/bin/mlflow server
    EOF
  - |
    sudo tee /etc/systemd/system/mlflow.service > /dev/null <<'EOF'
    [Service]
    ExecStart=/home/ubuntu/venv/bin/mlflow server
    EOF
  - echo "a quote that never closes
"""


def test_the_check_catches_a_broken_heredoc_and_a_broken_quote():
    """The bug of cluster.yaml before issue 14: the unit file's here-document written with `- |-` loses
    its final newline, Ray appends `)`, and bash never finds `EOF`. On its own the command is fine;
    only Ray's wrapping breaks it, which is why the check must wrap as Ray does."""
    stripped, kept, quote = yaml.safe_load(ORIGINAL_HEREDOC)["commands"]
    assert not stripped.endswith("\n") and kept.endswith("\n")
    assert subprocess.run(["bash", "-n", "-c", stripped]).returncode == 0, "fine without Ray's wrapping"
    ssh = LocalSSH()
    with pytest.raises(click.ClickException):
        run_like_ray(stripped, ssh, run_env="auto")
    assert "unexpected end of file" in ssh.calls[-1][3] and "wanted `EOF'" in ssh.calls[-1][3]
    run_like_ray(kept, ssh, run_env="auto")                     # `- |`: the fix cluster.yaml uses
    with pytest.raises(click.ClickException):
        run_like_ray(quote, ssh, run_env="auto")
    assert [c[2] for c in ssh.calls] == [2, 0, 2]


def test_backend_uri_names_the_driver_the_cluster_extra_installs(cfg):
    """SQLAlchemy 2.1 would pick psycopg (3) for a bare postgresql:// URI; the unit names it, and the
    `cluster` extra, which every node installs, provides it."""
    from packaging.requirements import Requirement
    from sqlalchemy.engine import make_url
    argv, _ = mlflow_unit(cfg)
    url = make_url(argv[argv.index("--backend-store-uri") + 1])
    assert url.drivername == "postgresql+psycopg" and url.get_driver_name() == "psycopg"
    assert "psycopg" in {Requirement(r).name for r in cluster_requirements()}
    for role in ("head_setup_commands", "worker_setup_commands"):
        assert any('[cluster]"' in c for c in cfg[role] if "pip install" in c), role


# ---- a worker that was stopped and is started again ----------------------------------------------------
def _on_this_machine(command: str, export: str, target: str) -> tuple[str, int]:
    """The NFS mount of the head's /shared -> a bind mount of `export`; /shared -> `target`."""
    command, n = re.subn(r'-t nfs4(?: -o \S+)? "\$RAY_HEAD_IP:/shared"', f"--bind {export}", command)
    return re.sub(r"(?<![\w:])/shared\b", target, command), n


def _mounts_at(target: str) -> int:
    return sum(line.split()[4] == target for line in open("/proc/self/mountinfo"))


@pytest.fixture
def mount_tools(tmp_path):
    if not pg_helpers.is_root():
        pytest.skip("mounting needs root (the cluster's commands use sudo mount)")
    reason = pg_helpers.ensure_debian_packages({"sudo": "sudo", "mountpoint": "util-linux"})
    if reason:
        pytest.skip(reason)
    probe = tmp_path / "probe"
    probe.mkdir()
    tried = subprocess.run(["mount", "--bind", str(probe), str(probe)], capture_output=True, text=True)
    if tried.returncode:
        pytest.skip(f"this machine does not allow bind mounts: {tried.stderr.strip()}")
    subprocess.run(["umount", str(probe)], check=True)


def test_restarted_worker_mounts_shared_before_ray_starts(cfg, tmp_path, mount_tools, cluster_extra):
    """A reused worker runs only its start commands ("Configuration already up to date, skipping file
    mounts, initialization and setup commands"). Run alone, twice (a second restart), they leave
    /shared mounted once and writable, and the files land in the head's export. Ray's own `ray stop` /
    `ray start` lines are not run here (they would stop this machine's other Ray clusters); they are
    checked to come after the mount and its check, and a failing check is shown to stop the sequence."""
    steps = [s for s in launcher_steps(cfg, "gpu_1x_a10g") if s.stage == "start"]
    order = [("mount" if " mount " in s.command else "check" if "mountpoint -q" in s.command and "touch" in s.command
              else "ray start" if "ray start" in s.command else "other") for s in steps]
    assert order.index("mount") < order.index("check") < order.index("ray start"), order
    export, target = tmp_path / "head-export", str(tmp_path / "worker" / "shared")
    export.mkdir()
    local = []
    for s in steps:
        if not RAY_CMD.search(s.command):
            command, n = _on_this_machine(s.command, str(export), target)
            local.append((command, n, s.kwargs))
    assert sum(n for _, n, _ in local) == 1, "the NFS mount of $RAY_HEAD_IP:/shared was not found"
    ssh = LocalSSH(execute=True, env=local_shell_env(tmp_path / "home"))
    try:
        for _ in range(2):
            for command, _, kwargs in local:
                try:
                    run_like_ray(command, ssh, **kwargs)
                except click.ClickException:
                    pytest.fail(f"start command failed:\n{command}\n{ssh.calls[-1][3]}")
            assert _mounts_at(target) == 1, "mounted once, also after a second start"
        (tmp_path / "worker" / "shared" / "state.pt").write_text("epoch 3")
        assert (export / "state.pt").read_text() == "epoch 3", "written through the mount into the head's folder"
        assert not list(export.glob(".write-test-*")), "the write check cleans up after itself"

        # the same check on a worker whose /shared is not mounted stops before Ray starts
        subprocess.run(["umount", target], check=True)
        (check, _, kwargs) = [x for x in local if "touch" in x[0]][0]
        with pytest.raises(click.ClickException):
            run_like_ray(check, ssh, **kwargs)
        assert f"capsweep: {target} is not mounted from the head or not writable here" in ssh.calls[-1][3]
    finally:
        while _mounts_at(target):
            subprocess.run(["umount", "-l", target], check=False)


# ---- the head's start commands ---------------------------------------------------------------------
def _head_start(cfg: dict, needle: str):
    (step,) = [s for s in launcher_steps(cfg, cfg["head_node_type"]) if s.stage == "start" and needle in s.command]
    return step




def test_head_start_fails_loudly_when_mlflow_does_not_answer(cfg, tmp_path, cluster_extra):
    """`systemctl restart mlflow` returns 0 even when the server then crash-loops; the next start
    command polls its /health and stops `ray up` when it never answers. Here nothing listens on the
    port, and the loop's 90 tries are cut to 2 (the passing case, against a real server on
    PostgreSQL, is in tests/cluster/test_cluster_postgres.py)."""
    reason = pg_helpers.ensure_debian_packages({"curl": "curl"})      # without it the loop could not pass
    if reason:
        pytest.skip(reason)
    step = _head_start(cfg, "/health")
    assert "seq 90" in step.command and "127.0.0.1:5000" in step.command
    command = step.command.replace("seq 90", "seq 2").replace("127.0.0.1:5000", f"127.0.0.1:{free_port()}")
    ssh = LocalSSH(execute=True, env=local_shell_env(tmp_path / "home"))
    with pytest.raises(click.ClickException):
        run_like_ray(command, ssh, **step.kwargs)
    assert ssh.calls[-1][2] == 1 and "the MLflow server does not answer" in ssh.calls[-1][3]
