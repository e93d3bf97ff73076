"""`capsweep train --save` and `capsweep eval` on a real MLflow store (no Ray: one process trains).

The saved run carries what a sweep's trial run carries (params without "not set", the device used,
per-epoch metrics, dataset inputs, MLflow's standard tags, one logged model); `capsweep eval` on it
reproduces the run's figures exactly on the same data, and every bad input is one line, exit 2.
"""
from __future__ import annotations

import hashlib

import pytest
from mlflow.tracking import MlflowClient

from sweeps.cli import main
from tests.helpers.sweep import TINY_BASE

import yaml


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """One `capsweep train --save` of a tiny depth-1 CapsNet (1 epoch of 2 steps) into a fresh store."""
    work = tmp_path_factory.mktemp("train")
    base = yaml.safe_load(TINY_BASE % {"epochs": 1})["base"]
    base["model"]["depth"] = 1
    base["train"]["max_steps_per_epoch"] = 2
    cfg = work / "run.yaml"
    cfg.write_text(yaml.safe_dump(base))
    uri = f"sqlite:///{work}/mlflow.db"
    from analysis.store import open_client as open_store
    open_store(uri, create=True).create_experiment("capsweep", artifact_location=str(work / "artifacts"))
    code = main(["train", str(cfg), "--quiet", "--save", "--tracking-uri", uri])
    assert code == 0
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("capsweep").experiment_id],
                                "tags.`capsweep.role` = 'train'")
    return work, uri, client, run


def test_train_save_logs_run_model_and_lineage(saved):
    work, uri, client, run = saved
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "train-d1-it3-dynamic-s0"
    p = run.data.params
    assert p["model.depth"] == "1" and p["train.device"] == "cpu"
    assert "None" not in p.values()
    assert run.data.tags["mlflow.user"] and run.data.tags["mlflow.source.name"].startswith("capsweep ")   # sys.argv: here pytest's
    assert run.data.tags["mlflow.source.git.commit"] == run.data.tags["capsweep.git_commit"]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "test_acc")] == [0]
    assert run.data.tags["capsweep.stop_reason"] == "epochs"          # as a sweep's trial run
    from capsmodels.contract import correct_from_tags, decode_correct
    assert decode_correct(correct_from_tags(run.data.tags))[0] == run.data.metrics["test_n"] == 200
    exp = client.get_experiment(run.info.experiment_id)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    (model,) = client.search_logged_models([run.info.experiment_id],
                                           filter_string=f"source_run_id = '{run.info.run_id}'")
    assert str(model.status) == "READY" and run.data.tags["capsweep.model_id"] == model.model_id
    assert model.params["model.depth"] == "1"
    inputs = {{t.key: t.value for t in i.tags}["mlflow.data.context"]: i
              for i in client.get_run(run.info.run_id).inputs.dataset_inputs}
    assert sorted(inputs) == ["test", "train", "val"]
    # the digest is the split as trained on: recomputed here from capsmodels' own splits
    from capsmodels import config as runcfg
    from capsmodels.datasets import load_raw
    from capsmodels.splits import make_splits
    cfg = runcfg.load(work / "run.yaml")
    splits = make_splits(load_raw("digits"), cfg.data, cfg.train.seed)
    x, y = splits.test.tensors
    digest = hashlib.sha256(x.numpy().tobytes() + y.numpy().tobytes()).hexdigest()[:16]
    assert inputs["test"].dataset.digest == digest and inputs["test"].dataset.name == "digits"
    assert {t.key: t.value for t in inputs["train"].tags}["capsweep.rows"] == "300"


def test_eval_reproduces_the_runs_figures_exactly(saved, capsys):
    from sweeps import evaluate, models
    work, uri, client, run = saved
    model_uri, source = models.resolve(client, run.info.run_id)
    assert source == run.info.run_id and model_uri == f"models:/{run.data.tags['capsweep.model_id']}"
    served, config = models.load(uri, model_uri)
    figures = evaluate.measure(served.net, evaluate.eval_config(config, []))
    for key in ("test_acc", "val_acc", "test_loss", "grad_ratio", "act_grad/l1", "dead_frac_max"):
        assert figures[key] == run.data.metrics[key] == run.data.metrics["best/" + key], key   # one epoch
    assert main(["eval", run.info.run_id, "--tracking-uri", uri, "--log"]) == 0
    out = capsys.readouterr().out
    assert f"test_acc {'':19s}{run.data.metrics['test_acc']:.6g}".split() == \
        [line for line in out.splitlines() if line.strip().startswith("test_acc ")][0].split()
    (ev,) = client.search_runs([run.info.experiment_id], "tags.`capsweep.role` = 'eval'")
    assert ev.data.tags["capsweep.eval_of"] == run.info.run_id
    assert ev.data.metrics["test_acc"] == run.data.metrics["test_acc"]
    assert [m.model_id for m in client.get_run(ev.info.run_id).inputs.model_inputs] == \
        [run.data.tags["capsweep.model_id"]]


