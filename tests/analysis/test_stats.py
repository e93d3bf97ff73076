"""analysis.stats against independent derivations: Welch's bounds recomputed from the formula with
scipy.stats.t and cross-checked with scipy's own Welch test, the single-seed and zero-variance cases,
the one-sample t bounds against scipy.stats.t.interval, Holm by hand, trends on configuration means."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from analysis.stats import (FAIL, INCONCLUSIVE, PASS, bound_p, check_bound, holm, noninferiority, t_interval,
                            split_sampling_variance)
from analysis.verdict import compute_verdict
from tests.helpers.synthetic import HEALTHY, synthetic_sweep

CAND = [0.91, 0.93, 0.92, 0.90]
REF = [0.90, 0.91, 0.89]


def test_welch_bounds_follow_the_formula():
    c, r = np.array(CAND), np.array(REF)
    vc, vr = c.var(ddof=1) / 4, r.var(ddof=1) / 3
    se = math.sqrt(vc + vr)
    df = (vc + vr) ** 2 / (vc ** 2 / 3 + vr ** 2 / 2)
    d = c.mean() - r.mean()
    t = stats.t.ppf(0.95, df)
    got = noninferiority(CAND, REF, margin=0.01, alpha=0.05)
    assert got.diff == pytest.approx(0.915 - 0.90, abs=1e-12)
    assert (got.se, got.df) == pytest.approx((se, df), rel=1e-12)
    assert (got.lo, got.hi) == pytest.approx((d - t * se, d + t * se), rel=1e-12)
    assert got.outcome == PASS and got.how == "welch"
    # scipy's Welch test of H0 "diff <= -margin" (shift the candidate by the margin) rejects at alpha
    # exactly when the lower bound clears -margin, with the same p-value
    for margin in (0.0, 0.005, 0.01, 0.02):
        p = stats.ttest_ind(c + margin, r, equal_var=False, alternative="greater").pvalue
        res = noninferiority(CAND, REF, margin=margin, alpha=0.05)
        assert res.p_value == pytest.approx(p, rel=1e-9)
        assert (p < 0.05) == (res.lo > -margin), (margin, p, res)
    # with the test set's term: se grows by it, the df stays the seed terms' (tau must not buy df)
    tau2 = 0.002 ** 2
    with_tau = noninferiority(CAND, REF, 0.01, test_var=tau2)
    assert (with_tau.se, with_tau.df) == pytest.approx((math.sqrt(vc + vr + tau2), df), rel=1e-12)
    assert with_tau.p_value == pytest.approx(stats.t.sf((d + 0.01) / math.sqrt(vc + vr + tau2), df), rel=1e-9)


def test_three_outcomes():
    assert noninferiority([0.80, 0.81, 0.79], REF, 0.01).outcome == FAIL          # 0.1 worse, tight
    assert noninferiority([0.88, 0.91, 0.86], REF, 0.01).outcome == INCONCLUSIVE  # straddles -0.01
    ni = noninferiority([0.88, 0.91, 0.86], REF, 0.01)
    assert ni.lo < -0.01 < ni.hi and 0 < ni.power < 1


def test_single_seed_and_zero_variance_cases():
    both_one = noninferiority([0.9], [0.9], 0.01)
    assert both_one.outcome == INCONCLUSIVE and "one seed on each side" in both_one.how
    assert noninferiority([], REF, 0.01).outcome == INCONCLUSIVE
    assert noninferiority(CAND, [float("nan")], 0.01).how == "no reference seed"
    # one seed on either side: its variance is unknown, so no test (borrowing the other side's passed
    # a candidate worse by the margin 24-30% of the time when the spreads differ fourfold)
    for cand, ref in (([0.905], [0.90, 0.91, 0.89, 0.92]), ([0.95, 0.96], [0.9])):
        one = noninferiority(cand, ref, 0.01)
        assert one.outcome == INCONCLUSIVE and "one seed on the" in one.how and one.p_value == 1.0
    # zero variance on both sides and no test-set term: the difference itself decides (0.25 and 0.5
    # are exact in binary)
    assert noninferiority([0.75, 0.75], [0.75, 0.75], 0.25).outcome == PASS
    assert noninferiority([0.25, 0.25], [0.75, 0.75], 0.25).outcome == FAIL
    assert noninferiority([0.5, 0.5], [0.75, 0.75], 0.25).outcome == INCONCLUSIVE


def test_identical_seeds_are_not_certainty_once_the_test_set_counts():
    """[0.991] x 3 against [1.0] x 3 on a 1,000-image test set: the seeds agree, but 1,000 images
    cannot show a difference of -0.009 is above -0.01 (before the test-set term it passed)."""
    tau2, how = split_sampling_variance(None, None, 0.991, 1.0, 1000)
    pc, pr = (991 + 2) / 1004, (1000 + 2) / 1004                     # Agresti-Coull, by hand
    assert tau2 == pytest.approx(pc * (1 - pc) / 1000 + pr * (1 - pr) / 1000, rel=1e-12)
    assert how.startswith("binomial")
    r = noninferiority([0.991] * 3, [1.0] * 3, 0.01, test_var=tau2)
    assert r.outcome == INCONCLUSIVE and r.se == pytest.approx(math.sqrt(tau2))
    assert noninferiority([0.991] * 3, [1.0] * 3, 0.01).outcome == PASS      # what it was without


def test_paired_split_sampling_variance_by_hand():
    """tau^2 = var_i(mean_c correct_i - mean_r correct_i) / n, from a hand-made 8-image example."""
    c = np.array([[1, 1, 0, 1, 1, 1, 0, 1], [1, 1, 1, 1, 0, 1, 0, 1]], dtype=float)
    r = np.array([[1, 0, 0, 1, 1, 1, 1, 1], [1, 1, 0, 1, 1, 1, 1, 1]], dtype=float)
    d = np.array([0.0, 0.5, 0.5, 0.0, -0.5, 0.0, -1.0, 0.0])        # (c0 + c1)/2 - (r0 + r1)/2
    tau2, how = split_sampling_variance(c, r, 0.75, 0.8125, 8)
    assert tau2 == pytest.approx(d.var(ddof=1) / 8, rel=1e-12) and how.startswith("paired")
    # identical models: at least one image's worth of disagreement, never 0
    assert split_sampling_variance(c, c, 0.75, 0.75, 8)[0] == pytest.approx(1 / 64)
    assert split_sampling_variance(None, None, 0.9, 0.9, None)[0] == 0.0


def test_p_values_match_scipy_and_the_bounds():
    """The NI p-value is scipy's one-sided Welch p of (candidate + margin) vs reference, and p < alpha
    exactly when the lower bound clears -margin; bound_p is the one-sample t p-value and agrees with
    check_bound."""
    c, r = np.array(CAND), np.array(REF)
    for margin in (0.0, 0.005, 0.01, 0.02, 0.03):
        res = noninferiority(CAND, REF, margin)
        p = stats.ttest_ind(c + margin, r, equal_var=False, alternative="greater").pvalue
        assert res.p_value == pytest.approx(p, rel=1e-9)
        assert (res.p_value < 0.05) == (res.outcome == PASS)
    rng = np.random.default_rng(3)
    for _ in range(200):
        x = rng.normal(0.4, 0.1, int(rng.integers(2, 6)))
        iv = t_interval(x, 0.05)
        for good in ("above", "below"):
            p = bound_p(iv, 0.45, good)
            alt = "greater" if good == "above" else "less"
            assert p == pytest.approx(stats.ttest_1samp(x, 0.45, alternative=alt).pvalue, rel=1e-9)
            assert (p <= 0.05) == (check_bound(iv, 0.45, good) == PASS)
    assert bound_p(t_interval([0.0, 0.0, 0.0]), 0.5, "below") == 0.0      # every seed 0: shown below
    assert bound_p(t_interval([0.3]), 0.5, "below") == 1.0                # one seed: no test


def test_power_matches_the_simulated_pass_rate():
    """The reported power (noncentral t at the spread) predicts how often an equal candidate passes."""
    rng = np.random.default_rng(7)
    sd, n, margin = 0.005, 5, 0.01
    passes = [noninferiority(rng.normal(0, sd, n), rng.normal(0, sd, n), margin).outcome == PASS
              for _ in range(1500)]
    se = sd * math.sqrt(2 / n)
    df = 2 * n - 2                      # Welch's df when both sample variances equal the true one
    predicted = stats.nct.sf(stats.t.ppf(0.95, df), df, margin / se)
    rate = float(np.mean(passes))
    assert abs(rate - predicted) < 0.04, (rate, predicted)


def test_t_interval_matches_scipy():
    x = [1.0, 2.0, 3.0, 4.0]
    iv = t_interval(x, alpha=0.05)
    lo, hi = stats.t.interval(0.90, 3, loc=2.5, scale=stats.sem(x))
    assert (iv.mean, iv.lo, iv.hi, iv.n) == pytest.approx((2.5, lo, hi, 4))
    one = t_interval([0.3])
    assert one.n == 1 and one.lo == -math.inf and one.hi == math.inf
    assert one.as_dict() == {"mean": 0.3, "lo": None, "hi": None, "n": 1, "sd": None}
    assert t_interval([float("nan"), None]).as_dict()["mean"] is None
    flat = t_interval([0.0, 0.0, 0.0])
    assert (flat.lo, flat.hi) == (0.0, 0.0)


def test_check_bound_three_ways():
    iv = t_interval([0.1, 0.2, 0.3])            # mean 0.2, bounds about 0.03 and 0.37
    assert check_bound(iv, 0.5, "below") == PASS
    assert check_bound(iv, 0.01, "below") == FAIL
    assert check_bound(iv, 0.2, "below") == INCONCLUSIVE
    assert check_bound(iv, 0.01, "above") == PASS
    assert check_bound(iv, 0.5, "above") == FAIL
    assert check_bound(t_interval([0.0]), 0.5, "below") == INCONCLUSIVE     # one seed
    assert check_bound(t_interval([0.0, 0.0]), 0.0, "below") == PASS       # on the threshold: at most
    assert check_bound(t_interval([]), 0.5, "below") == INCONCLUSIVE


def test_holm_by_hand():
    # sorted 0.01, 0.03, 0.04 times 3, 2, 1: 0.03, 0.06, 0.04 -> running max 0.03, 0.06, 0.06
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    got = holm([0.01, float("nan"), 0.04])     # a missing p-value is not a test: m = 2
    assert got[0] == pytest.approx(0.02) and math.isnan(got[1]) and got[2] == pytest.approx(0.04)
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])


def test_trends_use_one_point_per_configuration_and_holm():
    """Five seeds per configuration: every trend has one point per CapsNet configuration (2 here: depth
    0 and 3), and p_holm is Holm's adjustment of the p-values that exist."""
    rng = np.random.default_rng(8)
    sweep = synthetic_sweep(rng, HEALTHY + [("capsnet", 1, "healthy"), ("capsnet", 2, "collapsed")])
    v = compute_verdict(sweep)
    depth = [t for t in v.trends if t["factor"] == "model.depth"]
    acc = next(t for t in depth if t["probe"] == "test_acc")
    assert acc["n"] == 4                                # depth 0, 1, 2, 3: 4 configurations, 20 trials
    means = {c.depth: c.figures["test_acc"]["mean"] for c in v.configurations if c.arch == "capsnet"}
    rho = stats.spearmanr(sorted(means), [means[d] for d in sorted(means)]).statistic
    assert acc["statistic"] == pytest.approx(rho)
    ps = [t["p_value"] for t in v.trends]
    nan = lambda x: math.nan if x is None else x  # noqa: E731   (JSON's null is a missing p-value)
    assert [nan(t["p_holm"]) for t in v.trends] == pytest.approx(holm(ps), nan_ok=True)
    assert "model.arch" not in {t["factor"] for t in v.trends}


