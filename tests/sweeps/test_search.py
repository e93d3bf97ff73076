"""Search spaces and the seed repeater, driven directly (no Ray cluster needed)."""
from __future__ import annotations

import math

import pytest
from ray import tune

from capsmodels import config as runcfg
from sweeps import extras, search
from sweeps.spec import KEEP_BASE, describe_trials, resolve_trial, total_trials
from tests.helpers.sweep import SEARCH_BASE as BASE
from tests.helpers.sweep import optuna_spec
from tests.helpers.sweep import spec_of





def tune_trials(spec) -> list:
    """The trials Tune's own variant generator makes of search.build's space (no Ray cluster needed)."""
    from ray.tune.experiment import Experiment
    space, alg, _, n = search.build(spec)
    alg.add_configurations([Experiment("t", lambda config: None, config=space, num_samples=n)])
    trials = []
    while (trial := alg.next_trial()) is not None:
        trials.append(trial)
    return trials


def by_role(trials) -> dict:
    out = {"candidate": [], "reference": [], "control": []}
    for t in trials:
        out[t.config["trial.role"]].append(t.config)
    return out


def test_grid_space_repeats_every_configuration_over_seeds():
    spec = spec_of(space={"model.depth": {"grid": [0, 1, 2]}}, seeds=[3, 4], controls=False)
    space, _, sched, n = search.build(spec)
    assert sched is None and n == 1
    assert space["model.depth"] == tune.grid_search([0, 1, 2])
    assert space["train.seed"] == tune.grid_search([3, 4])
    trials = tune_trials(spec)
    assert sorted((t.config["model.depth"], t.config["train.seed"]) for t in trials) == \
        [(d, s) for d in (0, 1, 2) for s in (3, 4)]
    assert {t.config["trial.role"] for t in trials} == {"candidate"}      # depth 0 is in the grid


def test_grid_without_depth_zero_gets_matched_references_and_controls_per_seed():
    # capsdim-like: hidden capsule shape x depth {1, 3}, plus a learning-rate axis the references must match
    spec = spec_of(space={"model.caps_dim": {"grid": [4, 8]}, "model.depth": {"grid": [1, 3]},
                          "train.lr": {"grid": [1e-3, 1e-2]}}, seeds=[0, 1])
    trials = tune_trials(spec)
    roles = by_role(trials)
    assert len(roles["candidate"]) == 2 * 2 * 2 * 2
    assert all(c["model.arch"] == KEEP_BASE for c in roles["candidate"])      # left to the base config
    # one depth-0 CapsNet per seed and per combination of the swept keys other than depth and shape
    refs = sorted((c["train.lr"], c["train.seed"]) for c in roles["reference"])
    assert refs == [(1e-3, 0), (1e-3, 1), (1e-2, 0), (1e-2, 1)]
    assert all(c["model.depth"] == 0 and c["model.arch"] == "capsnet" for c in roles["reference"])
    # one cnn per swept depth and seed, plus its depth-0 twin, base config otherwise (tiny: caps_dim 4, lr 1e-3)
    ctrl = sorted((c["model.depth"], c["train.seed"]) for c in roles["control"])
    assert ctrl == [(0, 0), (0, 1), (1, 0), (1, 1), (3, 0), (3, 1)]
    assert all(c["model.arch"] == "cnn" and c["train.lr"] == 1e-3 and c["model.caps_dim"] == 4
               for c in roles["control"])
    assert len(trials) == total_trials(spec) == 26
    # as the verdict judges them: the depth-0 cnn is the deeper controls' reference
    assert describe_trials(spec) == "26 trials (16 candidates, 6 references, 4 controls)"
    for t in trials:                                   # every trial resolves to a valid run config
        cfg = resolve_trial(BASE, t.config)
        assert cfg.model.arch == {"control": "cnn"}.get(t.config["trial.role"], "capsnet")


def test_references_and_controls_can_be_switched_off():
    space = {"model.depth": {"grid": [1, 3]}}
    assert {t.config["trial.role"] for t in tune_trials(spec_of(space=space, references=False, controls=False))} \
        == {"candidate"}
    roles = by_role(tune_trials(spec_of(space=space, references=False)))
    assert not roles["reference"] and len(roles["control"]) == 3       # depths 0, 1, 3


def test_depth_outside_the_space_gets_references_when_the_base_is_deep():
    spec = spec_of(space={"model.iterations": {"grid": [1, 3]}}, base={**BASE, "model": {"preset": "tiny", "depth": 2}})
    roles = by_role(tune_trials(spec))
    assert sorted(c["model.iterations"] for c in roles["reference"]) == [1, 3]
    assert all(c["model.depth"] == 0 for c in roles["reference"])
    assert [c["model.depth"] for c in roles["control"]] == [0, 2]
    assert all(c["model.depth"] == KEEP_BASE for c in roles["candidate"])
    assert spec_of(space={"model.iterations": {"grid": [1, 3]}}, controls=False).references is True
    assert total_trials(spec_of(space={"model.iterations": {"grid": [1, 3]}}, controls=False)) == 2   # depth 0: none


