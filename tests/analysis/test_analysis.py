"""Tests of the analysis package against a real MLflow store (sqlite in tmp), no mocks.

The store holds runs written in the sweep runner's layout with known values, with the probes of
docs/PROBES.md (act_grad, starved_frac, frozen_frac, routing nulls):
  sweep "s1": a depth-0 reference (3 seeds) and depth >= 1 configurations, one built to escape
  (E: healthy gradients, few dead capsules, better accuracy), one built to be undecided (U: accuracy
  whose interval straddles the margin) and the others built not to escape, one reason each (V vanishing
  grad_ratio + a failed seed, D many dead capsules, F frozen capsules, T starved capsules, A accuracy
  below the shallow net, C collapsed: grad_ratio 1 but every layer's act_grad 1e-6, X a diverged seed,
  S a seed stopped early by the scheduler), plus cnn at depth 0 (the controls' reference) and depth 2
  (a control that passes);
  sweep "deep": one healthy depth-2 CapsNet without any depth-0 trial (for --reference s1);
  sweep "tiny" (logged last): depth 0..3, one seed each, logged with the old probes only (no act_grad,
  starved, frozen or nulls), accuracies chosen for a hand-computed Spearman rho;
  experiments "empty", "othertool" (runs without capsweep tags or probes) and "noprobes" (capsweep tags,
  no probes).
Expected numbers are derived here independently (t bounds and Welch's test from the formula with
scipy.stats.t, rho by hand).
"""
from __future__ import annotations

import base64
import json
import math
import os
from pathlib import Path
import struct
import time
import zlib
from html.parser import HTMLParser

import numpy as np
import pytest
from mlflow import MlflowClient
from mlflow.entities import Metric, Param

from analysis import cli
from analysis.load import fetch_histories, load_sweep
from analysis.errors import AnalysisError
from analysis.report import write_report
from analysis.verdict import Thresholds, compute_verdict, verdict_json
from scipy import stats

EPOCHS = 3
BASE = {"model.arch": "capsnet", "model.routing": "dynamic", "model.iterations": 3, "model.caps_dim": 8,
        "data.name": "mnist5k", "data.train_size": 1.0, "train.dead_tau": 0.01}
E_GRAD, E_DEAD, E_ACC = [0.5, 0.6, 0.7], [0.02, 0.0, 0.1], [0.95, 0.96, 0.94]
N_TEST = 10_000      # the test images every new-probe trial logs as `test_n`
TINY_ACC = [0.9, 0.7, 0.8, 0.6]  # depth 0, 1, 2, 3
U_ACC = [0.88, 0.91, 0.86]       # mean 0.883 against the reference's 0.90: straddles the margin


# ---------------------------------------------------------------------------------------------------
# Writing runs in the sweep layout

def start_sweep(client: MlflowClient, exp_id: str, sweep: str) -> str:
    run = client.create_run(exp_id, run_name=sweep, tags={"capsweep.role": "parent", "capsweep.sweep": sweep})
    client.log_batch(run.info.run_id, params=[Param("sweep.name", sweep)])
    return run.info.run_id


def capsnet_metrics(depth: int, *, grad_ratio: float, dead_hidden: float, test_acc: float,
                    grad_scale: float = 0.05, seed: int = 0, starved: float = 0.0, frozen: float = 0.0,
                    new_probes: bool = True) -> dict[str, float]:
    """Final-epoch metrics of a CapsNet with `depth` hidden layers. act_grad (and grad_norm) fall
    geometrically from l1 (= grad_scale, times 1 + 0.05 seed so seeds differ) to l{depth+1} (= that / 
    grad_ratio), so their ratio is grad_ratio; l0 = l1. Hidden layers have dead_frac = dead_hidden,
    starved_frac = starved, frozen_frac = frozen; primaries and class capsules 0. new_probes=False: the
    metrics an old sweep logged (no act_grad, grad_rms, starved, frozen, nulls)."""
    last = depth + 1
    ratio = grad_ratio if depth > 0 else 1.0
    scale = grad_scale * (1 + 0.05 * seed)
    m = {"test_acc": test_acc, "val_acc": test_acc + 0.01, "train_acc": test_acc + 0.02,
         "test_loss": 1 - test_acc, "val_loss": 1 - test_acc, "train_loss": 0.9 - test_acc,
         "grad_ratio": ratio, "images_per_s": 500.0, "peak_mem_mb": 100.0, "time_s": 1.0}
    if new_probes:
        m["test_n"] = float(N_TEST)
    for l in range(0, last + 1):
        frac = (l - 1) / (last - 1) if last > 1 and l >= 1 else 0.0
        g = scale * (1.0 / ratio) ** frac
        m[f"grad_norm/l{l}"] = g
        hidden = 1 <= l <= depth
        m[f"dead_frac/l{l}"] = dead_hidden if hidden else 0.0
        m[f"act_mean/l{l}"] = 0.3
        m[f"squash_gain/l{l}"] = 0.4
        if new_probes:
            m[f"act_grad/l{l}"] = g
            m[f"grad_rms/l{l}"] = g / 100
            m[f"starved_frac/l{l}"] = starved if hidden else 0.0
            m[f"frozen_frac/l{l}"] = frozen if hidden else 0.0
        if l >= 1:
            m[f"tree_score/l{l}"] = 0.3
            m[f"routing_dynamics/l{l}"] = 0.02
            if new_probes:
                m[f"tree_score_null/l{l}"] = 0.1
                m[f"routing_dynamics_null/l{l}"] = 0.005
    m["dead_frac_max"] = dead_hidden if depth else 0.0
    if new_probes:
        m["starved_frac_max"] = starved if depth else 0.0
        m["frozen_frac_max"] = frozen if depth else 0.0
    return m


