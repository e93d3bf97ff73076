"""Autoscaling with cluster.yaml's node types, by Ray 2.60's own autoscaler v2 (issue 21):

- default run, no Ray started: v2's ResourceDemandScheduler on the config Ray reads from cluster.yaml
  (AutoscalingConfig: node types, bounds, idle timeout). GPU trials start GPU workers within each
  type's bound and `max_workers`, nothing lands on the head (CPU 0), a trial needing more GPUs than any
  type has is infeasible, and an idle worker is removed after `idle_timeout_minutes`, not before;
- `-m slow`: a real Ray head on its own ports with autoscaler v2 and Ray's fake multi-node provider
  (FakeMultiNodeProvider: each "instance" is a real Ray node on this machine, with the node type's
  resources, GPUs as a plain resource count) driven by cluster.yaml's node types. A GPU sweep scales a
  worker up, every trial runs on it and none on the head, `max_workers` holds while more trials wait
  than one node can run, and the idle timeout scales the worker down. The wheel lacks the provider's
  defaults file (fake_multi_node/example.yaml), so the provider is named through Ray's `external`
  provider type (module path); the class and every autoscaler path are Ray's. To fit a 2-core machine:
  `max_workers` 1 (cluster.yaml: 16) and `idle_timeout_minutes` 0.05 (cluster.yaml: 10).

Every condition the slow test waits for is an outcome (a node alive or dead, a sweep finished), waited
for with a generous limit, and the bound is checked on Ray's own record of every node's start and end
time, not on a sample. The head is stopped by killing exactly its process group and the processes under
its temp folder, never with `ray stop`.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers.cluster import load_cluster
from tests.helpers.sweep import capsweep_cmd, env_for_subprocess, wait_for, write_spec

BIN = Path(sys.executable).parent


# ---- the config logic, as v2's scheduler reads it (default run) --------------------------------------
def _scheduler_request(config, instances: list, bundles: list[dict]):
    from ray.autoscaler.v2.scheduler import SchedulingRequest
    from ray.autoscaler.v2.utils import ResourceRequestUtil
    return SchedulingRequest(
        resource_requests=ResourceRequestUtil.group_by_count([ResourceRequestUtil.make(b) for b in bundles]),
        current_instances=instances, node_type_configs=config.get_node_type_configs(),
        max_num_nodes=config.get_max_num_nodes(), idle_timeout_s=config.get_idle_timeout_s(),
        disable_launch_config_check=config.disable_launch_config_check())


def _running(node_type: str, node_id: str, total: dict, available: dict, idle_ms: int = 0, head: bool = False):
    from ray.autoscaler.v2.schema import AutoscalerInstance
    from ray.core.generated.autoscaler_pb2 import NodeState, NodeStatus
    from ray.core.generated.instance_manager_pb2 import Instance, NodeKind
    return AutoscalerInstance(
        cloud_instance_id=f"i-{node_id}",
        im_instance=Instance(instance_type=node_type, status=Instance.RAY_RUNNING, instance_id=node_id,
                             node_id=node_id, cloud_instance_id=f"i-{node_id}",
                             node_kind=NodeKind.HEAD if head else NodeKind.WORKER),
        ray_node=NodeState(ray_node_type_name=node_type, node_id=node_id.encode(), instance_id=f"i-{node_id}",
                           total_resources=total, available_resources=available, idle_duration_ms=idle_ms,
                           status=NodeStatus.IDLE if idle_ms else NodeStatus.RUNNING))


def test_v2_scheduler_on_cluster_yamls_node_types():
    from ray.autoscaler.v2.instance_manager.config import AutoscalingConfig
    from ray.autoscaler.v2.scheduler import ResourceDemandScheduler
    from ray.core.generated.instance_manager_pb2 import TerminationRequest
    cfg = load_cluster()
    config = AutoscalingConfig(cfg, skip_content_hash=True)
    types = cfg["available_node_types"]
    gpu_types = {n for n, t in types.items() if t["resources"].get("GPU", 0) > 0}
    head = _running("head", "h0", types["head"]["resources"], types["head"]["resources"], head=True)
    scheduler = ResourceDemandScheduler()

    def launched(reply) -> dict:
        return {r.instance_type: r.count for r in reply.to_launch}

    # 100 trials of one GPU (and capsweep's one CPU) each: more than the bounds allow
    reply = scheduler.schedule(_scheduler_request(config, [head], [{"CPU": 1, "GPU": 1}] * 100))
    got = launched(reply)
    assert set(got) <= gpu_types and "head" not in got, got
    assert sum(got.values()) == cfg["max_workers"], got                    # the global bound binds
    assert all(n <= types[t]["max_workers"] for t, n in got.items()), got   # and every type's
    gpus = sum(types[t]["resources"]["GPU"] * n for t, n in got.items())
    assert len(reply.infeasible_resource_requests) == 100 - gpus, "the rest wait, reported as such"
    # a handful of trials: no more GPUs than they ask for, fitted on the fewest nodes
    got = launched(scheduler.schedule(_scheduler_request(config, [head], [{"CPU": 1, "GPU": 1}] * 4)))
    assert sum(types[t]["resources"]["GPU"] * n for t, n in got.items()) == 4, got
    # a trial that asks for more GPUs than any node type has is infeasible (nothing starts for it)
    reply = scheduler.schedule(_scheduler_request(config, [head], [{"CPU": 1, "GPU": 8}]))
    assert not reply.to_launch and len(reply.infeasible_resource_requests) == 1
    # nothing for the head: a zero-CPU head takes no trial, so CPU work starts a worker too
    got = launched(scheduler.schedule(_scheduler_request(config, [head], [{"CPU": 1}])))
    assert sum(got.values()) == 1 and set(got) <= gpu_types
    # an idle worker goes after idle_timeout_minutes, not before
    timeout_ms = cfg["idle_timeout_minutes"] * 60 * 1000
    assert config.get_idle_timeout_s() * 1000 == timeout_ms
    res = types["gpu_4x_a10g"]["resources"]
    for idle_ms, removed in ((timeout_ms - 1000, False), (timeout_ms + 1000, True)):
        worker = _running("gpu_4x_a10g", "w1", res, res, idle_ms=idle_ms)
        reply = scheduler.schedule(_scheduler_request(config, [head, worker], []))
        causes = [(t.instance_id, t.cause) for t in reply.to_terminate]
        assert causes == ([("w1", TerminationRequest.Cause.IDLE)] if removed else []), (idle_ms, causes)


# ---- fake multi-node autoscaling (slow) ---------------------------------------------------------------
def fake_cluster_config(cfg: dict, gcs_address: str, max_workers: int, idle_timeout_minutes: float) -> dict:
    """cluster.yaml's node types (names, resources, per-type bounds) and upscaling speed for Ray's fake
    multi-node provider; its head type carries the provider's fixed name and cluster.yaml's head
    resources (CPU 0)."""
    from ray.autoscaler._private.fake_multi_node.node_provider import FAKE_HEAD_NODE_ID, FAKE_HEAD_NODE_TYPE
    head = cfg["head_node_type"]
    types = {FAKE_HEAD_NODE_TYPE: {"resources": dict(cfg["available_node_types"][head]["resources"]),
                                   "node_config": {}, "max_workers": 0}}
    for name, t in cfg["available_node_types"].items():
        if name != head:
            types[name] = {"resources": dict(t["resources"]), "node_config": {},
                           "min_workers": t.get("min_workers", 0), "max_workers": t["max_workers"]}
    return {
        "cluster_name": "capsweep-fake", "max_workers": max_workers, "upscaling_speed": cfg["upscaling_speed"],
        "idle_timeout_minutes": idle_timeout_minutes,
        "provider": {"type": "external",
                     "module": "ray.autoscaler._private.fake_multi_node.node_provider.FakeMultiNodeProvider",
                     "gcs_address": gcs_address, "head_node_id": FAKE_HEAD_NODE_ID, "launch_multiple": True,
                     "disable_node_updaters": True, "disable_launch_config_check": True},
        "auth": {}, "available_node_types": types, "head_node_type": FAKE_HEAD_NODE_TYPE, "docker": {},
        "initialization_commands": [], "setup_commands": [], "head_setup_commands": [], "worker_setup_commands": [],
        "head_start_ray_commands": [], "worker_start_ray_commands": [], "file_mounts": {},
        "cluster_synced_files": [], "file_mounts_sync_continuously": False, "rsync_exclude": [], "rsync_filter": [],
    }


def test_fake_cluster_config_is_cluster_yamls_node_types():
    """The slow test's config: Ray validates it and reads cluster.yaml's types, resources and bounds."""
    from ray.autoscaler.v2.instance_manager.config import AutoscalingConfig
    cfg = load_cluster()
    fake = AutoscalingConfig(fake_cluster_config(cfg, "127.0.0.1:1", 1, 0.05), skip_content_hash=True)
    got = {n: (c.resources, c.min_worker_nodes, c.max_worker_nodes) for n, c in fake.get_node_type_configs().items()}
    want = {n: (t["resources"], t.get("min_workers", 0), t["max_workers"]) for n, t in cfg["available_node_types"].items()
            if n != cfg["head_node_type"]}
    head = got.pop(fake.get_head_node_type())
    assert got == want and head[0] == cfg["available_node_types"]["head"]["resources"] == {"CPU": 0}
    assert fake.get_max_num_worker_nodes() == 1 and fake.get_idle_timeout_s() == 3.0


@pytest.fixture
def fake_cluster(tmp_path_factory):
    from ray.autoscaler._private.fake_multi_node.node_provider import FAKE_HEAD_NODE_ID
    from tests.helpers.ray_nodes import Dashboard, listening, pids_under, popen, port_block, signal_all
    work = tmp_path_factory.mktemp("autoscale")
    tmp = Path(f"/tmp/csa{os.getpid()}")             # short: Ray's unix sockets live under the temp dir
    tmp.mkdir(exist_ok=True)
    token_file = tmp / "auth_token"
    token_file.write_text(secrets.token_hex(32))
    token_file.chmod(0o600)
    b = port_block(60)
    gcs = f"127.0.0.1:{b}"
    config = work / "autoscaling.yaml"
    config.write_text(json.dumps(fake_cluster_config(load_cluster(), gcs, max_workers=1, idle_timeout_minutes=0.05)))
    env = env_for_subprocess(PATH=f"{BIN}:{os.environ.get('PATH', '')}", RAY_AUTH_MODE="token",
                             RAY_AUTH_TOKEN_PATH=str(token_file), RAY_FAKE_CLUSTER="1",
                             RAY_enable_autoscaler_v2="1", RAY_CLOUD_INSTANCE_ID=FAKE_HEAD_NODE_ID,
                             RAY_OVERRIDE_NODE_ID_FOR_TESTING=FAKE_HEAD_NODE_ID, AUTOSCALER_UPDATE_INTERVAL_S="1")
    for k in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_JOB_ADDRESS"):
        env.pop(k, None)
    dash = Dashboard(f"http://127.0.0.1:{b + 1}", token_file.read_text())
    head = popen([str(BIN / "ray"), "start", "--head", f"--port={b}", f"--autoscaling-config={config}",
                   "--num-cpus=0", "--num-gpus=0", f"--temp-dir={tmp}", "--object-store-memory=100000000",
                   "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={b + 1}",
                   f"--ray-client-server-port={b + 2}", f"--node-manager-port={b + 3}",
                   f"--object-manager-port={b + 4}", f"--dashboard-agent-listen-port={b + 5}",
                   f"--dashboard-agent-grpc-port={b + 6}", f"--metrics-export-port={b + 7}",
                   f"--runtime-env-agent-port={b + 8}", f"--min-worker-port={b + 20}", f"--max-worker-port={b + 49}",
                   "--disable-usage-stats", "--block"], env, work / "head.log")

    def running() -> bool:
        assert head.poll() is None, "the Ray head exited: " + (work / "head.log").read_text()[-3000:]
        return True
    try:
        wait_for(lambda: running() and listening(b), 90, what="the Ray head's GCS")
        wait_for(lambda: running() and dash.up(), 90, what="the Ray head's dashboard")
        wait_for(lambda: running() and dash.alive_nodes(), 90, what="the head in Ray's node list")
        yield dict(work=work, tmp=tmp, env=env, dash=dash, gcs=gcs, log=work / "head.log")
    finally:
        signal_all([head.pid], str(tmp), signal.SIGTERM)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and pids_under(str(tmp)):
            time.sleep(0.5)
        signal_all([head.pid], str(tmp), signal.SIGKILL)
        shutil.rmtree(tmp, ignore_errors=True)


def _max_overlap(intervals: list[tuple[float, float]]) -> int:
    """The most intervals [start, end) alive at one moment."""
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals], key=lambda x: (x[0], x[1]))
    alive = best = 0
    for _, step in events:
        alive += step
        best = max(best, alive)
    return best


@pytest.mark.slow
def test_a_gpu_sweep_scales_workers_up_within_max_workers_and_back_down(fake_cluster):
    from tests.helpers.ray_nodes import is_trial
    c = fake_cluster
    dash, work = c["dash"], c["work"]
    nodes = dash.state("nodes", detail="true")
    assert [n["is_head_node"] for n in nodes] == [True], "no worker before any demand (min_workers 0)"
    (head_id,) = [n["node_id"] for n in nodes]
    # 6 trials of one GPU each, all pending at once (grid): more than one node of any type can run
    spec = write_spec(work / "gpu.yaml", "gpu", "model.depth: {grid: [0, 1, 2]}", seeds="[0, 1]", epochs=1,
                      tracking_uri=f"sqlite:///{work}/mlflow.db", storage=str(work / "ray_results"))
    started = time.time() * 1000
    proc = subprocess.run(capsweep_cmd("run", str(spec), "resources.gpu=1", "--address", c["gcs"]), cwd=work,
                          env=c["env"], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:] + c["log"].read_text()[-2000:]

    workers = [n for n in dash.state("nodes", detail="true") if not n["is_head_node"]]
    assert workers, "the sweep's GPU demand started no worker"
    assert all(n["start_time_ms"] >= started for n in workers), "workers started only for the sweep"
    for n in workers:
        gpus = n["resources_total"].get("GPU", 0)
        assert gpus in {1, 4} and n["resources_total"].get("CPU") in {4, 48}, n["resources_total"]
    now = time.time() * 1000
    lives = [(n["start_time_ms"], n.get("end_time_ms") or now) for n in workers]
    assert _max_overlap(lives) <= 1, "max_workers: 1 was exceeded"
    # ... while trials waited that another node would have run: the autoscaler's own events, which the
    # driver prints, say it could not place them (the bundle fits either node type: only the bound stops it)
    out = proc.stdout + proc.stderr
    assert re.search(r"No available node types can fulfill placement group requests .*\{'GPU': 1\.0, 'CPU': 1\.0\}", out), \
        out[-3000:]

    trials = [a for a in dash.state("actors", detail="true") if is_trial(a)]
    assert trials and all(a["node_id"] in {n["node_id"] for n in workers} for a in trials), \
        [(a["node_id"], a["state"]) for a in trials]
    assert head_id not in {a["node_id"] for a in trials}, "a trial ran on the head"
    results = list((work / "ray_results" / "gpu").glob("*/result.json"))
    assert len(results) == 6, "every trial ran to its end"

    # idle: the worker goes away (idle_timeout_minutes 0.05 here), the head stays
    wait_for(lambda: not [n for n in dash.state("nodes") if n["state"] == "ALIVE" and not n["is_head_node"]],
             180, interval=1, what="the idle workers to be removed")
    assert [n["node_id"] for n in dash.state("nodes") if n["state"] == "ALIVE"] == [head_id]
    print(f"{len(workers)} worker node(s) of {sorted({int(n['resources_total']['GPU']) for n in workers})} GPUs; "
          f"{len(trials)} trial actors, none on the head")
