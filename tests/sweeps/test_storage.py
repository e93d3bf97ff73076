"""storage_path as Ray Tune takes it (sweeps/storage.py): local folders and URIs through pyarrow.fs.

`file://` is the URI every machine can test without a network; it goes through the same pyarrow
code path (`FileSystem.from_uri`) as `s3://` and `gs://`, which need a bucket and credentials and
are not exercised here. The last test runs a real Optuna sweep with `storage_path: file://...`,
interrupts it with Ctrl-C and resumes it.
"""
from __future__ import annotations

import json
import signal

import pytest
import torch
from mlflow.tracking import MlflowClient

from sweeps import storage
from sweeps.spec import SpecError, from_config, storage_dir
from tests.helpers.sweep import background_sweep, capsweep_cmd, children, env_for_subprocess, parents, run, \
    wait_for, write_spec


@pytest.mark.parametrize("as_uri", [False, True])
def test_files_round_trip_locally_and_through_a_file_uri(tmp_path, as_uri):
    base = f"file://{tmp_path}" if as_uri else str(tmp_path)
    path = storage.join(base, "exp", "trial_state", "t1.pt")
    assert storage.read_bytes(path) is None and storage.load_torch(path) is None and not storage.exists(path)
    storage.save_torch(path, {"epoch": 0, "w": torch.arange(3.0)})
    storage.save_torch(path, {"epoch": 1, "w": torch.arange(4.0)})
    back = storage.load_torch(path)
    assert back["epoch"] == 1 and torch.equal(back["w"], torch.arange(4.0))
    assert (tmp_path / "exp" / "trial_state" / "t1.pt").is_file()          # the same file either way
    assert storage.listdir(storage.join(base, "exp", "trial_state")) == ["t1.pt"]    # no temporary left
    assert storage.is_file(path) and storage.remove(path) and not storage.remove(path)
    assert storage.listdir(storage.join(base, "absent")) == []


def test_join_scheme_and_local_dir(tmp_path, monkeypatch):
    assert storage.join("s3://bucket/runs/", "depth", "trial_state") == "s3://bucket/runs/depth/trial_state"
    assert storage.scheme("gs://b/x") == "gs" and storage.scheme("/a/b") is None
    monkeypatch.setenv(storage.CACHE_ENV, str(tmp_path))
    assert storage.local_dir("s3://bucket/runs/depth") == tmp_path / "storage" / "s3" / "bucket_runs_depth"
    assert storage.local_dir(f"file://{tmp_path}/x") == tmp_path / "x"


def _spec(path: str):
    return from_config({"name": "s", "base": {"model": {"preset": "tiny"}, "data": {"name": "digits"}},
                        "storage_path": path, "references": False, "controls": False})


def test_spec_takes_what_ray_takes_and_names_the_field_otherwise():
    assert storage_dir(_spec("s3://bucket/ray_results/")) == "s3://bucket/ray_results"
    assert storage_dir(_spec("gs://bucket/r")) == "gs://bucket/r"
    for bad, words in (("ftp://host/x", "is not allowed"), ("s3://", "names no bucket")):
        with pytest.raises(SpecError) as e:
            _spec(bad)
        assert str(e.value).startswith("storage_path: ") and words in str(e.value)


@pytest.mark.slow     # 55 s; the default run resumes an Optuna study (test_optuna_persist) and round-trips files through a file URI
def test_optuna_sweep_on_a_file_uri_interrupted_and_resumed(tmp_path):
    """A real sweep whose storage_path is a file:// URI: Ctrl-C mid-trial, then --resume. Every trial
    ends once with all its epochs; the trial states went through the URI; the Optuna study in the
    journal holds each configuration once, with the value MLflow logged; the parent run's best.json
    is the study's best trial."""
    state = tmp_path / "state"
    spec = write_spec(tmp_path / "o.yaml", "uri", "model.depth: {int: [0, 1]}", seeds="[0]", epochs=6,
                      storage=f"file://{state}",
                      extra="search: {algorithm: optuna, sampler: random, seed: 3}\nnum_samples: 2\n")
    env = env_for_subprocess()
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    with background_sweep("run", str(spec), "--num-cpus", "1", cwd=tmp_path, env=env, capture=True) as proc:
        wait_for(lambda: any(r.info.status == "RUNNING" and r.data.metrics.get("epoch", 0) >= 1
                             for r in children(client, sweep="uri")), timeout=400, what="a trial mid-way")
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 130, out[-3000:]
    assert sorted(p.name for p in (state / "uri" / "trial_state").iterdir())      # states written via the URI

    proc = run(capsweep_cmd("run", str(spec), "--num-cpus", "1", "--resume"), tmp_path, env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    runs = children(client, sweep="uri")
    assert len(runs) == 2
    for r in runs:
        assert r.info.status == "FINISHED", r.data.tags.get("capsweep.error", "")[-2000:]
        assert sorted(m.step for m in client.get_metric_history(r.info.run_id, "val_acc")) == list(range(6))

    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend
    study = optuna.load_study(study_name="uri", storage=JournalStorage(
        JournalFileBackend(str(state / "uri" / "optuna.journal"))))
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert len(complete) == 2 and len(study.trials) == 2                  # told once each, none re-asked
    logged = sorted(r.data.metrics["val_acc"] for r in runs)
    assert sorted(t.value for t in complete) == pytest.approx(logged)     # one seed: the value is the run's
    (parent,) = parents(client)
    with open(client.download_artifacts(parent.info.run_id, "best.json", str(tmp_path))) as f:
        best = json.load(f)
    assert best["kind"] == "best" and best["best"][0]["values"]["val_acc"] == pytest.approx(study.best_value)
    assert best["best"][0]["params"]["model.depth"] == str(study.best_params["model.depth"])
