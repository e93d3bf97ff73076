"""The verdict (analysis/verdict.py) on the shared store: which configuration escapes and why the
others do not, its bounds and tests against an independent derivation (scipy.stats.t, rho by hand),
and verdict.json.

The store: tests/helpers/analysis_store.py (the `store` and `s1` fixtures of tests/analysis/conftest.py)."""
from __future__ import annotations

import json
import math
import numpy as np
import pytest
from analysis.load import load_sweep
from analysis.verdict import Thresholds, compute_verdict, verdict_json
from scipy import stats
from tests.helpers.probe_metrics import N_TEST
from tests.helpers.analysis_store import E_ACC, E_DEAD, E_GRAD


def _config_of(verdict, run_id: str):
    return next(c for c in verdict.configurations if run_id in c.run_ids)


def test_verdict_finds_exactly_the_escaping_configuration(store, s1):
    _, v = s1
    cfg = store["configs"]
    escaping = _config_of(v, cfg["E"][0])
    assert v.escaped == "yes" and v.instrument == "validated"
    assert [e["id"] for e in v.escapes] == [escaping.id]
    assert [c.id for c in v.configurations if c.escaped] == [escaping.id]
    assert escaping.reasons == [] and {ch["outcome"] for ch in escaping.checks} == {"pass"}
    # the one check each configuration was built to fail (every other check passes)
    expected = {"V": {"seeds": "1 failed", "grad_ratio": "grad_ratio"}, "D": {"dead": "dead_frac"},
                "F": {"frozen": "frozen_frac"}, "T": {"starved": "starved_frac"},
                "A": {"accuracy": "worse than the reference"}, "C": {"gradient floor": "worse than the reference"},
                "X": {"seeds": "1 diverged"}}
    for name, fails in expected.items():
        c = _config_of(v, cfg[name][0])
        outcomes = {ch["name"]: ch["outcome"] for ch in c.checks}
        assert c.role == "candidate" and c.verdict == "not escaped", (name, c.reasons)
        assert {n for n, o in outcomes.items() if o != "pass"} == set(fails), (name, c.reasons)
        assert {n for n, o in outcomes.items() if o == "fail"} == set(fails), (name, c.reasons)
        for check, words in fails.items():
            assert words in next(ch["text"] for ch in c.checks if ch["name"] == check), (name, c.reasons)
    # a seed stopped early by the scheduler neither fails nor passes its configuration: undecided
    st = _config_of(v, cfg["S"][0])
    assert st.verdict == "undecided" and [ch["name"] for ch in st.checks if ch["outcome"] != "pass"] == \
        ["seeds"] and "1 stopped" in st.reasons[0] and "stopped early" in st.reasons[0]
    # the sweep is a family: E escapes because its p-value survives Holm over all 10 candidates
    assert v.family["candidates"] == 10 and escaping.p_holm <= 0.05
    assert escaping.p_holm == pytest.approx(min(1.0, 10 * escaping.p_value))
    u = _config_of(v, cfg["U"][0])
    assert u.verdict == "undecided" and [ch["name"] for ch in u.checks if ch["outcome"] != "pass"] == ["accuracy"]
    assert "power" in u.reasons[0]
    assert _config_of(v, cfg["R"][0]).role == "reference"
    assert _config_of(v, cfg["CNN0"][0]).role == "reference"
    ctrl = _config_of(v, cfg["CNN2"][0])
    assert ctrl.role == "control" and ctrl.verdict == "passes" and ctrl.reference["arch"] == "cnn"
    assert set(ctrl.reference["run_ids"]) == set(cfg["CNN0"])
    # C is healthy by ratio: only its absolute act_grad (1e-6 against the shallow net's 0.04) gives it away
    c = _config_of(v, cfg["C"][0])
    assert c.figures["grad_ratio"]["mean"] == pytest.approx(1.0)
    floor = next(ch for ch in c.checks if ch["name"] == "gradient floor")
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
            dead = next(ch for ch in e.checks if ch["name"] == "dead")
            assert lo < 0 and (dead["lo"], dead["hi"]) == pytest.approx((lo, hi))
            lo = 0.0
        fig = e.figures[probe]
        assert (fig["mean"], fig["lo"], fig["hi"], fig["n"]) == pytest.approx((x.mean(), lo, hi, 3), abs=1e-12)
    logs = np.log10(E_GRAD)                       # grad_ratio: t bounds on log10, shown as 10^x
    lo, hi = stats.t.interval(0.90, 2, loc=logs.mean(), scale=stats.sem(logs))
    g = e.figures["grad_ratio"]
    assert (g["mean"], g["lo"], g["hi"]) == pytest.approx((10 ** logs.mean(), 10 ** lo, 10 ** hi), rel=1e-9)
    c, r = np.array(E_ACC), np.array([0.90, 0.91, 0.89])
    # the test set's sampling (binomial: no per-image correctness logged here), Agresti-Coull p~
    pc, pr = (c.mean() * N_TEST + 2) / (N_TEST + 4), (r.mean() * N_TEST + 2) / (N_TEST + 4)
    tau2 = pc * (1 - pc) / N_TEST + pr * (1 - pr) / N_TEST
    se = math.sqrt(c.var(ddof=1) / 3 + r.var(ddof=1) / 3 + tau2)
    vc, vr = c.var(ddof=1) / 3, r.var(ddof=1) / 3
    df = (vc + vr) ** 2 / (vc ** 2 / 2 + vr ** 2 / 2)      # Welch-Satterthwaite over the seed terms only
    d = c.mean() - r.mean()
    acc = next(ch for ch in e.checks if ch["name"] == "accuracy")["test"]
    assert (acc["diff"], acc["lo"], acc["df"]) == pytest.approx((d, d - stats.t.ppf(0.95, df) * se, df), rel=1e-9)
    assert acc["lo"] > -0.01 and acc["outcome"] == "pass"


