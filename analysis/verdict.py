"""The verdict: does any CapsNet configuration escape vanishing gradients and capsule starvation?

Definitions (every probe, every check, the special cases): docs/PROBES.md, "The verdict". In short:

Trials are grouped into configurations by all their params except the seed and bookkeeping
(`train.device`, `train.threads`, `train.progress`, `train.check_every`, `train.compile`, `data.root`,
`data.download`, `trial.*` (the runner's `trial.role` included), `sweep.*`). Roles come from arch and
depth, never from `trial.role`:
  candidate  CapsNet, depth >= 1            reference  depth 0 (CapsNet; depth-0 cnn for the controls)
  control    `model.arch=cnn`, depth >= 1: a healthy network that must pass the same checks
Per finished trial the probes are read at its best-validation epoch (the `best/<name>` metrics the
training loop logs whenever val_acc improves; a sweep from before those existed is read at its last
epoch, with a note). A metric the trial does not log there is n/a, never 0, and is never evidence:
  test_acc          test accuracy (fraction); with `test_n` and the `capsweep.test_correct` tag the
                    test set's own sampling error enters the accuracy test (paired image by image)
  grad_ratio        the logged act_grad-based `grad_ratio` (= act_grad/l1 / act_grad/l{L}), tested on
                    log10; n/a for a trial without `act_grad/l*`
  act_grad_min      the gradient floor: min over the routed capsule layers l1..l{L} of `act_grad/l{l}`,
                    on log10. The primaries (l0) are left out: their per-capsule gradient depends on
                    depth in healthy networks (docs/PROBES.md), the routed layers' does not
  act_grad_class    log10 act_grad/l{L}, the class layer: starved_frac's own yardstick
  starved_worst, dead_worst, frozen_worst
                    max over hidden layers l1..l{depth} of starved_frac/dead_frac/frozen_frac (else the
                    logged *_max); n/a at depth 0
  tree_score, routing_dynamics (+ *_null)
                    mean over routed layers of the logged statistic and of its null: reported, not
                    used by the verdict
Checks of a candidate or control, each with three outcomes (pass / fail / inconclusive) at level alpha
and a one-sided p-value (pass exactly when p <= alpha):
  seeds            no seed diverged, failed, was interrupted or is incomplete (fail); a seed stopped
                   early by the scheduler or still running leaves the configuration undecided
  accuracy         Welch non-inferiority of test_acc against the matched depth-0 reference, margin
                   acc_margin, seeds' and test set's sampling error (analysis.stats.noninferiority)
  gradient floor   the same test on log10 act_grad_min, margin grad_margin decades; since the depth-0
                   reference's floor is its class layer, passing it also holds the candidate's class
                   layer (starved_frac's yardstick) to the reference's
  grad_ratio       one-sided t bounds of mean log10 grad_ratio inside [grad_ratio_min, grad_ratio_max]:
                   a class layer that collapsed (ratio far above 1) fails as a starved first layer does
  starved / dead / frozen   one-sided t bound of the worst hidden fraction against its maximum
  chance           one-sided t bound of test_acc against 1/num_classes + chance_margin
A configuration passes its own test when every check passes (an intersection-union test: its p-value
is the largest of its checks'); it fails when one fails; otherwise it is undecided.
The sweep is a family: a candidate escapes only when its p-value survives Holm's step-down over all K
candidates of the sweep, so P(any false "yes") <= alpha whatever K and however references are shared.
A candidate that passes its own test but not Holm's is "to confirm" (`capsweep confirm`). The answer is
gated by the controls: unless every cnn control passes, `escaped` is "undecided" and the report opens
"Inconclusive". Without a reference the two reference checks are inconclusive: a candidate is never
failed for a reference the sweep lacks.
"""
from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import asdict, dataclass, replace
from typing import Optional

import numpy as np
import pandas as pd

from analysis.results import ConfigResult, Verdict
from analysis.stats import (FAIL, INCONCLUSIVE, PASS, Interval, bound_p, check_bound, finite, holm,
                            noninferiority, t_interval, split_sampling_variance, trend)
from capsmodels.catalogue import SPLIT_SIZES
from capsmodels.contract import (CANDIDATE, CNN_UNUSED_KEYS, CONTROL, FINISHED, NUM_CLASSES, REFERENCE, RUNNING,
                                 SEED_KEY, STATUSES, STOPPED, SWEEP_PARAM_PREFIX, TAG_CONFIRMS, SweepParams,
                                 decode_correct, parse_layer_metric, role_of)

# how a trial ran, not what it trained: train.check_every changes nothing, train.compile only rounding
NON_CONFIG_PARAMS = {SEED_KEY, "train.device", "train.threads", "train.progress", "train.check_every",
                     "train.compile", "data.root", "data.download"}
NON_CONFIG_PREFIXES = ("trial.", SWEEP_PARAM_PREFIX)  # bookkeeping the runner adds (trial.role, trial.config_id)
HIDDEN_SHAPE_PARAMS = {"model.num_caps", "model.caps_dim"}
MATCH_EXCLUDED = {"model.depth", "model.arch"} | HIDDEN_SHAPE_PARAMS
# Per-trial probe columns (annotate) and what the report calls them. log10 columns are shown as 10^x.
PROBES = ("test_acc", "grad_ratio", "act_grad_min", "act_grad_class", "starved_worst", "dead_worst",
          "frozen_worst", "tree_score", "routing_dynamics")
NULLS = {"tree_score": "tree_score_null", "routing_dynamics": "routing_dynamics_null"}
LOG_PROBES = {"grad_ratio", "act_grad_min", "act_grad_class"}
BEST_PREFIX = "best/"      # the training loop's best-val-epoch copy of each metric (capsmodels/train.py)
# metrics that describe the run rather than the network at an epoch: never replaced by a best/ copy
RUN_METRICS = {"epoch", "best_epoch", "time_s", "images_per_s", "peak_mem_mb", "test_n"}
CONFIRM_TOP = 3            # `capsweep confirm` defaults: the power simulation in
CONFIRM_SEEDS = 12         # tests/analysis/test_verdict_family.py picks them (>= 80% at seed noise delta/2)
CONFIRM_RANKED = 20        # candidates listed in verdict.json's confirm.ranked
# The range of each bounded probe: the figures' bounds are clipped to it (the checks use the bounds as
# computed; a t bound past 0 or 1 only says the interval is wide).
RANGES = {"test_acc": (0.0, 1.0), "starved_worst": (0.0, 1.0), "dead_worst": (0.0, 1.0),
          "frozen_worst": (0.0, 1.0), "tree_score": (0.0, 1.0), "tree_score_null": (0.0, 1.0),
          "routing_dynamics": (0.0, math.inf), "routing_dynamics_null": (0.0, math.inf)}
FIGURES = PROBES + tuple(NULLS.values())
# Every status (capsmodels/contract.py), in the order the report lists them. All but finished and
# running fail the seeds check.
STATUS_ORDER = STATUSES
TINY = float(np.finfo(float).tiny)   # an exact 0 on a log10 axis: log10(2.2e-308) = -307.7


@dataclass
class Thresholds:
    """The verdict's parameters; the report states every one of them."""
    alpha: float = 0.05              # level of every one-sided test and bound
    acc_margin: float = 0.01         # non-inferiority margin of test_acc against the reference (absolute)
    grad_margin: float = 1.0         # non-inferiority margin of log10 min act_grad (decades)
    grad_ratio_min: float = 0.1      # geometric mean grad_ratio must be shown at least this
    grad_ratio_max: float = 1000.0   # ... and at most this (a collapsed class layer gives 1e4 and more)
    starved_frac_max: float = 0.5    # worst hidden starved_frac must be shown at most this
    dead_frac_max: float = 0.5       # worst hidden dead_frac must be shown at most this
    frozen_frac_max: float = 0.5     # worst hidden frozen_frac must be shown at most this
    chance_margin: float = 0.05      # accuracy must be shown above 1/num_classes + this
    num_classes: Optional[int] = None  # None: from data.name; unknown datasets count as 2 (strictest)


