"""The verdict: does any CapsNet configuration escape vanishing gradients and capsule starvation?

Trials are grouped into configurations by all their params except the seed (and except bookkeeping
params that do not change the model: `train.device`, `train.threads`, `train.progress`, `data.root`,
`data.download`, `trial.*`, `sweep.*`). Per finished trial the probes are read from the last epoch:

  grad_ratio        the logged `grad_ratio` (grad norm of the first routed layer l1 / the last, l{depth+1})
  dead_worst        max over hidden layers l = 1..depth of `dead_frac/l{l}`; depth 0 has no hidden layer,
                    so it is NaN there ("n/a") and the dead-capsule check does not apply
  tree_score        mean over the routed layers l = 1..depth+1 of `tree_score/l{l}`
  routing_dynamics  mean over the routed layers of `routing_dynamics/l{l}`
  test_acc          the last epoch's `test_acc` (fraction)
  grad_floor_ratio  min over all capsule layers l of `grad_norm/l{l}` divided by the reference gradient
                    norm: the median, over the shallow reference's trials and all their layers, of
                    `grad_norm/l{l}`. A collapsed deep net can have grad_ratio ~ 1 with every norm tiny;
                    this ratio catches it.

The shallow reference of a configuration is the depth-0 CapsNet trials of the same sweep that agree with
it on every swept param except depth, the seed and the hidden-layer shape (`model.num_caps`,
`model.caps_dim`); when none agree, all depth-0 CapsNet trials of the sweep are pooled (said so).

Over a configuration's finished seeds each probe gets its mean and a seeded bootstrap percentile interval
(analysis.stats.bootstrap_mean). A candidate (CapsNet, depth >= 1) escapes when all hold, each on the
conservative side of its interval:
  1. every seed finished (no diverged, failed, stopped, interrupted, running or incomplete seed)
  2. grad_ratio lower bound >= grad_ratio_min
  3. dead_worst upper bound <= dead_frac_max
  4. test_acc lower bound >= reference mean test_acc - acc_tolerance
  5. grad_floor_ratio lower bound >= grad_floor
  6. no seed has a capsule layer (any l) whose capsules are all dead (dead_frac = 1)
  7. test_acc lower bound >= 1 / num_classes + chance_margin
Checks 4 and 5 need a depth-0 CapsNet in the sweep; without one no configuration can escape (said so).
Depth-0 CapsNets are the reference and the CNN baseline (`model.arch=cnn`) is a baseline: neither is a
candidate, both get their figures.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np
import pandas as pd

from analysis.stats import Interval, bootstrap_mean, trend

SEED_PARAM = "train.seed"
NON_CONFIG_PARAMS = {SEED_PARAM, "train.device", "train.threads", "train.progress", "data.root",
                     "data.download"}
NON_CONFIG_PREFIXES = ("trial.", "sweep.")  # bookkeeping the runner may add (trial.config_id, ...)
HIDDEN_SHAPE_PARAMS = {"model.num_caps", "model.caps_dim"}
PROBES = ("grad_ratio", "dead_worst", "tree_score", "routing_dynamics", "test_acc")
FIGURES = PROBES + ("grad_floor_ratio",)
NUM_CLASSES = {"mnist": 10, "mnist5k": 10, "fashion_mnist": 10, "digits": 10, "cifar10": 10,
               "svhn": 10, "smallnorb": 5}
# Statuses the runner writes besides "finished": diverged, failed, running, stopped (ended early by the
# ASHA scheduler), interrupted (the sweep's driver stopped). All but "finished" count against a
# configuration; "incomplete" is set by analysis.load for finished runs without the probes.
STATUS_ORDER = ("finished", "diverged", "failed", "stopped", "interrupted", "running", "incomplete")
_LAYER = re.compile(r"^(?P<name>[a-z_]+)/l(?P<l>\d+)$")


@dataclass
class Thresholds:
    """The verdict's parameters; the report states every one of them."""
    grad_ratio_min: float = 0.1      # grad_ratio lower bound must reach this
    dead_frac_max: float = 0.5       # worst hidden layer's dead fraction, upper bound, at most this
    acc_tolerance: float = 0.0       # accuracy may fall this far (fraction) below the shallow CapsNet
    grad_floor: float = 0.1          # min layer grad norm / shallow reference median, lower bound
    chance_margin: float = 0.05      # accuracy must exceed 1/num_classes by this much
    num_classes: Optional[int] = None  # None: from data.name; unknown datasets count as 2 (strictest)
    n_boot: int = 10_000
    seed: int = 0
    confidence: float = 0.95


