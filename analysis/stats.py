"""The verdict's statistics as small pure functions (numpy/scipy only, no MLflow, no pandas), so every
number can be checked against an independent derivation and every rule's error rates simulated
(tests/analysis/test_verdict_calibration.py). Definitions: docs/PROBES.md, "The verdict".

  t_interval        one-sided t bounds of a mean over seeds
  check_bound       three-way rule of a seed mean against a threshold (pass / fail / inconclusive)
  bound_p           its one-sided p-value
  noninferiority    Welch one-sided non-inferiority test of (candidate - reference) with a margin, the
                    test set's sampling error in its standard error (split_sampling_variance); welch and
                    noninferiority_p are its vectorised pieces, shared with the calibration simulations
  trend, holm       rank trends over configuration means and Holm's step-down adjustment (also the
                    sweep-wide family step of the verdict: docs/PROBES.md, "The sweep is a family")
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace
from typing import Optional, Sequence

import numpy as np

PASS, FAIL, INCONCLUSIVE = "pass", "fail", "inconclusive"


def _num(x) -> Optional[float]:
    """JSON has no NaN/inf: missing numbers become null."""
    return None if x is None or not math.isfinite(x) else float(x)


def finite(values: Sequence[float]) -> np.ndarray:
    """The finite values of a sequence as float64 (None, NaN and +-inf dropped)."""
    x = np.asarray([np.nan if v is None else v for v in values], dtype=float)
    return x[np.isfinite(x)]


@functools.lru_cache(maxsize=4096)
def _t_quantile(level: float, df: float) -> float:
    """scipy's t quantile, cached by (level, df): a big report asks for the same few (one per seed
    count and level) tens of thousands of times, and one `t.ppf` call costs ~50 us."""
    from scipy import stats
    return float(stats.t.ppf(level, df))


# ---------------------------------------------------------------------------------------------------
# One sample: the mean over seeds and its one-sided bounds

@dataclass(frozen=True)
class Interval:
    """Mean over n seeds with one-sided t bounds at level alpha each: lo is a (1 - alpha) lower bound,
    hi a (1 - alpha) upper bound, so [lo, hi] is a two-sided (1 - 2 alpha) interval. sd: the sample
    standard deviation (ddof 1). n = 1: lo = -inf, hi = +inf (no spread can be estimated from one seed);
    n = 0: mean NaN."""
    mean: float
    lo: float
    hi: float
    n: int
    sd: float = math.nan

    def as_dict(self) -> dict:
        return {"mean": _num(self.mean), "lo": _num(self.lo), "hi": _num(self.hi), "n": self.n,
                "sd": _num(self.sd)}


def t_interval(values: Sequence[float], alpha: float = 0.05) -> Interval:
    """One-sided t bounds of the mean of the finite values x_1..x_n:

        lo = mean - t_{1-alpha, n-1} s / sqrt(n),   hi = mean + t_{1-alpha, n-1} s / sqrt(n)

    s the sample standard deviation (ddof 1). Each bound holds with probability 1 - alpha when the
    seeds are independent draws of a normal variable. s = 0 (every seed equal) gives lo = hi = mean.
    """
    x = finite(values)
    n = len(x)
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, 0)
    mean = float(x.mean())
    if n == 1:
        return Interval(mean, -math.inf, math.inf, 1)
    sd = float(x.std(ddof=1))
    half = _t_quantile(1 - alpha, n - 1) * sd / math.sqrt(n) if sd > 0 else 0.0
    return Interval(mean, mean - half, mean + half, n, sd)


def check_bound(iv: Interval, threshold: float, good: str) -> str:
    """Three-way rule of a seed mean against a threshold. good = 'above' (the quantity must be at least
    the threshold) or 'below' (at most). pass: the interval lies wholly on the good side (for 'above':
    lo >= threshold); fail: wholly on the bad side (hi < threshold); otherwise inconclusive. One seed
    (infinite bounds) or no value is inconclusive."""
    if iv.n == 0 or not math.isfinite(iv.mean):
        return INCONCLUSIVE
    if good == "above":
        return PASS if iv.lo >= threshold else FAIL if iv.hi < threshold else INCONCLUSIVE
    if good == "below":
        return PASS if iv.hi <= threshold else FAIL if iv.lo > threshold else INCONCLUSIVE
    raise ValueError(f"good must be 'above' or 'below', not {good!r}")


def bound_p(iv: Interval, threshold: float, good: str) -> float:
    """One-sided p-value of the null that the mean is on the bad side of `threshold`, consistent with
    `check_bound` (pass exactly when p <= alpha): for good = 'above', P(T_{n-1} >= (mean - threshold) /
    (s / sqrt(n))); for 'below' the mirror image. s = 0: 0.0 on the good side (threshold included),
    else 1.0. One seed or none: 1.0 (no test)."""
    if iv.n < 2 or not math.isfinite(iv.mean):
        return 1.0
    sign = 1.0 if good == "above" else -1.0
    gap = sign * (iv.mean - threshold)
    if not iv.sd > 0:
        return 0.0 if gap >= 0 else 1.0
    from scipy import stats
    return float(stats.t.sf(gap / (iv.sd / math.sqrt(iv.n)), iv.n - 1))


# ---------------------------------------------------------------------------------------------------
# Two samples: non-inferiority of the difference

@dataclass(frozen=True)
class NonInferiority:
    """Outcome of `noninferiority`. diff = mean(candidate) - mean(reference); lo, hi its one-sided
    (1 - alpha) bounds; se its standard error (seeds and, when given, the test set's sampling); df the
    degrees of freedom (inf when se = 0); p_value: the one-sided p-value of H0 "diff <= -margin" (pass
    exactly when p_value < alpha; 1.0 when there is no test), the number the sweep-wide Holm step
    reads; how: which variances were used, or why there is no test; power: the probability that the
    test passes at level alpha when the true difference is 0 and the true spreads are the observed
    ones (None when it cannot be computed)."""
    outcome: str
    diff: float
    lo: float
    hi: float
    se: float
    df: float
    n_cand: int
    n_ref: int
    margin: float
    alpha: float
    how: str
    power: Optional[float] = None
    p_value: float = 1.0
    test_var: float = 0.0

    def as_dict(self) -> dict:
        return {"outcome": self.outcome, "diff": _num(self.diff), "lo": _num(self.lo), "hi": _num(self.hi),
                "se": _num(self.se), "df": _num(self.df), "n_cand": self.n_cand, "n_ref": self.n_ref,
                "margin": self.margin, "alpha": self.alpha, "how": self.how, "power": _num(self.power),
                "p_value": _num(self.p_value), "test_se": _num(math.sqrt(self.test_var))}

    def power_at(self, level: float) -> Optional[float]:
        """P(pass | true difference 0) if the test were run at `level` (e.g. alpha / N under Holm)."""
        if not (math.isfinite(self.se) and self.se > 0 and math.isfinite(self.df)):
            return None
        from scipy import stats
        return float(stats.nct.sf(_t_quantile(1 - level, self.df), self.df, self.margin / self.se))


def welch(diff, var_c, n_c, var_r, n_r, test_var=0.0):
    """Standard error and degrees of freedom of a difference of two seed means, vectorised over numpy
    arrays (the verdict calls it with scalars, the calibration simulations with thousands of sweeps at
    once):

        se^2 = s_c^2/n_c + s_r^2/n_r + tau^2
        df   = (s_c^2/n_c + s_r^2/n_r)^2 / ((s_c^2/n_c)^2/(n_c-1) + (s_r^2/n_r)^2/(n_r-1))

    tau^2 = test_var: the variance the test set's sampling adds to the difference
    (`split_sampling_variance`), which seed spread cannot show because every seed is scored on the same
    images. df is Welch-Satterthwaite's over the seed terms only: tau^2 is nearly known (thousands of
    images) but must not buy degrees of freedom, because the sweep-wide Holm step reads p-values as
    far out as alpha / K (1.25e-4 at K = 400), and there a df that grows with tau^2 was liberal: a
    small seed variance drawn by chance made tau^2 dominate and the df large, a family-wise false
    "yes" of 0.27 at K = 400 with 3 seeds. With the seed terms only, tau^2 makes the test conservative
    (docs/PROBES.md gives the simulated rates). se = 0 gives df = inf."""
    vc, vr = np.asarray(var_c, float) / n_c, np.asarray(var_r, float) / n_r
    se2 = vc + vr + np.asarray(test_var, float)
    denom = vc ** 2 / (n_c - 1) + vr ** 2 / (n_r - 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        df = np.where(denom > 0, (vc + vr) ** 2 / np.where(denom > 0, denom, 1.0),
                      float(n_c + n_r - 2))
    return np.sqrt(se2), np.where(se2 > 0, df, np.inf)


def noninferiority_p(diff, se, df, margin: float):
    """One-sided p-value of H0 "true difference <= -margin": P(T_df >= (diff + margin) / se),
    vectorised. se = 0: 0.0 when diff > -margin, else 1.0 (the difference itself decides)."""
    from scipy import stats
    diff, se, df = (np.asarray(v, float) for v in (diff, se, df))
    with np.errstate(divide="ignore", invalid="ignore"):
        z = (diff + margin) / np.where(se > 0, se, 1.0)
        p = stats.t.sf(z, np.where(np.isfinite(df), df, 1e12))
    return np.where(se > 0, p, np.where(diff > -margin, 0.0, 1.0))


def noninferiority(cand: Sequence[float], ref: Sequence[float], margin: float,
                   alpha: float = 0.05, test_var: float = 0.0) -> NonInferiority:
    """Welch's one-sided non-inferiority test of the candidate's seed mean against the reference's,
    with the test set's sampling error in the standard error (`welch`).

    With n_c, n_r seeds, means m_c, m_r, sample variances s_c^2, s_r^2 (ddof 1) and tau^2 = test_var:

        d  = m_c - m_r,    se^2 = s_c^2/n_c + s_r^2/n_r + tau^2,    df: Welch-Satterthwaite's of the seed terms
        L  = d - t_{1-alpha, df} se,     U = d + t_{1-alpha, df} se,    p = P(T_df >= (d + margin)/se)

    pass (shown non-inferior) when L > -margin (equivalently p < alpha); fail (shown inferior) when
    U < -margin; otherwise inconclusive. Under H0 (true difference = -margin) it passes with
    probability about alpha.

    Special cases, stated so that a small sweep is never mistaken for evidence:
    - one seed on a side (or none): inconclusive. That side's seed variance is unknown, and borrowing
      the other side's (Crawford and Howell's single-case test) passed a candidate worse by the margin
      24-30% of the time when the two spreads differ fourfold (docs/PROBES.md).
    - se = 0 (every seed equal on both sides and no test-set term): the difference itself is
      compared, pass when d > -margin, fail when d < -margin (d = -margin exactly: inconclusive).
      With accuracies the test-set term is always there when the test set's size is known, so
      identical seeds are never taken for certainty.
    power: P(pass | true difference 0) = nct.sf(t_{1-alpha, df}, df, margin / se) at the observed spread.
    """
    c, r = finite(cand), finite(ref)
    nc, nr = len(c), len(r)
    if nc == 0 or nr == 0:
        why = "no finished candidate seed" if nc == 0 else "no reference seed"
        return NonInferiority(INCONCLUSIVE, math.nan, math.nan, math.nan, math.nan, math.nan, nc, nr,
                              margin, alpha, why)
    d = float(c.mean() - r.mean())
    if nc == 1 or nr == 1:
        side = "each side" if nc == nr == 1 else "the candidate" if nc == 1 else "the reference"
        return NonInferiority(INCONCLUSIVE, d, -math.inf, math.inf, math.nan, math.nan, nc, nr, margin,
                              alpha, f"one seed on {side}: its seed variance is unknown, so there is no test "
                                     "(run more seeds, or capsweep confirm)", test_var=test_var)
    se_a, df_a = welch(d, c.var(ddof=1), nc, r.var(ddof=1), nr, test_var)
    se, df = float(se_a), float(df_a)
    how = "welch" + (f" + test-set sampling (se {math.sqrt(test_var):.3g})" if test_var > 0 else "")
    p = float(noninferiority_p(d, se, df, margin))
    if se == 0:
        outcome = PASS if d > -margin else FAIL if d < -margin else INCONCLUSIVE
        return NonInferiority(outcome, d, d, d, 0.0, math.inf, nc, nr, margin, alpha,
                              how + "; zero variance: the difference itself is compared", p_value=p)
    tq = _t_quantile(1 - alpha, df)
    lo, hi = d - tq * se, d + tq * se
    outcome = PASS if lo > -margin else FAIL if hi < -margin else INCONCLUSIVE
    res = NonInferiority(outcome, d, lo, hi, se, df, nc, nr, margin, alpha, how, None, p, test_var)
    return replace(res, power=res.power_at(alpha))


def split_sampling_variance(cand_correct: Optional[np.ndarray], ref_correct: Optional[np.ndarray],
                      acc_c: float, acc_r: float, n_test: Optional[int]) -> tuple[float, str]:
    """(tau^2, how): the variance that sampling the test set adds to a difference of mean
    accuracies. Every seed of both sides is scored on the same n test images, so the seed spread
    holds none of it; with n = 1,000 images it is about 0.01 for two 90% models, the size of the
    usual margin.

    paired (both sides give per-image correctness, (seeds, n) 0/1 arrays over the same images):
        D_i = mean over the candidate's seeds of correct_i - the same over the reference's,
        tau^2 = max(var(D_i), 1/n) / n          (at least one image's worth of disagreement)
    binomial (only the size is known; assumes the two models err independently, so it overstates
    tau^2 for similar models: a conservative fallback), with Agresti-Coull's p~ = (k + 2)/(n + 4) so
    that 100% accuracy does not give variance 0:
        tau^2 = p~_c (1 - p~_c)/n + p~_r (1 - p~_r)/n
    (0, why) when n is unknown."""
    if cand_correct is not None and ref_correct is not None and cand_correct.shape[1] == ref_correct.shape[1]:
        n = cand_correct.shape[1]
        diff = cand_correct.mean(0) - ref_correct.mean(0)
        return max(float(diff.var(ddof=1)), 1.0 / n) / n, f"paired over {n} test images"
    if not n_test:
        return 0.0, "test-set size unknown: its sampling error is not in the standard error"

    def var(acc):
        p = (acc * n_test + 2) / (n_test + 4)
        return p * (1 - p) / n_test
    return var(acc_c) + var(acc_r), f"binomial over {n_test} test images"


# ---------------------------------------------------------------------------------------------------
# Trends over configurations, Holm's adjustment

@dataclass(frozen=True)
class Trend:
    """Association of one probe with one factor over configuration means (one point per configuration,
    never per seed). test: 'spearman' (numeric or boolean factor, booleans 0/1) or 'kruskal'
    (categorical factor, Kruskal-Wallis H over its levels). p_holm: Holm-adjusted over all trends of
    one report (set by `holm`)."""
    factor: str
    probe: str
    test: str
    statistic: float
    p_value: float
    n: int
    levels: int
    note: str = ""
    p_holm: float = math.nan

    def as_dict(self) -> dict:
        return {"factor": self.factor, "probe": self.probe, "test": self.test,
                "statistic": _num(self.statistic), "p_value": _num(self.p_value),
                "p_holm": _num(self.p_holm), "n": self.n, "levels": self.levels, "note": self.note}


def trend(factor: str, probe: str, x: Sequence, y: Sequence[float], kind: str) -> Trend:
    """Rank trend of y against factor values x (one pair per configuration). kind: 'numeric' | 'bool'
    (Spearman's rho, two-sided p from scipy.stats.spearmanr) or 'categorical' (Kruskal-Wallis). Pairs
    with a missing y are dropped; fewer than 3 pairs, one factor level or a constant y give NaN with a
    note (no test, so nothing for Holm to count)."""
    from scipy import stats
    xs = np.asarray(list(x), dtype=object)
    ys = np.asarray([np.nan if v is None else v for v in y], dtype=float)
    keep = np.isfinite(ys) & np.array([v is not None and v == v for v in xs], dtype=bool)
    xs, ys = xs[keep], ys[keep]
    levels = len(set(xs.tolist()))
    test = "kruskal" if kind == "categorical" else "spearman"
    if len(ys) < 3 or levels < 2:
        return Trend(factor, probe, test, math.nan, math.nan, len(ys), levels,
                     "too few configurations or levels with this probe")
    if np.all(ys == ys[0]):
        return Trend(factor, probe, test, math.nan, math.nan, len(ys), levels, "probe is constant")
    if kind == "categorical":
        groups = [ys[xs == lv] for lv in sorted(set(xs.tolist()), key=str)]
        res = stats.kruskal(*groups)
        return Trend(factor, probe, test, float(res.statistic), float(res.pvalue), len(ys), levels)
    res = stats.spearmanr(xs.astype(float), ys)
    return Trend(factor, probe, test, float(res.statistic), float(res.pvalue), len(ys), levels)


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the input order. With the m finite p-values sorted
    p_(1) <= ... <= p_(m): adj_(i) = max_{j <= i} min(1, (m - j + 1) p_(j)). Missing p-values (NaN,
    None: no test was possible) stay missing and do not count in m."""
    p = np.asarray([np.nan if v is None else v for v in p_values], dtype=float)
    out = np.full(len(p), np.nan)
    idx = np.flatnonzero(np.isfinite(p))
    m = len(idx)
    if m == 0:
        return out.tolist()
    order = idx[np.argsort(p[idx], kind="stable")]
    scaled = np.minimum(1.0, (m - np.arange(m)) * p[order])
    out[order] = np.maximum.accumulate(scaled)
    return out.tolist()