# ---------------------------------------------------------------------------------------------------
# Per-trial probes

def _layer_metrics(row: pd.Series, name: str) -> dict[int, float]:
    """{l: value} of the metrics `name/l{l}` the trial logs (NaN = not logged = absent)."""
    out = {}
    for col, v in row.items():
        parsed = parse_layer_metric(col)
        if parsed and parsed[0] == name and v is not None and np.isfinite(v):
            out[parsed[1]] = float(v)
    return out


def _depth_of(row: pd.Series) -> Optional[int]:
    v = row.get("model.depth")
    if v is not None and v == v and str(v).strip().lstrip("-").isdigit():
        return int(str(v).strip())
    layers = _layer_metrics(row, "grad_norm") or _layer_metrics(row, "act_grad")
    return max(layers) - 1 if layers else None


def _log10(v: float) -> float:
    """log10 with an exact 0 taken as the smallest normal float64 (a finite, very low value)."""
    return math.nan if v is None or not v == v or v < 0 else math.log10(max(v, TINY))


def _mean_or_nan(values: list[float]) -> float:
    return float(np.mean(values)) if values else math.nan


def _worst_hidden(row: pd.Series, name: str, depth: Optional[int]) -> float:
    """max over l1..l{depth} of `name/l{l}`, else the logged `name_max`; NaN at depth 0 or when absent."""
    if not depth:
        return math.nan
    layers = _layer_metrics(row, name)
    hidden = [layers[l] for l in range(1, depth + 1) if l in layers]
    if hidden:
        return max(hidden)
    v = row.get(f"{name}_max")
    return float(v) if v is not None and np.isfinite(v) else math.nan


def trial_probes(trials: pd.DataFrame) -> pd.DataFrame:
    """One row per trial: run_id, arch, depth and the probes of the module docstring (grad_ratio and
    act_grad_min as log10), NaN where the trial does not log what a probe needs.

    Column-wise over all trials at once (a 10,000-trial sweep has about a million metric cells): the
    per-layer columns are found once, and each probe is a numpy reduction over them, with the same
    rules as the one-row helpers above (`_layer_metrics`, `_depth_of`, `_worst_hidden`): a value that
    is not finite is absent, an absent hidden layer falls back to the logged `name_max`."""
    n = len(trials)
    layer_cols: dict[str, list[tuple[int, str]]] = {}
    for col in trials.columns:                      # frame order, as `_layer_metrics` iterates
        parsed = parse_layer_metric(col)
        if parsed:
            layer_cols.setdefault(parsed[0], []).append((parsed[1], col))

    def matrix(name: str) -> tuple[np.ndarray, np.ndarray]:
        """(values (n, k) with non-finite -> NaN, layer index of each column (k,))."""
        cols = layer_cols.get(name, [])
        if not cols:
            return np.full((n, 0), np.nan), np.zeros(0, int)
        vals = np.column_stack([pd.to_numeric(trials[c], errors="coerce").to_numpy(float) for _, c in cols])
        vals[~np.isfinite(vals)] = np.nan
        return vals, np.array([l for l, _ in cols])

    def column(name: str) -> np.ndarray:
        if name not in trials.columns:
            return np.full(n, np.nan)
        return pd.to_numeric(trials[name], errors="coerce").to_numpy(dtype=float, copy=True)

    def top_layer(name: str) -> np.ndarray:
        vals, ls = matrix(name)
        present = ~np.isnan(vals)
        return np.where(present.any(1), np.where(present, ls[None, :], -1).max(1, initial=-1), -1)

    depth: list = [None] * n
    if "model.depth" in trials.columns:
        for i, v in enumerate(trials["model.depth"].tolist()):
            if v is not None and v == v and str(v).strip().lstrip("-").isdigit():
                depth[i] = int(str(v).strip())
    top = np.where(top_layer("grad_norm") >= 0, top_layer("grad_norm"), top_layer("act_grad"))
    depth = [d if d is not None else (int(t) - 1 if t >= 0 else None) for d, t in zip(depth, top)]
    d_arr = np.array([d if d is not None else 0 for d in depth])       # 0: no hidden layer

    arch = ["capsnet"] * n
    if "model.arch" in trials.columns:
        arch = [a if isinstance(a, str) and a else "capsnet" for a in trials["model.arch"].tolist()]
    act, act_l = matrix("act_grad")
    has_act = (~np.isnan(act)).any(1)
    routed = np.where(act_l[None, :] >= 1, act, np.nan)      # l1..l{L}: the primaries (l0) left out
    has_routed = (~np.isnan(routed)).any(1)
    top_act = np.where(has_act, np.where(~np.isnan(act), act_l[None, :], -1).max(1, initial=-1), -1)
    with np.errstate(invalid="ignore", divide="ignore"):
        act_min = np.where(has_routed, np.nanmin(np.where(np.isnan(routed), np.inf, routed), axis=1,
                                                 initial=np.inf), np.nan)
        at_top = act_l[None, :] == top_act[:, None]
        act_class = np.where(at_top & ~np.isnan(act), act, -np.inf).max(1, initial=-np.inf)
        act_class = np.where(top_act >= 1, act_class, np.nan)
        out = {"run_id": trials["run_id"].tolist(), "arch": arch, "depth": depth,
               "test_acc": column("test_acc").tolist(),
               "grad_ratio": np.where(has_act, _log10_array(column("grad_ratio")), np.nan).tolist(),
               "act_grad_min": _log10_array(act_min).tolist(),
               "act_grad_class": _log10_array(act_class).tolist()}
        for probe, metric in (("starved_worst", "starved_frac"), ("dead_worst", "dead_frac"),
                              ("frozen_worst", "frozen_frac")):
            vals, ls = matrix(metric)
            hidden = (ls[None, :] >= 1) & (ls[None, :] <= d_arr[:, None]) & ~np.isnan(vals)
            worst = np.where(hidden, vals, -np.inf).max(1, initial=-np.inf)
            fallback = column(f"{metric}_max")
            fallback[~np.isfinite(fallback)] = np.nan
            out[probe] = np.where(d_arr == 0, np.nan, np.where(hidden.any(1), worst, fallback)).tolist()
        for stat in ("tree_score", "routing_dynamics"):
            for name in (stat, NULLS[stat]):
                vals, ls = matrix(name)
                vals = np.ascontiguousarray(vals[:, ls >= 1])
                full = ~np.isnan(vals).any(1) & (vals.shape[1] > 0)
                mean = np.full(n, np.nan)
                if full.any():              # the same reduction np.mean makes of the row as a list
                    mean[full] = vals[full].mean(1)
                for i in np.flatnonzero(~full):
                    mean[i] = _mean_or_nan([v for v in vals[i] if v == v])
                out[name] = mean.tolist()
    return pd.DataFrame(out, columns=["run_id", "arch", "depth", *FIGURES])


def _log10_array(v: np.ndarray) -> np.ndarray:
    """`_log10` elementwise: NaN for NaN or negative values, an exact 0 as the smallest normal float."""
    v = np.asarray(v, dtype=float)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(np.isnan(v) | (v < 0), np.nan, np.log10(np.maximum(v, TINY)))


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
    strings = [trials[c].fillna("").astype(str).tolist() for c in cols]
    keys = pd.Series(list(zip(*strings)) if cols else [()] * len(trials), index=trials.index, dtype=object)
    names = short_names(swept)

    def sort_key(k):
        d = dict(zip(cols, k))
        return (d.get("model.arch", "capsnet") != "capsnet", _as_number(d.get("model.depth", "")),
                tuple(_as_number(d[c]) for c in swept))
    ordered = sorted(set(keys), key=sort_key)
    ids = {k: f"c{i:02d}" for i, k in enumerate(ordered)}
    labels = {}
    for k, cid in ids.items():
        d = dict(zip(cols, k))
        # a cnn's label leaves out what a cnn does not read (routing, iterations, ...: CNN_UNUSED_KEYS)
        shown = [c for c in swept if not (d.get("model.arch") == "cnn" and c in CNN_UNUSED_KEYS)]
        labels[cid] = " ".join(f"{names[c]}={d[c]}" for c in shown) or "(single configuration)"
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


