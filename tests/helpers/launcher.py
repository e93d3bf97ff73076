"""Ray's own cluster launcher, run on this machine: `ray up`'s `get_or_create_head_node` for the head and
autoscaler v2's `RayInstaller` for the workers, with two stand-ins and nothing else:

- `FakeProvider`, the cloud: nodes are folders under one temp folder (a node's `/x` is `<its folder>/x`,
  its `~` is `<its folder>/home/ubuntu`), created, tagged, stopped and reused as Ray's AWS provider does
  it (a stopped node keeps its tags and is reused for a launch of the same kind, launch config and node
  type while `cache_stopped_nodes` is on, Ray's AWS default);
- `LocalCloud`, the `subprocess`-like process runner Ray's `SSHCommandRunner` hands every `ssh` and
  `rsync` argv to (Ray's `_runner` / `process_runner` parameters exist for this). `rsync` copies into the
  target node's folder. An `ssh` command's remote script, exactly as Ray wrapped it
  (`source ~/.bashrc; export OMP_NUM_THREADS=1 PYTHONWARNINGS=ignore && (...)`), is parsed with
  `bash -n`, or, when one of the test's rules names it, run for real with HOME at the node's home.

Everything between is Ray's: which lists run and in what order, the `export ...;` prefixes of the start
commands, the hashes that decide whether a node is up to date, the bootstrap config `ray up` writes to
the head, and how autoscaler v2 reads it back (`FileConfigReader`, which prepares the config again).
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import subprocess
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from tests.helpers.sweep import ROOT

REMOTE_HOME = "/home/ubuntu"
HEAD_IP = "10.0.0.5"
# A rule: (does this command run for real?, how the script is adapted to this machine before it does)
Rule = tuple[Callable[[str], bool], Callable[[str], str]]


@dataclass
class Node:
    id: str
    ip: str
    root: Path
    tags: dict
    state: str = "running"                 # running | stopped | terminated

    @property
    def home(self) -> Path:
        return self.path(REMOTE_HOME)

    def path(self, remote: str) -> Path:
        """Where a remote path of this node lies on this machine."""
        if remote == "~" or remote.startswith("~/"):
            remote = REMOTE_HOME + remote[1:]
        assert remote.startswith("/"), remote
        return self.root / remote.lstrip("/")


@dataclass
class Call:
    """One command Ray sent to a node: the list it came from, the command and Ray's run() arguments as
    Ray's NodeUpdater passed them, the script the node's bash received, and how it ended."""
    node: str
    stage: str                  # connect (uptime, mkdir for file mounts) | initialization | setup | start
    command: str
    kwargs: dict
    script: str = ""
    executed: bool = False
    returncode: int = 0
    output: str = ""


def stage_of(kwargs: dict) -> str:
    """Which list a command came from, read off how Ray's NodeUpdater calls `cmd_runner.run`: start
    commands with `environment_variables`, initialization commands with the SSH key override, setup
    commands with run_env="auto" alone; the rest (`uptime`, `mkdir -p` before a file mount) connect."""
    if "environment_variables" in kwargs:
        return "start"
    if "ssh_options_override_ssh_key" in kwargs:
        return "initialization"
    if kwargs.get("run_env") == "auto":
        return "setup"
    return "connect"


@dataclass
class LocalCloud:
    root: Path
    rules: list = field(default_factory=list)
    calls: list = field(default_factory=list)
    nodes: dict = field(default_factory=dict)
    extra_env: dict = field(default_factory=dict)
    _pending: dict = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def node_at(self, ip: str) -> Node:
        (node,) = [n for n in self.nodes.values() if n.ip == ip and n.state == "running"]
        return node

    def calls_on(self, node_id: str, stage: Optional[str] = None) -> list[Call]:
        return [c for c in self.calls if c.node == node_id and (stage is None or c.stage == stage)]

    def env_for(self, node: Node) -> dict:
        node.home.mkdir(parents=True, exist_ok=True)
        (node.home / ".bashrc").touch()
        return {"HOME": str(node.home), "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8",
                **self.extra_env}

    # -- the process runner API Ray calls (subprocess.check_call / check_output) --
    def check_call(self, argv, stdin=None, stdout=None, stderr=None, **kw):
        if argv[0] == "rsync":
            return self._rsync(argv)
        assert argv[0] == "ssh", argv
        target = next(i for i, a in enumerate(argv) if re.fullmatch(r"[\w.-]+@[\w.-]+", a))
        node = self.node_at(argv[target].split("@", 1)[1])
        remote = " ".join(argv[target + 1:])          # what sshd hands the login shell
        words = shlex.split(remote)
        assert words[:4] == ["bash", "--login", "-c", "-i"] and len(words) == 5, words[:4]
        script = words[4]
        call = self._pending.pop(threading.get_ident())
        call.script = script
        rule = next((r for r in self.rules if r[0](call.command)), None)
        if rule:
            call.executed = True
            proc = subprocess.run(["bash", "-c", rule[1](script)], env=self.env_for(node), capture_output=True,
                                  text=True, stdin=subprocess.DEVNULL, timeout=600)
        else:
            proc = subprocess.run(["bash", "-n", "-c", script], capture_output=True, text=True, timeout=60)
        call.returncode, call.output = proc.returncode, proc.stdout + proc.stderr
        if proc.returncode:
            raise subprocess.CalledProcessError(proc.returncode, argv, proc.stdout, proc.stderr)
        return 0

    def check_output(self, argv, **kw):
        self.check_call(argv)
        return self.calls[-1].output.encode()

    def _rsync(self, argv: list[str]) -> int:
        source, dest = argv[-2], argv[-1]
        ip, _, remote = dest.partition(":")
        node = self.node_at(ip.split("@", 1)[1])
        excludes = [argv[i + 1] for i, a in enumerate(argv) if a == "--exclude"]
        target = node.path(remote)
        if source.endswith("/"):
            ignore = shutil.ignore_patterns(*[e.replace("**/", "") for e in excludes])
            shutil.copytree(source, target, dirs_exist_ok=True, ignore=ignore)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
        return 0

    def record(self, node_id: str, command: str, kwargs: dict) -> Call:
        call = Call(node_id, stage_of(kwargs), command, dict(kwargs))
        with self._lock:
            self.calls.append(call)
        self._pending[threading.get_ident()] = call
        return call


def recording_runner(cloud: LocalCloud):
    """Ray's SSHCommandRunner, noting each command and its run() arguments before Ray wraps it."""
    from ray.autoscaler._private.command_runner import SSHCommandRunner

    class Recording(SSHCommandRunner):
        def run(self, cmd=None, **kwargs):
            cloud.record(self.node_id, cmd, kwargs)
            return super().run(cmd, **kwargs)

    return Recording