def cnn_metrics(depth: int, test_acc: float, seed: int) -> dict[str, float]:
    """A healthy cnn control: act_grad 0.1 on every layer, nothing dead, starved or frozen, no routing."""
    m = {"test_acc": test_acc, "val_acc": test_acc, "grad_ratio": 1.0, "test_n": float(N_TEST)}
    for l in range(depth + 2):
        m[f"grad_norm/l{l}"] = m[f"act_grad/l{l}"] = 0.1 * (1 + 0.05 * seed)
        for name in ("dead_frac", "starved_frac", "frozen_frac"):
            m[f"{name}/l{l}"] = 0.0
    return m


def log_trial(client: MlflowClient, exp_id: str, parent_id: str, sweep: str, trial_id: str,
              params: dict, final: dict[str, float], status: str = "finished", error: str = "") -> str:
    """One trial: params, EPOCHS epochs of each metric ramping up to `final` (the last epoch logs
    exactly `final`), the capsweep tags, MLflow status FAILED for failed trials, else FINISHED."""
    tags = {"mlflow.parentRunId": parent_id, "capsweep.role": "trial", "capsweep.sweep": sweep,
            "capsweep.trial_id": trial_id, "capsweep.seed": str(params["train.seed"]),
            "capsweep.status": status, "capsweep.git_commit": "abc1234"}
    if error:
        tags["capsweep.error"] = error
    rid = client.create_run(exp_id, run_name=trial_id, tags=tags).info.run_id
    now = int(time.time() * 1000)
    metrics = []
    for e in range(EPOCHS):
        for k, v in final.items():
            val = v if e == EPOCHS - 1 or math.isnan(v) else v * (0.5 + 0.5 * (e + 1) / EPOCHS)
            metrics.append(Metric(k, val, now + e, e))
        metrics.append(Metric("epoch", float(e), now + e, e))
    client.log_batch(rid, metrics=metrics, params=[Param(k, str(v)) for k, v in params.items()])
    client.set_terminated(rid, "FAILED" if status == "failed" else "FINISHED")
    return rid


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    c = MlflowClient(uri)
    exp = c.create_experiment("capsweep", artifact_location=str(root / "artifacts"))
    ids: dict = {"uri": uri, "root": root, "configs": {}}

    parent = start_sweep(c, exp, "s1")
    ids["parent"] = parent
    count = iter(range(1000))

    def trial(name, params, seed, final, status="finished", error=""):
        p = {**BASE, **params, "train.seed": seed}
        rid = log_trial(c, exp, parent, "s1", f"t{next(count):03d}", p, final, status, error)
        ids["configs"].setdefault(name, []).append(rid)

    def cfg(depth, init, lr):
        return {"model.depth": depth, "model.init": init, "train.lr": lr}

    for s, a in enumerate([0.90, 0.91, 0.89]):
        trial("R", cfg(0, "std", 0.001), s, capsnet_metrics(0, grad_ratio=1, dead_hidden=0, test_acc=a,
                                                            grad_scale=0.04, seed=s))
    for s, (g, d, a) in enumerate(zip(E_GRAD, E_DEAD, E_ACC)):
        trial("E", cfg(2, "fan", 0.001), s, capsnet_metrics(2, grad_ratio=g, dead_hidden=d, test_acc=a,
                                                            grad_scale=0.04, seed=s))
    for s, a in enumerate(U_ACC):
        trial("U", cfg(3, "std", 0.01), s, capsnet_metrics(3, grad_ratio=0.5, dead_hidden=0.1, test_acc=a, seed=s))
    for s, g in enumerate([0.01, 0.02, 0.015]):
        trial("V", cfg(2, "std", 0.001), s, capsnet_metrics(2, grad_ratio=g, dead_hidden=0.1, test_acc=0.92,
                                                            seed=s))
    trial("V", cfg(2, "std", 0.001), 3, {}, status="failed", error="RuntimeError: CUDA out of memory")
    for s, d in enumerate([0.8, 0.7, 0.9]):
        trial("D", cfg(1, "fan", 0.001), s, capsnet_metrics(1, grad_ratio=0.5, dead_hidden=d, test_acc=0.92,
                                                            seed=s))
    for s, f in enumerate([0.8, 0.9, 0.85]):
        trial("F", cfg(1, "fan", 0.01), s, capsnet_metrics(1, grad_ratio=0.5, dead_hidden=0.1, frozen=f,
                                                           test_acc=0.92, seed=s))
    for s, st in enumerate([0.7, 0.8, 0.75]):
        trial("T", cfg(3, "std", 0.001), s, capsnet_metrics(3, grad_ratio=0.5, dead_hidden=0.1, starved=st,
                                                            test_acc=0.92, seed=s))
    for s, a in enumerate([0.80, 0.82, 0.81]):
        trial("A", cfg(3, "fan", 0.001), s, capsnet_metrics(3, grad_ratio=0.5, dead_hidden=0.1, test_acc=a,
                                                            seed=s))
    for s in range(3):
        trial("C", cfg(2, "fan", 0.01), s, capsnet_metrics(2, grad_ratio=1.0, dead_hidden=0.1, test_acc=0.92,
                                                           grad_scale=1e-6, seed=s))
    for s in range(2):
        trial("X", cfg(3, "fan", 0.01), s, capsnet_metrics(3, grad_ratio=0.5, dead_hidden=0.1, test_acc=0.92,
                                                           seed=s))
    diverged = {**capsnet_metrics(3, grad_ratio=0.5, dead_hidden=0.1, test_acc=0.1),
                "test_loss": float("nan"), "val_loss": float("nan")}
    trial("X", cfg(3, "fan", 0.01), 2, diverged, status="diverged")
    for s in range(3):  # healthy, but the scheduler stopped one seed early: it must not escape
        trial("S", cfg(1, "std", 0.01), s, capsnet_metrics(1, grad_ratio=0.5, dead_hidden=0.1, test_acc=0.92,
                                                           seed=s),
              status="stopped" if s == 2 else "finished")
    for depth, name, accs in ((0, "CNN0", [0.95, 0.955, 0.95]), (2, "CNN2", [0.955, 0.96, 0.955])):
        for s, a in enumerate(accs):
            trial(name, {**cfg(depth, "std", 0.001), "model.arch": "cnn"}, s, cnn_metrics(depth, a, s))
    c.set_terminated(parent, "FINISHED")

    time.sleep(0.01)
    deep = start_sweep(c, exp, "deep")
    for s, (g, d, a) in enumerate(zip(E_GRAD, E_DEAD, E_ACC)):
        rid = log_trial(c, exp, deep, "deep", f"deep{s}", {**BASE, **cfg(2, "fan", 0.001), "train.seed": s},
                        capsnet_metrics(2, grad_ratio=g, dead_hidden=d, test_acc=a, grad_scale=0.04, seed=s))
        ids["configs"].setdefault("deep", []).append(rid)
    c.set_terminated(deep, "FINISHED")

    time.sleep(0.01)  # "tiny" starts later: the most recent sweep
    tiny = start_sweep(c, exp, "tiny")
    ids["tiny_parent"] = tiny
    for depth, a in enumerate(TINY_ACC):
        log_trial(c, exp, tiny, "tiny", f"d{depth}", {**BASE, "model.depth": depth, "train.seed": 0},
                  capsnet_metrics(depth, grad_ratio=0.5, dead_hidden=0.1, test_acc=a, new_probes=False))
    c.set_terminated(tiny, "FINISHED")

    c.create_experiment("empty")
    other = c.create_experiment("othertool")
    for i in range(2):
        rid = c.create_run(other, run_name=f"other{i}").info.run_id
        c.log_batch(rid, metrics=[Metric("loss", 0.5, 0, 0)], params=[Param("lr", "0.1")])
        c.set_terminated(rid, "FINISHED")
    noprobes = c.create_experiment("noprobes")
    p = start_sweep(c, noprobes, "np")
    log_trial(c, noprobes, p, "np", "t0", {**BASE, "model.depth": 1, "train.seed": 0}, {"loss": 0.3})
    return ids