def scored(trials: pd.DataFrame) -> pd.DataFrame:
    """The trial table with each trial's metrics as of its best-validation epoch, and `scored_at`.

    The training loop logs `best/<name>` beside `<name>` at every epoch where val_acc improves, so the
    latest `best/<name>` is the best-val epoch's value. A trial with any `best/` metric is read from
    them alone (a metric it did not log at that epoch is n/a, never another epoch's value); a trial
    without (a sweep from before, or a diverged first epoch) keeps its last epoch. Why: a fixed budget
    read at its last epoch confounds depth with convergence speed (docs/PROBES.md)."""
    best_cols = [c for c in trials.columns if str(c).startswith(BEST_PREFIX)]
    out = trials
    if not best_cols:
        return out.assign(scored_at="last epoch")
    has_best = trials[best_cols].notna().any(axis=1).to_numpy()
    base = {str(c)[len(BEST_PREFIX):] for c in best_cols}
    metric_like = [c for c in trials.columns if c in base or parse_layer_metric(c) or str(c) in _SCORED_SCALARS]
    replaced = {}
    for c in metric_like:
        if c in RUN_METRICS:
            continue
        best = trials.get(BEST_PREFIX + c)
        values = pd.to_numeric(trials[c], errors="coerce").to_numpy(float)
        replaced[c] = np.where(has_best, best.to_numpy(float) if best is not None else np.nan, values)
    replaced["scored_at"] = np.where(has_best, "best-val epoch", "last epoch")
    # one concat, in the table's column order: assigning a column at a time fragments a wide frame
    new = pd.DataFrame(replaced, index=trials.index)
    return pd.concat([out.drop(columns=[c for c in replaced if c in out.columns]), new], axis=1)[
        [*trials.columns, "scored_at"]]


# scalar metrics the verdict reads, replaced by their best/ copy (the per-layer ones: parse_layer_metric)
_SCORED_SCALARS = {"test_acc", "test_loss", "val_acc", "val_loss", "train_acc", "train_loss", "grad_ratio",
                   "test_acc_transformed", "dead_frac_max", "starved_frac_max", "frozen_frac_max"}


def annotate(data) -> tuple[pd.DataFrame, dict, list[str]]:
    """The sweep's trial table, scored at each trial's best-val epoch (`scored`), with `config_id`,
    `role`, arch, depth and the per-trial probes joined on (probe columns replace logged metrics of the
    same name: `grad_ratio` becomes its log10); the label of each config id; the swept config params.
    Shared by the verdict and the plots."""
    trials = scored(data.trials)
    cfg_ids, labels, swept = assign_configs(trials, data.param_cols)
    probes = trial_probes(trials)
    probes["role"] = [role_of(a, None if d is None or d != d else int(d))
                      for a, d in zip(probes["arch"], probes["depth"])]
    probes["config_id"] = cfg_ids.to_numpy()
    probes = probes.set_index("run_id")
    trials = trials.drop(columns=[c for c in probes.columns if c in trials.columns]).join(probes, on="run_id")
    return trials, labels, swept


# ---------------------------------------------------------------------------------------------------
# The reference of a configuration

def reference_pool(trials: pd.DataFrame) -> pd.DataFrame:
    """Finished depth-0 trials (any arch): where references are drawn from."""
    return trials[(trials["status"] == FINISHED) & (trials["depth"] == 0)]


def find_reference(first: pd.Series, pool: pd.DataFrame, match_cols: list[str], source: str) -> dict:
    """The depth-0 reference of a configuration whose first trial is `first`: the trials of `pool` of
    the same arch (a control without a depth-0 cnn falls back to the depth-0 CapsNet), narrowed param by
    param (match_cols: all config params but depth, arch and the hidden shape) to those agreeing with
    it; a param on which no trial agrees is skipped and named ('matched except ...': a sampled value the
    runner could not match in advance), and when none agrees the whole arch is pooled ('pooled').
    Returns {'how', 'arch', 'source', 'n_trials', 'run_ids', 'unmatched', 'trials'}."""
    arch = first["arch"]
    sel = pool[pool["arch"] == arch]
    fallback = ""
    if sel.empty and arch != "capsnet":
        sel, fallback = pool[pool["arch"] == "capsnet"], f" (no depth-0 {arch}: the depth-0 CapsNet)"
    if sel.empty:
        return {"how": "none", "arch": arch, "source": source, "n_trials": 0, "run_ids": [], "unmatched": [],
                "trials": sel}
    matched, unmatched = [], []
    for c in match_cols:
        want = first.get(c)
        want = "" if want is None or want != want else str(want)
        narrowed = sel[sel[c].fillna("").astype(str) == want]
        if narrowed.empty:
            unmatched.append(c)
        else:
            sel = narrowed
            matched.append(c)
    how = ("pooled" if unmatched and not matched else
           f"matched except {', '.join(unmatched)}" if unmatched else "matched")
    return {"how": how + fallback, "arch": str(sel["arch"].iloc[0]), "source": source,
            "n_trials": int(len(sel)), "run_ids": list(sel["run_id"]), "unmatched": unmatched, "trials": sel}


def reference_finder(pool: pd.DataFrame, match_cols: list[str], source: str):
    """`find_reference` for many configurations of one pool: the pool's match columns are turned into
    strings once, each narrowing is a numpy mask, and configurations that want the same (arch,
    values) share one answer. Returns first -> the same dict `find_reference` returns."""
    arch = pool["arch"].to_numpy(dtype=object)
    strings = {c: pool[c].fillna("").astype(str).to_numpy(dtype=object) for c in match_cols}
    cache: dict = {}

    def want(first: pd.Series, c: str) -> str:
        v = first.get(c)
        return "" if v is None or v != v else str(v)

    def find(first: pd.Series) -> dict:
        key = (first["arch"], tuple(want(first, c) for c in match_cols))
        if key in cache:
            return cache[key]
        a, fallback = first["arch"], ""
        mask = arch == a
        if not mask.any() and a != "capsnet":
            mask, fallback = arch == "capsnet", f" (no depth-0 {a}: the depth-0 CapsNet)"
        if not mask.any():
            cache[key] = {"how": "none", "arch": a, "source": source, "n_trials": 0, "run_ids": [],
                          "unmatched": [], "trials": pool[mask]}
            return cache[key]
        matched, unmatched = [], []
        for c, w in zip(match_cols, key[1]):
            narrowed = mask & (strings[c] == w)
            if narrowed.any():
                mask = narrowed
                matched.append(c)
            else:
                unmatched.append(c)
        how = ("pooled" if unmatched and not matched else
               f"matched except {', '.join(unmatched)}" if unmatched else "matched")
        sel = pool[mask]
        cache[key] = {"how": how + fallback, "arch": str(sel["arch"].iloc[0]), "source": source,
                      "n_trials": int(len(sel)), "run_ids": list(sel["run_id"]), "unmatched": unmatched,
                      "trials": sel}
        return cache[key]
    return find


# ---------------------------------------------------------------------------------------------------
# Checks

