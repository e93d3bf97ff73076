"""cluster.yaml through Ray 2.60's own launcher code (tests/helpers/launcher.py: a fake provider whose
nodes are folders, and a process runner that parses every command as the node's bash receives it):

- `ray up` (get_or_create_head_node) on the head, and autoscaler v2 (NodeProviderAdapter + RayInstaller,
  reading the bootstrap config `ray up` wrote with its own FileConfigReader) on a worker of each type:
  every node runs each setup command once (issue 21, 1: with a global `setup_commands`, v2 runs it twice
  on every worker, shown on the old layout);
- a reused (stopped, then started again) worker runs only its start commands; a second `ray up` with
  nothing changed runs only the head's start commands, and after an edit of a synced file all of its
  setup commands (why head setup must leave running services alone, tests/cluster/test_cluster_services.py);
- the head's start command that pins the workers' AMI, run for real on the bootstrap config `ray up`
  wrote, read back by v2; without an AMI id `ray up` stops before Ray starts.
"""
from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import click
import pytest

from tests.helpers import launcher as cl
from tests.helpers.cluster import load_cluster

AMI = "ami-0123456789abcdef0"
LOOKUP = r"\$\(TOKEN=\$\(curl [^)]*169\.254\.169\.254/latest/api/token\) && curl [^)]*/latest/meta-data/ami-id\)"


@pytest.fixture
def cfg() -> dict:
    return load_cluster()


@pytest.fixture
def cloud(tmp_path, cluster_extra):
    """A fresh cloud, and `ray up`'s environment (the checkout as cwd, a HOME with the Ray token)."""
    with cl.launcher_env(tmp_path):
        yield cl.LocalCloud(tmp_path / "cloud")


def _workers(cfg: dict) -> list[str]:
    return [t for t in cfg["available_node_types"] if t != cfg["head_node_type"]]


def _bare(command: str) -> str:
    """A command without the `export K=V; ` prefixes Ray adds (with_head_node_ip to a worker's
    commands, with_envs to the start commands)."""
    return re.sub(r"^(export \w+=\S+; )+", "", command)


def _ran(cloud: cl.LocalCloud, node_id: str, stage: str) -> list[str]:
    """The commands (prefixes stripped) of one list Ray ran on a node; each parsed as the node gets it."""
    calls = cloud.calls_on(node_id, stage)
    assert all(c.returncode == 0 for c in calls), [(c.command, c.output) for c in calls if c.returncode]
    return [_bare(c.command) for c in calls]


def test_every_node_runs_each_setup_command_once(cfg, cloud):
    provider = cl.fake_provider(cloud, cfg["provider"], cfg["cluster_name"])
    cl.ray_up(cfg, cloud, provider)
    head = cl.head_node(cloud)
    assert _ran(cloud, head.id, "setup") == cfg["head_setup_commands"]
    assert _ran(cloud, head.id, "start") == cfg["head_start_ray_commands"]
    assert not _ran(cloud, head.id, "initialization") and not cfg["setup_commands"]

    # the config the head's autoscaler reads: v2's FileConfigReader prepares `ray up`'s output again
    cl.head_file_mounts_here(cloud)
    v2 = cl.v2_config(cloud)
    assert v2.get_head_setup_commands() == cfg["head_setup_commands"]
    for node_type in _workers(cfg):
        assert v2.get_worker_setup_commands(node_type) == cfg["worker_setup_commands"]
        node = cl.launch_worker(cloud, provider, v2, node_type)
        assert _ran(cloud, node, "setup") == cfg["worker_setup_commands"], node_type
        assert _ran(cloud, node, "start") == cfg["worker_start_ray_commands"]
        # the workers' commands are the head's shared ones (YAML aliases), in the head's order
        assert cfg["head_setup_commands"][:len(cfg["worker_setup_commands"])] == cfg["worker_setup_commands"]
        # v2's start environment: the head's address, the instance, its type, its resources
        (start,) = [c for c in cloud.calls_on(node, "start") if "ray start" in c.command]
        t = cfg["available_node_types"][node_type]
        assert start.command.startswith(f"export RAY_HEAD_IP={cl.HEAD_IP}; export RAY_CLOUD_INSTANCE_ID={node}; "
                                        f"export RAY_NODE_TYPE_NAME={node_type}; export RAY_CLOUD_INSTANCE_TYPE_NAME="
                                        f"{t['node_config']['InstanceType']}; ")
        assert start.kwargs["environment_variables"]["RAY_OVERRIDE_RESOURCES"] == t["resources"]
        assert f"export RAY_OVERRIDE_RESOURCES='{json.dumps(t['resources'], separators=(',', ':'))}';" in start.script
        # what the setup installs from travelled with the file mounts: the lock and the Ray token
        root = cloud.nodes[node]
        assert root.path("/home/ubuntu/capsweep/sweeps/constraints.txt").is_file()
        assert root.path("~/.ray/auth_token").is_file()