@pytest.fixture(scope="module")
def s1(store):
    data = load_sweep("capsweep", store["uri"], "s1", progress=False)
    return data, compute_verdict(data)


def _config_of(verdict: dict, run_id: str) -> dict:
    return next(c for c in verdict["configurations"] if run_id in c["run_ids"])


# ---------------------------------------------------------------------------------------------------
# Loading

def test_load_table_has_one_row_per_trial_of_the_sweep(store, s1):
    data, _ = s1
    t = data.trials
    assert len(t) == 3 + 3 + 3 + 4 + 3 + 3 + 3 + 3 + 3 + 3 + 3 + 3 + 3  # R E U V D F T A C X S CNN0 CNN2
    assert set(t["sweep"]) == {"s1"} and data.parent_run_id == store["parent"]
    assert {"model.depth", "model.init", "train.lr", "train.seed"} <= set(data.param_cols)
    assert t["status"].value_counts().to_dict() == {"finished": 37, "failed": 1, "diverged": 1,
                                                  "stopped": 1}
    e = t[t["run_id"].isin(store["configs"]["E"])].sort_values("seed")
    assert e["grad_ratio"].tolist() == E_GRAD and e["test_acc"].tolist() == E_ACC
    assert e["best_val_acc"].tolist() == pytest.approx([a + 0.01 for a in E_ACC])
    assert e["n_epochs"].tolist() == [EPOCHS] * 3
    assert data.history_method.startswith("SQL bulk")


def test_bulk_histories_equal_per_run_histories(store):
    client = MlflowClient(store["uri"])
    runs = store["configs"]["E"] + store["configs"]["X"]
    bulk, method = fetch_histories(client, runs, ["val_acc", "grad_ratio", "test_loss"])
    assert method.startswith("SQL bulk")
    for rid in runs:
        for key in ("val_acc", "grad_ratio", "test_loss"):
            ref = sorted((m.step, m.value) for m in client.get_metric_history(rid, key))
            got = bulk[(bulk["run_id"] == rid) & (bulk["key"] == key)].sort_values("step")
            assert got["step"].tolist() == [s for s, _ in ref]
            np.testing.assert_array_equal(got["value"].to_numpy(), [v for _, v in ref])


def test_default_sweep_is_the_most_recent_with_a_note(store):
    data = load_sweep("capsweep", store["uri"], None, progress=False)
    assert data.sweep == "tiny" and len(data.trials) == 4
    assert any("3 sweeps" in n and "'tiny'" in n for n in data.notes)