def _check(name: str, outcome: str, text: str, p_value: float = 1.0, **detail) -> dict:
    """One check's record. p_value: its one-sided p-value (pass exactly when p <= alpha; 1.0 when
    there is no test), the number the configuration's intersection-union p-value is the largest of."""
    return {"name": name, "outcome": outcome, "text": text, "p_value": _plain(p_value),
            **{k: _plain(v) if not isinstance(v, dict) else v for k, v in detail.items()}}


def _seeds_check(statuses: list[str]) -> dict:
    """Seeds that did not finish. A diverged, failed, interrupted or incomplete seed fails the
    configuration; one stopped early by the scheduler (ASHA) or still running leaves it undecided:
    its result is unknown, and judging on the survivors alone would favour the configuration (ASHA
    stops the worst), so a stopped seed neither fails nor passes it."""
    bad = [s for s in statuses if s != FINISHED]
    if not bad:
        return _check("seeds", PASS, f"all {len(statuses)} seed(s) finished", 0.0)
    counts = ", ".join(f"{n} {s}" for s, n in Counter(bad).most_common())
    if all(s in (RUNNING, STOPPED) for s in bad):
        why = ("stopped early by the scheduler: their results are unknown, so the configuration is not "
               "judged on its survivors (confirm on fresh seeds)" if STOPPED in bad else "still running")
        return _check("seeds", INCONCLUSIVE, f"seeds not finished ({counts}): {why}")
    return _check("seeds", FAIL, f"seeds not finished: {counts}")


def _bound_check(name: str, iv: Interval, threshold: float, good: str, what: str, absent: str,
                 log: bool = False) -> dict:
    """A one-sample three-way check, its sentence naming the bound that decided it."""
    show = (lambda x: _f(10 ** x) if x is not None and math.isfinite(x) else _f(x)) if log else _f
    thr = show(threshold)
    if iv.n == 0:
        return _check(name, INCONCLUSIVE, f"{what}: n/a ({absent})", n=0, threshold=threshold)
    outcome = check_bound(iv, threshold, good)
    p = bound_p(iv, threshold, good)
    detail = dict(mean=iv.mean, lo=iv.lo, hi=iv.hi, n=iv.n, threshold=threshold, log10=log)
    rel = "at least" if good == "above" else "at most"
    if iv.n == 1:
        return _check(name, outcome, f"{what} {show(iv.mean)} on one seed: no interval, "
                                     f"cannot show it is {rel} {thr}", p, **detail)
    if outcome == PASS:
        bound = iv.lo if good == "above" else iv.hi
        text = f"{what}: bound {show(bound)} is {rel} {thr}"
    elif outcome == FAIL:
        bound = iv.hi if good == "above" else iv.lo
        text = f"{what}: mean {show(iv.mean)}, even its {'upper' if good == 'above' else 'lower'} bound " \
               f"{show(bound)} is {'below' if good == 'above' else 'above'} {thr}"
    else:
        text = f"{what}: mean {show(iv.mean)}, interval [{show(iv.lo)}, {show(iv.hi)}] contains {thr}"
    return _check(name, outcome, text, p, **detail)


def _band_check(name: str, iv: Interval, low: float, high: float, what: str, absent: str) -> dict:
    """Two one-sided bounds on a log10 probe: pass when lo >= low and hi <= high, fail when the
    whole interval is below low or above high; p = the larger of the two one-sided p-values."""
    above = _bound_check(name, iv, low, "above", what, absent, log=True)
    below = _bound_check(name, iv, high, "below", what, absent, log=True)
    if iv.n == 0:
        return above
    p = max(above["p_value"], below["p_value"])
    if FAIL in (above["outcome"], below["outcome"]):
        failed = above if above["outcome"] == FAIL else below
        return {**failed, "p_value": p, "threshold": [low, high]}
    if above["outcome"] == below["outcome"] == PASS:
        text = (f"{what}: bounds [{_f(10 ** iv.lo)}, {_f(10 ** iv.hi)}] lie within "
                f"[{_f(10 ** low)}, {_f(10 ** high)}]")
        return {**above, "text": text, "p_value": p, "threshold": [low, high]}
    undecided = above if above["outcome"] != PASS else below
    return {**undecided, "p_value": p, "threshold": [low, high]}


def _ni_check(name: str, cand: list[float], ref: Optional[dict], margin: float, alpha: float,
              probe: str, what: str, unit: str, absent: str, test_var: tuple = (0.0, ""),
              family: Optional[int] = None) -> dict:
    """Non-inferiority of the candidate's `probe` against the reference's, as a check record.
    test_var: (tau^2, how) of the test set's sampling (accuracy only). family: the number of
    candidates Holm's first step divides alpha by, to state the power the family-wise test has."""
    if ref is None or ref["how"] == "none":
        return _check(name, INCONCLUSIVE, f"{what}: no depth-0 reference in the sweep (add depth-0 CapsNet "
                                          "trials or pass --reference SWEEP): not tested")
    ref_vals = finite(ref["trials"][probe].tolist())
    if len(finite(cand)) == 0 or len(ref_vals) == 0:
        return _check(name, INCONCLUSIVE, f"{what}: n/a ({absent})")
    r = noninferiority(cand, ref_vals, margin, alpha, test_var[0])
    d = r.as_dict()
    if test_var[1]:
        d["test_set"] = test_var[1]
    if family and family > 1:
        d["power_family"] = _plain(r.power_at(alpha / family))
    iv = f"diff {_f(r.diff, signed=True)}{unit}, bounds [{_f(r.lo, signed=True)}, {_f(r.hi, signed=True)}]"
    power = f"; power {r.power:.2f} at the observed noise" if r.power is not None else ""
    if r.outcome == PASS:
        text = f"{what}: non-inferior to the reference ({iv}; lower bound > -{margin:g}{unit})"
    elif r.outcome == FAIL:
        text = f"{what}: worse than the reference by more than the margin ({iv}; upper bound < -{margin:g}{unit})"
    else:
        text = f"{what}: not decided ({iv} contain -{margin:g}{unit}; {r.how}{power})"
    return _check(name, r.outcome, text, r.p_value, test=d)


def config_checks(fin: dict[str, list[float]], statuses: list[str], ref: Optional[dict], th: Thresholds,
                  chance_floor: float, intervals: Optional[dict] = None,
                  test_var: tuple = (0.0, ""), family: Optional[int] = None) -> list[dict]:
    """Every check of a candidate or control (module docstring) on its finished seeds: `fin` maps each
    probe (PROBES) to its values over them, `statuses` is every seed's status.
    intervals: t_interval of each probe of `fin` at th.alpha when the caller has them already.
    test_var: the test set's sampling variance of the accuracy difference (`split_sampling_variance`)."""
    a = th.alpha
    if not fin["test_acc"]:
        return [_seeds_check(statuses)] + [_check(name, INCONCLUSIVE, f"{name}: no finished seed to test")
                                           for name in CHECK_NAMES[1:]]
    iv = intervals if intervals is not None else {p: t_interval(fin[p], a) for p in PROBES}
    log_min = math.log10(th.grad_ratio_min) if th.grad_ratio_min > 0 else -math.inf
    log_max = math.log10(th.grad_ratio_max) if th.grad_ratio_max > 0 else math.inf
    return [
        _seeds_check(statuses),
        _ni_check("accuracy", fin["test_acc"], ref, th.acc_margin, a, "test_acc",
                  "accuracy vs depth-0 reference", "", "no test_acc", test_var, family),
        _ni_check("gradient floor", fin["act_grad_min"], ref, th.grad_margin, a, "act_grad_min",
                  "gradient floor (log10 min act_grad over l1..l{L}) vs depth-0 reference", " decades",
                  "act_grad/l* not logged"),
        _band_check("grad_ratio", iv["grad_ratio"], log_min, log_max, "grad_ratio (geometric mean)",
                    "grad_ratio on act_grad not logged"),
        _bound_check("starved", iv["starved_worst"], th.starved_frac_max, "below",
                     "worst hidden starved_frac", "starved_frac/l* not logged"),
        _bound_check("dead", iv["dead_worst"], th.dead_frac_max, "below", "worst hidden dead_frac",
                     "dead_frac/l* not logged"),
        _bound_check("frozen", iv["frozen_worst"], th.frozen_frac_max, "below", "worst hidden frozen_frac",
                     "frozen_frac/l* not logged"),
        _bound_check("chance", iv["test_acc"], chance_floor, "above", "test_acc against chance",
                     "no test_acc"),
    ]


