"""The hyperparameter-search views of an Optuna sweep, as pure functions of a table: which configurations
are Pareto-optimal on the sweep's objectives, and how much each swept param matters to each objective.

Why per configuration: Optuna sees the mean over a suggestion's seeds (sweeps/configs/hunt.yaml), so
the front and the importances are computed on the same means, one row per configuration, never per
seed. Only the candidates the study saw (`trial.role` = candidate) enter; the runner's references and
controls are never shown to Optuna (README, "Every sweep carries its yardsticks").

Importances: Optuna's own fANOVA evaluator (`optuna.importance`, the figures optuna-dashboard shows)
on a study rebuilt from the table, seeded, so a report is reproducible. Definitions: docs/PROBES.md.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import pandas as pd

from analysis.verdict import factor_kind
from capsmodels.contract import SweepParams

_BLOCK = 256   # rows compared at once in pareto_mask: (block x n x k) booleans


def objectives_of(params: dict) -> list[tuple[str, str]]:
    """[(metric, 'max'|'min'), ...] from the parent run's `sweep.metric` / `sweep.mode` params
    (sweeps/runner.py writes them comma-joined); [] when they are absent or do not pair up."""
    s = SweepParams.from_params(params)
    metrics, modes = s.metrics, s.modes
    if not metrics or len(metrics) != len(modes) or not set(modes) <= {"max", "min"}:
        return []
    return list(zip(metrics, modes))


def config_means(trials: pd.DataFrame, by: str, params: Sequence[str], metrics: Sequence[str]) -> pd.DataFrame:
    """One row per value of `by` (a configuration id): its params (first trial's values, equal within a
    configuration), the mean of each metric over its rows (NaN-skipping) and `n`, the rows averaged."""
    if trials.empty:
        return pd.DataFrame(columns=[by, *params, *metrics, "n"])
    g = trials.groupby(by, sort=True)
    out = g[list(params)].first() if params else pd.DataFrame(index=g.size().index)
    for m in metrics:
        out[m] = g[m].mean() if m in trials else np.nan
    out["n"] = g.size()
    return out.reset_index()


def pareto_mask(values: np.ndarray, maximize: Sequence[bool]) -> np.ndarray:
    """values: (n, k) objective values; maximize: k flags. True where no other row dominates the row
    (at least as good on every objective, strictly better on one). Rows with a NaN are never on the
    front and dominate nothing; equal rows do not dominate each other. O(n^2 k), vectorised in blocks."""
    v = np.asarray(values, dtype=float)
    if v.ndim != 2 or v.shape[1] != len(maximize):
        raise ValueError(f"values must be (n, {len(maximize)}), got {v.shape}")
    v = np.where(np.asarray(maximize, dtype=bool), v, -v)          # every objective maximised
    ok = np.isfinite(v).all(axis=1)
    idx = np.flatnonzero(ok)
    w = v[idx]                                                       # (m, k)
    mask = np.zeros(len(v), dtype=bool)
    for start in range(0, len(w), _BLOCK):
        blk = w[start:start + _BLOCK][:, None, :]                    # (b, 1, k) against (1, m, k)
        dominated = ((w[None] >= blk).all(-1) & (w[None] > blk).any(-1)).any(1)
        mask[idx[start:start + _BLOCK]] = ~dominated
    return mask


def pareto_front(table: pd.DataFrame, objectives: Sequence[tuple[str, str]]) -> pd.Series:
    """Boolean Series (table's index): the rows on the Pareto front of `objectives` [(column, mode)]."""
    cols = [c for c, _ in objectives]
    return pd.Series(pareto_mask(table[cols].to_numpy(dtype=float), [m == "max" for _, m in objectives]),
                     index=table.index, name="pareto")


def _distribution(values: pd.Series):
    """The Optuna distribution a param's observed values fit: a float range for numbers, categories
    otherwise (booleans too); None when it takes a single value (nothing to attribute)."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution
    kind = factor_kind(values)
    s = values.dropna()
    if kind == "numeric":
        x = s.astype(float)
        return (FloatDistribution(float(x.min()), float(x.max())), float) if x.max() > x.min() else None
    levels = sorted(s.astype(str).unique())
    return (CategoricalDistribution(levels), str) if len(levels) > 1 else None


def param_importances(table: pd.DataFrame, params: Sequence[str], objective: str, mode: str = "max",
                      seed: int = 0) -> Optional[dict[str, float]]:
    """Importance of each param for `objective` (fractions summing to 1, largest first): Optuna's fANOVA
    evaluator (seeded) on a study rebuilt from the table's rows with a finite objective and every param
    set. Params that take one value are left out. None when fewer than 3 rows or no varying param."""
    import optuna
    rows = table[np.isfinite(pd.to_numeric(table[objective], errors="coerce").to_numpy(dtype=float))]
    rows = rows.dropna(subset=list(params))
    dists = {p: d for p in params if (d := _distribution(rows[p])) is not None}
    if len(rows) < 3 or not dists:
        return None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize" if mode == "max" else "minimize")
    study.add_trials([
        optuna.trial.create_trial(params={p: cast(r[p]) for p, (_, cast) in dists.items()},
                                  distributions={p: d for p, (d, _) in dists.items()}, value=float(r[objective]))
        for _, r in rows.iterrows()])
    got = optuna.importance.get_param_importances(
        study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=seed), normalize=True)
    return {p: float(v) for p, v in sorted(got.items(), key=lambda kv: -kv[1])}


__all__ = ["objectives_of", "config_means", "pareto_mask", "pareto_front", "param_importances"]