# ---------------------------------------------------------------------------------------------------
# Per-trial probes

def _layer_metrics(row: pd.Series, name: str) -> dict[int, float]:
    out = {}
    for col, v in row.items():
        m = _LAYER.match(str(col))
        if m and m.group("name") == name and v is not None and np.isfinite(v):
            out[int(m.group("l"))] = float(v)
    return out


def _depth_of(row: pd.Series) -> Optional[int]:
    v = row.get("model.depth")
    if v is not None and v == v and str(v).strip().lstrip("-").isdigit():
        return int(str(v).strip())
    layers = _layer_metrics(row, "grad_norm")
    return max(layers) - 1 if layers else None


def trial_probes(trials: pd.DataFrame) -> pd.DataFrame:
    """One row per trial: run_id, arch, depth and the probes of the module docstring (without
    grad_floor_ratio, which needs the reference), plus grad_min (min layer grad norm), grad_layers
    (all layer grad norms, for the reference median) and any_layer_dead (a layer with dead_frac >= 1)."""
    rows = []
    for _, r in trials.iterrows():
        depth = _depth_of(r)
        a = r.get("model.arch")
        arch = a if isinstance(a, str) and a else "capsnet"
        grads = _layer_metrics(r, "grad_norm")
        dead = _layer_metrics(r, "dead_frac")
        tree = _layer_metrics(r, "tree_score")
        dyn = _layer_metrics(r, "routing_dynamics")
        hidden_dead = [dead[l] for l in range(1, (depth or 0) + 1) if l in dead]
        routed = lambda d: [v for l, v in d.items() if l >= 1]  # noqa: E731  (l0 is never routed)
        rows.append({
            "run_id": r["run_id"], "arch": arch, "depth": depth,
            "grad_ratio": float(r.get("grad_ratio", np.nan)),
            "dead_worst": max(hidden_dead) if hidden_dead else np.nan,
            "tree_score": float(np.mean(routed(tree))) if routed(tree) else np.nan,
            "routing_dynamics": float(np.mean(routed(dyn))) if routed(dyn) else np.nan,
            "test_acc": float(r.get("test_acc", np.nan)),
            "grad_min": min(grads.values()) if grads else np.nan,
            "grad_layers": [grads[l] for l in sorted(grads)],
            "any_layer_dead": bool(dead) and max(dead.values()) >= 1.0,
        })
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------------------------
# Configurations

def config_params(param_cols: list[str]) -> list[str]:
    return [p for p in param_cols if p not in NON_CONFIG_PARAMS and not p.startswith(NON_CONFIG_PREFIXES)]


def varying(trials: pd.DataFrame, cols: list[str]) -> list[str]:
    """Params whose value differs between trials (a param missing from some runs counts as a value)."""
    return [c for c in cols if trials[c].fillna("<unset>").astype(str).nunique() > 1]


def short_names(cols: list[str]) -> dict[str, str]:
    """`model.depth` -> `depth` unless two sections share the leaf name."""
    leaves = [c.split(".")[-1] for c in cols]
    return {c: (leaf if leaves.count(leaf) == 1 else c) for c, leaf in zip(cols, leaves)}


def assign_configs(trials: pd.DataFrame, param_cols: list[str]) -> tuple[pd.Series, dict, list[str]]:
    """Config id per trial ('c00', ... ordered by arch, depth, then the swept values), the label of each
    id (its swept params, e.g. 'depth=2 iterations=3'), and the swept (varying) config params."""
    cols = config_params(param_cols)
    swept = varying(trials, cols)
    keys = trials[cols].fillna("").astype(str).apply(tuple, axis=1) if cols else \
        pd.Series([()] * len(trials), index=trials.index)
    names = short_names(swept)

    def sort_key(k):
        d = dict(zip(cols, k))
        depth = d.get("model.depth", "")
        return (d.get("model.arch", "capsnet") != "capsnet", _as_number(depth),
                tuple(_as_number(d[c]) for c in swept))
    ordered = sorted(set(keys), key=sort_key)
    ids = {k: f"c{i:02d}" for i, k in enumerate(ordered)}
    labels = {}
    for k, cid in ids.items():
        d = dict(zip(cols, k))
        labels[cid] = " ".join(f"{names[c]}={d[c]}" for c in swept) or "(single configuration)"
    return keys.map(ids), labels, swept