def test_a_global_setup_list_runs_twice_on_every_worker_under_v2(cfg, cloud):
    """The layout before issue 21: the shared commands as the global `setup_commands`. `ray up` runs them
    once on the head, but the bootstrap config it writes already holds them merged into each role's
    list, and v2 merges them in again: every worker runs each of them twice."""
    n = len(cfg["worker_setup_commands"])
    old = copy.deepcopy(cfg)
    old["setup_commands"] = cfg["worker_setup_commands"]
    old["head_setup_commands"] = cfg["head_setup_commands"][n:]
    old["worker_setup_commands"] = []
    provider = cl.fake_provider(cloud, old["provider"], old["cluster_name"])
    cl.ray_up(old, cloud, provider)
    assert _ran(cloud, cl.head_node(cloud).id, "setup") == cfg["head_setup_commands"]
    cl.head_file_mounts_here(cloud)
    v2 = cl.v2_config(cloud)
    node = cl.launch_worker(cloud, provider, v2, "gpu_1x_a10g")
    ran = _ran(cloud, node, "setup")
    assert ran == cfg["worker_setup_commands"] * 2 and len(set(ran)) == n
    assert len(v2.get_head_setup_commands()) == len(cfg["head_setup_commands"]) + n


def test_a_reused_worker_runs_only_its_start_commands(cfg, cloud):
    """The head's autoscaler stops an idle worker (cache_stopped_nodes) and later starts it again for the
    same node type: Ray finds the node's runtime hash up to date and skips file mounts and setup."""
    provider = cl.fake_provider(cloud, cfg["provider"], cfg["cluster_name"])
    cl.ray_up(cfg, cloud, provider)
    cl.head_file_mounts_here(cloud)
    v2 = cl.v2_config(cloud)
    node = cl.launch_worker(cloud, provider, v2, "gpu_4x_a10g")
    first = len(cloud.calls)
    provider.terminate_nodes([node])                           # what v2 calls for an idle worker
    assert cloud.nodes[node].state == "stopped"
    again = cl.launch_worker(cloud, provider, v2, "gpu_4x_a10g")
    assert again == node and provider.reused == [node]
    later = cloud.calls[first:]
    assert [c.stage for c in later if c.stage != "start"] == ["connect"] and later[0].command == "uptime"
    assert [_bare(c.command) for c in later if c.stage == "start"] == cfg["worker_start_ray_commands"]
    # a worker of the other type is never reused for it
    other = cl.launch_worker(cloud, provider, v2, "gpu_1x_a10g")
    assert other != node and _ran(cloud, other, "setup") == cfg["worker_setup_commands"]


