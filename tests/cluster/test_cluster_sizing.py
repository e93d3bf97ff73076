"""The figures of cluster.yaml's 64-GPU sizing and of `capsweep submit`'s max_concurrent, worked out by
hand here and checked against the code, Ray's own scheduler function and the README."""
from __future__ import annotations

import pytest

from sweeps.spec import from_config
from sweeps.submit import NODE_GROUP_LABEL, autoscaler_ceiling, launched_from, trial_concurrency
from tests.helpers.cluster import CLUSTER_YAML, load_cluster, mlflow_unit, pg_max_connections
from tests.helpers.sweep import ROOT

TOY = {"max_workers": 5, "head_node_type": "h",
       "available_node_types": {"h": {"resources": {"CPU": 2}},
                                "a": {"resources": {"CPU": 4, "GPU": 1}, "max_workers": 4},
                                "b": {"resources": {"CPU": 48, "GPU": 4}, "max_workers": 1}}}


def test_autoscaler_ceiling_by_hand():
    cfg = load_cluster()
    # at most 16 workers; 16 x g5.12xlarge (4 GPUs, 48 vCPUs) fill them before any g5.xlarge
    assert autoscaler_ceiling(cfg, "GPU") == 16 * 4 == 64
    assert autoscaler_ceiling(cfg, "CPU") == 16 * 48 == 768
    # toy: b first (1 node: 4 GPUs, 48 CPUs), then 4 x a (1 GPU, 4 CPUs): 5 nodes; the head's 2 CPUs
    assert autoscaler_ceiling(TOY, "GPU") == 4 + 4 * 1
    assert autoscaler_ceiling(TOY, "CPU") == 2 + 48 + 4 * 4
    tight = dict(TOY, max_workers=3)                   # b + 2 x a
    assert autoscaler_ceiling(tight, "GPU") == 4 + 2


def test_the_readme_and_cluster_yaml_name_these_figures():
    """The vCPU quota to ask AWS for is the CPU ceiling (CPU resources equal the instances' vCPUs)."""
    cfg = load_cluster()
    for name, t in cfg["available_node_types"].items():
        vcpus = {"m5.2xlarge": 8, "g5.xlarge": 4, "g5.12xlarge": 48}[t["node_config"]["InstanceType"]]
        assert t["resources"].get("CPU") in (0, vcpus), name      # the head offers none to trials
    readme = (ROOT / "README.md").read_text()
    for text in (readme, CLUSTER_YAML.read_text()):
        text = " ".join(text.replace("\n#", "\n").split())            # words, across wrapped comment lines
        assert "Running On-Demand G and VT instances" in text and "768" in text
        assert "/tmp/ray/session_latest/logs/monitor" in text and "ray monitor cluster.yaml" in text
    assert "64 GPUs" in readme


def _spec(**kw):
    raw = {"name": "s", "base": {"model": {"preset": "tiny"}, "data": {"name": "digits"}},
           "space": {"model.depth": {"choice": [0, 1]}}, "search": {"algorithm": "optuna"},
           "references": False, "controls": False}
    raw.update(kw)
    return from_config(raw)


def _node(head: bool, resources: dict, group: str | None = None) -> dict:
    """A node as Ray's state API lists it (the fields trial_concurrency reads)."""
    return {"is_head_node": head, "state": "ALIVE", "resources_total": resources,
            "labels": {NODE_GROUP_LABEL: group} if group else {}}


def test_trial_concurrency_by_hand():
    cfg_path = CLUSTER_YAML
    fresh = [_node(True, {"CPU": 0}, "head")]                       # `ray up` done, no worker yet
    grown = fresh + [_node(False, {"CPU": 48, "GPU": 4}, "gpu_4x_a10g")]
    assert launched_from(load_cluster(), fresh) and launched_from(load_cluster(), grown)
    assert trial_concurrency(_spec(resources={"gpu": 1}), fresh, cfg_path)[0] == 64
    assert trial_concurrency(_spec(resources={"gpu": 0.25}), grown, cfg_path)[0] == 256
    n, why = trial_concurrency(_spec(resources={"gpu": 0.5}), fresh, cfg_path)
    assert n == 128 and why == "up to 64 GPU within cluster.yaml's autoscaler bounds, resources.gpu=0.5 per trial"
    # a cluster cluster.yaml did not start (no node types, or others): only what it has now counts
    plain = [_node(True, {"CPU": 1}), _node(False, {"CPU": 1, "GPU": 1})]
    other = [_node(True, {"CPU": 8}, "head"), _node(False, {"CPU": 8, "GPU": 8}, "gpu_8x")]
    assert not launched_from(load_cluster(), plain) and not launched_from(load_cluster(), other)
    assert trial_concurrency(_spec(resources={"cpu": 1}), plain, cfg_path) == (
        2, "2 CPU on the cluster's nodes now, resources.cpu=1 per trial")
    assert trial_concurrency(_spec(resources={"gpu": 2}), plain, cfg_path)[0] == 0
    assert trial_concurrency(_spec(resources={"gpu": 1}), other, cfg_path)[0] == 8
    assert trial_concurrency(_spec(resources={"gpu": 1}), fresh, None)[0] == 0


@pytest.mark.parametrize("max_concurrent, pending", [(0, 1), (64, 64)])
def test_optuna_pending_trials_follow_max_concurrent(monkeypatch, max_concurrent, pending):
    """Ray Tune's own rule (tune_controller._get_max_pending_trials) on the search algorithm capsweep
    builds, wrapped as Tune wraps a Searcher: without max_concurrent one trial waits at a time, which is
    all the demand the autoscaler sees."""
    from ray.tune.execution.tune_controller import _get_max_pending_trials
    from ray.tune.search import SearchGenerator

    from sweeps import search
    monkeypatch.delenv("TUNE_MAX_PENDING_TRIALS_PG", raising=False)
    _, search_alg, _, _ = search.build(_spec(max_concurrent=max_concurrent, num_samples=100))
    assert _get_max_pending_trials(SearchGenerator(search_alg)) == pending


def test_mlflow_connections_fit_postgres():
    """(workers + 1 parent) x 3 engines x (pool + overflow) against max_connections - 3 reserved; the
    engine count per process is measured in tests/cluster/test_cluster_postgres.py."""
    cfg = load_cluster()
    argv, env = mlflow_unit(cfg)
    workers = int(argv[argv.index("--workers") + 1])
    pool = int(env["MLFLOW_SQLALCHEMYSTORE_POOL_SIZE"]) + int(env["MLFLOW_SQLALCHEMYSTORE_MAX_OVERFLOW"])
    assert (workers + 1) * 3 * pool == 72 <= pg_max_connections(cfg) - 3


@pytest.mark.parametrize("path, ok", [
    ("/shared/ray_results", True), ("s3://bucket/ray_results", True), ("gs://bucket/ray", True),
    ("file:///shared/ray_results", True), ("ray_results", False), ("file://ray_results", False),
])
def test_submit_takes_the_storage_ray_takes(path, ok):
    """A cluster sweep's storage must be shared: an absolute path (the NFS mount), a bucket, or an
    absolute file:// URI; a relative path would land in the job's temporary folder on the head."""
    from sweeps.submit import SubmitError, check_cluster_ready
    spec = from_config({"name": "s", "base": {}, "space": {"model.depth": {"grid": [0]}},
                        "mlflow": {"tracking_uri": "http://127.0.0.1:5000"}, "storage_path": path})
    if ok:
        check_cluster_ready(spec)
    else:
        with pytest.raises(SubmitError, match="storage_path"):
            check_cluster_ready(spec)