def _as_number(v) -> tuple:
    """Sort numbers numerically and before strings."""
    try:
        return (0, float(v), "")
    except (TypeError, ValueError):
        return (1, 0.0, str(v))


def factor_kind(values: pd.Series) -> str:
    """'bool' (all true/false), 'numeric' (all parse as numbers) or 'categorical'."""
    s = values.dropna().astype(str).str.strip().str.lower()
    if len(s) and s.isin(["true", "false"]).all():
        return "bool"
    try:
        s.astype(float)
        return "numeric"
    except ValueError:
        return "categorical"


def factor_values(values: pd.Series, kind: str) -> list:
    if kind == "bool":
        return [None if v is None or v != v else float(str(v).strip().lower() == "true") for v in values]
    if kind == "numeric":
        return [None if v is None or v != v else float(v) for v in values]
    return [None if v is None or v != v else str(v) for v in values]


def num_classes_of(trials: pd.DataFrame, th: Thresholds) -> tuple[int, str]:
    if th.num_classes:
        return th.num_classes, "given"
    names = set(trials.get("data.name", pd.Series(dtype=str)).dropna().astype(str))
    known = [NUM_CLASSES[n] for n in names if n in NUM_CLASSES]
    if names and len(known) == len(names):
        return min(known), f"from data.name ({', '.join(sorted(names))})"
    return 2, (f"dataset {', '.join(sorted(names)) or '(unknown)'} has no known class count; "
               "chance taken as 1/2 (the strictest); pass --num-classes")


def annotate(data) -> tuple[pd.DataFrame, dict, list[str]]:
    """The sweep's trial table with `config_id`, arch, depth and the per-trial probes joined on; the
    label of each config id; the swept config params. Shared by the verdict and the plots."""
    trials = data.trials.copy()
    cfg_ids, labels, swept = assign_configs(trials, data.param_cols)
    trials["config_id"] = cfg_ids.to_numpy()
    probes = trial_probes(trials).set_index("run_id")
    probes = probes[[c for c in probes.columns if c not in trials.columns]]  # grad_ratio, test_acc: as logged
    trials = trials.join(probes, on="run_id")
    for p in PROBES:
        if p not in trials:
            trials[p] = np.nan
    return trials, labels, swept


# ---------------------------------------------------------------------------------------------------
# The verdict

