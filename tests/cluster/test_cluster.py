"""The cluster path: `cluster.yaml` checked by Ray's own validator, and a real `capsweep submit` to a
two-node Ray cluster with a real MLflow tracking server, both started on this machine.

How two Ray nodes share one machine (Ray 2.60, found by trying):
- each node gets its own `--temp-dir` (sockets, logs, session files); the worker's session name still
  comes from the head through the GCS, so the two folders hold the same session;
- each node gets its own ports: `--node-manager-port`, `--object-manager-port`, a disjoint
  `--min-worker-port/--max-worker-port` range, `--dashboard-agent-listen-port`,
  `--dashboard-agent-grpc-port`, `--metrics-export-port`, `--runtime-env-agent-port`; the head also
  takes `--port` (GCS), `--dashboard-port` and `--ray-client-server-port`. Every port comes from one
  block below the kernel's ephemeral range that was free when the test started;
- `--object-store-memory` is kept small: this is a shared 2-core machine;
- the environment is the same for both nodes and every client: RAY_AUTH_MODE=token and
  RAY_AUTH_TOKEN_PATH (this test's own token). Set it explicitly: Ray 2.60 turns token auth on for a
  `ray start` whenever ~/.ray/auth_token exists (any local `ray.init()` creates one), and a client
  without the token then gets 401 from the dashboard.
Every process is started in its own session, and the finalizer stops the job, then kills exactly those
process groups (never `ray stop`, which would end other engineers' Ray on this machine), and last any
process whose working folder or command line lies in this test's temp folder (the job driver, which the
Ray job supervisor starts in a session of its own).
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from tests.helpers.cluster import CLUSTER_YAML, mlflow_unit
from tests.helpers.sweep import ROOT, capsweep_cmd, children, env_for_subprocess, parents, wait_for, write_spec
from tests.helpers.ray_nodes import BIN, Dashboard, is_trial, listening, pids_under, popen, port_block, signal_all



# ---- cluster.yaml --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cluster_cfg() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def _commands(cfg: dict) -> list[str]:
    keys = ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
            "head_start_ray_commands", "worker_start_ray_commands")
    return [c for k in keys for c in (cfg.get(k) or [])]


def _ray_start(cfg: dict, key: str) -> tuple[dict, list[str]]:
    """(environment, argv) of the `ray start ...` line of a start-command list (after `ulimit ...;`)."""
    (line,) = [c for c in cfg[key] if "ray start" in c]
    words = shlex.split(line.split(";")[-1])
    env = {}
    while "=" in words[0]:
        k, _, v = words.pop(0).partition("=")
        env[k] = v
    assert words[:2] == ["ray", "start"], line
    return env, words[2:]


def test_cluster_yaml_passes_rays_validator(cluster_cfg):
    """The schema check `ray up` runs: as written, and after Ray fills in its AWS defaults."""
    from ray.autoscaler._private.util import prepare_config, validate_config
    validate_config(cluster_cfg)                       # raises jsonschema.ValidationError / ValueError
    prepared = prepare_config(cluster_cfg)
    validate_config(prepared)
    assert prepared["provider"]["type"] == "aws"
    # the head only drives; GPU node types scale between their bounds, within the global cap
    head = prepared["head_node_type"]
    workers = {k: v for k, v in prepared["available_node_types"].items() if k != head}
    assert prepared["available_node_types"][head]["resources"].get("GPU", 0) == 0
    assert len(workers) >= 2
    for name, t in workers.items():
        assert t["resources"]["GPU"] >= 1, name
        assert 0 <= t["min_workers"] <= t["max_workers"] <= prepared["max_workers"], name
    assert {t["node_config"]["InstanceType"] for t in workers.values()} >= {"g5.xlarge", "g5.12xlarge"}


def test_cluster_commands_parse_with_the_real_clis(cluster_cfg):
    """Every flag of the `ray start` and `mlflow server` lines exists (click parses them, nothing runs)."""
    from mlflow.cli import server as mlflow_server
    from ray.scripts.scripts import start as ray_start
    head_env, head_argv = _ray_start(cluster_cfg, "head_start_ray_commands")
    head = ray_start.make_context("start", head_argv)
    assert head.params["head"] and head.params["dashboard_host"] == "127.0.0.1"
    worker_env, worker_argv = _ray_start(cluster_cfg, "worker_start_ray_commands")
    worker = ray_start.make_context("start", worker_argv)
    assert not worker.params["head"] and worker.params["address"] == f"$RAY_HEAD_IP:{head.params['port']}"
    assert head_env == worker_env == {"RAY_AUTH_MODE": "token"}, "Ray token authentication on every node"
    srv = mlflow_server.make_context("server", mlflow_unit(cluster_cfg)[0])
    assert srv.params["host"] == "127.0.0.1"
    # a real database, reached over the local socket as the OS user: no user, password or TCP host
    from sqlalchemy.engine import make_url
    db = make_url(srv.params["backend_store_uri"])
    assert db.get_backend_name() == "postgresql" and db.database == "mlflow"
    assert db.username is None and db.password is None and db.host is None
    assert db.query["host"].startswith("/"), "a unix socket folder"
    assert srv.params["serve_artifacts"] and srv.params["artifacts_destination"]


def test_cluster_installs_this_ray_and_the_project(cluster_cfg):
    """The launcher needs the same Ray on your machine and the cluster; the synced paths exist here."""
    import ray
    for role in ("head_setup_commands", "worker_setup_commands"):
        setup = "\n".join(cluster_cfg[role])
        assert re.findall(r"ray\[[a-z,]+\]==([0-9.]+)", setup) == [ray.__version__], role
        assert "torch" in setup and "capsweep[cluster]" in setup, role
    mounts = cluster_cfg["file_mounts"]
    for remote, local in mounts.items():
        if not local.startswith("~"):
            assert (ROOT / local).exists(), local
            assert remote.startswith("/home/ubuntu/capsweep/")
    assert {"./pyproject.toml", "./capsmodels", "./sweeps", "./analysis"} <= set(mounts.values())
    assert not any(".venv" in v or v in (".", "./") for v in mounts.values()), "Ray hashes every mounted file"


def test_cluster_keeps_ports_private(cluster_cfg):
    text = CLUSTER_YAML.read_text()
    live = "\n".join(_commands(cluster_cfg))
    assert not re.search(r"(?<![\d.])0\.0\.0\.0(?![\d/])", live), "a command binds every interface"
    assert not re.search(r"--(dashboard-)?host[= ]+(::|\[::\]|\*)", live), "a command binds every interface"
    # the security group opens nothing beyond Ray's defaults (SSH + traffic inside the cluster)
    extra = (cluster_cfg["provider"].get("security_group") or {}).get("IpPermissions") or []
    opened = {p for rule in extra for p in range(rule.get("FromPort", 0), rule.get("ToPort", -1) + 1)}
    assert not opened & {5000, 8265, 10001, 6379, 5432, 2049}, opened
    # the head exports its NFS share only to private networks
    exports = re.findall(r"(\S+)\((rw[^)]*)\)", live)
    assert exports and all(re.match(r"^(10\.|172\.(1[6-9]|2\d|3[01])\.|192\.168\.)", net) for net, _ in exports)
    assert "ray attach cluster.yaml -p 5000" in text and "ray dashboard cluster.yaml" in text


def _items(node, key=""):
    """Every (key, scalar value) pair of the parsed YAML, list items under their parent's key."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _items(v, str(k))
    elif isinstance(node, list):
        for v in node:
            yield from _items(v, key)
    else:
        yield key, node