CHECK_NAMES = ("seeds", "accuracy", "gradient floor", "grad_ratio", "starved", "dead", "frozen", "chance")


def decide(checks: list[dict]) -> str:
    """'pass' when every check passes, 'fail' when one fails, else 'inconclusive'."""
    outcomes = {c["outcome"] for c in checks}
    return FAIL if FAIL in outcomes else PASS if outcomes == {PASS} else INCONCLUSIVE


def iut_p(checks: list[dict]) -> float:
    """The configuration's p-value as an intersection-union test: the largest of its checks' (it
    passes every check at level alpha exactly when this is <= alpha)."""
    return max((c["p_value"] if c["p_value"] is not None else 1.0) for c in checks) if checks else 1.0


TO_CONFIRM = "to confirm"
VERDICT_WORDS = {CANDIDATE: {PASS: "escaped", FAIL: "not escaped", INCONCLUSIVE: "undecided",
                             TO_CONFIRM: TO_CONFIRM},
                 CONTROL: {PASS: "passes", FAIL: "fails", INCONCLUSIVE: "undecided"}}
# The sweep's outcome: `escaped` in verdict.json is yes / no / undecided; `outcome` also says why not
OUTCOMES = ("yes", "no", "undecided", "inconclusive", TO_CONFIRM)


def family_step(cands: list[ConfigResult], alpha: float, vouched: bool = True) -> None:
    """Holm's step-down over the K candidates' intersection-union p-values, in place: each gets
    `p_holm`; a candidate that passes every check escapes when p_holm <= alpha, and is otherwise
    'to confirm'. Holm holds the family-wise error at alpha under any dependence between candidates
    (a shared reference included): P(any candidate that truly does not escape is called escaped) <=
    alpha, whatever K (tests/analysis/test_verdict_calibration.py simulates it at K = 40 and 400).
    `vouched`: whether the healthy controls pass the same checks; while they do not, no candidate is
    called escaped (a family-wise pass is then what to confirm, as the sweep's answer says)."""
    adjusted = holm([c.p_value for c in cands])
    for c, p in zip(cands, adjusted):
        c.p_holm = _plain(p)
        if c.outcome == PASS:
            survives = p is not None and p <= alpha
            c.escaped = survives and vouched
            c.verdict = VERDICT_WORDS[CANDIDATE][PASS if c.escaped else TO_CONFIRM]
            if not survives:
                c.reasons = [f"passes its own test (p = {_f(c.p_value)}) but not the sweep-wide one "
                             f"(Holm over {len(cands)} candidates: p = {_f(p)} > {alpha:g}): confirm it "
                             "on fresh seeds"]
            elif not vouched:
                c.reasons = ["passes every check and the sweep-wide test, but the healthy control does not "
                             "pass the same checks: confirm it on fresh seeds beside a control that does"]


# ---------------------------------------------------------------------------------------------------
# The verdict

def select_on_validation(trials: pd.DataFrame, param_cols: list[str], select: list[str]) -> dict:
    """Tuning on validation (docs/PROBES.md, "Tuned on validation"): configurations that differ only in
    the `select` keys (e.g. train.lr) form a group; the one with the best mean val_acc over its finished
    seeds (at each trial's best-val epoch) is the group's, the others are not judged. Test accuracy is
    never looked at, so the selection does not bias the test the verdict reports.
    Returns config_id -> {'selected': bool, 'val': mean val_acc, 'winner': the group's config_id}."""
    cols = [c for c in config_params(param_cols) if c not in select]
    fin = trials[trials["status"] == FINISHED]
    val = pd.to_numeric(fin["val_acc"], errors="coerce") if "val_acc" in fin else pd.Series(np.nan, index=fin.index)
    means = val.groupby(fin["config_id"]).mean()
    groups = trials.drop_duplicates("config_id").set_index("config_id")[cols].fillna("").astype(str)
    out = {}
    for _, members in groups.groupby(cols, sort=False) if cols else [((), groups)]:
        ids = list(members.index)
        scored = [(means.get(i, np.nan), i) for i in ids]
        ok = [(v, i) for v, i in scored if v == v]
        winner = min(ok, key=lambda vi: (-vi[0], vi[1]))[1] if ok else None    # best val; ties: first id
        for v, i in scored:
            out[i] = {"selected": i == winner, "val": _plain(v), "winner": winner}
    return out


def _select_keys(data, select: Optional[list]) -> list[str]:
    """`select` as given, else the sweep's own (`select:` in its spec, logged as param sweep.select)."""
    if select is not None:
        return list(select)
    return SweepParams.from_params((getattr(data, "parent_record", None) or {}).get("params") or {}).select


