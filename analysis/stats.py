"""Seeded bootstrap intervals and rank trends. numpy/scipy only, no MLflow, so the numbers can be checked
against independent derivations in tests.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np


@dataclass(frozen=True)
class Interval:
    """Mean over seeds and a bootstrap percentile interval of that mean. n: seeds with a value."""
    mean: float
    lo: float
    hi: float
    n: int

    def as_dict(self) -> dict:
        return {"mean": _num(self.mean), "lo": _num(self.lo), "hi": _num(self.hi), "n": self.n}


def _num(x: float) -> Optional[float]:
    """JSON has no NaN: missing numbers become null."""
    return None if x is None or not math.isfinite(x) else float(x)


def bootstrap_mean(values: Sequence[float], n_boot: int = 10_000, seed: int = 0,
                   confidence: float = 0.95) -> Interval:
    """Percentile bootstrap of the mean over seeds.

    Scheme (tests repeat it verbatim): drop NaNs -> n values x; rng = np.random.default_rng(seed), a fresh
    generator for every call so an interval does not depend on which others were computed first;
    idx = rng.integers(0, n, size=(n_boot, n)); means = x[idx].mean(axis=1);
    lo, hi = np.percentile(means, [50 (1 - confidence), 50 (1 + confidence)]) (numpy's default linear
    interpolation). One value gives lo = hi = mean (no spread can be estimated from one seed); no
    value gives NaNs.
    """
    x = np.asarray([v for v in values if v is not None and np.isfinite(v)], dtype=float)
    n = len(x)
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, 0)
    mean = float(x.mean())
    if n == 1:
        return Interval(mean, mean, mean, 1)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_boot, n))
    means = x[idx].mean(axis=1)
    lo, hi = np.percentile(means, [50 * (1 - confidence), 50 * (1 + confidence)])
    return Interval(mean, float(lo), float(hi), n)


@dataclass(frozen=True)
class Trend:
    """Association of one probe with one factor over trials. test: 'spearman' (numeric or boolean
    factor, booleans encoded 0/1) or 'kruskal' (categorical factor, Kruskal-Wallis H over its levels)."""
    factor: str
    probe: str
    test: str
    statistic: float
    p_value: float
    n: int
    levels: int
    note: str = ""

    def as_dict(self) -> dict:
        return {"factor": self.factor, "probe": self.probe, "test": self.test,
                "statistic": _num(self.statistic), "p_value": _num(self.p_value), "n": self.n,
                "levels": self.levels, "note": self.note}


def trend(factor: str, probe: str, x: Sequence, y: Sequence[float], kind: str) -> Trend:
    """Rank trend of y against factor values x. kind: 'numeric' | 'bool' (Spearman's rho, two-sided
    p-value from scipy.stats.spearmanr) or 'categorical' (Kruskal-Wallis). Pairs with a missing y are
    dropped; fewer than 3 pairs, one factor level, or a constant y give NaN with a note."""
    from scipy import stats
    xs = np.asarray(list(x), dtype=object)
    ys = np.asarray(list(y), dtype=float)
    keep = np.isfinite(ys) & np.array([v is not None and v == v for v in xs], dtype=bool)
    xs, ys = xs[keep], ys[keep]
    levels = len(set(xs.tolist()))
    test = "kruskal" if kind == "categorical" else "spearman"
    if len(ys) < 3 or levels < 2:
        return Trend(factor, probe, test, math.nan, math.nan, len(ys), levels,
                     "too few trials or levels with this probe")
    if np.all(ys == ys[0]):
        return Trend(factor, probe, test, math.nan, math.nan, len(ys), levels, "probe is constant")
    if kind == "categorical":
        groups = [ys[xs == lv] for lv in sorted(set(xs.tolist()), key=str)]
        res = stats.kruskal(*groups)
        return Trend(factor, probe, test, float(res.statistic), float(res.pvalue), len(ys), levels)
    xf = xs.astype(float)
    res = stats.spearmanr(xf, ys)
    return Trend(factor, probe, test, float(res.statistic), float(res.pvalue), len(ys), levels)