def test_thresholds_move_the_verdict(store):
    data = load_sweep("capsweep", store["uri"], "s1", progress=False)
    # E's grad_ratio interval is about [0.45, 0.79]: a minimum of 0.6 inside it makes E undecided
    strict = compute_verdict(data, Thresholds(grad_ratio_min=0.6))
    assert strict.escaped == "undecided" and not strict.escapes
    assert _config_of(strict, store["configs"]["E"][0]).verdict == "undecided"
    lenient = compute_verdict(data, Thresholds(dead_frac_max=0.99))  # D (dead 0.7-0.9, bound 0.97) passes
    e_id, d_id = (_config_of(lenient, store["configs"][n][0]).id for n in ("E", "D"))
    d = _config_of(lenient, store["configs"]["D"][0])
    # D now passes its own test, but its p-value does not survive Holm over the 10 candidates: it is
    # what to confirm, not an escape
    assert {e["id"] for e in lenient.escapes} == {e_id}
    assert d.outcome == "pass" and d.verdict == "to confirm" and d.p_holm > 0.05 >= d.p_value
    wide = compute_verdict(data, Thresholds(acc_margin=0.1))        # U's accuracy is now shown non-inferior
    assert _config_of(wide, store["configs"]["U"][0]).outcome == "pass"


def test_failed_and_diverged_trials_are_listed(store, s1):
    _, v = s1
    listed = {t["run_id"]: t for t in v.failed_trials}
    failed, diverged = store["configs"]["V"][3], store["configs"]["X"][2]
    assert set(listed) == {failed, diverged, store["configs"]["S"][2]}
    assert listed[failed]["status"] == "failed" and "out of memory" in listed[failed]["error"]
    assert listed[diverged]["status"] == "diverged"