def compute_verdict(data, th: Optional[Thresholds] = None, annotated: Optional[tuple] = None,
                    reference=None, select: Optional[list] = None) -> Verdict:
    """The verdict for a SweepData (analysis.load): a typed Verdict (analysis/results.py) with one
    ConfigResult per configuration. Its `escaped` is 'yes' | 'no' | 'undecided', `instrument`
    'validated' | 'control failed' | 'control undecided' | 'no control', `outcome` one of OUTCOMES (also
    'inconclusive' and 'to confirm'); verdict.json is `verdict_json(verdict)`. annotated: `annotate(data)` when the caller has it already.
    reference: another SweepData of the same experiment whose depth-0 trials are the references
    (`capsweep report --reference SWEEP`); None: this sweep's own depth-0 trials.
    select: swept keys tuned on validation (`select_on_validation`); None: the sweep's own `select`."""
    th = th or Thresholds()
    trials, labels, swept = annotated or annotate(data)
    select = [k for k in _select_keys(data, select) if k in swept]
    chosen = select_on_validation(trials, data.param_cols, select) if select else {}
    n_classes, classes_how = num_classes_of(trials, th)
    chance_floor = 1.0 / n_classes + th.chance_margin
    notes = list(data.notes)
    if reference is not None:
        ref_trials = annotate(reference)[0]
        pool, source = reference_pool(ref_trials), f"sweep {reference.sweep}"
        shared = set(data.param_cols) & set(reference.param_cols)
        match_cols = [c for c in config_params(sorted(shared)) if c not in MATCH_EXCLUDED]
        notes += [f"reference sweep: {n}" for n in reference.notes]
    else:
        pool, source = reference_pool(trials), "this sweep"
        match_cols = [c for c in swept if c not in MATCH_EXCLUDED and c not in select]
        if chosen:       # references are tuned like the rest: each group's chosen depth-0 network
            pool = pool[[chosen.get(c, {}).get("selected", True) for c in pool["config_id"]]]
    if chosen:
        n_groups = len({v["winner"] for v in chosen.values()})
        notes.append(f"tuned on validation: {', '.join(select)} chosen per configuration of the other params by "
                     f"the best mean val_acc ({n_groups} chosen of {len(chosen)} configurations; the others are "
                     "listed as not selected and not judged); test accuracy is what the verdict reports")
    if pool[pool["arch"] == "capsnet"].empty:
        notes.append(f"{source} has no finished depth-0 CapsNet: accuracy and gradient-floor checks cannot "
                     "be made, so candidates are undecided (never failed) on them; add depth-0 trials or "
                     "pass --reference SWEEP")
    if classes_how != "given" and not classes_how.startswith("from"):
        notes.append(classes_how)
    last = int((trials["scored_at"] == "last epoch").sum()) if "scored_at" in trials else len(trials)
    if last:
        notes.append(f"{last} of {len(trials)} trial(s) are scored at their last epoch: they do not log the "
                     "best-validation-epoch metrics (best/*), so their depth and convergence speed are "
                     "not told apart (docs/PROBES.md)")

    configs = []
    # The loop below reads a narrow copy: slicing the wide trial table (hundreds of param and metric
    # columns) per configuration cost a minute at 10,000 trials (benchmarks/report_scale.py).
    narrow = trials[_narrow_columns(trials, swept, match_cols)]
    pool = pool[_narrow_columns(pool, [], match_cols)]
    cols = {c: narrow[c].tolist() for c in narrow.columns if c not in FIGURES}    # python values, once
    figures = narrow[list(FIGURES)].to_numpy(dtype=float)                           # (trials, probes)
    finished = np.array([s == FINISHED for s in cols["status"]], dtype=bool)
    codes, uniques = pd.factorize(narrow["config_id"], sort=False)
    order = np.argsort(codes, kind="stable")                # each config's rows, in the table's order
    bounds = np.searchsorted(codes[order], np.arange(len(uniques) + 1))
    rows_of = {uniques[k]: order[bounds[k]:bounds[k + 1]] for k in range(len(uniques))}
    reference_of = reference_finder(pool, match_cols, source)
    n_cands = sum(cols["role"][rows_of[cid][0]] == CANDIDATE and chosen.get(cid, {}).get("selected", True)
                  for cid in rows_of)
    test_hows: Counter = Counter()
    for cid in sorted(rows_of):
        rows = rows_of[cid]
        fin_rows = rows[finished[rows]]
        first = {c: v[rows[0]] for c, v in cols.items()}
        arch, depth, role = first["arch"], first["depth"], first["role"]
        depth = None if depth is None or depth != depth else int(depth)
        values = figures[fin_rows]
        figs = {p: t_interval(values[:, k].tolist(), th.alpha) for k, p in enumerate(FIGURES)}
        statuses = [cols["status"][i] for i in rows]
        entry = {"id": cid, "label": labels[cid], "role": role, "arch": arch, "depth": depth,
                 "trial_role": sorted({str(v) for i in rows if pd.notna(v := cols["trial.role"][i])})
                 if "trial.role" in cols else [],
                 "params": {c: _plain(first.get(c)) for c in swept}}
        pick = chosen.get(cid)
        if pick is not None and not pick["selected"]:
            entry.update(verdict="not selected", outcome=None, escaped=False, checks=[], reference=None,
                         p_value=None, selected=False,
                         reasons=[f"tuned on validation: mean val_acc {_f(pick['val'])} below the chosen "
                                  f"{pick['winner']}'s {_f(chosen[pick['winner']]['val']) if pick['winner'] else 'n/a'}"])
        elif role == REFERENCE:
            entry.update(verdict=f"reference (depth-0 {arch})", outcome=None, escaped=False)
        else:
            ref = reference_of(first)
            fin = {p: values[:, k].tolist() for k, p in enumerate(FIGURES)}
            tv = _test_variance(cols, fin_rows, ref, values[:, FIGURES.index("test_acc")])
            test_hows[tv[1].split(" over ")[0]] += 1
            checks = config_checks(fin, statuses, ref, th, chance_floor, figs, tv,
                                   n_cands if role == CANDIDATE else None)
            outcome = decide(checks)
            entry.update(verdict=VERDICT_WORDS[role][outcome], outcome=outcome,
                         escaped=role == CANDIDATE and outcome == PASS, checks=checks,
                         reasons=[c["text"] for c in checks if c["outcome"] != PASS],
                         reference={k: v for k, v in ref.items() if not k.startswith("_") and k != "trials"},
                         p_value=iut_p(checks))
        configs.append(ConfigResult(
            **entry, n_seeds=int(len(fin_rows)), seeds=[_plain(cols["seed"][i]) for i in fin_rows],
            statuses={str(k): int(v) for k, v in Counter(statuses).most_common()},
            figures={p: _figure_dict(p, figs[p]) for p in FIGURES},
            run_ids=[cols["run_id"][i] for i in rows]))

    cands = [c for c in configs if c.role == CANDIDATE and c.selected]
    controls = [c for c in configs if c.role == CONTROL and c.selected]
    instrument = ("no control" if not controls else "control failed" if any(c.outcome == FAIL for c in controls)
                  else "control undecided" if any(c.outcome != PASS for c in controls) else "validated")
    family_step(cands, th.alpha, vouched=instrument == "validated")
    escapes = [{"id": c.id, "label": c.label} for c in cands if c.escaped]
    nominal = [c for c in cands if c.verdict == TO_CONFIRM]
    undecided = [c.id for c in cands if c.outcome == INCONCLUSIVE]
    confirms = _confirms(data)
    outcome = _outcome(cands, escapes, nominal, undecided, instrument, confirms)
    escaped = outcome if outcome in ("yes", "no") else "undecided"
    confirm = _confirm_plan(data, trials, cands, outcome, confirms)
    few = sorted({c.id for c in cands + controls if 0 < c.n_seeds < 5})
    if few:
        notes.append(f"{len(few)} candidate/control configuration(s) have fewer than 5 finished seeds "
                     f"({', '.join(_ids(few))}): the non-inferiority test has little power there (each "
                     "undecided accuracy check states its power at the observed noise); see docs/PROBES.md")
    if test_hows.get("test-set size unknown: its sampling error is not in the standard error"):
        notes.append("the test set's size is unknown for some configurations (no test_n metric or "
                     "data.test_size): their accuracy tests leave its sampling error out")
    elif test_hows.get("binomial"):
        notes.append(f"{test_hows['binomial']} accuracy test(s) take the test set's sampling error as binomial "
                     "(no per-image correctness logged): conservative for similar models")

    failed = [{"run_id": r["run_id"], "trial_id": _plain(r["trial_id"]), "seed": _plain(r["seed"]),
               "status": r["status"], "error": r.get("error") or "", "config_id": r["config_id"],
               "label": labels[r["config_id"]]}
              for r in trials.loc[trials["status"] != FINISHED,
                                  [c for c in ("run_id", "trial_id", "seed", "status", "error", "config_id")
                                   if c in trials.columns]].to_dict("records")]
    capsnet_cfgs = [c for c in configs if c.arch == "capsnet" and c.n_seeds and c.selected]
    trend_rows = compute_trends(capsnet_cfgs, swept)
    status_counts = trials["status"].value_counts()
    return Verdict(
        escaped=escaped,
        instrument=instrument,
        outcome=outcome,
        answer=_answer(outcome, escapes, cands, nominal, undecided, controls, confirm, data.sweep, th),
        instrument_text=_instrument_text(instrument, controls),
        test=_test_text(th),
        family={"method": "holm", "alpha": th.alpha, "candidates": len(cands),
                "text": _family_text(len(cands), th.alpha)},
        experiment=data.experiment, sweep=data.sweep, tracking_uri=data.tracking_uri,
        parent_run_id=data.parent_run_id,
        reference_source=source,
        thresholds={**asdict(th), "num_classes": n_classes, "num_classes_source": classes_how,
                    "chance_accuracy_floor": chance_floor,
                    "dead_tau": sorted({_plain(v) for v in trials.get("train.dead_tau", pd.Series(
                        dtype=str)).dropna()}) or "training default (0.01)"},
        rules=RULES,
        counts={"trials": int(len(trials)), "configurations": len(configs), "candidates": len(cands),
                "controls": len(controls),
                **{s: int(status_counts.get(s, 0)) for s in STATUS_ORDER},
                **{str(s): int(n) for s, n in status_counts.items() if s not in STATUS_ORDER}},
        swept_params=swept,
        selected_on_validation=select,
        escapes=escapes,
        confirm=confirm,
        confirmed_by=list(getattr(data, "confirmed_by", []) or []),
        configurations=configs,
        failed_trials=failed,
        trends=[t.as_dict() for t in trend_rows],
        notes=notes,
    )