def fake_provider(cloud: LocalCloud, provider_config: dict, cluster_name: str):
    """A NodeProvider whose nodes are folders of `cloud` (see the module's docstring)."""
    from ray.autoscaler.node_provider import NodeProvider
    from ray.autoscaler.tags import (
        TAG_RAY_LAUNCH_CONFIG,
        TAG_RAY_NODE_KIND,
        TAG_RAY_USER_NODE_TYPE,
    )

    runner_cls = recording_runner(cloud)

    class FakeProvider(NodeProvider):
        def __init__(self):
            super().__init__(provider_config, cluster_name)
            self.cache_stopped_nodes = provider_config.get("cache_stopped_nodes", True)   # AWS's default
            self.created: list[str] = []
            self.reused: list[str] = []

        def _match(self, node: Node, tag_filters: dict) -> bool:
            return all(node.tags.get(k) == v for k, v in tag_filters.items())

        def non_terminated_nodes(self, tag_filters):
            return [n.id for n in cloud.nodes.values() if n.state == "running" and self._match(n, tag_filters)]

        def is_running(self, node_id):
            return cloud.nodes[node_id].state == "running"

        def is_terminated(self, node_id):
            return cloud.nodes[node_id].state != "running"

        def node_tags(self, node_id):
            return dict(cloud.nodes[node_id].tags)

        def internal_ip(self, node_id):
            return cloud.nodes[node_id].ip

        external_ip = internal_ip

        def set_node_tags(self, node_id, tags):
            cloud.nodes[node_id].tags.update(tags)

        def create_node(self, node_config, tags, count):
            out = {}
            if self.cache_stopped_nodes:            # as AWSNodeProvider.create_node reuses stopped nodes
                keys = (TAG_RAY_NODE_KIND, TAG_RAY_LAUNCH_CONFIG, TAG_RAY_USER_NODE_TYPE)
                for node in [n for n in cloud.nodes.values() if n.state == "stopped"
                             and all(n.tags.get(k) == tags.get(k) for k in keys)][:count]:
                    node.state = "running"
                    node.tags.update(tags)
                    self.reused.append(node.id)
                    out[node.id] = node
                    count -= 1
            for _ in range(count):
                n = len(cloud.nodes)
                node_id = f"i-{n:017x}"
                ip = HEAD_IP if n == 0 else f"10.0.1.{n}"
                node = Node(node_id, ip, cloud.root / node_id, dict(tags))
                node.root.mkdir(parents=True)
                cloud.nodes[node_id] = node
                self.created.append(node_id)
                out[node_id] = node
            return out

        def terminate_node(self, node_id):
            cloud.nodes[node_id].state = "stopped" if self.cache_stopped_nodes else "terminated"

        def get_command_runner(self, log_prefix, node_id, auth_config, cluster_name, process_runner,
                               use_internal_ip, docker_config=None):
            return runner_cls(log_prefix=log_prefix, node_id=node_id, provider=self, auth_config=auth_config,
                              cluster_name=cluster_name, process_runner=process_runner,
                              use_internal_ip=use_internal_ip)

    return FakeProvider()


