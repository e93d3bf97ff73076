"""Nothing loaded from a store or a storage folder runs code (README, "Security").

Each place capsweep reads a file that someone else could have written gets a planted payload, in both
shapes an attacker would try: `torch.save(P())` and a bare pickle of P, where `P.__reduce__` returns
`(os.system, ("touch MARKER",))`. The check: the marker file never appears, and the command refuses in
one line with a non-zero exit (or, for a file the sweep driver reads while running, the error is kept
on the run and the sweep goes on). The places: a logged model's weights (`capsweep eval`, and
`mlflow.pyfunc.load_model`), a model in MLflow's pickle format (refused unless --trust), a trial's
per-epoch state and final weights (the trial, the driver's model logging, the --resume preflight).
No Ray here: the stores are real SQLite MLflow stores in tmp_path.
"""
from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from analysis.store import open_client
from sweeps.cli import main
from tests.helpers.sweep import TINY_BASE
from tests.helpers.payloads import fallback_json, payload


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    """MLflow puts a new experiment's artifacts in ./mlruns of the working folder: keep them out of the repo."""
    monkeypatch.chdir(tmp_path)




def _config() -> dict:
    from capsmodels import config as runcfg
    base = yaml.safe_load(TINY_BASE % {"epochs": 1})["base"]
    base["model"]["depth"] = 1
    return runcfg.to_dict(runcfg.from_dict(base))


def _net(config: dict, seed: int = 0):
    from capsmodels import config as runcfg
    from capsmodels import networks
    torch.manual_seed(seed)
    return networks.build(runcfg.from_dict(config), (1, 8, 8), 10).eval()


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """One SQLite store for the module (creating one takes seconds); each test logs its own model."""
    work = tmp_path_factory.mktemp("store")
    uri = f"sqlite:///{work}/mlflow.db"
    here = os.getcwd()
    os.chdir(work)          # the Default experiment's artifacts: ./mlruns of the folder that creates the store
    try:
        client = open_client(uri, create=True)
    finally:
        os.chdir(here)
    exp = client.create_experiment("capsweep", artifact_location=str(work / "artifacts"))
    return uri, client, exp


@pytest.fixture()
def store(shared, tmp_path):
    """A run holding a model logged by capsweep (weights + config), in the module's store."""
    from sweeps import models
    uri, client, exp = shared
    run_id = client.create_run(exp, run_name="r").info.run_id
    config = _config()
    net = _net(config)
    model_id = models.log_model(client, uri, exp, run_id, net, config, (1, 8, 8), {"k": "v"})
    client.set_terminated(run_id)
    return tmp_path, uri, client, exp, run_id, model_id, net, config


def _model_dir(client: MlflowClient, model_id: str) -> Path:
    loc = client.get_logged_model(model_id).artifact_location
    return Path(loc[len("file://"):] if loc.startswith("file://") else loc)


def _one_line_error(capsys, says: str) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("capsweep: error: ") and says in err, err
    return err