def test_reference_is_matched_param_by_param():
    """A candidate whose sampled lr no reference has is matched on init and the lr is named unmatched;
    a cnn control without a depth-0 cnn falls back to the depth-0 CapsNet, said so."""
    import pandas as pd
    from analysis.verdict import find_reference
    pool = pd.DataFrame({"run_id": ["a", "b", "c"], "arch": ["capsnet"] * 3,
                         "model.init": ["std", "data", "data"], "train.lr": ["0.001"] * 3})
    first = pd.Series({"arch": "capsnet", "model.init": "data", "train.lr": "0.0013"})
    ref = find_reference(first, pool, ["model.init", "train.lr"], "this sweep")
    assert ref["how"] == "matched except train.lr" and ref["run_ids"] == ["b", "c"]
    assert find_reference(first.replace({"data": "fan"}), pool, ["model.init", "train.lr"], "x")["how"] == "pooled"
    ctrl = find_reference(pd.Series({"arch": "cnn", "model.init": "std", "train.lr": "0.001"}), pool,
                          ["model.init", "train.lr"], "this sweep")
    assert ctrl["how"] == "matched (no depth-0 cnn: the depth-0 CapsNet)" and ctrl["run_ids"] == ["a"]
    assert find_reference(first, pool.iloc[:0], ["model.init"], "x")["how"] == "none"