def test_eval_with_an_affine_test_transform_adds_the_transformed_accuracy(saved, capsys):
    work, uri, client, run = saved
    model_uri = f"models:/{run.data.tags['capsweep.model_id']}"
    assert main(["eval", model_uri, "data.test_transform=affine", "--tracking-uri", uri]) == 0
    out = capsys.readouterr().out
    assert "test_acc_transformed" in out and "test_transform affine" in out


@pytest.mark.parametrize("args, says", [
    (["0123456789abcdef"], "run: no run '0123456789abcdef'"),
    (["models:/m-0000"], "model: no logged model 'm-0000'"),
    (["RUN", "model.routing=magic"], "model.routing: 'magic' is not allowed"),
    (["RUN", "data.nope=1"], "data.nope"),
    (["RUN", "data.name=mnist5k"], "data.name: 'mnist5k' gives inputs of shape (1, 28, 28)"),
    # the logged model's own keys: refused, not silently ignored (issue 23, 4)
    (["RUN", "model.depth=3"], "model.depth: not an eval override: eval measures the logged model as it was "
                               "trained; this would change its architecture (allowed: data.*, train.eval_batch,"),
    (["RUN", "data.test_size=50", "model.preset=small"], "model.preset: not an eval override"),
    (["RUN", "train.lr=0.1"], "train.lr: not an eval override: it only acts while training"),
    (["RUN", "train.seed=3"], "train.seed: not an eval override: the seed chose the validation split"),
])
def test_bad_input_is_one_line_and_exit_2(saved, capsys, args, says):
    work, uri, client, run = saved
    args = [run.info.run_id if a == "RUN" else a for a in args]
    capsys.readouterr()
    assert main(["eval", *args, "--tracking-uri", uri]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("capsweep: error: ") and says in err, err


def test_eval_on_a_store_that_does_not_exist_is_refused_without_creating_it(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path}/none.db"
    assert main(["eval", "abc", "--tracking-uri", uri]) == 2
    assert "no MLflow store" in capsys.readouterr().err and not (tmp_path / "none.db").exists()


def test_architecture_overrides_are_refused_before_the_store_is_read(tmp_path, capsys):
    """The refusal needs no store: a store that does not exist is not even looked at."""
    uri = f"sqlite:///{tmp_path}/none.db"
    assert main(["eval", "abc", "model.depth=3", "--tracking-uri", uri]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("capsweep: error: model.depth: not an eval override")
    assert not (tmp_path / "none.db").exists()


def test_data_and_evaluation_overrides_act(saved, capsys):
    """data.* and the evaluation keys are honoured: on a 60-image test subset the accuracy is a count
    over 60, and the logged eval run records the overrides as its params."""
    work, uri, client, run = saved
    args = ["data.test_size=60", "train.eval_batch=32", "train.device=cpu", "train.dead_tau=0.02"]
    assert main(["eval", run.info.run_id, *args, "--tracking-uri", uri, "--log"]) == 0
    out = capsys.readouterr().out
    (ev,) = [r for r in client.search_runs([run.info.experiment_id], "tags.`capsweep.role` = 'eval'")
             if r.data.tags["capsweep.eval_overrides"] == " ".join(args)]
    p = ev.data.params
    assert (p["data.test_size"], p["train.eval_batch"], p["train.dead_tau"]) == ("60.0", "32", "0.02")   # test_size is a float (fraction or count)
    acc = ev.data.metrics["test_acc"]
    assert abs(acc * 60 - round(acc * 60)) < 1e-6, acc           # k correct of 60 images
    assert f"{acc:.6g}" in out and ev.info.run_id in out


def test_eval_says_what_it_does_while_it_works(saved, capsys, monkeypatch):
    """The status line (capsmodels/progress.py; on a terminal, or with CAPSWEEP_PROGRESS=1): the store, the
    model, the data; erased before the figures are printed."""
    work, uri, client, run = saved
    monkeypatch.setenv("CAPSWEEP_PROGRESS", "1")
    assert main(["eval", run.info.run_id, "--tracking-uri", uri]) == 0
    out, err = capsys.readouterr()
    steps = [s.split(" ... ")[0] for s in err.split("\r\x1b[K") if s]
    assert list(dict.fromkeys(steps)) == ["capsweep eval: opening the store",
                                          f"capsweep eval: loading the model {run.info.run_id}",
                                          "capsweep eval: measuring it on digits"]
    assert err.endswith("\r\x1b[K") and out.startswith("capsweep eval: models:/")