def compute_verdict(data, th: Optional[Thresholds] = None, annotated: Optional[tuple] = None) -> dict:
    """The verdict for a SweepData (analysis.load) as a JSON-able dict whose first key is 'escaped'.
    annotated: `annotate(data)` when the caller has it already (the report needs it too)."""
    th = th or Thresholds()
    trials, labels, swept = annotated or annotate(data)
    n_classes, classes_how = num_classes_of(trials, th)
    chance_floor = 1.0 / n_classes + th.chance_margin
    ok = trials["status"] == "finished"
    ref_pool = trials[ok & (trials["arch"] == "capsnet") & (trials["depth"] == 0)]
    match_cols = [c for c in swept if c not in ({"model.depth"} | HIDDEN_SHAPE_PARAMS)]
    notes = list(data.notes)
    if ref_pool.empty:
        notes.append("the sweep has no finished depth-0 CapsNet: accuracy and gradient-floor checks "
                     "cannot be made, so no configuration can escape")
    if classes_how != "given" and not classes_how.startswith("from"):
        notes.append(classes_how)

    configs, escapes = [], []
    for cid in sorted(set(trials["config_id"])):
        g = trials[trials["config_id"] == cid]
        fin = g[g["status"] == "finished"]
        first = g.iloc[0]
        arch, depth = first["arch"], first["depth"]
        depth = None if depth is None or depth != depth else int(depth)
        role = "baseline" if arch != "capsnet" else ("reference" if depth == 0 else "candidate")
        ref = _reference(first, ref_pool, match_cols)
        fin = fin.assign(grad_floor_ratio=fin["grad_min"] / ref["grad_norm_median"]
                         if ref["grad_norm_median"] else np.nan)
        figs = {p: bootstrap_mean(fin[p].tolist(), th.n_boot, th.seed, th.confidence) for p in FIGURES}
        bad = g[g["status"] != "finished"]
        reasons = _reasons(figs, bad, fin, ref, th, chance_floor) if role == "candidate" else []
        escaped = role == "candidate" and not reasons
        verdict = {"candidate": "escaped" if escaped else "not escaped",
                   "reference": "reference (depth 0)", "baseline": f"baseline ({arch})"}[role]
        entry = {
            "id": cid, "label": labels[cid], "role": role, "arch": arch, "depth": depth,
            "params": {c: _plain(first.get(c)) for c in swept},
            "verdict": verdict, "escaped": escaped, "reasons": reasons,
            "n_seeds": int(len(fin)), "seeds": [_plain(s) for s in fin["seed"]],
            "statuses": {str(k): int(v) for k, v in g["status"].value_counts().items()},
            "figures": {p: figs[p].as_dict() for p in FIGURES},
            "reference": {k: _plain(v) for k, v in ref.items()},
            "run_ids": list(g["run_id"]),
        }
        if escaped and len(fin) == 1:
            notes.append(f"{cid} escapes on a single seed: its interval is that seed's value")
        configs.append(entry)
        if escaped:
            escapes.append({"id": cid, "label": labels[cid]})

    failed = [{"run_id": r["run_id"], "trial_id": _plain(r["trial_id"]), "seed": _plain(r["seed"]),
               "status": r["status"], "error": r.get("error") or "", "config_id": r["config_id"],
               "label": labels[r["config_id"]]}
              for _, r in trials[trials["status"] != "finished"].iterrows()]
    trend_rows = compute_trends(trials[ok & (trials["arch"] == "capsnet")], swept)
    n_cand = sum(c["role"] == "candidate" for c in configs)
    answer = (f"Yes: {len(escapes)} of {n_cand} candidate configuration(s) (CapsNet, depth >= 1) escape "
              f"vanishing gradients and capsule starvation: {', '.join(e['id'] for e in escapes)}"
              if escapes else
              f"No: none of {n_cand} candidate configuration(s) (CapsNet, depth >= 1) escapes "
              "vanishing gradients and capsule starvation")
    status_counts = trials["status"].value_counts()
    return {
        "escaped": "yes" if escapes else "no",
        "answer": answer,
        "experiment": data.experiment, "sweep": data.sweep, "tracking_uri": data.tracking_uri,
        "parent_run_id": data.parent_run_id,
        "thresholds": {**asdict(th), "num_classes": n_classes, "num_classes_source": classes_how,
                       "chance_accuracy_floor": chance_floor,
                       "dead_tau": sorted({_plain(v) for v in trials.get("train.dead_tau", pd.Series(
                           dtype=str)).dropna()}) or "training default (0.01)"},
        "rules": RULES,
        "counts": {"trials": int(len(trials)), "configurations": len(configs), "candidates": n_cand,
                   **{s: int(status_counts.get(s, 0)) for s in STATUS_ORDER},
                   **{str(s): int(n) for s, n in status_counts.items() if s not in STATUS_ORDER}},
        "swept_params": swept,
        "escapes": escapes,
        "configurations": configs,
        "failed_trials": failed,
        "trends": [t.as_dict() for t in trend_rows],
        "notes": notes,
    }


RULES = [
    "every seed finished (diverged, failed, stopped-early, interrupted, running or incomplete seeds count "
    "against the configuration)",
    "grad_ratio: lower bound of the interval >= grad_ratio_min",
    "worst hidden layer's dead_frac: upper bound <= dead_frac_max",
    "test_acc: lower bound >= the shallow (depth-0) CapsNet's mean test_acc - acc_tolerance",
    "gradient floor: lower bound of (min over layers of grad_norm / the shallow reference's median "
    "layer grad_norm) >= grad_floor",
    "no seed has a capsule layer with every capsule dead (dead_frac = 1)",
    "test_acc: lower bound >= 1/num_classes + chance_margin",
]