def _ids(ids: list[str], most: int = 12) -> list[str]:
    """At most `most` ids, then '... (N more)': a note must stay a line at 400 candidates."""
    return ids if len(ids) <= most else ids[:most] + [f"... ({len(ids) - most} more)"]


def _outcome(cands: list, escapes: list, nominal: list, undecided: list, instrument: str,
             confirms: Optional[str]) -> str:
    """The sweep's answer (docs/PROBES.md, "The answer"): inconclusive unless every control passes;
    then yes when a candidate escapes family-wise, no when every candidate fails, 'to confirm' when
    some pass their own test only (an exploration; a confirmation is then undecided), else undecided."""
    if instrument != "validated":
        return "inconclusive"
    if escapes:
        return "yes"
    if cands and all(c.outcome == FAIL for c in cands):
        return "no"
    if nominal and not confirms:
        return TO_CONFIRM
    return "undecided"


def _confirms(data) -> Optional[str]:
    """The exploration this sweep confirms (`capsweep confirm` tags its parent run), else None."""
    rec = getattr(data, "parent_record", None) or {}
    return (rec.get("tags") or {}).get(TAG_CONFIRMS) or SweepParams.from_params(rec.get("params") or {}).confirms or None


def _confirm_plan(data, trials: pd.DataFrame, cands: list, outcome: str, confirms: Optional[str]) -> dict:
    """What `capsweep confirm` re-runs: the candidates that did not fail, most promising first (the
    smallest intersection-union p-value, then the largest accuracy lower bound), each with every
    config param as logged, and the exploration's seeds (the confirmation takes fresh ones)."""
    def key(c):
        acc = next((ch for ch in c.checks if ch["name"] == "accuracy"), {})
        lo = (acc.get("test") or {}).get("lo")
        diff = (acc.get("test") or {}).get("diff")
        return (c.p_value if c.p_value is not None else 1.0,
                -(lo if lo is not None else -math.inf), -(diff if diff is not None else -math.inf))
    live = sorted((c for c in cands if c.outcome != FAIL), key=key)[:CONFIRM_RANKED]
    cfg_cols = config_params([c for c in data.param_cols if c in trials.columns])
    by_run = trials.set_index("run_id")
    ranked = []
    for c in live:
        row = by_run.loc[c.run_ids[0]]
        acc = next((ch for ch in c.checks if ch["name"] == "accuracy"), {})
        ranked.append({"id": c.id, "label": c.label, "outcome": c.outcome, "p_value": c.p_value,
                       "acc_lo": (acc.get("test") or {}).get("lo"), "seeds": c.seeds,
                       "params": {k: str(row[k]) for k in cfg_cols if pd.notna(row[k])}})
    seeds = sorted({int(s) for s in trials["seed"] if s is not None and str(s).lstrip("-").isdigit()})
    worth = sum(c.outcome == PASS for c in cands)     # pass their own test: all of them are worth it
    top = worth or min(CONFIRM_TOP, len(ranked))
    command = f"capsweep confirm {data.sweep} --top {top}" if ranked and top and not confirms else None
    return {"ranked": ranked, "top": top, "seeds": CONFIRM_SEEDS, "seeds_used": seeds, "confirms": confirms,
            "command": command}


def _test_variance(cols: dict, fin_rows: np.ndarray, ref: Optional[dict], acc: np.ndarray) -> tuple:
    """(tau^2, how) of a configuration's accuracy difference with its reference
    (analysis.stats.split_sampling_variance): paired when every finished seed on both sides logged its
    per-image correctness over the same images, else binomial from the test set's size."""
    if ref is None or ref["how"] == "none" or not len(fin_rows):
        return 0.0, ""
    mine = _correct_matrix([cols.get("test_correct", [None] * (max(fin_rows) + 1))[i] for i in fin_rows])
    if "_correct" not in ref:
        rt = ref["trials"]
        ref["_correct"] = _correct_matrix(rt["test_correct"].tolist() if "test_correct" in rt else [None])
        ref["_acc"] = float(np.nanmean(rt["test_acc"].to_numpy(float))) if len(rt) else math.nan
        ref["_n"] = _test_size(rt.iloc[0].to_dict() if len(rt) else {})
    n = _test_size({k: v[fin_rows[0]] for k, v in cols.items()})
    return split_sampling_variance(mine, ref["_correct"], float(np.nanmean(acc)) if len(acc) else math.nan,
                             ref["_acc"], n or ref["_n"])


def _correct_matrix(values: list) -> Optional[np.ndarray]:
    """(seeds, n) 0/1 float array from the trials' correctness tags; None unless every one decodes to
    the same n."""
    rows, n0 = [], None
    for v in values:
        if not isinstance(v, str) or not v:
            return None
        try:
            n, packed = decode_correct(v)
        except ValueError:
            return None
        if n0 is not None and n != n0:
            return None
        n0 = n
        rows.append(np.unpackbits(np.frombuffer(packed, np.uint8))[:n])
    return np.vstack(rows).astype(float) if rows else None


def _test_size(row: dict) -> Optional[int]:
    """Test images a trial was scored on: its `test_n` metric, else data.test_size (a count, or a
    fraction of the dataset's test split, capsmodels.catalogue.SPLIT_SIZES), else the whole split."""
    v = row.get("test_n")
    if v is not None and v == v and v >= 1:
        return int(v)
    total = SPLIT_SIZES.get(str(row.get("data.name")), (None, None))[1]
    size = row.get("data.test_size")
    try:
        size = None if size is None or size != size or str(size) in ("", "None") else float(size)
    except (TypeError, ValueError):
        size = None
    if size is None:
        return total
    if size > 1:
        return int(size)
    return int(round(size * total)) if total else None


def _narrow_columns(trials: pd.DataFrame, swept: list[str], match_cols: list[str]) -> list[str]:
    """The columns the per-configuration verdict reads, in the table's order."""
    want = ({"config_id", "status", "arch", "depth", "role", "seed", "run_id", "trial.role", "test_correct",
             "test_n", "data.name", "data.test_size"}
            | set(FIGURES) | set(swept) | set(match_cols))
    return [c for c in trials.columns if c in want]


def _figure_dict(probe: str, iv: Interval) -> dict:
    """A probe's mean and bounds for the report; log10 probes are given back as 10^x (geometric mean);
    bounds of a bounded probe are clipped to its range (RANGES)."""
    d = iv.as_dict()
    if probe in RANGES:
        lo, hi = RANGES[probe]
        d["lo"] = None if d["lo"] is None else max(lo, d["lo"])
        d["hi"] = None if d["hi"] is None else min(hi, d["hi"])
    if probe in LOG_PROBES:
        d = {k: (None if v is None else 10 ** v) if k in ("mean", "lo", "hi") else v for k, v in d.items()}
        d["scale"] = "geometric"
        d.pop("sd")
    return d


def _named(cands: list, most: int = 5) -> str:
    """'c05 (depth=2 iterations=3), c07 (...)': ids with their settings, so a terminal reader need
    not look the ids up."""
    shown = [f"{c.id} ({c.label})" for c in cands[:most]]
    more = f" and {len(cands) - most} more" if len(cands) > most else ""
    return ", ".join(shown) + more