@contextlib.contextmanager
def launcher_env(tmp: Path):
    """Where `ray up` runs: the checkout as working folder (file_mounts name ./capsmodels, ...), a HOME of
    its own with the cluster's ~/.ray/auth_token (Ray hashes every mounted file), usage stats off, and AWS
    credentials that reach nothing (Ray's AWS code builds boto3 clients; no request leaves this machine)."""
    laptop = tmp / "laptop"
    (laptop / ".ray").mkdir(parents=True, exist_ok=True)
    (laptop / ".ray" / "auth_token").write_text("0" * 64)
    env = {"HOME": str(laptop), "RAY_USAGE_STATS_ENABLED": "0", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_EC2_METADATA_DISABLED": "true",
           "AWS_CONFIG_FILE": str(tmp / "no-aws-config"), "AWS_SHARED_CREDENTIALS_FILE": str(tmp / "no-aws-creds")}
    saved = {k: os.environ.get(k) for k in env}
    cwd = os.getcwd()
    os.environ.update(env)
    os.chdir(ROOT)
    try:
        yield laptop
    finally:
        os.chdir(cwd)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def prepared(cfg: dict) -> dict:
    """What `ray up` hands get_or_create_head_node before the cloud's own bootstrap (`_bootstrap_config`:
    prepare_config, validate_config; AWS's bootstrap_aws, which adds the key pair, subnets, security group
    and the head's instance profile, runs under botocore's Stubber in tests/cluster/test_cluster_aws.py)."""
    from ray.autoscaler._private.util import prepare_config, validate_config
    out = prepare_config(cfg)
    validate_config(out)
    return out


def ray_up(cfg: dict, cloud: LocalCloud, provider, restart_only: bool = False, no_restart: bool = False):
    """`ray up cluster.yaml --yes` from the checkout: Ray's get_or_create_head_node with this provider and
    process runner. Needs cwd = the checkout and HOME with ~/.ray/auth_token (the file mounts Ray hashes).
    Each `ray up` is a process of its own: Ray's in-process cache of runtime hashes starts empty."""
    from ray.autoscaler._private import util
    from ray.autoscaler._private.commands import get_or_create_head_node
    util._hash_cache.clear()
    get_or_create_head_node(prepared(cfg), str(ROOT / "cluster.yaml"), no_restart=no_restart,
                            restart_only=restart_only, yes=True, override_cluster_name=None,
                            _provider=provider, _runner=cloud)


def head_node(cloud: LocalCloud) -> Node:
    from ray.autoscaler.tags import NODE_KIND_HEAD, TAG_RAY_NODE_KIND
    (node,) = [n for n in cloud.nodes.values() if n.tags.get(TAG_RAY_NODE_KIND) == NODE_KIND_HEAD]
    return node


def v2_config(cloud: LocalCloud):
    """The head's ~/ray_bootstrap_config.yaml as autoscaler v2's monitor reads it (FileConfigReader, with
    skip_content_hash as `ray.autoscaler.v2.monitor` passes it)."""
    from ray.autoscaler.v2.instance_manager.config import FileConfigReader
    return FileConfigReader(str(head_node(cloud).path("~/ray_bootstrap_config.yaml")),
                            skip_content_hash=True).get_cached_autoscaling_config()


def head_file_mounts_here(cloud: LocalCloud) -> None:
    """The autoscaler on the head hashes and syncs its own copies of the file mounts (the bootstrap config
    maps each remote path to itself): /home/ubuntu/... is the head's folder here, and so is HOME (inside
    `launcher_env`, which puts HOME back)."""
    head = head_node(cloud)
    path = head.path("~/ray_bootstrap_config.yaml")
    cfg = json.loads(path.read_text())
    cfg["file_mounts"] = {k: str(head.path(v)) if v.startswith(REMOTE_HOME + "/") else v
                          for k, v in cfg["file_mounts"].items()}
    path.write_text(json.dumps(cfg))
    os.environ["HOME"] = str(head.home)


def launch_worker(cloud: LocalCloud, provider, config, node_type: str) -> str:
    """Autoscaler v2 adds one worker of `node_type`: its NodeProviderAdapter launches it (tags, launch
    hash, resources as v2 sets them) and its RayInstaller sets it up from the head, as the monitor's
    ThreadedRayInstaller does, here in this thread."""
    from ray.autoscaler.v2.instance_manager.config import IConfigReader
    from ray.autoscaler.v2.instance_manager.node_provider import NodeProviderAdapter
    from ray.autoscaler.v2.instance_manager.ray_installer import RayInstaller
    from ray.core.generated.instance_manager_pb2 import Instance

    class Reader(IConfigReader):
        def get_cached_autoscaling_config(self):
            return config

        def refresh_cached_autoscaling_config(self):
            pass

    adapter = NodeProviderAdapter(v1_provider=provider, config_reader=Reader())
    created, reused = len(provider.created), len(provider.reused)
    adapter._launch_nodes_by_type(node_type, 1, "test-request")        # synchronously, in this thread
    assert not adapter.poll_errors(), "the launch failed"
    (node_id,) = provider.created[created:] + provider.reused[reused:]
    installer = RayInstaller(provider=provider, config=config, process_runner=cloud)
    installer.install_ray(Instance(instance_type=node_type, cloud_instance_id=node_id), head_node_ip=HEAD_IP)
    return node_id