# ---- a model logged now: weights + config -----------------------------------------------------------
def test_a_logged_model_is_weights_and_config_and_loads_back_exactly(store):
    from sweeps import models
    tmp_path, uri, client, exp, run_id, model_id, net, config = store
    folder = _model_dir(client, model_id)
    assert sorted(p.name for p in folder.iterdir()) == ["MLmodel", "config.yaml", "requirements.txt", "weights.pt"]
    # the weights file names nothing but torch's own rebuild functions: no class of this project
    assert torch.serialization.get_unsafe_globals_in_checkpoint(str(folder / "weights.pt")) == []
    weights = torch.load(folder / "weights.pt", weights_only=True)
    assert set(weights) == set(net.state_dict())
    mlmodel = yaml.safe_load((folder / "MLmodel").read_text())
    assert set(mlmodel["flavors"]) == {"capsweep", "python_function"}
    assert mlmodel["flavors"]["capsweep"]["in_shape"] == [1, 8, 8]
    assert mlmodel["flavors"]["capsweep"]["num_classes"] == 10
    assert yaml.safe_load((folder / "config.yaml").read_text()) == config
    logged = client.get_logged_model(model_id)
    assert str(logged.status) == "READY" and logged.source_run_id == run_id
    assert logged.params["model.depth"] == "1" and logged.tags["k"] == "v"
    assert client.get_run(run_id).data.tags["capsweep.model_id"] == model_id
    assert [o.model_id for o in client.get_run(run_id).outputs.model_outputs] == [model_id]
    x = torch.rand(8, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    served, back = models.load(uri, f"models:/{model_id}")
    assert back == config
    with torch.no_grad():
        assert torch.equal(served(x), net(x).scores)


def test_mlflow_pyfunc_loads_it_through_the_same_safe_path(store):
    import mlflow.pyfunc
    tmp_path, uri, client, exp, run_id, model_id, net, config = store
    x = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    model = mlflow.pyfunc.load_model(str(_model_dir(client, model_id)))
    with torch.no_grad():
        np.testing.assert_array_equal(model.predict(x.numpy()), net(x).scores.numpy())


@pytest.mark.parametrize("kind", ["torch", "pickle"])
def test_a_payload_in_a_logged_models_weights_runs_nothing(store, capsys, kind):
    tmp_path, uri, client, exp, run_id, model_id, net, config = store
    marker = tmp_path / "pwned"
    (_model_dir(client, model_id) / "weights.pt").write_bytes(payload(kind, marker))
    capsys.readouterr()
    assert main(["eval", run_id, "--tracking-uri", uri]) == 2
    _one_line_error(capsys, "not a plain weights file")
    assert not marker.exists()
    import mlflow.pyfunc
    from sweeps.models import UnsafeModel
    with pytest.raises(UnsafeModel):
        mlflow.pyfunc.load_model(str(_model_dir(client, model_id)))
    assert not marker.exists()


# ---- a model in MLflow's pickle format (capsweep before this version) -------------------------------
def _log_legacy(tmp_path, client, uri, exp, net, config) -> tuple[str, str]:
    """A model as capsweep logged it before: mlflow.pytorch with pickle serialization."""
    import mlflow.pytorch
    from sweeps.models import ScoresNet
    run_id = client.create_run(exp, run_name="legacy").info.run_id
    cfg = tmp_path / "config.yaml"
    cfg.write_text(yaml.safe_dump(config))
    from analysis.store import scoped_environ
    with scoped_environ({"MLFLOW_TRACKING_URI": uri, "MLFLOW_EXPERIMENT_ID": exp}, override=True):   # fluent API
        info = mlflow.pytorch.log_model(ScoresNet(net), name="model", run_id=run_id, extra_files=[str(cfg)],
                                        serialization_format="pickle", pip_requirements=["torch"])
    client.set_tag(run_id, "capsweep.model_id", info.model_id)
    return run_id, info.model_id


def test_a_model_in_mlflows_pickle_format_is_refused_unless_trusted(store, capsys):
    tmp_path, uri, client, exp, _, _, net, config = store
    run_id, model_id = _log_legacy(tmp_path, client, uri, exp, net, config)
    capsys.readouterr()
    assert main(["eval", run_id, "--tracking-uri", uri]) == 2
    _one_line_error(capsys, "pickle format")
    assert main(["eval", run_id, "--tracking-uri", uri, "--trust"]) == 0     # the user's explicit choice
    assert "test_acc" in capsys.readouterr().out


@pytest.mark.parametrize("kind", ["torch", "pickle"])
def test_a_payload_in_a_pickle_format_model_runs_nothing(store, capsys, kind):
    tmp_path, uri, client, exp, _, _, net, config = store
    run_id, model_id = _log_legacy(tmp_path, client, uri, exp, net, config)
    marker = tmp_path / "pwned"
    (_model_dir(client, model_id) / "data" / "model.pth").write_bytes(payload(kind, marker))
    capsys.readouterr()
    assert main(["eval", f"models:/{model_id}", "--tracking-uri", uri]) == 2
    _one_line_error(capsys, "pickle format")
    assert not marker.exists()


# ---- a trial's files on the sweep's storage -----------------------------------------------------------
@pytest.mark.parametrize("kind", ["torch", "pickle"])
def test_a_payload_in_a_trials_state_runs_nothing(tmp_path, kind):
    from sweeps import storage, trainable
    marker = tmp_path / "pwned"
    path = tmp_path / "trial_state" / "t1.pt"
    path.parent.mkdir()
    path.write_bytes(payload(kind, marker))
    with pytest.raises(storage.UnsafeFile) as e:
        trainable.load_state(str(path))
    assert "\n" not in str(e.value) and "--trust" in str(e.value) and str(path) in str(e.value)
    assert storage.unsafe_reason(str(path))
    assert not marker.exists()


def test_a_trials_own_state_loads_with_weights_only(tmp_path):
    """What fit checkpoints (model, Adam, scheduler, generator, metrics) is plain data: the refusal
    above never hits a real state file."""
    from capsmodels import config as runcfg
    from capsmodels.train import fit
    from sweeps import storage, trainable
    config = _config()
    config["train"].update(epochs=1, max_steps_per_epoch=1)
    states = []
    fit(runcfg.from_dict(config), None, checkpoint=states.append)
    path = str(tmp_path / "s.pt")
    trainable.save_state(path, states[-1])
    assert storage.unsafe_reason(path) is None
    back = trainable.load_state(path)
    assert back["epoch"] == 0 and back["metrics"]["status"] == states[-1]["metrics"]["status"]
    assert all(torch.equal(back["model"][k], v) for k, v in states[-1]["model"].items())


@pytest.mark.parametrize("kind", ["torch", "pickle"])
def test_a_payload_in_a_trials_weights_is_not_logged_and_runs_nothing(shared, tmp_path, kind):
    """The driver logs a trial's model.pt when it ends: a planted one is kept, named on the run, and
    the sweep goes on (the queue's apply does not raise)."""
    from sweeps import models
    from sweeps.run_writer import RunWriter
    from sweeps.write_queue import Model, Start
    uri, client, exp = shared
    parent = client.create_run(exp).info.run_id
    writer = RunWriter(client, exp, parent, "s", None, uri)
    config = _config()
    writer.apply(Start("t1", "d1", {"model.depth": 1}, 0, yaml.safe_dump(config)))
    state_path, mdir = models.trial_paths(str(tmp_path / "ray" / "s" / "trial_state"), "t1")
    models.write_start(mdir, yaml.safe_dump(config), {"in_shape": [1, 8, 8], "num_classes": 10})
    marker = tmp_path / "pwned"
    Path(mdir, "model.pt").write_bytes(payload(kind, marker))
    writer.apply(Model("t1", mdir, state_path, keep=False))
    rid = writer.run_ids["t1"]
    assert "not a plain weights file" in client.get_run(rid).data.tags["capsweep.model_error"]
    assert client.search_logged_models([exp], filter_string=f"source_run_id = '{rid}'") == []
    assert Path(mdir, "model.pt").exists() and not marker.exists()


@pytest.mark.parametrize("kind", ["torch", "pickle"])
def test_resume_refuses_a_planted_trial_file_in_one_line(tmp_path, kind):
    from sweeps import runner
    exp_dir = tmp_path / "ray" / "s"
    (exp_dir / "trial_state").mkdir(parents=True)
    good = _net(_config()).state_dict()
    buf = io.BytesIO()
    torch.save({"model": good, "epoch": 0, "metrics": {"status": "running"}}, buf)
    (exp_dir / "trial_state" / "a.pt").write_bytes(buf.getvalue())
    runner.check_trial_files(str(exp_dir))            # plain state passes
    marker = tmp_path / "pwned"
    (exp_dir / "trial_models" / "b").mkdir(parents=True)
    (exp_dir / "trial_models" / "b" / "model.pt").write_bytes(payload(kind, marker))
    with pytest.raises(runner.SweepRefused) as e:
        runner.check_trial_files(str(exp_dir))
    assert "\n" not in str(e.value) and "model.pt" in str(e.value) and "--trust" in str(e.value)
    assert not marker.exists()




def test_resume_puts_the_drivers_private_copy_of_tune_state_back(tmp_path, monkeypatch):
    """The copy taken after a step replaces what is in the (shared) experiment folder at --resume:
    a changed file is rewritten, a planted extra state file removed, other files left alone."""
    from sweeps import tune_guard
    monkeypatch.setenv("CAPSWEEP_CACHE", str(tmp_path / "cache"))
    exp_dir, staging = tmp_path / "ray" / "s", tmp_path / "staging"
    exp_dir.mkdir(parents=True)
    staging.mkdir()
    (exp_dir / "tuner.pkl").write_bytes(b"tuner as written")
    guard = tune_guard.TuneStateGuard(str(exp_dir))
    guard.reset()
    guard.capture_tuner()
    (staging / "experiment_state-1.json").write_bytes(b'{"step": 1}')
    (staging / "searcher-state-1.pkl").write_bytes(b"searcher")
    guard.update(str(staging))
    assert oct(os.stat(guard.root).st_mode & 0o777) == "0o700"
    marker = tmp_path / "pwned"
    (exp_dir / "tuner.pkl").write_bytes(payload("torch", marker))
    (exp_dir / "experiment_state-1.json").write_bytes(fallback_json(marker))
    (exp_dir / "experiment_state-9.json").write_bytes(fallback_json(marker))    # "newer": Tune would pick it
    (exp_dir / "optuna.journal").write_bytes(b"journal")
    assert tune_guard.TuneStateGuard(str(exp_dir)).restore() == 4      # 2 rewritten, 1 removed, 1 added
    assert sorted(p.name for p in exp_dir.iterdir()) == ["experiment_state-1.json", "optuna.journal",
                                                          "searcher-state-1.pkl", "tuner.pkl"]
    assert (exp_dir / "tuner.pkl").read_bytes() == b"tuner as written"
    assert (exp_dir / "experiment_state-1.json").read_bytes() == b'{"step": 1}'
    assert (exp_dir / "optuna.journal").read_bytes() == b"journal"
    # a later step's state replaces the copy as a whole
    (staging / "experiment_state-1.json").write_bytes(b'{"step": 2}')
    os.utime(staging / "experiment_state-1.json", ns=(1, 2))
    guard.update(str(staging))
    assert guard.files()["experiment_state-1.json"] == b'{"step": 2}' and guard.files()["tuner.pkl"]
    assert not marker.exists()


def test_resume_without_a_private_copy_is_refused_unless_trusted(tmp_path, monkeypatch):
    from sweeps import tune_guard
    monkeypatch.setenv("CAPSWEEP_CACHE", str(tmp_path / "cache"))
    exp_dir = tmp_path / "ray" / "s"
    exp_dir.mkdir(parents=True)
    marker = tmp_path / "pwned"
    (exp_dir / "tuner.pkl").write_bytes(payload("pickle", marker))
    with pytest.raises(tune_guard.UntrustedState) as e:
        tune_guard.TuneStateGuard(str(exp_dir)).restore()
    assert "\n" not in str(e.value) and "--trust" in str(e.value)
    assert tune_guard.TuneStateGuard(str(exp_dir)).restore(trust=True) == 0
    assert not marker.exists()
