"""cluster.yaml's commands, wrapped and run the way Ray 2.60's cluster launcher runs them.

`ray up` (and the autoscaler on the head, for workers) hands every command to
`ray.autoscaler._private.command_runner.SSHCommandRunner.run`, which builds
    ssh ... ubuntu@IP bash --login -c -i 'source ~/.bashrc; export OMP_NUM_THREADS=1 PYTHONWARNINGS=ignore && (CMD)'
(`_with_interactive`), CMD being prefixed first with `export K=V;` for the start commands' environment
(`_with_environment_variables`: RAY_OVERRIDE_RESOURCES, and RAY_USAGE_STATS_ENABLED on the head). Before
that, `ray.autoscaler._private.util.with_envs` prefixes `export RAY_HEAD_IP=...; ` to the workers'
commands and, for Ray start, the instance id and node type (autoscaler v2, the default of `ray up` since
Ray 2.50: `commands.get_or_create_head_node`, `v2/instance_manager/ray_installer.py`).

Which commands a node gets, and in what order, is recorded from Ray's own launcher code run on this
machine (`launcher_steps`, tests/helpers/launcher.py). `LocalSSH` runs one such command again: Ray's own
SSHCommandRunner builds it, and only the transport differs: `LocalSSH` takes the argv Ray would hand to
`ssh` and runs its remote part on this machine, as sshd does, with the login shell
(`bash -c "<the remote words joined by spaces>"`), or only parses it (`bash -n`).
"""
from __future__ import annotations

import copy
import functools
import json
import os
import re
import shlex
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import yaml

from tests.helpers.sweep import ROOT

CLUSTER_YAML = ROOT / "cluster.yaml"
HEAD_IP = "10.0.0.5"                   # what the launcher substitutes for the head's private address
SSH_USER_AT = f"ubuntu@{HEAD_IP}"


def load_cluster() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


@dataclass
class LocalSSH:
    """The process runner Ray's SSHCommandRunner calls (`check_call`/`check_output`, like `subprocess`).

    execute=False: the remote script is only parsed (`bash -n`); True: run it here with `env` (HOME is
    the remote user's home: its ~/.bashrc is what Ray's wrapper sources). Every call is kept in `calls`:
    (ray's argv, the script the remote bash runs, returncode, output)."""
    execute: bool = False
    env: Optional[dict] = None
    calls: list = field(default_factory=list)

    def _remote(self, argv: list[str]) -> str:
        """What sshd hands the user's login shell: the words after user@host, joined by spaces."""
        target = next(i for i, a in enumerate(argv) if re.fullmatch(r"[\w.-]+@[\w.-]+", a))
        return " ".join(argv[target + 1:])

    def check_call(self, argv, stdin=None, stdout=None, stderr=None):
        remote = self._remote(argv)
        words = shlex.split(remote)
        assert words[:4] == ["bash", "--login", "-c", "-i"] and len(words) == 5, words[:4]
        script = words[4]
        if self.execute:
            proc = subprocess.run(["bash", "-c", remote], env=self.env, capture_output=True, text=True,
                                  stdin=subprocess.DEVNULL, timeout=600)
        else:
            proc = subprocess.run(["bash", "-n", "-c", script], capture_output=True, text=True, timeout=60)
        self.calls.append((argv, script, proc.returncode, proc.stdout + proc.stderr))
        if proc.returncode:
            raise subprocess.CalledProcessError(proc.returncode, argv, proc.stdout, proc.stderr)
        return 0

    def check_output(self, argv, **kw):
        self.check_call(argv)
        return self.calls[-1][3].encode()


def ssh_runner(process_runner: LocalSSH):
    """Ray's SSHCommandRunner for one node, its IP already known (no cloud provider is asked)."""
    from ray.autoscaler._private.command_runner import (
        SSHCommandRunner,
        is_using_login_shells,
    )
    assert is_using_login_shells(), "ray up runs every command in a login shell"
    runner = SSHCommandRunner(log_prefix="", node_id="i-0123456789abcdef0", provider=None,
                              auth_config={"ssh_user": "ubuntu"}, cluster_name="capsweep",
                              process_runner=process_runner, use_internal_ip=True)
    runner.ssh_ip = HEAD_IP
    return runner


@dataclass
class Step:
    """One command as the launcher sent it: which list it came from, the command, and Ray's run()
    arguments (the command already prefixed with the launcher's `export ...; ` where Ray does that)."""
    stage: str
    command: str
    kwargs: dict