def test_random_search_references_at_the_base_with_small_categorical_levels():
    space = {"model.depth": {"int": [0, 3]}, "train.lr": {"loguniform": [1e-4, 1e-2]},
             "model.routing": {"choice": ["dynamic", "em"]}}
    spec = spec_of(space=space, search={"algorithm": "random"}, num_samples=3, seeds=[0, 1])
    roles = by_role(tune_trials(spec))
    assert len(roles["candidate"]) == 3 * 2
    # ranges cannot be matched in advance: the base value; 2 routing levels <= 8: each level
    assert sorted((c["model.routing"], c["train.seed"]) for c in roles["reference"]) == \
        [("dynamic", 0), ("dynamic", 1), ("em", 0), ("em", 1)]
    assert all(c["train.lr"] == 1e-3 and c["model.depth"] == 0 for c in roles["reference"])
    # every integer of the depth range, per seed
    assert sorted((c["model.depth"], c["train.seed"]) for c in roles["control"]) == \
        [(d, s) for d in range(4) for s in (0, 1)]
    assert total_trials(spec) == 6 + 4 + 8
    # more than 8 categorical combinations: the base config only
    many = {**space, "model.squash": {"choice": ["sabour", "exp", "tanh"]}, "model.bias": {"choice": [False, True]}}
    refs = extras.reference_points(spec_of(space=many, search={"algorithm": "random"}))
    assert refs == [{"model.depth": 0, "model.arch": "capsnet"}]


def test_asha_takes_the_epochs_of_the_resolved_base_and_never_stops_extra_trials():
    spec = spec_of(space={"model.depth": {"grid": [1, 2]}}, base={"model": {"preset": "tiny"}, "data": {"name": "digits"}},
                   scheduler={"name": "asha", "grace_period": 1}, seeds=[0])
    _, _, sched, _ = search.build(spec)
    assert sched._max_t == runcfg.TrainConfig().epochs == 3        # the default, not 100
    trials = {t.config["trial.role"] + str(t.config["model.depth"]): t for t in tune_trials(spec)}
    for t in trials.values():
        sched.on_trial_add(None, t)
    step = lambda t, acc: sched.on_trial_result(None, t, {"training_iteration": 1, "val_acc": acc})  # noqa: E731
    assert step(trials["candidate1"], 0.9) == "CONTINUE"
    assert step(trials["reference0"], 0.0) == "CONTINUE"          # worse than the rung: still runs
    assert step(trials["control1"], 0.0) == "CONTINUE"
    assert step(trials["candidate2"], 0.1) == "STOP"              # candidates are judged as before


def test_random_space_domains():
    spec = spec_of(space={"train.lr": {"loguniform": [1e-4, 1e-2]}, "model.iterations": {"int": [1, 5]}},
                   search={"algorithm": "random"}, num_samples=7)
    space, _, _, n = search.build(spec)
    assert n == 7 + 1          # + the cnn control at the base depth (0), one seed; depth 0: no reference
    lr = space["train.lr"]
    assert (lr.lower, lr.upper) == (1e-4, 1e-2)
    it = space["model.iterations"]
    assert (it.lower, it.upper) == (1, 6)          # randint's upper bound is exclusive: 5 included


def test_asha_scheduler_takes_the_metric():
    spec = spec_of(space={"model.depth": {"grid": [0, 1]}}, scheduler={"name": "asha", "grace_period": 1})
    _, _, sched, _ = search.build(spec)
    assert sched is not None and sched.metric == "val_acc" and sched._max_t == 1




def innermost(alg):
    while hasattr(alg, "searcher"):
        alg = alg.searcher
    return alg


def completed(alg) -> list:
    """The trials Optuna itself has seen complete."""
    return [t for t in innermost(alg)._ot_study.trials if t.state.name == "COMPLETE"]


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
    done = completed(alg)
    assert len(done) == 1 and done[0].value == pytest.approx(0.6)   # the seed mean reached Optuna


def test_seed_repeater_multi_objective_and_nan_seed():
    spec = optuna_spec([0, 1], metric=["val_acc", "grad_ratio"], mode=["max", "max"], sampler="nsga2")
    _, alg, _, _ = search.build(spec)
    alg.suggest("a"), alg.suggest("b")
    alg.on_trial_complete("a", {"val_acc": 0.4, "grad_ratio": 0.2})
    alg.on_trial_complete("b", {"val_acc": 0.6, "grad_ratio": math.nan})   # a vanished gradient (0/0)
    (t,) = completed(alg)
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
    done = completed(fresh)
    assert len(done) == 1 and done[0].value == pytest.approx(0.4)


def test_optuna_space_is_picklable():
    import pickle
    spec = optuna_spec([0])
    _, alg, _, _ = search.build(spec)
    pickle.dumps(innermost(alg)._space)


