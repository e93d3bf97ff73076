"""Calibration of the verdict by simulation, with no MLflow and no training (docs/PROBES.md, "The verdict").

(a) The non-inferiority test alone (analysis.stats.noninferiority): its pass rate when the candidate
    equals the reference (power), and when it is worse by the margin (type-I error) or by twice it.
(b) The whole verdict (analysis.verdict.compute_verdict) on synthetic sweeps: per-trial metric rows as
    the model side logs them (docs/PROBES.md, "Probes"), with a depth-0 CapsNet reference and cnn
    controls, and a healthy or a collapsed deep CapsNet.
Every rate is printed in the assertion message. Seeded: the same numbers on every run.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

from analysis.stats import FAIL, PASS, noninferiority
from analysis.verdict import Thresholds, compute_verdict
from tests.helpers.synthetic import ACC_SD, COLLAPSED, HEALTHY, synthetic_sweep
from tests.helpers.synthetic import ALPHA, DELTA



def _rate(rng, n_seeds: int, shift: float, sd: float, reps: int) -> tuple[float, float]:
    """(pass rate, fail rate) of the test over `reps` draws of candidate ~ N(shift, sd), reference ~
    N(0, sd), n_seeds each."""
    passed = failed = 0
    for _ in range(reps):
        r = noninferiority(rng.normal(shift, sd, n_seeds), rng.normal(0.0, sd, n_seeds), DELTA, ALPHA)
        passed += r.outcome == PASS
        failed += r.outcome == FAIL
    return passed / reps, failed / reps


def test_noninferiority_power_and_type_one_error():
    rng = np.random.default_rng(20240609)
    sd = DELTA / 2
    eq5, eq5_fail = _rate(rng, 5, 0.0, sd, 3000)
    eq3, _ = _rate(rng, 3, 0.0, sd, 2000)
    worse2, _ = _rate(rng, 5, -2 * DELTA, sd, 1000)
    reps = 4000
    worse1, _ = _rate(rng, 5, -DELTA, sd, reps)
    tol = 3 * math.sqrt(ALPHA * (1 - ALPHA) / reps)
    msg = (f"seed noise sd = delta/2 = {sd}, margin {DELTA}, alpha {ALPHA}: pass rate equal@5 seeds {eq5:.3f} "
           f"(fail {eq5_fail:.3f}), equal@3 seeds {eq3:.3f}, worse by 2 delta@5 {worse2:.4f}, worse by "
           f"delta@5 {worse1:.4f} (type-I error; allowed {ALPHA} + MC tolerance {tol:.4f})")
    print(msg)
    assert eq5 >= 0.80, msg
    assert eq5_fail <= 0.01, msg
    assert eq3 < eq5, msg                  # fewer seeds, less power: the report warns below 5 seeds
    assert worse2 <= ALPHA, msg
    assert worse1 <= ALPHA + tol, msg


# ---------------------------------------------------------------------------------------------------
# Synthetic sweeps













def _verdicts(kinds, draws: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [compute_verdict(synthetic_sweep(rng, kinds)) for _ in range(draws)]


def test_healthy_deep_configuration_escapes_and_controls_pass():
    vs = _verdicts(HEALTHY, 10, 1)
    yes = sum(v.escaped == "yes" for v in vs)
    controls = sum(v.instrument == "validated" for v in vs)
    why = [c.reasons for v in vs for c in v.configurations if c.role != "reference" and c.reasons]
    msg = (f"healthy depth-3 CapsNet, 5 seeds, accuracy sd {ACC_SD}: escaped 'yes' in {yes}/10 draws; "
           f"cnn control validated in {controls}/10; reasons where not: {why[:3]}")
    print(msg)
    assert yes >= 9, msg
    assert controls >= 9, msg


def test_collapsed_deep_configuration_never_escapes():
    vs = _verdicts(COLLAPSED, 10, 2)
    answers = [v.escaped for v in vs]
    cand = [next(c for c in v.configurations if c.role == "candidate") for v in vs]
    failed = {ch["name"] for c in cand for ch in c.checks if ch["outcome"] == FAIL}
    controls = sum(v.instrument == "validated" for v in vs)
    msg = (f"collapsed depth-3 CapsNet: answers {answers}; checks that failed: {sorted(failed)}; healthy cnn "
           f"control validated in {controls}/10 (the accuracy test's power at 5 seeds is below 1)")
    print(msg)
    # the candidate fails in every draw; the sweep answers "no" wherever the healthy control passes, and
    # "inconclusive" (escaped: undecided) where it does not: the control gates the answer
    assert [c.verdict for c in cand] == ["not escaped"] * 10, msg
    assert answers == ["no" if v.instrument == "validated" else "undecided" for v in vs], msg
    assert all(v.outcome == ("no" if v.instrument == "validated" else "inconclusive") for v in vs), msg
    # every symptom of the collapse is caught on its own, not only one of them
    assert {"accuracy", "gradient floor", "grad_ratio", "starved", "dead", "frozen", "chance"} <= failed, msg
    # the control (a cnn as good as its depth-0 twin) passes when its accuracy test has the power, which
    # at 5 seeds with the test set's sampling error is about 0.85 per draw
    assert controls >= 7, msg


def test_a_sweep_without_reference_or_controls_is_undecided_not_failed():
    """A healthy candidate whose sweep forgot the depth-0 CapsNet is undecided (its two reference checks
    cannot be made), never 'not escaped'; without cnn controls the instrument says so."""
    rng = np.random.default_rng(3)
    v = compute_verdict(synthetic_sweep(rng, [("capsnet", 2, "healthy")]))
    (c,) = v.configurations
    outcomes = {ch["name"]: ch["outcome"] for ch in c.checks}
    assert v.escaped == "undecided" and c.verdict == "undecided", c.reasons
    assert outcomes["accuracy"] == outcomes["gradient floor"] == "inconclusive"
    assert {n for n, o in outcomes.items() if o != "inconclusive"} == \
        {"seeds", "grad_ratio", "starved", "dead", "frozen", "chance"}
    assert all(o == PASS for n, o in outcomes.items() if n not in ("accuracy", "gradient floor"))
    assert any("no depth-0 reference" in r for r in c.reasons)
    assert v.instrument == "no control"
    assert any("no finished depth-0 CapsNet" in n for n in v.notes)


def test_reference_from_another_sweep_decides_the_candidate():
    """`--reference SWEEP`: the depth-0 trials of another sweep (matched on the shared params) are the
    reference; the same healthy candidate that was undecided alone now escapes."""
    rng = np.random.default_rng(4)
    # 10 seeds a side: the accuracy test's power is then ~0.97 (at 5 seeds, 0.8: a wiring test should
    # not rest on the one draw)
    cand = synthetic_sweep(rng, [("capsnet", 2, "healthy"), ("cnn", 2, "healthy")], seeds=10, name="deep")
    ref = synthetic_sweep(rng, [("capsnet", 0, "healthy"), ("cnn", 0, "healthy")], seeds=10, name="shallow")
    v = compute_verdict(cand, reference=ref)
    c = next(c for c in v.configurations if c.role == "candidate")
    assert v.escaped == "yes", c.reasons
    assert c.reference["how"] == "matched" and c.reference["source"] == "sweep shallow"
    assert set(c.reference["run_ids"]) == set(ref.trials.query("`model.arch` == 'capsnet'")["run_id"])
    ctrl = next(c for c in v.configurations if c.role == "control")
    assert ctrl.reference["arch"] == "cnn" and v.instrument == "validated"


def test_a_control_that_fails_says_the_thresholds_are_wrong():
    rng = np.random.default_rng(5)
    sweep = synthetic_sweep(rng, [("capsnet", 0, "healthy"), ("capsnet", 3, "healthy"), ("cnn", 0, "healthy"),
                                  ("cnn", 3, "healthy")])
    v = compute_verdict(sweep, Thresholds(frozen_frac_max=0.0))   # healthy nets have a few frozen capsules
    assert v.instrument == "control failed"
    assert v.instrument_text.startswith("NOT validated") and "thresholds are wrong" in v.instrument_text


@pytest.mark.parametrize("old", [True, False])
def test_absent_probes_are_na_and_never_evidence(old):
    """A sweep logged before the new probes (no act_grad, starved, frozen, nulls; grad_ratio on weight
    norms): those checks are inconclusive (n/a), never passed or failed on a 0 that was not measured."""
    rng = np.random.default_rng(6)
    sweep = synthetic_sweep(rng, HEALTHY)
    if old:
        drop = [c for c in sweep.trials.columns if c.startswith(("act_grad/", "starved_frac", "frozen_frac",
                                                                  "tree_score_null", "routing_dynamics_null"))]
        sweep.trials = sweep.trials.drop(columns=drop)
    v = compute_verdict(sweep)
    c = next(c for c in v.configurations if c.role == "candidate")
    outcomes = {ch["name"]: ch["outcome"] for ch in c.checks}
    if old:
        assert {n for n, o in outcomes.items() if o == "inconclusive"} == \
            {"gradient floor", "grad_ratio", "starved", "frozen"}, c.reasons
        assert c.figures["grad_ratio"]["mean"] is None and c.figures["tree_score_null"]["mean"] is None
        assert v.escaped == "undecided"
    else:
        assert set(outcomes.values()) == {PASS} and v.escaped == "yes"


@pytest.mark.parametrize("status, verdict", [("failed", "not escaped"), ("running", "undecided")])
def test_a_candidate_without_finished_seeds(status, verdict):
    """Every seed failed: not escaped (the seeds check fails); every seed still running: undecided.
    Either way the other checks have nothing to test and say so."""
    rng = np.random.default_rng(9)
    sweep = synthetic_sweep(rng, HEALTHY)
    sweep.trials.loc[sweep.trials["model.depth"].eq("3") & sweep.trials["model.arch"].eq("capsnet"), "status"] = status
    v = compute_verdict(sweep)
    c = next(c for c in v.configurations if c.role == "candidate")
    assert c.verdict == verdict and c.n_seeds == 0
    assert [ch["outcome"] for ch in c.checks[1:]] == ["inconclusive"] * 7
    assert all("no finished seed" in ch["text"] for ch in c.checks[1:])
    assert v.escaped == ("no" if status == "failed" else "undecided")