@functools.lru_cache(maxsize=4)
def _launcher_run(cfg_json: str) -> dict:
    """Every command Ray's launcher sends to a new node of each type, recorded from Ray's own code:
    `ray up` (get_or_create_head_node) for the head, autoscaler v2 (its NodeProviderAdapter and
    RayInstaller, reading the bootstrap config `ray up` wrote) for one worker of each type; every script
    parsed with `bash -n` as the node's bash receives it (tests/helpers/launcher.py)."""
    from tests.helpers import launcher as cl
    cfg = json.loads(cfg_json)
    with tempfile.TemporaryDirectory() as tmp, cl.launcher_env(Path(tmp)):
        cloud = cl.LocalCloud(Path(tmp) / "cloud")
        provider = cl.fake_provider(cloud, cfg["provider"], cfg["cluster_name"])
        cl.ray_up(cfg, cloud, provider)
        nodes = {cfg["head_node_type"]: cl.head_node(cloud).id}
        cl.head_file_mounts_here(cloud)
        config = cl.v2_config(cloud)
        for node_type in cfg["available_node_types"]:
            if node_type != cfg["head_node_type"]:
                nodes[node_type] = cl.launch_worker(cloud, provider, config, node_type)
        return {t: [(c.stage, c.command, c.kwargs, c.returncode, c.output) for c in cloud.calls_on(node_id)]
                for t, node_id in nodes.items()}


def launcher_calls(cfg: dict, node_type: str) -> list[tuple]:
    """(stage, command, run() kwargs, bash -n's status, its output) of every command Ray sent to a new
    node of `node_type`, `uptime` and the file mounts' `mkdir -p` (stage "connect") included."""
    return [(s, c, copy.deepcopy(k), rc, out) for s, c, k, rc, out in _launcher_run(json.dumps(cfg, sort_keys=True))[node_type]]


def launcher_steps(cfg: dict, node_type: str) -> list[Step]:
    """Every command `ray up` (head) or autoscaler v2 (a worker of `node_type`) runs on a new node, in
    Ray's order: initialization, setup, start (recorded from Ray's own code, see _launcher_run)."""
    return [Step(stage, command, kwargs) for stage, command, kwargs, _, _ in launcher_calls(cfg, node_type)
            if stage != "connect"]


def run_like_ray(command: str, process_runner: LocalSSH, **kwargs) -> None:
    """SSHCommandRunner.run(command): raises click.ClickException ("SSH command failed.") on a non-zero
    status, which is how `ray up` stops ("Setup command failed." / "Start command failed.")."""
    ssh_runner(process_runner).run(command, **kwargs)


def local_shell_env(home: Path, **extra: str) -> dict:
    """The remote user's environment for LocalSSH(execute=True): a home of its own (an empty ~/.bashrc,
    so nothing of this machine's user is sourced) and this machine's PATH."""
    home.mkdir(parents=True, exist_ok=True)
    (home / ".bashrc").touch()
    env = {"HOME": str(home), "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8"}
    env.update(extra)
    return env


def command_with(cfg: dict, key: str, needle: str) -> str:
    """The one command of cfg[key] that contains `needle`."""
    (cmd,) = [c for c in cfg[key] if needle in c]
    return cmd


def mlflow_unit(cfg: dict) -> tuple[list[str], dict]:
    """(argv after `mlflow server`, Environment= variables) of the head's mlflow.service unit."""
    text = command_with(cfg, "head_setup_commands", "mlflow.service")
    (line,) = re.findall(r"^ExecStart=(\S*mlflow server .*)$", text, flags=re.M)
    argv = shlex.split(line)
    assert Path(argv[0]).name == "mlflow" and argv[1] == "server"
    env = dict(kv.split("=", 1) for kv in re.findall(r"^Environment=(\S+)$", text, flags=re.M))
    return argv[2:], env


def cluster_requirements() -> list[str]:
    """pyproject.toml's `cluster` extra, as written."""
    try:
        import tomllib
    except ImportError:                       # Python 3.10
        from pip._vendor import tomli as tomllib
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return list(project["optional-dependencies"]["cluster"])


def pg_max_connections(cfg: dict) -> int:
    (n,) = re.findall(r"ALTER SYSTEM SET max_connections = (\d+)", "\n".join(cfg["head_setup_commands"]))
    return int(n)


def assert_outage_survived(client, out: str, returncode: int, epochs: int) -> None:
    """What a sweep whose tracking server went away and came back must show (the server kill/restart
    tests): it finished, said the server was unreachable and the queued writes delivered, and every
    trial has every epoch once, none lost, none doubled."""
    from tests.helpers.sweep import children, parents
    assert returncode == 0, out[-3000:]
    assert "unreachable" in out and "delivered" in out
    runs = children(client)
    assert len(runs) == 2
    for r in runs:
        steps = sorted(m.step for m in client.get_metric_history(r.info.run_id, "val_acc"))
        assert steps == list(range(epochs)), steps
        assert r.info.status == "FINISHED"
    (parent,) = parents(client)
    assert parent.info.status == "FINISHED"