def _reference(first: pd.Series, pool: pd.DataFrame, match_cols: list[str]) -> dict:
    """The shallow reference for a configuration: matched depth-0 CapsNet trials, else all of them."""
    if pool.empty:
        return {"how": "none", "n_trials": 0, "acc_mean": None, "grad_norm_median": None}
    sel = pool
    for c in match_cols:
        sel = sel[sel[c].fillna("").astype(str) == ("" if first.get(c) != first.get(c) else str(first.get(c)))]
    how = "matched"
    if sel.empty:
        sel, how = pool, "pooled"
    layers = [v for lst in sel["grad_layers"] for v in lst]
    return {"how": how, "n_trials": int(len(sel)), "acc_mean": float(sel["test_acc"].mean()),
            "grad_norm_median": float(np.median(layers)) if layers else None}


def _reasons(figs: dict[str, Interval], bad: pd.DataFrame, fin: pd.DataFrame, ref: dict,
             th: Thresholds, chance_floor: float) -> list[str]:
    """Why a candidate does not escape (empty: it escapes). One short sentence per failed check."""
    out = []
    if len(bad):
        counts = bad["status"].value_counts()
        out.append("seeds not finished: " + ", ".join(f"{n} {s}" for s, n in counts.items()))
    if fin.empty:
        out.append("no finished seed")
        return out
    gr, dw, acc, fl = figs["grad_ratio"], figs["dead_worst"], figs["test_acc"], figs["grad_floor_ratio"]
    if not (gr.lo >= th.grad_ratio_min):
        out.append(f"vanishing gradients: grad_ratio lower bound {_f(gr.lo)} < {th.grad_ratio_min:g}")
    if not (dw.hi <= th.dead_frac_max):
        out.append(f"starved capsules: worst hidden dead_frac upper bound {_f(dw.hi)} > {th.dead_frac_max:g}")
    if ref["acc_mean"] is None:
        out.append("no depth-0 CapsNet reference to compare accuracy and gradient norms with")
    else:
        need = ref["acc_mean"] - th.acc_tolerance
        if not (acc.lo >= need):
            out.append(f"accuracy below the shallow CapsNet: test_acc lower bound {_f(acc.lo)} < {_f(need)}")
        if not (fl.lo >= th.grad_floor):
            out.append(f"collapsed gradients: min layer grad_norm / shallow median, lower bound "
                       f"{_f(fl.lo)} < {th.grad_floor:g}")
    if fin["any_layer_dead"].any():
        out.append(f"all capsules dead in some layer ({int(fin['any_layer_dead'].sum())} seed(s))")
    if not (acc.lo >= chance_floor):
        out.append(f"accuracy near chance: test_acc lower bound {_f(acc.lo)} < {_f(chance_floor)}")
    return out


def _f(x) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.4g}"


def _plain(v):
    """numpy/pandas scalars -> plain JSON types; NaN -> None."""
    if v is None:
        return None
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        return None if not math.isfinite(float(v)) else float(v)
    if isinstance(v, (np.bool_,)):
        return bool(v)
    return v


def compute_trends(trials: pd.DataFrame, swept: list[str]) -> list:
    """Trend of each probe against each swept factor over finished CapsNet trials (one point per trial).
    Numeric factors: Spearman's rho; booleans encoded 0/1, then Spearman; categorical factors (routing
    algorithm, squash, init): Kruskal-Wallis H across levels."""
    out = []
    for factor in swept:
        if factor == "model.arch" or factor not in trials:
            continue
        kind = factor_kind(trials[factor])
        xs = factor_values(trials[factor], kind)
        for probe in PROBES:
            out.append(trend(factor, probe, xs, trials[probe].to_numpy(dtype=float), kind))
    return out


def verdict_json(verdict: dict) -> str:
    """The verdict as JSON text whose first line reads `{"escaped": "yes", "answer": ...,`."""
    head = {k: verdict[k] for k in ("escaped", "answer")}
    rest = {k: v for k, v in verdict.items() if k not in head}
    body = json.dumps(rest, indent=2, allow_nan=False, default=_plain)
    first = json.dumps(head)[:-1]  # '{"escaped": "no", "answer": "..."'
    return first + ",\n" + body[2:] + "\n"