def test_ray_up_again_reruns_the_head_setup_only_after_a_synced_file_changed(cfg, cloud, tmp_path):
    """`ray up` on a running head: with nothing changed only the start commands run; after an edit of
    any synced file (Ray hashes their contents into the runtime hash) every setup command runs again."""
    synced = tmp_path / "README.md"
    synced.write_text("v1")
    cfg["file_mounts"]["/home/ubuntu/capsweep/README.md"] = str(synced)
    provider = cl.fake_provider(cloud, cfg["provider"], cfg["cluster_name"])
    cl.ray_up(cfg, cloud, provider)
    head = cl.head_node(cloud)
    marks = [len(cloud.calls)]
    cl.ray_up(cfg, cloud, provider)
    marks.append(len(cloud.calls))
    synced.write_text("v2")
    cl.ray_up(cfg, cloud, provider)
    assert cl.head_node(cloud).id == head.id and provider.created == [head.id], "the same head, kept"
    second, third = cloud.calls[marks[0]:marks[1]], cloud.calls[marks[1]:]
    assert not [c for c in second if c.stage == "setup"]
    assert [_bare(c.command) for c in second if c.stage == "start"] == cfg["head_start_ray_commands"]
    assert [c.command for c in third if c.stage == "setup"] == cfg["head_setup_commands"]
    assert head.path("/home/ubuntu/capsweep/README.md").read_text() == "v2"


def _ami_rule(replacement: str):
    return (lambda command: "meta-data/ami-id" in command,
            lambda script: re.sub(LOOKUP, replacement, script))


def test_head_pins_the_workers_ami_in_the_config_v2_reads(cfg, tmp_path, cluster_extra):
    """The head's IAM role may not resolve `resolve:ssm:` parameters, so a head start command writes
    the head's own AMI id into the bootstrap config `ray up` wrote (JSON) before the autoscaler starts.
    Here it runs for real on that file, the instance-metadata lookup replaced by a fixed id (no EC2
    metadata service on this machine); v2 reads every node type with that id and nothing else changed."""
    command = [c for c in cfg["head_start_ray_commands"] if "meta-data/ami-id" in c][0]
    assert len(re.findall(LOOKUP, command)) == 1, "IMDSv2: a token, then meta-data/ami-id"
    configs = {}
    for name, rules in (("as written", []), ("pinned", [_ami_rule(f"$(echo {AMI})")])):
        with cl.launcher_env(tmp_path / name):
            cloud = cl.LocalCloud(tmp_path / name / "cloud", rules=rules)
            cl.ray_up(cfg, cloud, cl.fake_provider(cloud, cfg["provider"], cfg["cluster_name"]))
            (ran,) = [c for c in cloud.calls if "meta-data/ami-id" in c.command]
            assert ran.executed == bool(rules) and ran.returncode == 0, ran.output
            configs[name] = cl.v2_config(cloud)
    types = cfg["available_node_types"]
    assert {configs["as written"].get_cloud_node_config(t)["ImageId"] for t in types} == {
        cfg["available_node_types"][t]["node_config"]["ImageId"] for t in types}
    assert all(t["node_config"]["ImageId"].startswith("resolve:ssm:") for t in types.values())
    expected = copy.deepcopy(configs["as written"].get_raw_config_mutable())
    for t in expected["available_node_types"].values():
        t["node_config"]["ImageId"] = AMI
    assert configs["pinned"].get_raw_config_mutable() == expected, "every ImageId pinned, nothing else changed"


def test_no_ami_id_stops_ray_up_before_ray_starts(cfg, tmp_path, cluster_extra):
    with cl.launcher_env(tmp_path):
        cloud = cl.LocalCloud(tmp_path / "cloud", rules=[_ami_rule("$(false)")])
        with pytest.raises(click.ClickException, match="Failed to setup head node"):
            cl.ray_up(cfg, cloud, cl.fake_provider(cloud, cfg["provider"], cfg["cluster_name"]))
        last = cloud.calls[-1]
        assert "meta-data/ami-id" in last.command and last.returncode == 1
        assert "capsweep: cannot read this head's AMI id from the instance metadata" in last.output
        assert not [c for c in cloud.calls if "ray start" in c.command], "Ray never started"
        boot = json.loads(cl.head_node(cloud).path("~/ray_bootstrap_config.yaml").read_text())
        assert all(t["node_config"]["ImageId"].startswith("resolve:ssm:") for t in boot["available_node_types"].values())