def test_sweeps_whose_parent_run_is_gone_are_found_and_the_latest_is_the_default(store):
    """A deleted parent run (an interrupted start, a clean-up) does not hide its sweep: `--sweep` finds
    it beside sweeps that have parents, and with no parent at all the default is the sweep whose
    trials started last, not the alphabetically last name."""
    c = MlflowClient(store["uri"])
    exp = c.create_experiment("orphans")
    started = []
    for name in ("zeta", "alpha", "kept"):        # in this order: "kept" is the only one with a parent
        time.sleep(0.01)
        parent = start_sweep(c, exp, name)
        log_trial(c, exp, parent, name, f"{name}0", {**BASE, "model.depth": 0, "train.seed": 0},
                  capsnet_metrics(0, grad_ratio=1, dead_hidden=0, test_acc=0.9))
        started.append(parent)
    c.delete_run(started[0])
    c.delete_run(started[1])
    data = load_sweep("orphans", store["uri"], "zeta", progress=False)
    assert data.sweep == "zeta" and list(data.trials["trial_id"]) == ["zeta0"] and data.parent_run_id is None
    assert any("'zeta' has no parent run" in n for n in data.notes)
    with pytest.raises(AnalysisError, match="sweep 'nope' not found .*sweeps there: alpha, kept, zeta"):
        load_sweep("orphans", store["uri"], "nope", progress=False)
    c.delete_run(started[2])                       # now no sweep has a parent
    data = load_sweep("orphans", store["uri"], None, progress=False)
    assert data.sweep == "kept" and data.parent_run_id is None
    assert any("3 sweeps" in n and "'kept'" in n for n in data.notes)
    c.delete_run(c.search_runs([exp], "tags.`capsweep.sweep` = 'kept'")[0].info.run_id)
    assert load_sweep("orphans", store["uri"], None, progress=False).sweep == "alpha"   # not "zeta"


# ---------------------------------------------------------------------------------------------------
# The verdict

def test_verdict_finds_exactly_the_escaping_configuration(store, s1):
    _, v = s1
    cfg = store["configs"]
    escaping = _config_of(v, cfg["E"][0])
    assert v["escaped"] == "yes" and v["instrument"] == "validated"
    assert [e["id"] for e in v["escapes"]] == [escaping["id"]]
    assert [c["id"] for c in v["configurations"] if c["escaped"]] == [escaping["id"]]
    assert escaping["reasons"] == [] and {ch["outcome"] for ch in escaping["checks"]} == {"pass"}
    # the one check each configuration was built to fail (every other check passes)
    expected = {"V": {"seeds": "1 failed", "grad_ratio": "grad_ratio"}, "D": {"dead": "dead_frac"},
                "F": {"frozen": "frozen_frac"}, "T": {"starved": "starved_frac"},
                "A": {"accuracy": "worse than the reference"}, "C": {"gradient floor": "worse than the reference"},
                "X": {"seeds": "1 diverged"}}
    for name, fails in expected.items():
        c = _config_of(v, cfg[name][0])
        outcomes = {ch["name"]: ch["outcome"] for ch in c["checks"]}
        assert c["role"] == "candidate" and c["verdict"] == "not escaped", (name, c["reasons"])
        assert {n for n, o in outcomes.items() if o != "pass"} == set(fails), (name, c["reasons"])
        assert {n for n, o in outcomes.items() if o == "fail"} == set(fails), (name, c["reasons"])
        for check, words in fails.items():
            assert words in next(ch["text"] for ch in c["checks"] if ch["name"] == check), (name, c["reasons"])
    # a seed stopped early by the scheduler neither fails nor passes its configuration: undecided
    st = _config_of(v, cfg["S"][0])
    assert st["verdict"] == "undecided" and [ch["name"] for ch in st["checks"] if ch["outcome"] != "pass"] == \
        ["seeds"] and "1 stopped" in st["reasons"][0] and "stopped early" in st["reasons"][0]
    # the sweep is a family: E escapes because its p-value survives Holm over all 10 candidates
    assert v["family"]["candidates"] == 10 and escaping["p_holm"] <= 0.05
    assert escaping["p_holm"] == pytest.approx(min(1.0, 10 * escaping["p_value"]))
    u = _config_of(v, cfg["U"][0])
    assert u["verdict"] == "undecided" and [ch["name"] for ch in u["checks"] if ch["outcome"] != "pass"] == ["accuracy"]
    assert "power" in u["reasons"][0]
    assert _config_of(v, cfg["R"][0])["role"] == "reference"
    assert _config_of(v, cfg["CNN0"][0])["role"] == "reference"
    ctrl = _config_of(v, cfg["CNN2"][0])
    assert ctrl["role"] == "control" and ctrl["verdict"] == "passes" and ctrl["reference"]["arch"] == "cnn"
    assert set(ctrl["reference"]["run_ids"]) == set(cfg["CNN0"])
    # C is healthy by ratio: only its absolute act_grad (1e-6 against the shallow net's 0.04) gives it away
    c = _config_of(v, cfg["C"][0])
    assert c["figures"]["grad_ratio"]["mean"] == pytest.approx(1.0)
    floor = next(ch for ch in c["checks"] if ch["name"] == "gradient floor")
    assert floor["test"]["diff"] == pytest.approx(math.log10(1e-6 / 0.04), abs=0.05)


