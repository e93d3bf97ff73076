"""The verdict's statistics as small pure functions (numpy/scipy only, no MLflow, no pandas), so every
number can be checked against an independent derivation and every rule's error rates simulated
(tests/test_verdict_calibration.py). Definitions: docs/PROBES.md, "The verdict".

  t_interval        one-sided t bounds of a mean over seeds
  check_bound       three-way rule of a seed mean against a threshold (pass / fail / inconclusive)
  noninferiority    Welch one-sided non-inferiority test of (candidate - reference) with a margin
  trend, holm       rank trends over configuration means and Holm's step-down adjustment
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
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


# ---------------------------------------------------------------------------------------------------
# Two samples: non-inferiority of the difference

@dataclass(frozen=True)
class NonInferiority:
    """Outcome of `noninferiority`. diff = mean(candidate) - mean(reference); lo, hi its one-sided
    (1 - alpha) bounds; se its standard error; df the degrees of freedom (inf when se = 0); how: which
    variance was used ('welch', 'borrowed from the reference', 'borrowed from the candidate',
    'zero variance', or why there is no test); power: the probability that the test passes when the
    true difference is 0 and the true standard deviations are the observed ones (None when it cannot
    be computed)."""
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

    def as_dict(self) -> dict:
        return {"outcome": self.outcome, "diff": _num(self.diff), "lo": _num(self.lo), "hi": _num(self.hi),
                "se": _num(self.se), "df": _num(self.df), "n_cand": self.n_cand, "n_ref": self.n_ref,
                "margin": self.margin, "alpha": self.alpha, "how": self.how, "power": _num(self.power)}


def noninferiority(cand: Sequence[float], ref: Sequence[float], margin: float,
                   alpha: float = 0.05) -> NonInferiority:
    """Welch one-sided non-inferiority test of the candidate's seed mean against the reference's.

    With n_c, n_r seeds, means m_c, m_r and sample variances s_c^2, s_r^2 (ddof 1):

        d  = m_c - m_r
        se = sqrt(s_c^2 / n_c + s_r^2 / n_r)
        df = se^4 / ((s_c^2/n_c)^2 / (n_c - 1) + (s_r^2/n_r)^2 / (n_r - 1))     (Welch-Satterthwaite)
        L  = d - t_{1-alpha, df} se,     U = d + t_{1-alpha, df} se

    pass (shown non-inferior) when L > -margin; fail (shown inferior) when U < -margin; otherwise
    inconclusive. Under H0 (true difference = -margin) the test passes with probability about alpha.

    Special cases, stated so that a small sweep is never mistaken for evidence:
    - se = 0 with a variance known on both sides (every seed equal on both): the difference itself is
      compared, pass when d > -margin, fail when d < -margin (d = -margin exactly: inconclusive).
    - one seed on one side, n >= 2 on the other: that side's variance is unknown, so the other side's
      s^2 is borrowed (equal variances assumed, as in Crawford and Howell's 1998 single-case test):
      se = s_o sqrt(1/n_c + 1/n_r), df = n_o - 1. A borrowed s = 0 is the zero-variance case above.
    - one seed on both sides, or no finished seed on a side: inconclusive (no spread to test against).
    power: P(pass | true difference 0) = P(T > t_{1-alpha, df} - margin / se), T ~ t(df, noncentral 0),
    i.e. the noncentral-t approximation nct.sf(t_crit, df, margin / se) at the observed spread.
    """
    from scipy import stats
    c, r = finite(cand), finite(ref)
    nc, nr = len(c), len(r)
    if nc == 0 or nr == 0:
        why = "no finished candidate seed" if nc == 0 else "no reference seed"
        return NonInferiority(INCONCLUSIVE, math.nan, math.nan, math.nan, math.nan, math.nan, nc, nr,
                              margin, alpha, why)
    d = float(c.mean() - r.mean())
    if nc == 1 and nr == 1:
        return NonInferiority(INCONCLUSIVE, d, -math.inf, math.inf, math.nan, math.nan, nc, nr, margin,
                              alpha, "one seed on each side: no variance to test against")
    if nc >= 2 and nr >= 2:
        vc, vr = float(c.var(ddof=1)) / nc, float(r.var(ddof=1)) / nr
        se = math.sqrt(vc + vr)
        df = (vc + vr) ** 2 / (vc ** 2 / (nc - 1) + vr ** 2 / (nr - 1)) if se > 0 else math.inf
        how = "welch"
    else:
        other, side = (r, "reference") if nc == 1 else (c, "candidate")
        s2 = float(other.var(ddof=1))
        se = math.sqrt(s2 * (1 / nc + 1 / nr))
        df = len(other) - 1 if se > 0 else math.inf
        how = f"variance borrowed from the {side} (one seed on the other side)"
    if se == 0:
        outcome = PASS if d > -margin else FAIL if d < -margin else INCONCLUSIVE
        return NonInferiority(outcome, d, d, d, 0.0, math.inf, nc, nr, margin, alpha,
                              how + "; zero variance: the difference itself is compared")
    tq = _t_quantile(1 - alpha, df)
    lo, hi = d - tq * se, d + tq * se
    outcome = PASS if lo > -margin else FAIL if hi < -margin else INCONCLUSIVE
    power = float(stats.nct.sf(tq, df, margin / se))
    return NonInferiority(outcome, d, lo, hi, se, df, nc, nr, margin, alpha, how, power)


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
