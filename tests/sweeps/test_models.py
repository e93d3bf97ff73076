"""Trained models and lineage in MLflow: a real 2-trial sweep (Ray Tune, local SQLite store), then
fast checks of the pieces on their own (no Ray).

The sweep runs with --keep-state so that each trial's own last-epoch weights are still on disk: the
logged model's predictions are compared with theirs. Deletion without the flag is checked on the
writer directly here, and on the 8-trial sweep of tests/e2e/test_sweep.py.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from tests.helpers.sweep import capsweep_cmd, children, env_for_subprocess, parents, run, write_spec

NAMES = ["d1-it1-dynamic-s0", "d1-it3-dynamic-s0"]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """2 trials (routing iterations 1 and 3 at depth 1, seed 0), 1 epoch of 2 steps, state kept."""
    work = tmp_path_factory.mktemp("models")
    spec = write_spec(work / "m.yaml", "m", "model.iterations: {grid: [1, 3]}", seeds="[0]", epochs=1,
                      storage=str(work / "ray"))
    proc = run(capsweep_cmd("run", str(spec), "base.model.depth=1", "base.train.max_steps_per_epoch=2",
                            "--num-cpus", "2", "--keep-state"), work, env_for_subprocess())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{work}/mlflow.db")
    return work, client, children(client, sweep="m")


def _load(uri: str, model_uri: str):
    """The logged model rebuilt from its weights and config (sweeps/models.py), as `capsweep eval` does."""
    from sweeps import models
    return models.load(uri, model_uri)[0]


def _net_from_state(config: dict, weights: dict):
    from sweeps.models import build_net
    return build_net(config, (1, 8, 8), 10, weights)


def test_each_trial_has_one_logged_model_that_predicts_as_the_trial(sweep):
    work, client, kids = sweep
    assert len(kids) == 2
    x = torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(0))   # a fixed batch
    for r in kids:
        found = client.search_logged_models([r.info.experiment_id],
                                            filter_string=f"source_run_id = '{r.info.run_id}'")
        assert len(found) == 1 and str(found[0].status) == "READY"
        assert r.data.tags["capsweep.model_id"] == found[0].model_id
        assert found[0].params["model.iterations"] == r.data.params["model.iterations"]
        served = _load(f"sqlite:///{work}/mlflow.db", f"models:/{found[0].model_id}")
        tid = r.data.tags["capsweep.trial_id"]
        state = torch.load(work / "ray" / "m" / "trial_state" / f"{tid}.pt", weights_only=True)
        config = yaml.safe_load(open(client.download_artifacts(r.info.run_id, "config.yaml")).read())
        own = _net_from_state(config, state["model"])
        with torch.no_grad():
            assert torch.equal(served(x), own(x).scores)
        assert state["metrics"]["test_acc"] == r.data.metrics["test_acc"]


def test_state_and_weights_kept_with_keep_state(sweep):
    work, client, kids = sweep
    for r in kids:
        tid = r.data.tags["capsweep.trial_id"]
        assert (work / "ray" / "m" / "trial_state" / f"{tid}.pt").is_file()
        mdir = work / "ray" / "m" / "trial_models" / tid
        assert sorted(p.name for p in mdir.iterdir()) == ["config.yaml", "final.json", "model.pt", "trial.json"]


def test_run_names_tags_inputs_device_and_experiment_kind(sweep):
    work, client, kids = sweep
    assert sorted(r.info.run_name for r in kids) == NAMES
    (parent,) = parents(client)
    for r in [parent, *kids]:
        tags = r.data.tags
        assert tags["mlflow.source.git.commit"] == tags["capsweep.git_commit"]
        assert tags["mlflow.source.name"].startswith("capsweep run ") and tags["mlflow.user"]
    from capsmodels import config as runcfg
    from capsmodels.datasets import load_raw
    from capsmodels.splits import make_splits
    raw = load_raw("digits")
    for r in kids:
        assert r.data.params["train.device"] == "cpu"
        assert r.data.tags["capsweep.device_name"]
        assert "None" not in r.data.params.values()
        inputs = client.get_run(r.info.run_id).inputs.dataset_inputs
        by_context = {{t.key: t.value for t in i.tags}["mlflow.data.context"]: i for i in inputs}
        assert sorted(by_context) == ["test", "train", "val"]
        config = yaml.safe_load(open(client.download_artifacts(r.info.run_id, "config.yaml")).read())
        cfg = runcfg.from_dict(config)
        splits = make_splits(raw, cfg.data, cfg.train.seed)
        for context, ds in (("train", splits.train), ("val", splits.val), ("test", splits.test)):
            x, y = ds.tensors
            digest = hashlib.sha256(x.numpy().tobytes() + y.numpy().tobytes()).hexdigest()[:16]
            assert by_context[context].dataset.digest == digest
            assert {t.key: t.value for t in by_context[context].tags}["capsweep.rows"] == str(len(y))
    exp = client.get_experiment(parent.info.experiment_id)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"


def test_system_metrics_reported_per_epoch(sweep):
    work, client, kids = sweep
    for r in kids:
        m = r.data.metrics
        assert 0.0 <= m["system/cpu_utilization_percentage"] <= 100.0
        assert 0.0 < m["system/system_memory_usage_percentage"] < 100.0
        assert m["system/process_memory_rss_megabytes"] > 50       # a process that imported torch
        assert m["system/process_memory_rss_megabytes"] < m["system/system_memory_usage_megabytes"]
        steps = [h.step for h in client.get_metric_history(r.info.run_id, "system/process_memory_rss_megabytes")]
        assert steps == [0]


def test_eval_of_a_sweep_trial_reproduces_its_test_acc(sweep):
    from sweeps import evaluate, models
    work, client, kids = sweep
    uri = f"sqlite:///{work}/mlflow.db"
    for r in kids:
        model_uri, source = models.resolve(client, r.info.run_id)
        served, config = models.load(uri, model_uri)
        figures = evaluate.measure(served.net, evaluate.eval_config(config, []))
        assert figures["test_acc"] == r.data.metrics["test_acc"]


# ---- the pieces on their own ---------------------------------------------------------------------
def test_run_names():
    from sweeps.run_writer import run_name
    base = {"model.arch": "capsnet", "model.depth": 3, "model.iterations": 3, "model.routing": "dynamic",
            "train.seed": 0, "model.caps_dim": 8, "model.bias": False, "train.lr": 0.00123, "model.init": "std"}
    assert run_name(base, ["model.depth", "train.seed"]) == "d3-it3-dynamic-s0"
    assert run_name(base, ["model.caps_dim", "model.bias", "train.lr", "model.init", "trial.role"]) == \
        "d3-it3-dynamic-cd8-nobias-lr0.00123-std-s0"
    assert run_name({**base, "model.arch": "cnn", "model.depth": 1}, ["model.depth"]) == "cnn-d1-s0"


def _writer_with_trial(tmp_path):
    """A real store with a parent and one started trial run, its files written as a trial writes them."""
    from capsmodels import config as runcfg
    from sweeps import models
    from sweeps.run_writer import RunWriter
    from sweeps.write_queue import Start
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    exp = client.create_experiment("e", artifact_location=str(tmp_path / "art"))
    parent = client.create_run(exp).info.run_id
    writer = RunWriter(client, exp, parent, "s", "abc", uri)
    config = yaml.safe_load(write_spec(tmp_path / "s.yaml", "s", "model.depth: {grid: [1]}").read_text())["base"]
    config = runcfg.to_dict(runcfg.from_dict(config))
    writer.apply(Start("t1", "d1", {"model.depth": 1, "data.root": None, "train.device": "auto"}, 0,
                       yaml.safe_dump(config)))
    state_path, mdir = models.trial_paths(str(tmp_path / "ray" / "s" / "trial_state"), "t1")
    torch.manual_seed(0)
    from capsmodels import networks
    net = networks.build(runcfg.from_dict(config), (1, 8, 8), 10)
    models.write_start(mdir, yaml.safe_dump(config), {"in_shape": [1, 8, 8], "num_classes": 10})
    return client, exp, writer, net, state_path, Path(mdir)


def test_model_record_logs_once_across_retries_and_deletes_the_weights(tmp_path):
    from sweeps import models, storage
    from sweeps.write_queue import Model
    client, exp, writer, net, state_path, mdir = _writer_with_trial(tmp_path)
    rid = writer.run_ids["t1"]
    assert set(client.get_run(rid).data.params) == {"model.depth"}      # None and `auto` not logged
    storage.save_torch(state_path, {"model": net.state_dict(), "metrics": {}})
    models.write_final(str(mdir), net, {"status": "finished"})
    # a half-logged model of an earlier try (created, never finalised) is replaced, not kept
    client.create_logged_model(exp, name="model", source_run_id=rid)
    writer.apply(Model("t1", str(mdir), state_path, keep=False))
    writer.apply(Model("t1", str(mdir), state_path, keep=False))        # the queue's retry: no-op
    (found,) = client.search_logged_models([exp], filter_string=f"source_run_id = '{rid}'")
    assert str(found.status) == "READY"
    assert not Path(state_path).exists() and sorted(p.name for p in mdir.iterdir()) == \
        ["config.yaml", "final.json", "trial.json"]
    x = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(_load(f"sqlite:///{tmp_path}/mlflow.db", f"models:/{found.model_id}")(x),
                           net.eval()(x).scores)


def test_model_of_a_trial_stopped_early_comes_from_its_state_and_keep_keeps_it(tmp_path):
    from sweeps import storage
    from sweeps.write_queue import Model
    client, exp, writer, net, state_path, mdir = _writer_with_trial(tmp_path)
    last = {k: torch.zeros_like(v) if v.is_floating_point() else v for k, v in net.state_dict().items()}
    # no model.pt: ASHA stopped it; its last epoch's weights differ from its best epoch's, which are logged
    storage.save_torch(state_path, {"model": last, "best_model": net.state_dict(), "metrics": {}})
    writer.apply(Model("t1", str(mdir), state_path, keep=True))
    rid = writer.run_ids["t1"]
    (found,) = client.search_logged_models([exp], filter_string=f"source_run_id = '{rid}'")
    assert Path(state_path).exists()
    x = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(_load(f"sqlite:///{tmp_path}/mlflow.db", f"models:/{found.model_id}")(x),
                           net.eval()(x).scores)


def test_end_tags_say_why_a_trial_stopped_and_carry_its_best_epochs_correctness(tmp_path):
    from capsmodels.contract import correct_from_tags, encode_correct
    from sweeps.run_writer import end_tags
    from sweeps.write_queue import End, from_json, to_json
    code = encode_correct(bytes([0b10110110, 0b11011011, 0b01101000]), 21)
    assert end_tags("finished", {"stop_reason": "patience", "test_correct": code}) == \
        {"capsweep.stop_reason": "patience", "capsweep.test_correct": code}
    assert end_tags("stopped", {"test_correct": code})["capsweep.stop_reason"] == "scheduler"   # ASHA's stop
    assert end_tags("failed", {"stop_reason": "epochs", "test_correct": code}) == {}
    assert end_tags("diverged", {"stop_reason": "diverged"}) == {"capsweep.stop_reason": "diverged"}
    client, exp, writer, net, state_path, mdir = _writer_with_trial(tmp_path)
    rec = End("t1", "finished", None, end_tags("finished", {"stop_reason": "epochs", "test_correct": code}))
    assert from_json(to_json(rec)) == rec                           # spooled and replayed whole
    assert from_json('["end", "t1", "finished", null]') == End("t1", "finished", None)   # an older spool
    writer.apply(rec)
    tags = client.get_run(writer.run_ids["t1"]).data.tags
    assert tags["capsweep.status"] == "finished" and tags["capsweep.stop_reason"] == "epochs"
    assert correct_from_tags(tags) == code


def test_dataset_digest_is_sha256_of_the_split():
    from sweeps.provenance import dataset_inputs
    x, y = np.arange(12, dtype=np.float32).reshape(3, 4), np.array([0, 1, 2])
    (d,) = dataset_inputs("toy", {"test": (torch.from_numpy(x), torch.from_numpy(y))})
    assert d == {"name": "toy", "context": "test", "rows": 3,
                 "digest": hashlib.sha256(x.tobytes() + y.tobytes()).hexdigest()[:16]}


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc (Linux)")
def test_system_sampler_against_procfs_status():
    from sweeps.sysmetrics import SystemSampler
    sampler = SystemSampler(torch.device("cpu"))
    sum(i * i for i in range(200_000))          # some CPU time between the samples
    m = sampler.sample()
    vmrss = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS")) * 1024 / 1e6
    assert abs(m["system/process_memory_rss_megabytes"] - vmrss) < 0.05 * vmrss
    total = next(int(l.split()[1]) for l in open("/proc/meminfo") if l.startswith("MemTotal")) * 1024 / 1e6
    assert m["system/system_memory_usage_megabytes"] == pytest.approx(
        m["system/system_memory_usage_percentage"] / 100 * total)
    assert 0.0 <= m["system/cpu_utilization_percentage"] <= 100.0
    assert m["system/process_cpu_utilization_percentage"] >= 0.0
    assert not any(k.startswith("system/gpu_") for k in m)     # on the CPU no GPU figures


def test_a_model_that_cannot_be_logged_is_tagged_and_its_files_kept(tmp_path):
    """A non-transient failure (here weights that do not fit the config) must not stop the sweep."""
    from sweeps import storage
    from sweeps.write_queue import Model
    client, exp, writer, net, state_path, mdir = _writer_with_trial(tmp_path)
    storage.save_torch(str(mdir / "model.pt"), {"wrong.weight": torch.zeros(1)})
    writer.apply(Model("t1", str(mdir), state_path, keep=False))
    rid = writer.run_ids["t1"]
    assert "wrong.weight" in client.get_run(rid).data.tags["capsweep.model_error"]
    assert client.search_logged_models([exp], filter_string=f"source_run_id = '{rid}'") == []
    assert (mdir / "model.pt").exists()


def test_resume_backfills_a_trial_that_tune_finished_and_mlflow_lacks(sweep):
    """Issue 18, item 2 (the default run's part; tests/sweeps/test_reliability.py has the outage): a finished
    trial whose run MLflow lacks (a driver killed with its writes in flight) gets its run on --resume,
    every epoch from Tune's results, its model and its end, though Tune does not run it again; the other
    trial is left as it was. Runs last in this module: it changes the shared sweep."""
    work, client, kids = sweep
    lost, kept = sorted(kids, key=lambda r: r.info.run_name)
    kept_history = client.get_metric_history(kept.info.run_id, "val_acc")
    client.delete_run(lost.info.run_id)
    proc = run(capsweep_cmd("run", str(work / "m.yaml"), "base.model.depth=1", "base.train.max_steps_per_epoch=2",
                            "--num-cpus", "2", "--keep-state", "--resume"), work, env_for_subprocess())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    now = {r.info.run_name: r for r in children(client, sweep="m")}
    assert sorted(now) == NAMES
    back = now[lost.info.run_name]
    assert back.info.run_id != lost.info.run_id and back.info.status == "FINISHED"
    assert back.data.tags["capsweep.trial_id"] == lost.data.tags["capsweep.trial_id"]
    assert back.data.tags["capsweep.status"] == "finished"
    assert back.data.metrics["test_acc"] == lost.data.metrics["test_acc"]
    assert [m.step for m in client.get_metric_history(back.info.run_id, "val_acc")] == [0]
    (model,) = client.search_logged_models([back.info.experiment_id],
                                           filter_string=f"source_run_id = '{back.info.run_id}'")
    assert back.data.tags["capsweep.model_id"] == model.model_id
    assert now[kept.info.run_name].info.run_id == kept.info.run_id
    assert client.get_metric_history(kept.info.run_id, "val_acc") == kept_history