@pytest.mark.parametrize("sampler", ["tpe", "cmaes", "nsga2", "random"])
def test_every_sampler_pickles_and_the_copy_draws_what_the_original_would(sampler):
    """Tune pickles the searcher when the Tuner is created and at every snapshot (`--resume`).
    NSGA-II holds a thread lock in Optuna 5.1 (sweeps/samplers.py): pickling used to raise. After 5
    told configurations (NSGA-II's first generation of 4 is complete: the next uses its parents and
    its lock), a pickled copy suggests exactly what the original suggests next, and can be told."""
    import pickle
    multi = sampler == "nsga2"
    spec = optuna_spec([0], metric=["val_acc", "grad_ratio"] if multi else "val_acc",
                       mode=["max", "min"] if multi else "max", sampler=sampler)
    _, alg, _, _ = search.build(spec)
    for k in range(5):
        c = alg.suggest(f"t{k}")
        alg.on_trial_complete(f"t{k}", {"val_acc": 0.1 * c["model.depth"] + c["train.lr"], "grad_ratio": 0.1 * k})
    back = pickle.loads(pickle.dumps(alg))
    assert [t.values for t in completed(back)] == [t.values for t in completed(alg)]
    nxt = [a.suggest("t5") for a in (alg, back)]
    assert nxt[0] == nxt[1]
    back.on_trial_complete("t5", {"val_acc": 0.5, "grad_ratio": 0.5})
    assert len(completed(back)) == 6 and len(completed(alg)) == 5
    assert pickle.loads(pickle.dumps(back)).suggest("t6") == back.suggest("t6")


def test_optuna_gets_the_extra_trials_first_never_sees_them_and_resumes_without_repeating(tmp_path):
    spec = optuna_spec([0, 1], added=True)
    _, alg, _, n = search.build(spec)
    refs, ctrls = extras.reference_points(spec), extras.control_points(spec)
    assert refs == [{"model.routing": r, "model.depth": 0, "model.arch": "capsnet"} for r in ("dynamic", "em")]
    assert [c["model.depth"] for c in ctrls] == [0, 1, 2, 3]
    n_extra = (len(refs) + len(ctrls)) * 2
    assert n == 4 * 2 + n_extra == total_trials(spec)
    first = [alg.suggest(f"x{i}") for i in range(3)]
    assert [c["trial.role"] for c in first] == ["reference"] * 3
    assert (first[0]["train.seed"], first[1]["train.seed"]) == (0, 1)
    for i, c in enumerate(first):
        alg.on_trial_result(f"x{i}", {"val_acc": 0.5})
        alg.on_trial_complete(f"x{i}", {"val_acc": 0.5})
    assert completed(alg) == []                 # a reference is no point of the search
    # saved and restored the way Tune does it for --resume (wrappers' get_state, then the base searcher)
    from ray.tune.search import SearchGenerator
    SearchGenerator(alg).save_to_dir(str(tmp_path), "s1")
    _, fresh, _, _ = search.build(spec)
    SearchGenerator(fresh).restore_from_dir(str(tmp_path))
    rest = [fresh.suggest(f"y{i}") for i in range(n_extra - 3)]
    assert [c["trial.role"] for c in rest] == ["reference"] + ["control"] * 8       # nothing repeated
    assert sorted((c["model.depth"], c["train.seed"]) for c in rest[1:]) == [(d, s) for d in range(4) for s in (0, 1)]
    fresh.on_trial_complete("x2", {"val_acc": 0.9})                 # an extra from before the save
    a, b = fresh.suggest("c1"), fresh.suggest("c2")
    assert (a["trial.role"], b["trial.role"]) == ("candidate", "candidate")
    assert (a["train.seed"], b["train.seed"]) == (0, 1) and a["model.depth"] == b["model.depth"]
    fresh.on_trial_complete("c1", {"val_acc": 0.2})
    fresh.on_trial_complete("c2", {"val_acc": 0.4})
    (t,) = completed(fresh)
    assert t.value == pytest.approx(0.3)        # only the candidates' seed mean reached Optuna



def test_resolve_trial_is_base_then_params_then_presets_and_defaults():
    """The one way a trial's config is built (sweeps/spec.py): bookkeeping params and KEEP_BASE are
    not run-config keys; what neither base nor params set comes from the preset or the schema."""
    cfg = resolve_trial({"model": {"preset": "tiny"}, "train": {"lr": 0.5}},
                        {"model.depth": 2, "trial.role": "control", "train.lr": KEEP_BASE, "__trial_index__": 1})
    assert cfg.model.depth == 2 and cfg.train.lr == 0.5
    assert cfg.train.epochs == runcfg.TrainConfig().epochs and cfg.data.name == runcfg.DataConfig().name
    assert cfg.model.num_caps == runcfg.from_dict({"model": {"preset": "tiny"}}).model.num_caps


def test_importing_the_runner_leaves_the_environment_alone():
    """sweeps/runner.py sets Tune's and MLflow's variables around a sweep (run_sweep), not at import."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    code = ("import os; before = dict(os.environ); import sweeps.runner\n"
            "print(sorted(k for k in set(before) | set(os.environ) if os.environ.get(k) != before.get(k)"
            " and k.startswith(('MLFLOW_', 'RAY_AIR'))))")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_HTTP", "RAY_AIR"))}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout + out.stderr
