"""Search spaces and the seed repeater, driven directly (no Ray cluster needed)."""
from __future__ import annotations

import math

import pytest
from ray import tune

from sweeps import search
from sweeps.spec import from_config

BASE = {"model": {"preset": "tiny"}, "data": {"name": "digits"}, "train": {"epochs": 1}}


def spec_of(**kw):
    raw = {"name": "s", "base": BASE, "metric": "val_acc", "mode": "max", "seeds": [0]}
    raw.update(kw)
    return from_config(raw)


def test_grid_space_repeats_every_configuration_over_seeds():
    spec = spec_of(space={"model.depth": {"grid": [0, 1, 2]}}, seeds=[3, 4])
    space, alg, sched, n = search.build(spec)
    assert alg is None and sched is None and n == 1
    assert space["model.depth"] == tune.grid_search([0, 1, 2])
    assert space["train.seed"] == tune.grid_search([3, 4])


def test_random_space_domains():
    spec = spec_of(space={"train.lr": {"loguniform": [1e-4, 1e-2]}, "model.iterations": {"int": [1, 5]}},
                   search={"algorithm": "random"}, num_samples=7)
    space, _, _, n = search.build(spec)
    assert n == 7
    lr = space["train.lr"]
    assert (lr.lower, lr.upper) == (1e-4, 1e-2)
    it = space["model.iterations"]
    assert (it.lower, it.upper) == (1, 6)          # randint's upper bound is exclusive: 5 included


def test_asha_scheduler_takes_the_metric():
    spec = spec_of(space={"model.depth": {"grid": [0, 1]}}, scheduler={"name": "asha", "grace_period": 1})
    _, _, sched, _ = search.build(spec)
    assert sched is not None and sched.metric == "val_acc"


def optuna_spec(seeds, metric="val_acc", mode="max", sampler="tpe"):
    return spec_of(space={"model.depth": {"int": [0, 3]}, "model.routing": {"choice": ["dynamic", "em"]},
                          "train.lr": {"loguniform": [1e-4, 1e-2]}},
                   search={"algorithm": "optuna", "sampler": sampler}, seeds=seeds, num_samples=4,
                   metric=metric, mode=mode)


def test_seed_repeater_gives_each_suggestion_to_every_seed_and_reports_the_mean():
    spec = optuna_spec([10, 20])
    _, alg, _, n = search.build(spec)
    assert n == 8
    a, b = alg.suggest("t1"), alg.suggest("t2")
    assert a["train.seed"] == 10 and b["train.seed"] == 20
    assert {k: v for k, v in a.items() if k != "train.seed"} == {k: v for k, v in b.items() if k != "train.seed"}
    assert 0 <= a["model.depth"] <= 3 and a["model.routing"] in ("dynamic", "em")
    c = alg.suggest("t3")
    assert c["train.seed"] == 10                        # next suggestion, first seed again
    alg.on_trial_complete("t1", {"val_acc": 0.5})
    alg.on_trial_complete("t2", {"val_acc": 0.7})
    study = alg.searcher._ot_study
    done = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert len(done) == 1 and done[0].value == pytest.approx(0.6)   # the seed mean reached Optuna


def test_seed_repeater_multi_objective_and_nan_seed():
    spec = optuna_spec([0, 1], metric=["val_acc", "grad_ratio"], mode=["max", "max"], sampler="nsga2")
    _, alg, _, _ = search.build(spec)
    alg.suggest("a"), alg.suggest("b")
    alg.on_trial_complete("a", {"val_acc": 0.4, "grad_ratio": 0.2})
    alg.on_trial_complete("b", {"val_acc": 0.6, "grad_ratio": math.nan})   # a vanished gradient (0/0)
    (t,) = [t for t in alg.searcher._ot_study.trials if t.state.name == "COMPLETE"]
    assert t.values == pytest.approx([0.5, 0.2])        # nan-mean over seeds, per objective


def test_seed_repeater_state_survives_save_and_restore(tmp_path):
    spec = optuna_spec([0, 1])
    _, alg, _, _ = search.build(spec)
    alg.suggest("a"), alg.suggest("b")
    alg.on_trial_complete("a", {"val_acc": 0.3})
    alg.save(str(tmp_path / "searcher.pkl"))
    _, fresh, _, _ = search.build(spec)
    fresh.restore(str(tmp_path / "searcher.pkl"))
    fresh.on_trial_complete("b", {"val_acc": 0.5})      # the group started before the save completes
    done = [t for t in fresh.searcher._ot_study.trials if t.state.name == "COMPLETE"]
    assert len(done) == 1 and done[0].value == pytest.approx(0.4)


def test_optuna_space_is_picklable():
    import pickle
    spec = optuna_spec([0])
    _, alg, _, _ = search.build(spec)
    pickle.dumps(alg.searcher._space)
