"""The best configuration(s) of a finished sweep, logged on its parent run by the runner at the end.

A configuration is a candidate trial's values of the sweep's space keys (`sweep.space`); its score for
objective m is the mean over its seeds of each trial's last logged m, the number Optuna was told
(sweeps/search.py, SeedRepeater). One objective: the best mean. Several: the Pareto set of those means.
Written as `best.json`, metrics `best.<metric>` and, for one objective, tags `capsweep.best.<key>`.
"""
from __future__ import annotations

import json
import math

from analysis.store import trial_rows
from capsmodels.contract import CANDIDATE, FINISHED

BEST_FILE = "best.json"
BEST_TAG = "capsweep.best"          # capsweep.best.<space key> = value (single objective only)


def pareto_mask(values: list[list[float]], modes: list[str]) -> list[bool]:
    """True for the rows no other row dominates (at least as good in every objective, better in one).
    values: (n, k) with NaN allowed (a NaN row is never on the front)."""
    import numpy as np
    v = np.asarray(values, dtype=float).reshape(len(values), len(modes))
    v = v * np.array([1.0 if m == "max" else -1.0 for m in modes])      # all maximised
    ok = ~np.isnan(v).any(axis=1)
    # dominated[i, j]: row j dominates row i, all pairs at once: (n, n, k) comparisons
    ge = (v[None, :, :] >= v[:, None, :]).all(axis=2)
    gt = (v[None, :, :] > v[:, None, :]).any(axis=2)
    dominated = (ge & gt & ok[None, :]).any(axis=1)
    return list(ok & ~dominated)


def configurations(rows: list[dict], keys: list[str], metrics: list[str]) -> list[dict]:
    """Candidate configurations with their seed means over finished trials:
    [{params: {key: value}, seeds: [...], values: {metric: mean}, run_ids: [...]}]."""
    groups: dict[tuple, dict] = {}
    for row in rows:
        if row["role"] != CANDIDATE or row["status"] != FINISHED:
            continue
        params = {k: row["params"].get(k) for k in keys}
        g = groups.setdefault(tuple(params.items()), {"params": params, "seeds": [], "run_ids": [],
                                                      "scores": {m: [] for m in metrics}})
        g["seeds"].append(row["seed"])
        g["run_ids"].append(row["run_id"])
        for m in metrics:
            x = row["metrics"].get(m)
            if x is not None and math.isfinite(x):
                g["scores"][m].append(float(x))
    out = []
    for g in groups.values():
        values = {m: (sum(s) / len(s) if s else math.nan) for m, s in g.pop("scores").items()}
        out.append({**g, "values": values})
    return out


def best_configurations(rows: list[dict], keys: list[str], metrics: list[str], modes: list[str]) -> list[dict]:
    """One objective: the configuration with the best seed mean (ties: the first). Several: the
    Pareto set of the seed means, sorted by the first objective."""
    configs = [c for c in configurations(rows, keys, metrics) if all(math.isfinite(c["values"][m]) for m in metrics)]
    if not configs:
        return []
    if len(metrics) == 1:
        sign = 1.0 if modes[0] == "max" else -1.0
        return [max(configs, key=lambda c: sign * c["values"][metrics[0]])]
    keep = pareto_mask([[c["values"][m] for m in metrics] for c in configs], modes)
    front = [c for c, k in zip(configs, keep) if k]
    return sorted(front, key=lambda c: c["values"][metrics[0]], reverse=modes[0] == "max")


def log_best(client, parent_id: str, keys: list[str], metrics: list[str], modes: list[str]) -> list[dict]:
    """Compute the best configuration(s) of a finished sweep and log them on its parent run:
    `best.json` ({objectives, modes, best: [...]}), metrics `best.<metric>` and, for one objective,
    tags `capsweep.best.<key>` (tags: a resumed sweep may log them again)."""
    import time
    from mlflow.entities import Metric, RunTag
    parent = client.get_run(parent_id)
    rows = trial_rows(client, parent.info.experiment_id, parent_id)
    best = best_configurations(rows, keys, metrics, modes)
    doc = {"objectives": metrics, "modes": modes, "kind": "best" if len(metrics) == 1 else "pareto",
           "best": best}
    client.log_text(parent_id, json.dumps(doc, indent=2, default=str), BEST_FILE)
    now = int(time.time() * 1000)
    if best:
        tags = [RunTag(f"{BEST_TAG}.{k}", str(v)) for k, v in best[0]["params"].items()] if len(best) == 1 else []
        tags.append(RunTag(f"{BEST_TAG}.count", str(len(best))))
        ms = [Metric(f"best.{m}", best[0]["values"][m], now, 0) for m in metrics] if len(best) == 1 else []
        client.log_batch(parent_id, metrics=ms, tags=tags)
    return best