def test_old_sweep_is_read_with_na_probes_and_rho_on_configuration_means(store):
    """'tiny' was logged before act_grad, starved_frac, frozen_frac and the nulls: those are n/a (None),
    never 0, its checks are undecided, and the trend is over the 4 configurations."""
    data = load_sweep("capsweep", store["uri"], "tiny", progress=False)
    v = compute_verdict(data)
    t = next(t for t in v.trends if t["factor"] == "model.depth" and t["probe"] == "test_acc")
    # depth ranks 1 2 3 4, accuracy 0.9 0.7 0.8 0.6 -> ranks 4 2 3 1; d = -3 0 0 3; sum d^2 = 18
    rho = 1 - 6 * 18 / (4 * (4 ** 2 - 1))
    assert rho == pytest.approx(-0.8)
    assert t["test"] == "spearman" and t["n"] == 4
    assert t["statistic"] == pytest.approx(rho, abs=1e-12)
    # two-sided p of Student's t with n - 2 = 2 degrees of freedom: 2 * (1/2 - t/(2 sqrt(2 + t^2)))
    tt = abs(rho) * math.sqrt(2 / (1 - rho ** 2))
    assert t["p_value"] == pytest.approx(1 - tt / math.sqrt(2 + tt ** 2), rel=1e-9)
    assert v.escaped == "undecided"   # one seed per configuration: nothing can be shown
    d1 = next(c for c in v.configurations if c.depth == 1)
    for probe in ("grad_ratio", "act_grad_min", "starved_worst", "frozen_worst", "tree_score_null"):
        assert d1.figures[probe]["mean"] is None, probe
    assert d1.figures["tree_score"]["mean"] == pytest.approx(0.3)
    outcomes = {ch["name"]: ch["outcome"] for ch in d1.checks}
    assert outcomes["seeds"] == "pass" and set(outcomes.values()) == {"pass", "inconclusive"}
    assert "n/a" in next(ch["text"] for ch in d1.checks if ch["name"] == "starved")
    assert v.instrument == "no control"


def test_reference_from_another_sweep(store):
    """'deep' has no depth-0 trial: alone its candidate is undecided (never failed for the missing
    reference); with s1 as the reference sweep it escapes."""
    deep = load_sweep("capsweep", store["uri"], "deep", progress=False)
    alone = compute_verdict(deep)
    assert alone.escaped == "undecided"
    (c,) = alone.configurations
    assert {ch["name"] for ch in c.checks if ch["outcome"] != "pass"} == {"accuracy", "gradient floor"}
    ref = load_sweep("capsweep", store["uri"], "s1", progress=False, history_keys=())
    v = compute_verdict(deep, reference=ref)
    (c,) = v.configurations
    # the candidate passes every check and the family step (K = 1), but 'deep' has no cnn control:
    # nothing shows its checks let a healthy deep network pass, so the sweep's answer is inconclusive,
    # never yes, and the candidate is what to confirm, not escaped
    assert c.verdict == "to confirm" and not c.escaped and c.outcome == "pass", c.reasons
    assert "healthy control does not pass" in c.reasons[0] and v.escapes == []
    assert v.escaped == "undecided" and v.outcome == "inconclusive" and v.instrument == "no control"
    assert v.answer.startswith("Inconclusive: the sweep has no healthy cnn control")
    # s1's depth-0 CapsNet is init=std, deep's candidate init=fan: matched on the rest, said so
    assert c.reference["source"] == "sweep s1" and c.reference["how"] == "matched except model.init"
    assert set(c.reference["run_ids"]) == set(store["configs"]["R"])


def test_verdict_json_first_line_and_round_trip(s1):
    _, v = s1
    text = verdict_json(v)
    assert text.splitlines()[0].startswith(
        '{"escaped": "yes", "instrument": "validated", "outcome": "yes", "answer": ')
    back = json.loads(text)
    assert list(back)[0] == "escaped" and back["escapes"] == v.escapes
    assert back["thresholds"]["grad_ratio_min"] == 0.1 and back["thresholds"]["alpha"] == 0.05
    assert back["thresholds"]["acc_margin"] == 0.01 and back["thresholds"]["grad_margin"] == 1.0
    # the typed results read back from the file are the verdict itself, and write the same text
    from analysis.results import Verdict
    assert Verdict.from_json(back) == v and verdict_json(Verdict.from_json(back)) == text
    e = v.candidates[0]
    assert e.check("accuracy")["name"] == "accuracy" and e.check("no such check") is None
    assert len(v.candidates) == v.family["candidates"]


def test_every_catalogued_dataset_has_its_class_count_in_the_verdict():
    import pandas as pd
    from capsmodels.catalogue import CLASSES
    from analysis.verdict import num_classes_of
    for name, labels in CLASSES.items():
        trials = pd.DataFrame({"data.name": [name, name]})
        n, why = num_classes_of(trials, Thresholds())
        assert n == len(labels) and name in why, (name, n, why)
    assert num_classes_of(pd.DataFrame({"data.name": ["sign"]}), Thresholds())[0] == 2