def test_cluster_yaml_holds_no_credentials(cluster_cfg):
    """Secrets are referenced (a file path, an environment variable, an IAM role), never written."""
    text = CLUSTER_YAML.read_text()
    assert not re.search(r"AKIA[0-9A-Z]{16}", text), "an AWS access key id"
    assert not re.search(r"BEGIN [A-Z ]*PRIVATE KEY", text)
    assert not re.search(r"://[^/\s:@]+:[^/\s@]+@", text), "user:password@ in a URI"
    assert "aws_credentials" not in cluster_cfg["provider"] and "ssh_private_key" not in cluster_cfg["auth"]
    secretish = re.compile(r"password|passwd|secret|token|access_key|private_key|credential", re.I)
    for key, value in _items(cluster_cfg):
        if secretish.search(key) and value not in (None, ""):
            assert re.match(r"^(~|/|\./)", str(value)), f"{key}: {value!r} is not a path"
    live = "\n".join(_commands(cluster_cfg))
    for name, value in re.findall(r"\b(\w+)=(\S+)", live):
        if secretish.search(name):
            assert value.startswith("$"), f"{name}= is set inline in a command"
    assert not re.search(r"--(password|token|secret)[= ]", live, flags=re.I)
















@pytest.fixture(scope="module")
def two_node_cluster(tmp_path_factory):
    """A Ray head (dashboard + Jobs API on 127.0.0.1), a second Ray node, and an MLflow server.

    Token authentication is on, as cluster.yaml sets it up: every node and every client (here the
    `capsweep submit` process) gets RAY_AUTH_MODE=token and the token file's path; the token is this
    test's own (RAY_AUTH_TOKEN_PATH), never ~/.ray/auth_token.
    """
    work = tmp_path_factory.mktemp("cluster")
    tmp = Path(f"/tmp/csw{os.getpid()}")       # short: Ray's unix sockets live under the temp dir
    tmp.mkdir(exist_ok=True)
    token_file = tmp / "auth_token"
    token_file.write_text(secrets.token_hex(32))
    token_file.chmod(0o600)
    b = port_block()
    ports = dict(gcs=b, dashboard=b + 1, client=b + 2, mlflow=b + 3)
    # RAY_health_check_period_ms: the GCS probes each raylet every second, not every 3 s, so a killed
    # node is declared dead after 5 failed probes (~5 s, not ~15 s); a slow but living raylet still has
    # 5 x 10 s (health_check_timeout_ms, unchanged) before that happens
    env = env_for_subprocess(PATH=f"{BIN}:{os.environ.get('PATH', '')}", RAY_USAGE_STATS_ENABLED="0",
                             RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_file),
                             RAY_health_check_period_ms="1000")
    for k in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_JOB_ADDRESS"):
        env.pop(k, None)
    dash = Dashboard(f"http://127.0.0.1:{ports['dashboard']}", token_file.read_text())
    groups: list[int] = []
    job: dict = {}
    nodes: dict = {}

    def node_args(name: str, off: int) -> list[str]:
        return [f"--temp-dir={tmp}/{name}", "--num-cpus=1", "--object-store-memory=100000000",
                f"--node-manager-port={b + off}", f"--object-manager-port={b + off + 1}",
                f"--dashboard-agent-listen-port={b + off + 2}", f"--dashboard-agent-grpc-port={b + off + 3}",
                f"--metrics-export-port={b + off + 4}", f"--runtime-env-agent-port={b + off + 5}",
                f"--min-worker-port={b + off + 10}", f"--max-worker-port={b + off + 39}",
                "--disable-usage-stats", "--block"]

    def running(proc: subprocess.Popen, log: str) -> bool:
        assert proc.poll() is None, f"{log} exited: " + (work / log).read_text()[-2000:]
        return True

    def start_worker(name: str = "n1", off: int = 60) -> subprocess.Popen:
        """The second node (again, after a test killed it: give it a new temp folder and port offset).
        Like cluster.yaml's workers it offers a GPU and the head none: `--num-gpus=1` declares Ray's GPU
        resource (this machine has no GPU; a trial given it sees CUDA_VISIBLE_DEVICES=0, finds no CUDA
        device and trains on the CPU), so a trial that asks for resources.gpu=1 can only run here."""
        worker = popen([str(BIN / "ray"), "start", f"--address=127.0.0.1:{ports['gcs']}", *node_args(name, off),
                         "--num-gpus=1"], env, work / f"{name}.log")
        groups.append(worker.pid)
        nodes["worker"] = worker
        wait_for(lambda: running(worker, f"{name}.log") and len(dash.alive_nodes()) == 2, 90,
                 what="two alive Ray nodes")
        return worker

    def mlflow_up() -> bool:
        try:
            return urllib.request.urlopen(f"http://127.0.0.1:{ports['mlflow']}/health", timeout=2).status == 200
        except OSError:
            return False

    try:
        mlflow = popen([str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{work}/srv.db",
                         "--host", "127.0.0.1", "--port", str(ports["mlflow"]), "--workers", "1",
                         "--serve-artifacts", "--artifacts-destination", str(work / "artifacts")],
                        env, work / "mlflow.log")
        groups.append(mlflow.pid)
        head = popen([str(BIN / "ray"), "start", "--head", f"--port={ports['gcs']}",
                       "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                       f"--dashboard-port={ports['dashboard']}", f"--ray-client-server-port={ports['client']}",
                       *node_args("n0", 10)], env, work / "head.log")
        groups.append(head.pid)
        wait_for(lambda: running(head, "head.log") and listening(ports["gcs"]), 90, what="the Ray head's GCS")
        wait_for(lambda: running(head, "head.log") and dash.up(), 90, what="the Ray head's dashboard")
        start_worker()
        wait_for(lambda: running(mlflow, "mlflow.log") and mlflow_up(), 90, what="the MLflow server")
        yield dict(work=work, dash=dash, env=env, job=job, mlflow=f"http://127.0.0.1:{ports['mlflow']}",
                   gcs=f"127.0.0.1:{ports['gcs']}", nodes=nodes, start_worker=start_worker)
    finally:
        if job.get("id"):
            try:
                dash.stop(job["id"])
            except OSError:
                pass
        signal_all(groups, str(tmp), signal.SIGTERM)
        deadline = time.monotonic() + 5          # `ray start --block` drains up to 30 s on SIGTERM: no need
        while time.monotonic() < deadline and pids_under(str(tmp)):
            time.sleep(0.5)
        signal_all(groups, str(tmp), signal.SIGKILL)
        shutil.rmtree(tmp, ignore_errors=True)