def test_bounds_and_welch_test_match_an_independent_derivation(store, s1):
    """E's figures are means with t bounds (scipy.stats.t.interval at 1 - 2 alpha, clipped to [0, 1] for
    fractions: dead's lower bound is below 0); its accuracy check is Welch's one-sided test against R,
    recomputed from the formula; its dead check uses the unclipped bound."""
    _, v = s1
    e = _config_of(v, store["configs"]["E"][0])
    for probe, values in (("dead_worst", E_DEAD), ("test_acc", E_ACC)):
        x = np.array(values)
        lo, hi = stats.t.interval(0.90, len(x) - 1, loc=x.mean(), scale=stats.sem(x))
        if probe == "dead_worst":
            dead = next(ch for ch in e["checks"] if ch["name"] == "dead")
            assert lo < 0 and (dead["lo"], dead["hi"]) == pytest.approx((lo, hi))
            lo = 0.0
        fig = e["figures"][probe]
        assert (fig["mean"], fig["lo"], fig["hi"], fig["n"]) == pytest.approx((x.mean(), lo, hi, 3), abs=1e-12)
    logs = np.log10(E_GRAD)                       # grad_ratio: t bounds on log10, shown as 10^x
    lo, hi = stats.t.interval(0.90, 2, loc=logs.mean(), scale=stats.sem(logs))
    g = e["figures"]["grad_ratio"]
    assert (g["mean"], g["lo"], g["hi"]) == pytest.approx((10 ** logs.mean(), 10 ** lo, 10 ** hi), rel=1e-9)
    c, r = np.array(E_ACC), np.array([0.90, 0.91, 0.89])
    # the test set's sampling (binomial: no per-image correctness logged here), Agresti-Coull p~
    pc, pr = (c.mean() * N_TEST + 2) / (N_TEST + 4), (r.mean() * N_TEST + 2) / (N_TEST + 4)
    tau2 = pc * (1 - pc) / N_TEST + pr * (1 - pr) / N_TEST
    se = math.sqrt(c.var(ddof=1) / 3 + r.var(ddof=1) / 3 + tau2)
    vc, vr = c.var(ddof=1) / 3, r.var(ddof=1) / 3
    df = (vc + vr) ** 2 / (vc ** 2 / 2 + vr ** 2 / 2)      # Welch-Satterthwaite over the seed terms only
    d = c.mean() - r.mean()
    acc = next(ch for ch in e["checks"] if ch["name"] == "accuracy")["test"]
    assert (acc["diff"], acc["lo"], acc["df"]) == pytest.approx((d, d - stats.t.ppf(0.95, df) * se, df), rel=1e-9)
    assert acc["lo"] > -0.01 and acc["outcome"] == "pass"


def test_thresholds_move_the_verdict(store):
    data = load_sweep("capsweep", store["uri"], "s1", progress=False)
    # E's grad_ratio interval is about [0.45, 0.79]: a minimum of 0.6 inside it makes E undecided
    strict = compute_verdict(data, Thresholds(grad_ratio_min=0.6))
    assert strict["escaped"] == "undecided" and not strict["escapes"]
    assert _config_of(strict, store["configs"]["E"][0])["verdict"] == "undecided"
    lenient = compute_verdict(data, Thresholds(dead_frac_max=0.99))  # D (dead 0.7-0.9, bound 0.97) passes
    e_id, d_id = (_config_of(lenient, store["configs"][n][0])["id"] for n in ("E", "D"))
    d = _config_of(lenient, store["configs"]["D"][0])
    # D now passes its own test, but its p-value does not survive Holm over the 10 candidates: it is
    # what to confirm, not an escape
    assert {e["id"] for e in lenient["escapes"]} == {e_id}
    assert d["outcome"] == "pass" and d["verdict"] == "to confirm" and d["p_holm"] > 0.05 >= d["p_value"]
    wide = compute_verdict(data, Thresholds(acc_margin=0.1))        # U's accuracy is now shown non-inferior
    assert _config_of(wide, store["configs"]["U"][0])["outcome"] == "pass"


def test_failed_and_diverged_trials_are_listed(store, s1):
    _, v = s1
    listed = {t["run_id"]: t for t in v["failed_trials"]}
    failed, diverged = store["configs"]["V"][3], store["configs"]["X"][2]
    assert set(listed) == {failed, diverged, store["configs"]["S"][2]}
    assert listed[failed]["status"] == "failed" and "out of memory" in listed[failed]["error"]
    assert listed[diverged]["status"] == "diverged"


def test_old_sweep_is_read_with_na_probes_and_rho_on_configuration_means(store):
    """'tiny' was logged before act_grad, starved_frac, frozen_frac and the nulls: those are n/a (None),
    never 0, its checks are undecided, and the trend is over the 4 configurations."""
    data = load_sweep("capsweep", store["uri"], "tiny", progress=False)
    v = compute_verdict(data)
    t = next(t for t in v["trends"] if t["factor"] == "model.depth" and t["probe"] == "test_acc")
    # depth ranks 1 2 3 4, accuracy 0.9 0.7 0.8 0.6 -> ranks 4 2 3 1; d = -3 0 0 3; sum d^2 = 18
    rho = 1 - 6 * 18 / (4 * (4 ** 2 - 1))
    assert rho == pytest.approx(-0.8)
    assert t["test"] == "spearman" and t["n"] == 4
    assert t["statistic"] == pytest.approx(rho, abs=1e-12)
    # two-sided p of Student's t with n - 2 = 2 degrees of freedom: 2 * (1/2 - t/(2 sqrt(2 + t^2)))
    tt = abs(rho) * math.sqrt(2 / (1 - rho ** 2))
    assert t["p_value"] == pytest.approx(1 - tt / math.sqrt(2 + tt ** 2), rel=1e-9)
    assert v["escaped"] == "undecided"   # one seed per configuration: nothing can be shown
    d1 = next(c for c in v["configurations"] if c["depth"] == 1)
    for probe in ("grad_ratio", "act_grad_min", "starved_worst", "frozen_worst", "tree_score_null"):
        assert d1["figures"][probe]["mean"] is None, probe
    assert d1["figures"]["tree_score"]["mean"] == pytest.approx(0.3)
    outcomes = {ch["name"]: ch["outcome"] for ch in d1["checks"]}
    assert outcomes["seeds"] == "pass" and set(outcomes.values()) == {"pass", "inconclusive"}
    assert "n/a" in next(ch["text"] for ch in d1["checks"] if ch["name"] == "starved")
    assert v["instrument"] == "no control"


