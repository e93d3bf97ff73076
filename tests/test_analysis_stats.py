"""analysis.stats against independent derivations: Welch's bounds recomputed from the formula with
scipy.stats.t and cross-checked with scipy's own Welch test, the single-seed and zero-variance cases,
the one-sample t bounds against scipy.stats.t.interval, Holm by hand, trends on configuration means."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from analysis.stats import (FAIL, INCONCLUSIVE, PASS, check_bound, holm, noninferiority, t_interval)
from analysis.verdict import compute_verdict
from tests.test_verdict_calibration import HEALTHY, synthetic_sweep

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
    # exactly when the lower bound clears -margin
    for margin in (0.0, 0.005, 0.01, 0.02):
        p = stats.ttest_ind(c + margin, r, equal_var=False, alternative="greater").pvalue
        res = noninferiority(CAND, REF, margin=margin, alpha=0.05)
        assert (p < 0.05) == (res.lo > -margin), (margin, p, res)


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
    # one candidate seed against four reference seeds: Crawford and Howell's single-case t, the
    # reference's variance borrowed, df = n_ref - 1
    ref4 = [0.90, 0.91, 0.89, 0.92]
    one = noninferiority([0.905], ref4, 0.01)
    s = np.std(ref4, ddof=1)
    se = s * math.sqrt(1 + 1 / 4)
    t = stats.t.ppf(0.95, 3)
    d = 0.905 - np.mean(ref4)
    assert (one.df, one.se) == pytest.approx((3, se))
    assert (one.lo, one.hi) == pytest.approx((d - t * se, d + t * se))
    assert "borrowed from the reference" in one.how
    # zero variance on both sides: the difference itself decides (0.25 and 0.5 are exact in binary)
    assert noninferiority([0.75, 0.75], [0.75, 0.75], 0.25).outcome == PASS
    assert noninferiority([0.25, 0.25], [0.75, 0.75], 0.25).outcome == FAIL
    assert noninferiority([0.5, 0.5], [0.75, 0.75], 0.25).outcome == INCONCLUSIVE
    assert noninferiority([0.5], [0.75, 0.75, 0.75], 0.125).outcome == FAIL   # borrowed s = 0


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
    depth = [t for t in v["trends"] if t["factor"] == "model.depth"]
    acc = next(t for t in depth if t["probe"] == "test_acc")
    assert acc["n"] == 4                                # depth 0, 1, 2, 3: 4 configurations, 20 trials
    means = {c["depth"]: c["figures"]["test_acc"]["mean"] for c in v["configurations"] if c["arch"] == "capsnet"}
    rho = stats.spearmanr(sorted(means), [means[d] for d in sorted(means)]).statistic
    assert acc["statistic"] == pytest.approx(rho)
    ps = [t["p_value"] for t in v["trends"]]
    assert [t["p_holm"] for t in v["trends"]] == pytest.approx(holm(ps), nan_ok=True)
    assert "model.arch" not in {t["factor"] for t in v["trends"]}


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