def test_submit_runs_a_sweep_across_two_nodes(two_node_cluster):
    """`capsweep submit` -> a Ray job on the head -> trials on both nodes -> runs on the MLflow server."""
    c = two_node_cluster
    work, dash = c["work"], c["dash"]
    spec = write_spec(work / "multi.yaml", "multi", "model.depth: {grid: [0, 1]}", seeds="[0]",
                      storage=str(work / "shared" / "ray_results"))     # the cluster's shared folder
    proc = subprocess.run(capsweep_cmd("submit", str(spec), f"mlflow.tracking_uri={c['mlflow']}",
                                       "--address", dash.url),
                          cwd=work, env=c["env"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    (job_id,) = re.findall(r"as Ray job (\S+)", proc.stdout)
    c["job"]["id"] = job_id
    assert f"ray job logs --follow {job_id} --address {dash.url}" in proc.stdout

    info = wait_for(lambda: (j := dash.job(job_id))["status"] in ("SUCCEEDED", "FAILED", "STOPPED") and j,
                    240, interval=2, what=f"Ray job {job_id}")
    logs = dash.logs(job_id)
    assert info["status"] == "SUCCEEDED", logs[-4000:]

    # trials ran on both nodes (one CPU each, one CPU per trial: the two trials run side by side);
    # Ray's state API keeps each (now dead) trial actor and the node it ran on
    nodes = dash.alive_nodes()
    assert len(nodes) == 2
    actors = [a for a in dash.state("actors", detail="true") if a.get("job_id") == info["job_id"]]
    trials = [a for a in actors if is_trial(a)]
    assert len(trials) == 2, sorted((a["class_name"], a["state"]) for a in actors)
    assert {a["node_id"] for a in trials} == nodes

    # everything reached the tracking server: one parent, one child per trial, full histories
    client = MlflowClient(c["mlflow"])
    (parent,) = parents(client)
    assert parent.info.status == "FINISHED" and parent.data.tags["capsweep.sweep"] == "multi"
    assert parent.data.metrics["trials_finished"] == 2
    kids = children(client, sweep="multi")
    assert sorted((r.data.params["model.depth"], r.data.params["train.seed"]) for r in kids) == [
        ("0", "0"), ("1", "0")]
    for r in kids:
        assert r.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert r.info.status == "FINISHED" and r.data.tags["capsweep.status"] == "finished"
        for name in ("val_acc", "train_loss", "grad_ratio", "dead_frac/l1", "act_mean/l1"):
            assert sorted(m.step for m in client.get_metric_history(r.info.run_id, name)) == [0, 1], name
        # artifacts go through the server (--serve-artifacts) into its --artifacts-destination
        assert r.info.artifact_uri.startswith("mlflow-artifacts:")
        cfg = yaml.safe_load(open(client.download_artifacts(r.info.run_id, "config.yaml")).read())
        assert cfg["model"]["depth"] == int(r.data.params["model.depth"])
    assert list((work / "artifacts").rglob("config.yaml")), "artifacts landed in --artifacts-destination"
    assert (work / "shared" / "ray_results" / "multi").is_dir(), "Tune state in the spec's storage_path"


def test_submit_gives_an_optuna_sweep_the_clusters_concurrency(two_node_cluster):
    """An Optuna sweep left at max_concurrent 0 would keep one trial pending at a time (the autoscaler
    would see one trial's demand): `capsweep submit` counts the cluster (two nodes of one CPU each, CPU
    trials of one CPU; its nodes carry no cluster.yaml node types, so no autoscaler bound is added) and
    sends max_concurrent=2 with the job, which runs to the end with both trials."""
    c = two_node_cluster
    work, dash = c["work"], c["dash"]
    spec = write_spec(work / "opt.yaml", "opt", "model.depth: {choice: [0, 1]}", seeds="[0]", epochs=1,
                      storage=str(work / "shared" / "ray_results"),
                      extra="search: {algorithm: optuna}\nnum_samples: 2\n")
    submit = capsweep_cmd("submit", str(spec), f"mlflow.tracking_uri={c['mlflow']}", "mlflow.experiment=optuna")
    # two GPUs a trial, one (the worker's) on the cluster: nothing to run at once, so one line and no job
    proc = subprocess.run([*submit, "resources.gpu=2", "--address", dash.url], cwd=work, env=c["env"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "capsweep: error: max_concurrent: 0 leaves an Optuna sweep one pending trial at a time, and the cluster "
        "holds no whole trial to count from (1 GPU on the cluster's nodes now, resources.gpu=2 per trial); set max_concurrent=N, "
        "the trials to run at once"], proc.stderr
    proc = subprocess.run([*submit, "--address", dash.url], cwd=work, env=c["env"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "capsweep: max_concurrent=2 (2 CPU on the cluster's nodes now, resources.cpu=1 per trial)" in proc.stderr
    (job_id,) = re.findall(r"as Ray job (\S+)", proc.stdout)
    c["job"]["id"] = job_id
    assert dash.job(job_id)["entrypoint"].endswith(" max_concurrent=2")
    info = wait_for(lambda: (j := dash.job(job_id))["status"] in ("SUCCEEDED", "FAILED", "STOPPED") and j,
                    240, interval=2, what=f"Ray job {job_id}")
    assert info["status"] == "SUCCEEDED", dash.logs(job_id)[-4000:]
    kids = children(MlflowClient(c["mlflow"]), "optuna", "opt")
    assert len(kids) == 2 and all(r.data.tags["capsweep.status"] == "finished" for r in kids)


def _descendants(root: int) -> list[int]:
    """`root` and every process below it (by parent pid), read before anything is killed."""
    kids: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        kids.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(kids.get(pid, []))
    return out


def _kill_node(proc: subprocess.Popen, extra: list[int]) -> list[int]:
    """SIGKILL a `ray start --block` node for real: its process group, its whole process tree (raylet,
    agents, workers) and `extra` pids (the trial actor), collected first so nothing is reparented away."""
    pids = set(_descendants(proc.pid)) | set(extra)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    proc.wait(timeout=10)
    return sorted(pids)


def _results(trial_dir: Path) -> list[dict]:
    """Tune's result.json of one trial (one JSON object per reported epoch, kept across retries)."""
    path = trial_dir / "result.json"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass                       # a line being written
    return out


@pytest.mark.slow     # 52 s; the default run sends a sweep across two nodes
def test_killed_worker_node_trial_retried_elsewhere(two_node_cluster):
    """Fault: a worker node dies mid-trial (SIGKILL of its raylet and everything under it). The trials
    ask for a GPU, which only the worker node offers (as on the cluster, whose head has none), so the
    first attempt runs there whatever the scheduler prefers, and the two trials run one after the other.
    Ray declares the node dead, a replacement node joins (the autoscaler's part on the cluster), Tune
    retries the trial there (FailureConfig.max_failures), the trial continues from the state it saved
    after its last epoch on the shared storage, and the sweep completes: one MLflow run per trial, every
    epoch logged once, and no trial ever on the head."""
    c = two_node_cluster
    work, dash = c["work"], c["dash"]
    name, epochs = "nodekill", 40
    storage = work / "shared" / "ray_results"
    spec = write_spec(work / f"{name}.yaml", name, "model.depth: {grid: [0, 1]}", seeds="[0]", epochs=epochs,
                      storage=str(storage))
    (head_id,) = [n["node_id"] for n in dash.state("nodes") if n["state"] == "ALIVE" and n["is_head_node"]]
    (worker_id,) = dash.alive_nodes() - {head_id}
    client = MlflowClient(c["mlflow"])
    log = work / f"{name}.log"
    driver = popen(capsweep_cmd("run", str(spec), f"mlflow.tracking_uri={c['mlflow']}",
                                 "mlflow.experiment=faults", "max_failures=2", "resources.gpu=1",
                                 "--address", c["gcs"]), c["env"], log)
    replacement_id = None
    try:
        def driver_alive() -> bool:
            assert driver.poll() is None, f"the sweep driver exited early ({driver.returncode}): " + \
                log.read_text()[-3000:]
            return True

        def victim():
            """(trial id, actor) of the trial running on the worker node, once its first epoch is in MLflow."""
            actors = [a for a in dash.state("actors", detail="true")
                      if is_trial(a) and a["state"] == "ALIVE" and a["node_id"] == worker_id]
            if not actors:
                return None
            (actor,) = actors
            for trial_dir in (storage / name).glob("*/"):
                res = _results(trial_dir)
                if res and res[-1].get("pid") == actor["pid"]:
                    tid = res[-1]["trial_id"]
                    runs = [r for r in children(client, "faults", name) if r.data.tags["capsweep.trial_id"] == tid]
                    if runs and client.get_metric_history(runs[0].info.run_id, "val_acc"):
                        return tid, actor
            return None

        tid, actor = wait_for(lambda: driver_alive() and victim(), 240, interval=0.5,
                              what="a trial on the worker node with an epoch in MLflow")
        (run,) = [r for r in children(client, "faults", name) if r.data.tags["capsweep.trial_id"] == tid]
        before = len(client.get_metric_history(run.info.run_id, "val_acc"))
        assert before < epochs, "the trial finished before the node could be killed: raise `epochs`"
        _kill_node(c["nodes"]["worker"], [actor["pid"]])
        killed_at = time.time()
        wait_for(lambda: worker_id not in dash.alive_nodes(), 60, interval=1, what="Ray to declare the node dead")
        detected_s = time.time() - killed_at
        c["start_worker"]("n2", 110)                  # the module's cluster has two nodes again
        (replacement_id,) = dash.alive_nodes() - {head_id}

        try:
            rc = driver.wait(timeout=300)
        except subprocess.TimeoutExpired:
            pytest.fail("the sweep did not finish within 300 s of the kill: " + log.read_text()[-4000:])
        assert rc == 0, log.read_text()[-4000:]
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
            driver.wait()
        if replacement_id is None and worker_id not in dash.alive_nodes():
            c["start_worker"]("n2", 110)

    # one child run per trial, all finished; the killed trial's retry is counted on its own run
    (parent,) = parents(client, "faults")
    assert parent.info.status == "FINISHED" and parent.data.metrics["trials_finished"] == 2
    kids = children(client, "faults", name)
    assert sorted(r.data.params["model.depth"] for r in kids) == ["0", "1"]
    assert len({r.data.tags["capsweep.trial_id"] for r in kids}) == 2 and tid in {
        r.data.tags["capsweep.trial_id"] for r in kids}
    for r in kids:
        assert r.info.status == "FINISHED" and r.data.tags["capsweep.status"] == "finished", r.data.tags
        steps = [m.step for m in client.get_metric_history(r.info.run_id, "val_acc")]
        assert sorted(steps) == list(range(epochs)), (r.data.tags["capsweep.trial_id"], sorted(steps))
        retries = int(r.data.tags.get("capsweep.retries", "0"))
        assert (retries >= 1) if r.data.tags["capsweep.trial_id"] == tid else (retries == 0), r.data.tags

    # the retry resumed from the saved state, not from scratch. Tune's own record of the trial
    # (result.json, one line per result it received) is the first attempt's epochs 0..k, then the
    # retry's r..N-1 with 1 <= r <= k + 1: the retry first says again the epoch its state file holds (k,
    # or k + 1 when the node died between saving that state and reporting it), so Tune may hold an epoch
    # twice while the logger keeps MLflow at exactly once (checked above). A repeated epoch carries the
    # saved metrics of the same model, optimiser and RNG state, so it shows the same numbers.
    (trial_dir,) = [d for d in (storage / name).glob("*/") if (_results(d) or [{}])[0].get("trial_id") == tid]
    res = _results(trial_dir)
    starts = [i for i, r in enumerate(res) if r["iterations_since_restore"] == 1]
    assert starts[0] == 0 and len(starts) == 2, [(r["epoch"], r["iterations_since_restore"]) for r in res]
    first, retry = [r["epoch"] for r in res[:starts[1]]], [r["epoch"] for r in res[starts[1]:]]
    k, r0 = first[-1], retry[0]
    assert first == list(range(k + 1)) and retry == list(range(r0, epochs)) and 1 <= r0 <= k + 1, (first, retry)
    assert k + 1 >= before, "the first attempt's epochs reached MLflow"
    for again in res[starts[1]:starts[1] + k + 1 - r0]:
        (once,) = [r for r in res[:starts[1]] if r["epoch"] == again["epoch"]]
        assert again["val_acc"] == once["val_acc"] and again["train_loss"] == once["train_loss"], again["epoch"]
    (run,) = [r for r in kids if r.data.tags["capsweep.trial_id"] == tid]
    logged = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "val_acc")}
    assert logged == {r["epoch"]: r["val_acc"] for r in res}, "MLflow holds the values Tune received"

    # Ray's record: the first attempt ran on the killed node; the retry and the other trial on the
    # replacement; nothing on the head
    job_actors = [a for a in dash.state("actors", detail="true")
                  if is_trial(a) and a["job_id"] == actor["job_id"]]
    where = {head_id: "head", worker_id: "killed node", replacement_id: "replacement"}
    # (warm workers, the default reuse_actors: the retry and the other trial may share one actor there)
    placed = sorted((where.get(a["node_id"], a["node_id"]), a["state"]) for a in job_actors)
    assert placed in ([("killed node", "DEAD"), ("replacement", "DEAD")],
                      [("killed node", "DEAD"), ("replacement", "DEAD"), ("replacement", "DEAD")]), job_actors
    print(f"node declared dead {detected_s:.1f} s after the kill; trial {tid}: epochs 0..{k} on the killed node, "
          f"{r0}..{epochs - 1} on the replacement node")