def test_reference_from_another_sweep(store):
    """'deep' has no depth-0 trial: alone its candidate is undecided (never failed for the missing
    reference); with s1 as the reference sweep it escapes."""
    deep = load_sweep("capsweep", store["uri"], "deep", progress=False)
    alone = compute_verdict(deep)
    assert alone["escaped"] == "undecided"
    (c,) = alone["configurations"]
    assert {ch["name"] for ch in c["checks"] if ch["outcome"] != "pass"} == {"accuracy", "gradient floor"}
    ref = load_sweep("capsweep", store["uri"], "s1", progress=False, history_keys=())
    v = compute_verdict(deep, reference=ref)
    (c,) = v["configurations"]
    # the candidate passes every check and the family step (K = 1), but 'deep' has no cnn control:
    # nothing shows its checks let a healthy deep network pass, so the sweep's answer is inconclusive,
    # never yes, and the candidate is what to confirm, not escaped
    assert c["verdict"] == "to confirm" and not c["escaped"] and c["outcome"] == "pass", c["reasons"]
    assert "healthy control does not pass" in c["reasons"][0] and v["escapes"] == []
    assert v["escaped"] == "undecided" and v["outcome"] == "inconclusive" and v["instrument"] == "no control"
    assert v["answer"].startswith("Inconclusive: the sweep has no healthy cnn control")
    # s1's depth-0 CapsNet is init=std, deep's candidate init=fan: matched on the rest, said so
    assert c["reference"]["source"] == "sweep s1" and c["reference"]["how"] == "matched except model.init"
    assert set(c["reference"]["run_ids"]) == set(store["configs"]["R"])


def test_verdict_json_first_line_and_round_trip(s1):
    _, v = s1
    text = verdict_json(v)
    assert text.splitlines()[0].startswith(
        '{"escaped": "yes", "instrument": "validated", "outcome": "yes", "answer": ')
    back = json.loads(text)
    assert list(back)[0] == "escaped" and back["escapes"] == v["escapes"]
    assert back["thresholds"]["grad_ratio_min"] == 0.1 and back["thresholds"]["alpha"] == 0.05
    assert back["thresholds"]["acc_margin"] == 0.01 and back["thresholds"]["grad_margin"] == 1.0


# ---------------------------------------------------------------------------------------------------
# The report

class _Collect(HTMLParser):
    def __init__(self):
        super().__init__()
        self.imgs, self.links, self.scripts = [], [], []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.imgs.append(a.get("src", ""))
        if tag == "link":
            self.links.append(a)
        if tag == "script":
            self.scripts.append(a)