def _answer(outcome: str, escapes: list, cands: list, nominal: list, undecided: list, controls: list,
            confirm: dict, sweep: str, th: Thresholds) -> str:
    n = len(cands)
    what = "candidate configuration(s) (CapsNet, depth >= 1)"
    fam = f"the chance of any false 'yes' held at {th.alpha:g} over all {n} (Holm)"
    by_id = {c.id: c for c in cands}
    cmd = f": `{confirm['command']}`" if confirm.get("command") else ""
    if outcome == "inconclusive":
        bad = [c.id for c in controls if c.outcome != PASS]
        why = ("the sweep has no healthy cnn control, so nothing shows its checks let a healthy deep network pass"
               if not controls else f"the healthy control {'fails' if any(c.outcome == FAIL for c in controls) else 'does not pass'} "
               f"the same checks ({', '.join(_ids(bad))})")
        would = [c for c in cands if c.outcome == PASS]
        tail = (f"; {len(would)} candidate(s) would pass and are what to confirm: {_named(would)}{cmd}"
                if would else "")
        return f"Inconclusive: {why}, so this sweep answers neither yes nor no{tail}"
    if outcome == "yes":
        return (f"Yes: {len(escapes)} of {n} {what} escape vanishing gradients and capsule starvation, "
                f"{fam}: " + _named([by_id[e["id"]] for e in escapes]))
    if outcome == "no":
        return f"No: each of the {n} {what} is shown not to escape (some check fails)"
    if outcome == TO_CONFIRM:
        return (f"To confirm: no candidate escapes with {fam}; {len(nominal)} pass(es) their own test and "
                f"are worth confirming on fresh seeds: {_named(nominal)}{cmd}")
    if not cands:
        return "Undecided: the sweep has no candidate configuration (CapsNet, depth >= 1)"
    if nominal:    # a confirmation whose candidates pass alone but not family-wise
        return (f"Undecided: not confirmed: {len(nominal)} candidate(s) pass their own test but none with "
                f"{fam}: {_named(nominal)}")
    return (f"Undecided: none of {n} {what} is shown to escape, and {len(undecided)} are not decided "
            f"either way ({', '.join(_ids(undecided))}); more seeds{' or ' + cmd[3:-1] if cmd else ''} "
            "would decide them")


def _family_text(k: int, alpha: float) -> str:
    return (f"A 'yes' is a claim about the whole sweep: a candidate escapes only when every one of its "
            f"checks passes and its p-value (the largest of its checks') survives Holm's step-down over "
            f"all {k} candidates, so the chance that this sweep says 'yes' when no candidate truly escapes "
            f"is at most {alpha:g}, however many candidates it has and however they share references")


def _instrument_text(instrument: str, controls: list) -> str:
    """The sentence after 'Instrument: <status>.' on the report's second line."""
    if instrument == "no control":
        return ("not validated: the sweep has no cnn control at depth >= 1, so nothing shows that the "
                "thresholds let a healthy deep network pass")
    if instrument == "validated":
        return (f"all {len(controls)} cnn control configuration(s) (depth >= 1, healthy networks) pass the "
                "same checks")
    bad = [c.id for c in controls if c.outcome != PASS]
    if instrument == "control failed":
        return (f"NOT validated: cnn control(s) {', '.join(bad)} fail the same checks, so the thresholds are "
                "wrong for this sweep and its 'no' may be the instrument's, not the networks'")
    return (f"not validated: cnn control(s) {', '.join(bad)} do not pass the same checks (undecided: more "
            "seeds needed)")


def _test_text(th: Thresholds) -> str:
    return (f"Accuracy: Welch one-sided non-inferiority test of candidate - matched depth-0 reference at each "
            f"trial's best-validation epoch, margin {th.acc_margin:g}, the test set's sampling error in the "
            f"standard error, level alpha = {th.alpha:g}; gradient floor: the same test on log10 min act_grad "
            f"over the routed layers, margin {th.grad_margin:g} decade(s); structural checks: one-sided t "
            f"bounds of the seed mean at level {th.alpha:g}; the sweep: Holm over its candidates")


RULES = [
    "scoring: every trial at its best-validation epoch (the best/* metrics), a sweep without them at its "
    "last epoch",
    "seeds: a diverged, failed, interrupted or incomplete seed fails; a seed stopped early by the scheduler "
    "or still running leaves the configuration undecided",
    "accuracy: Welch one-sided non-inferiority of test_acc, candidate - matched depth-0 reference, se^2 = "
    "seed variances / seeds + the test set's sampling variance (paired per image, else binomial): pass "
    "when the lower bound L > -acc_margin, fail when the upper bound U < -acc_margin; one seed on a side "
    "is undecided",
    "gradient floor: the same test on log10(min over the routed layers l1..l{L} of act_grad), margin "
    "grad_margin decades (the primaries are left out: their gradient grows with depth in healthy networks)",
    "grad_ratio (act_grad/l1 / act_grad/l{L}, on log10): pass when its t bounds lie within [grad_ratio_min, "
    "grad_ratio_max], fail when the whole interval is outside",
    "starved / dead / frozen: worst hidden layer's starved_frac, dead_frac, frozen_frac: pass when the "
    "upper t bound is at most its maximum, fail when the lower bound is above it; starved_frac's yardstick "
    "(the class layer) is held to the reference's by the gradient floor",
    "chance: test_acc's lower t bound at least 1/num_classes + chance_margin (fail: upper bound below)",
    "a configuration passes its own test when every check passes (p-value: the largest of its checks'), "
    "fails when one fails, else is undecided; no reference makes the reference checks undecided, never "
    "failed; n/a (a probe not logged) is never evidence either way",
    "the sweep: a candidate escapes when its p-value survives Holm's step-down over all candidates "
    "(family-wise error <= alpha); one that passes only its own test is 'to confirm'",
    "the answer: 'inconclusive' (escaped: undecided) unless every cnn control passes; then yes (an escape), "
    "no (every candidate fails), 'to confirm' (an exploration with candidates passing only their own test) "
    "or undecided",
]


def _f(x, signed: bool = False) -> str:
    if x is None or not math.isfinite(x):
        return "n/a" if x is None or x != x else ("-inf" if x < 0 else "+inf")
    return f"{x:+.3g}" if signed else f"{x:.3g}"


def _plain(v):
    """numpy/pandas scalars -> plain JSON types; NaN/inf -> None."""
    if v is None:
        return None
    if isinstance(v, (np.bool_,)):
        return bool(v)
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        return None if not math.isfinite(float(v)) else float(v)
    return v


def compute_trends(configs: list[dict], swept: list[str]) -> list:
    """Trend of each probe against each swept factor over CapsNet configuration means (one point per
    configuration, never per seed: seeds of one configuration are not independent evidence about a
    factor). Numeric factors: Spearman's rho; booleans 0/1, then Spearman; categorical factors:
    Kruskal-Wallis H across levels. p-values are Holm-adjusted across every trend of the report."""
    out = []
    for factor in swept:
        if factor == "model.arch":
            continue
        raw = pd.Series([c.params.get(factor) for c in configs], dtype=object)
        kind = factor_kind(raw)
        xs = factor_values(raw, kind)
        for probe in PROBES:
            means = [c.figures[probe]["mean"] for c in configs]
            if probe in LOG_PROBES:
                means = [None if m is None or m <= 0 else math.log10(m) for m in means]
            out.append(trend(factor, probe, xs, means, kind))
    adjusted = holm([t.p_value for t in out])
    return [replace(t, p_holm=p) for t, p in zip(out, adjusted)]


def verdict_json(verdict: Verdict | dict) -> str:
    """The verdict as JSON text whose first line reads `{"escaped": "yes", "instrument": ..., "answer": ...,`."""
    if isinstance(verdict, Verdict):
        verdict = verdict.to_json()
    head = {k: verdict[k] for k in ("escaped", "instrument", "outcome", "answer") if k in verdict}
    rest = {k: v for k, v in verdict.items() if k not in head}
    body = json.dumps(rest, indent=2, allow_nan=False, default=_plain)
    first = json.dumps(head)[:-1]
    return first + ",\n" + body[2:] + "\n"