def _valid_png(raw: bytes) -> bool:
    """Signature, then CRC-checked chunks from IHDR to IEND."""
    if raw[:8] != b"\x89PNG\r\n\x1a\n":
        return False
    pos, kinds = 8, []
    while pos < len(raw):
        (length,) = struct.unpack(">I", raw[pos:pos + 4])
        kind, data = raw[pos + 4:pos + 8], raw[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", raw[pos + 8 + length:pos + 12 + length])
        if zlib.crc32(kind + data) != crc:
            return False
        kinds.append(kind)
        pos += 12 + length
    return kinds[0] == b"IHDR" and kinds[-1] == b"IEND" and b"IDAT" in kinds


def test_html_report_is_self_contained(s1, tmp_path):
    data, v = s1
    paths = write_report(data, v, str(tmp_path))
    text = open(paths["html"]).read()
    p = _Collect()
    p.feed(text)
    assert len(p.imgs) >= 4
    for src in p.imgs:
        assert src.startswith("data:image/png;base64,")
        assert _valid_png(base64.b64decode(src.split(",", 1)[1], validate=True))
    low = text.lower()
    assert "http://" not in low and "https://" not in low
    assert p.links == [] and all("src" not in s for s in p.scripts)
    md = open(paths["markdown"]).read()
    pngs = sorted(f for f in os.listdir(tmp_path) if f.endswith(".png"))
    assert len(pngs) == len(p.imgs)
    for f in pngs:
        assert f"]({f})" in md
    assert open(paths["verdict"]).readline().startswith('{"escaped": "yes", ')


def test_figures_drawn_by_forked_workers_equal_those_drawn_in_one_process(s1, tmp_path):
    """make_plots draws each figure whole in one of `workers` forked processes: the figure records,
    their order and every PNG byte are those of the one-process run; a figure that cannot be drawn
    is still one 'skipped' record in its place."""
    from analysis import plots
    from analysis.verdict import annotate
    data, v = s1
    trials, _, swept = annotate(data)
    swept = swept + ["no.such_param"]          # one figure per swept factor: this one cannot be drawn
    runs = {}
    for n in (1, 3):
        out = tmp_path / f"w{n}"
        figs = plots.make_plots(trials, data.histories, v, str(out), swept, workers=n)
        runs[n] = (figs, {f: (out / f).read_bytes() for f in sorted(os.listdir(out))})
    assert runs[1] == runs[3]
    figs, files = runs[1]
    assert any("skipped" in f and "no.such_param" in f["title"] for f in figs)
    assert len(files) == sum("file" in f for f in figs) >= 4


def _visible_text(html_text: str) -> list[str]:
    """The report's text in reading order, one entry per text node (no style block)."""
    class Text(HTMLParser):
        def __init__(self):
            super().__init__()
            self.out, self.skip = [], False

        def handle_starttag(self, tag, attrs):
            self.skip = tag == "style"

        def handle_data(self, data):
            if not self.skip and data.strip():
                self.out.append(" ".join(data.split()))
    t = Text()
    t.feed(html_text)
    return t.out


def test_first_lines_state_answer_instrument_test_margin_and_level(s1, tmp_path):
    data, v = s1
    paths = write_report(data, v, str(tmp_path))
    head = " ".join(_visible_text(open(paths["html"]).read())[1:8])   # [0] is the <title>
    assert head.startswith("Escaped: YES Instrument: validated.")
    for words in ("Welch one-sided non-inferiority", "margin 0.01", "alpha = 0.05", "margin 1 decade(s)"):
        assert words in head, head
    md = open(paths["markdown"]).read().splitlines()
    assert md[0] == "# Escaped: YES" and md[2].startswith("**Instrument: validated.**")
    assert "margin 0.01," in md[4] and "level alpha = 0.05" in md[4] and "Holm" in md[4]
    # reasons sit under their row (a full-width row), not in a column that widens the table
    text = open(paths["html"]).read()
    assert "why not" not in text and text.count("<tr class='why'>") == sum(
        1 for c in v["configurations"] if c["role"] != "reference")


def test_report_of_an_old_sweep_shows_na_not_zero(store, tmp_path):
    data = load_sweep("capsweep", store["uri"], "tiny", progress=False)
    v = compute_verdict(data)
    paths = write_report(data, v, str(tmp_path))
    md = open(paths["markdown"]).read()
    row = next(l for l in md.splitlines() if l.startswith("| c01 |"))          # depth 1, one seed
    cells = [c.strip() for c in row.strip("|").split("|")]
    # test acc, delta acc, grad ratio, min act_grad, starved, dead, frozen, tree score, routing dyn.
    assert cells[4:] == ["0.7", "-0.2", "n/a", "n/a", "n/a", "0.1", "n/a", "0.3 (null n/a)", "0.02 (null n/a)"]
    assert md.splitlines()[0] == "# Inconclusive: no healthy control in the sweep"   # old sweep: no cnn control
    assert "Not drawn: Gradient floor: log10 min act_grad against hidden capsule layers (depth): n/a" in md


def test_cli_writes_report_and_logs_it_on_the_parent_run(store, tmp_path, capsys):
    out = tmp_path / "rep"
    code = cli.main(["--experiment", "capsweep", "--tracking-uri", store["uri"], "--sweep", "s1",
                     "--out", str(out), "--alpha", "0.1"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert captured.out.startswith("escaped: yes")
    assert captured.out.splitlines()[1].startswith("instrument: validated")
    client = MlflowClient(store["uri"])
    logged = {os.path.basename(f.path) for f in client.list_artifacts(store["parent"], "report")}
    assert {"report.html", "report.md", "verdict.json"} <= logged
    assert {f for f in os.listdir(out) if f.endswith(".png")} <= logged
    assert json.loads((out / "verdict.json").read_text())["thresholds"]["alpha"] == 0.1


def test_report_takes_the_sweep_positionally_and_the_store_before_the_subcommand(store, tmp_path, capsys):
    """`capsweep --tracking-uri U report s1` as `status s1` takes its sweep (issue 23, 5)."""
    from sweeps.cli import main as capsweep
    out = tmp_path / "rep"
    assert capsweep(["--tracking-uri", store["uri"], "report", "s1", "--out", str(out), "--no-log-artifacts"]) == 0
    assert json.loads((out / "verdict.json").read_text())["sweep"] == "s1"
    assert "report: " in capsys.readouterr().out


def test_cli_reference_flag(store, tmp_path, capsys):
    out = tmp_path / "rep"
    args = ["--experiment", "capsweep", "--tracking-uri", store["uri"], "--sweep", "deep", "--out", str(out),
            "--no-log-artifacts"]
    assert cli.main(args) == 0
    assert capsys.readouterr().out.startswith("escaped: undecided")
    assert cli.main(args + ["--reference", "s1"]) == 0
    assert capsys.readouterr().out.startswith("escaped: undecided -- Inconclusive: the sweep has no healthy cnn")
    assert json.loads((out / "verdict.json").read_text())["reference_source"] == "sweep s1"
    assert cli.main(args + ["--reference", "nope"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "sweep 'nope' not found" in line


def test_cli_ignores_the_old_bootstrap_flag_with_a_note(store, tmp_path, capsys):
    assert cli.main(["--experiment", "capsweep", "--tracking-uri", store["uri"], "--sweep", "s1", "--out",
                     str(tmp_path / "r"), "--bootstrap", "500", "--no-log-artifacts"]) == 0
    assert "--bootstrap is ignored" in capsys.readouterr().err


def test_cli_says_where_the_report_is_when_mlflow_cannot_take_it(store, tmp_path, capsys):
    """The artifact store refuses the upload (a file where the run's report/ folder must go): the report
    is still written, the verdict and its path are printed, and one line says it is not in MLflow."""
    client = MlflowClient(store["uri"])
    blocker = Path(client.get_run(store["parent"]).info.artifact_uri) / "report"
    moved = blocker.with_name("report.moved")
    if blocker.exists():
        blocker.rename(moved)
    blocker.parent.mkdir(parents=True, exist_ok=True)
    blocker.write_text("not a folder")
    try:
        out = tmp_path / "rep"
        code = cli.main(["--experiment", "capsweep", "--tracking-uri", store["uri"], "--sweep", "s1",
                         "--out", str(out)])
    finally:
        blocker.unlink()
        if moved.exists():
            moved.rename(blocker)
    captured = capsys.readouterr()
    assert code == 1
    assert captured.out.startswith("escaped: yes") and f"report: {out / 'report.html'}" in captured.out
    (line,) = captured.err.strip().splitlines()
    assert line.startswith(f"capsweep report: error: the report is in {out} but was not logged to MLflow: ")
    assert (out / "report.html").is_file() and (out / "verdict.json").is_file()


# ---------------------------------------------------------------------------------------------------
# Bad input: one line on stderr, exit 1 (2 for bad arguments), never a traceback

@pytest.mark.parametrize("args, words", [
    (["--experiment", "nope"], "experiment 'nope' not found"),
    (["--experiment", "empty"], "has no runs"),
    (["--experiment", "othertool"], "none written by capsweep"),
    (["--experiment", "noprobes"], "probes"),
    (["--experiment", "capsweep", "--sweep", "s9"], "sweep 's9' not found"),
])
def test_bad_input_is_one_line_and_exit_2(store, tmp_path, capsys, args, words):
    code = cli.main(args + ["--tracking-uri", store["uri"], "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1 and words in lines[0], err
    assert "Traceback" not in err


def test_missing_sqlite_store_is_not_created(tmp_path, capsys):
    db = tmp_path / "absent.db"
    code = cli.main(["--experiment", "capsweep", "--tracking-uri", f"sqlite:///{db}"])
    err = capsys.readouterr().err
    assert code == 2 and not db.exists()
    assert len(err.strip().splitlines()) == 1 and "does not exist" in err


@pytest.mark.parametrize("args, words", [
    (["--dead-frac-max", "2"], "--dead-frac-max: 2.0 is not allowed; must be in [0, 1]"),
    (["--alpha", "0.7"], "--alpha: 0.7 is not allowed; must be in (0, 0.5)"),
    (["--alpha", "x"], "argument --alpha: invalid float value: 'x'"),
    (["--acc-margin", "-0.1"], "--acc-margin: -0.1 is not allowed"),
    (["--grad-margin", "nan"], "--grad-margin: nan is not allowed"),
    (["--grad-ratio-min", "0"], "--grad-ratio-min: 0.0 is not allowed; must be > 0"),
    (["--acc-tolerance", "0.1"], "--acc-tolerance was replaced by --acc-margin"),
    (["--grad-floor=0.1"], "--grad-floor was replaced by --grad-margin"),
    (["--reference", ""], "--reference: '' is not allowed"),
    (["--bogus"], "unrecognized arguments: --bogus"),
])
def test_bad_arguments_are_one_line_and_exit_2(args, words, capsys):
    assert cli.main(["--experiment", "capsweep"] + args) == 2
    err = capsys.readouterr().err
    (line,) = err.strip().splitlines()
    assert line.startswith("capsweep report: error: ") and words in line, err


# ---- the contract shared with sweeps (capsmodels/contract.py) ------------------------------------
def test_contract_and_analysis_import_neither_ray_mlflow_nor_torch():
    """A laptop analyses a cluster's sweep without the training stack: checked in a fresh interpreter."""
    import subprocess
    import sys
    code = ("import sys, capsmodels.contract, analysis, analysis.load, analysis.verdict, analysis.report, "
            "analysis.cli, analysis.mlflowio, analysis.store, analysis.inspect\n"
            "print(sorted(m for m in ('ray', 'mlflow', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[2], env={**os.environ, "MPLBACKEND": "Agg"})
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_every_catalogued_dataset_has_its_class_count_in_the_verdict():
    import pandas as pd
    from capsmodels.catalogue import CLASSES
    from analysis.verdict import num_classes_of
    for name, labels in CLASSES.items():
        trials = pd.DataFrame({"data.name": [name, name]})
        n, why = num_classes_of(trials, Thresholds())
        assert n == len(labels) and name in why, (name, n, why)
    assert num_classes_of(pd.DataFrame({"data.name": ["sign"]}), Thresholds())[0] == 2


def test_mlflow_http_env_is_scoped_and_the_users_setting_wins(monkeypatch):
    from analysis.store import mlflow_http_env
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "99")
    with mlflow_http_env(max_retries=2, timeout_s=30):
        assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "2"
        assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "99"          # the user's, kept
        with mlflow_http_env(max_retries=0, timeout_s=5, override=True):
            assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "0"
            assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "5"
        assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "2"
        assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "99"
    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "99"


def test_search_all_reads_every_page(tmp_path):
    from analysis import store as mlflowio
    client = MlflowClient(f"sqlite:///{tmp_path / 'pages.db'}")
    exp = client.create_experiment("pages")
    for i in range(8):           # 4 of sweep p, 4 of q
        client.create_run(exp, tags={"capsweep.sweep": "p" if i % 2 else "q"})
    old = mlflowio.PAGE
    mlflowio.PAGE = 2            # 4 runs of sweep p over pages of 2: three search calls, the last empty
    try:
        runs = mlflowio.search_all(client, exp, "tags.`capsweep.sweep` = 'p'")
    finally:
        mlflowio.PAGE = old
    assert len(runs) == 4 and len({r.info.run_id for r in runs}) == 4
