"""The verdict: does any CapsNet configuration escape vanishing gradients and capsule starvation?

Definitions (every probe, every check, the special cases): docs/PROBES.md, "The verdict". In short:

Trials are grouped into configurations by all their params except the seed and bookkeeping
(`train.device`, `train.threads`, `train.progress`, `data.root`, `data.download`, `trial.*` (the runner's
`trial.role` included), `sweep.*`). Roles come from arch and depth, never from `trial.role`:
  candidate  CapsNet, depth >= 1            reference  depth 0 (CapsNet; depth-0 cnn for the controls)
  control    `model.arch=cnn`, depth >= 1: a healthy network that must pass the same checks
Per finished trial the probes are read from the last epoch (a metric the trial does not log is n/a,
never 0, and is never evidence):
  test_acc          test accuracy (fraction)
  grad_ratio        the logged act_grad-based `grad_ratio` (= act_grad/l1 / act_grad/l{L}), tested on
                    log10; n/a for a trial without `act_grad/l*` (an old sweep's weight-norm ratio is
                    not size-invariant and is not used)
  act_grad_min      min over all capsule layers l0..l{L} of `act_grad/l{l}`, tested on log10
  starved_worst, dead_worst, frozen_worst
                    max over hidden layers l1..l{depth} of starved_frac/dead_frac/frozen_frac (else the
                    logged *_max); n/a at depth 0
  tree_score, routing_dynamics (+ *_null)
                    mean over routed layers of the logged statistic and of its null: reported, not
                    used by the verdict
Checks of a candidate or control, each with three outcomes (pass / fail / inconclusive) at level alpha:
  seeds            every seed finished (a diverged, failed, stopped, interrupted or incomplete seed
                   fails; a seed still running is inconclusive)
  accuracy         Welch non-inferiority of test_acc against the matched depth-0 reference, margin
                   acc_margin (analysis.stats.noninferiority)
  gradient floor   the same test on log10 act_grad_min, margin grad_margin decades
  grad_ratio       one-sided t bound of mean log10 grad_ratio against log10 grad_ratio_min
  starved / dead / frozen   one-sided t bound of the worst hidden fraction against its maximum
  chance           one-sided t bound of test_acc against 1/num_classes + chance_margin
A configuration escapes (control: passes) when every check passes; it is not escaped (fails) when one
fails; otherwise undecided. Without a reference the two reference checks are inconclusive: a candidate
is never failed for a reference the sweep lacks.
"""
from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import asdict, dataclass, replace
from typing import Optional

import numpy as np
import pandas as pd

from analysis.stats import (FAIL, INCONCLUSIVE, PASS, Interval, check_bound, finite, holm,
                            noninferiority, t_interval, trend)
from capsmodels.contract import CANDIDATE, CONTROL, FINISHED, NUM_CLASSES, REFERENCE, RUNNING, STATUSES

SEED_PARAM = "train.seed"
NON_CONFIG_PARAMS = {SEED_PARAM, "train.device", "train.threads", "train.progress", "data.root",
                     "data.download"}
NON_CONFIG_PREFIXES = ("trial.", "sweep.")  # bookkeeping the runner adds (trial.role, trial.config_id)
HIDDEN_SHAPE_PARAMS = {"model.num_caps", "model.caps_dim"}
MATCH_EXCLUDED = {"model.depth", "model.arch"} | HIDDEN_SHAPE_PARAMS
# Per-trial probe columns (annotate) and what the report calls them. log10 columns are shown as 10^x.
PROBES = ("test_acc", "grad_ratio", "act_grad_min", "starved_worst", "dead_worst", "frozen_worst",
          "tree_score", "routing_dynamics")
NULLS = {"tree_score": "tree_score_null", "routing_dynamics": "routing_dynamics_null"}
LOG_PROBES = {"grad_ratio", "act_grad_min"}
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
_LAYER = re.compile(r"^(?P<name>[a-z_]+)/l(?P<l>\d+)$")


@dataclass
class Thresholds:
    """The verdict's parameters; the report states every one of them."""
    alpha: float = 0.05              # level of every one-sided test and bound
    acc_margin: float = 0.01         # non-inferiority margin of test_acc against the reference (absolute)
    grad_margin: float = 1.0         # non-inferiority margin of log10 min act_grad (decades)
    grad_ratio_min: float = 0.1      # geometric mean grad_ratio must be shown at least this
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
        m = _LAYER.match(str(col))
        if m and m.group("name") == name and v is not None and np.isfinite(v):
            out[int(m.group("l"))] = float(v)
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
        m = _LAYER.match(str(col))
        if m:
            layer_cols.setdefault(m.group("name"), []).append((int(m.group("l")), col))

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
    act, _ = matrix("act_grad")
    has_act = (~np.isnan(act)).any(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        act_min = np.where(has_act, np.nanmin(np.where(np.isnan(act), np.inf, act), axis=1, initial=np.inf),
                           np.nan)
        out = {"run_id": trials["run_id"].tolist(), "arch": arch, "depth": depth,
               "test_acc": column("test_acc").tolist(),
               "grad_ratio": np.where(has_act, _log10_array(column("grad_ratio")), np.nan).tolist(),
               "act_grad_min": _log10_array(act_min).tolist()}
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


def role_of(arch: str, depth: Optional[int]) -> str:
    """reference (depth 0), candidate (CapsNet, depth >= 1 or unknown) or control (any other arch)."""
    if depth == 0:
        return REFERENCE
    return CANDIDATE if arch == "capsnet" else CONTROL


def annotate(data) -> tuple[pd.DataFrame, dict, list[str]]:
    """The sweep's trial table with `config_id`, `role`, arch, depth and the per-trial probes joined on
    (probe columns replace logged metrics of the same name: `grad_ratio` becomes its log10); the label
    of each config id; the swept config params. Shared by the verdict and the plots."""
    trials = data.trials.copy()
    cfg_ids, labels, swept = assign_configs(trials, data.param_cols)
    trials["config_id"] = cfg_ids.to_numpy()
    probes = trial_probes(trials).set_index("run_id")
    trials = trials.drop(columns=[c for c in probes.columns if c in trials.columns]).join(probes, on="run_id")
    trials["role"] = [role_of(a, None if d is None or d != d else int(d))
                      for a, d in zip(trials["arch"], trials["depth"])]
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

def _check(name: str, outcome: str, text: str, **detail) -> dict:
    return {"name": name, "outcome": outcome, "text": text,
            **{k: _plain(v) if not isinstance(v, dict) else v for k, v in detail.items()}}


def _seeds_check(statuses: list[str]) -> dict:
    bad = [s for s in statuses if s != FINISHED]
    if not bad:
        return _check("seeds", PASS, f"all {len(statuses)} seed(s) finished")
    counts = ", ".join(f"{n} {s}" for s, n in Counter(bad).most_common())
    if all(s == RUNNING for s in bad):
        return _check("seeds", INCONCLUSIVE, f"seeds not finished yet: {counts}")
    return _check("seeds", FAIL, f"seeds not finished: {counts}")


def _bound_check(name: str, iv: Interval, threshold: float, good: str, what: str, absent: str,
                 log: bool = False) -> dict:
    """A one-sample three-way check, its sentence naming the bound that decided it."""
    show = (lambda x: _f(10 ** x) if x is not None and math.isfinite(x) else _f(x)) if log else _f
    thr = show(threshold)
    if iv.n == 0:
        return _check(name, INCONCLUSIVE, f"{what}: n/a ({absent})", n=0, threshold=threshold)
    outcome = check_bound(iv, threshold, good)
    detail = dict(mean=iv.mean, lo=iv.lo, hi=iv.hi, n=iv.n, threshold=threshold, log10=log)
    rel = "at least" if good == "above" else "at most"
    if iv.n == 1:
        return _check(name, outcome, f"{what} {show(iv.mean)} on one seed: no interval, "
                                     f"cannot show it is {rel} {thr}", **detail)
    if outcome == PASS:
        bound = iv.lo if good == "above" else iv.hi
        text = f"{what}: bound {show(bound)} is {rel} {thr}"
    elif outcome == FAIL:
        bound = iv.hi if good == "above" else iv.lo
        text = f"{what}: mean {show(iv.mean)}, even its {'upper' if good == 'above' else 'lower'} bound " \
               f"{show(bound)} is {'below' if good == 'above' else 'above'} {thr}"
    else:
        text = f"{what}: mean {show(iv.mean)}, interval [{show(iv.lo)}, {show(iv.hi)}] contains {thr}"
    return _check(name, outcome, text, **detail)


def _ni_check(name: str, cand: list[float], ref: Optional[dict], margin: float, alpha: float,
              probe: str, what: str, unit: str, absent: str) -> dict:
    """Non-inferiority of the candidate's `probe` against the reference's, as a check record."""
    if ref is None or ref["how"] == "none":
        return _check(name, INCONCLUSIVE, f"{what}: no depth-0 reference in the sweep (add depth-0 CapsNet "
                                          "trials or pass --reference SWEEP): not tested")
    ref_vals = finite(ref["trials"][probe].tolist())
    if len(finite(cand)) == 0 or len(ref_vals) == 0:
        return _check(name, INCONCLUSIVE, f"{what}: n/a ({absent})")
    r = noninferiority(cand, ref_vals, margin, alpha)
    d = r.as_dict()
    iv = f"diff {_f(r.diff, signed=True)}{unit}, bounds [{_f(r.lo, signed=True)}, {_f(r.hi, signed=True)}]"
    power = f"; power {r.power:.2f} at the observed noise" if r.power is not None else ""
    if r.outcome == PASS:
        text = f"{what}: non-inferior to the reference ({iv}; lower bound > -{margin:g}{unit})"
    elif r.outcome == FAIL:
        text = f"{what}: worse than the reference by more than the margin ({iv}; upper bound < -{margin:g}{unit})"
    else:
        text = f"{what}: not decided ({iv} contain -{margin:g}{unit}; {r.how}{power})"
    return _check(name, r.outcome, text, test=d)


def config_checks(fin: dict[str, list[float]], statuses: list[str], ref: Optional[dict], th: Thresholds,
                  chance_floor: float, intervals: Optional[dict] = None) -> list[dict]:
    """Every check of a candidate or control (module docstring) on its finished seeds: `fin` maps each
    probe (PROBES) to its values over them, `statuses` is every seed's status.
    intervals: t_interval of each probe of `fin` at th.alpha when the caller has them already."""
    a = th.alpha
    if not fin["test_acc"]:
        return [_seeds_check(statuses)] + [_check(name, INCONCLUSIVE, f"{name}: no finished seed to test")
                                           for name in CHECK_NAMES[1:]]
    iv = intervals if intervals is not None else {p: t_interval(fin[p], a) for p in PROBES}
    return [
        _seeds_check(statuses),
        _ni_check("accuracy", fin["test_acc"], ref, th.acc_margin, a, "test_acc",
                  "accuracy vs depth-0 reference", "", "no test_acc"),
        _ni_check("gradient floor", fin["act_grad_min"], ref, th.grad_margin, a, "act_grad_min",
                  "gradient floor (log10 min act_grad) vs depth-0 reference", " decades",
                  "act_grad/l* not logged"),
        _bound_check("grad_ratio", iv["grad_ratio"], math.log10(th.grad_ratio_min) if th.grad_ratio_min > 0
                     else -math.inf, "above", "grad_ratio (geometric mean)",
                     "grad_ratio on act_grad not logged", log=True),
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


VERDICT_WORDS = {CANDIDATE: {PASS: "escaped", FAIL: "not escaped", INCONCLUSIVE: "undecided"},
                 CONTROL: {PASS: "passes", FAIL: "fails", INCONCLUSIVE: "undecided"}}


# ---------------------------------------------------------------------------------------------------
# The verdict

def compute_verdict(data, th: Optional[Thresholds] = None, annotated: Optional[tuple] = None,
                    reference=None) -> dict:
    """The verdict for a SweepData (analysis.load) as a JSON-able dict whose first key is 'escaped'
    ('yes' | 'no' | 'undecided'), then 'instrument' ('validated' | 'control failed' | 'control
    undecided' | 'no control'). annotated: `annotate(data)` when the caller has it already.
    reference: another SweepData of the same experiment whose depth-0 trials are the references
    (`capsweep report --reference SWEEP`); None: this sweep's own depth-0 trials."""
    th = th or Thresholds()
    trials, labels, swept = annotated or annotate(data)
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
        match_cols = [c for c in swept if c not in MATCH_EXCLUDED]
    if pool[pool["arch"] == "capsnet"].empty:
        notes.append(f"{source} has no finished depth-0 CapsNet: accuracy and gradient-floor checks cannot "
                     "be made, so candidates are undecided (never failed) on them; add depth-0 trials or "
                     "pass --reference SWEEP")
    if classes_how != "given" and not classes_how.startswith("from"):
        notes.append(classes_how)

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
        if role == REFERENCE:
            entry.update(verdict=f"reference (depth-0 {arch})", outcome=None, escaped=False, checks=[],
                         reasons=[], reference=None)
        else:
            ref = reference_of(first)
            fin = {p: values[:, k].tolist() for k, p in enumerate(FIGURES)}
            checks = config_checks(fin, statuses, ref, th, chance_floor, figs)
            outcome = decide(checks)
            entry.update(verdict=VERDICT_WORDS[role][outcome], outcome=outcome,
                         escaped=role == CANDIDATE and outcome == PASS, checks=checks,
                         reasons=[c["text"] for c in checks if c["outcome"] != PASS],
                         reference={k: v for k, v in ref.items() if k != "trials"})
        entry.update({
            "n_seeds": int(len(fin_rows)), "seeds": [_plain(cols["seed"][i]) for i in fin_rows],
            "statuses": {str(k): int(v) for k, v in Counter(statuses).most_common()},
            "figures": {p: _figure_dict(p, figs[p]) for p in FIGURES},
            "run_ids": [cols["run_id"][i] for i in rows],
        })
        configs.append(entry)

    cands = [c for c in configs if c["role"] == CANDIDATE]
    controls = [c for c in configs if c["role"] == CONTROL]
    escapes = [{"id": c["id"], "label": c["label"]} for c in cands if c["escaped"]]
    undecided = [c["id"] for c in cands if c["outcome"] == INCONCLUSIVE]
    escaped = "yes" if escapes else ("undecided" if undecided or not cands else "no")
    instrument = ("no control" if not controls else "control failed" if any(c["outcome"] == FAIL for c in controls)
                  else "control undecided" if any(c["outcome"] != PASS for c in controls) else "validated")
    few = sorted({c["id"] for c in cands + controls if 0 < c["n_seeds"] < 5})
    if few:
        notes.append(f"{len(few)} candidate/control configuration(s) have fewer than 5 finished seeds "
                     f"({', '.join(few)}): the non-inferiority test has little power there (each undecided "
                     "accuracy check states its power at the observed noise); see docs/PROBES.md")
    if undecided and not escapes:
        notes.append(f"{len(undecided)} candidate(s) undecided ({', '.join(undecided)}): more seeds (or a "
                     "reference) would decide them")

    failed = [{"run_id": r["run_id"], "trial_id": _plain(r["trial_id"]), "seed": _plain(r["seed"]),
               "status": r["status"], "error": r.get("error") or "", "config_id": r["config_id"],
               "label": labels[r["config_id"]]}
              for r in trials.loc[trials["status"] != FINISHED,
                                  [c for c in ("run_id", "trial_id", "seed", "status", "error", "config_id")
                                   if c in trials.columns]].to_dict("records")]
    capsnet_cfgs = [c for c in configs if c["arch"] == "capsnet" and c["n_seeds"]]
    trend_rows = compute_trends(capsnet_cfgs, swept)
    status_counts = trials["status"].value_counts()
    return {
        "escaped": escaped,
        "instrument": instrument,
        "answer": _answer(escaped, escapes, cands, undecided),
        "instrument_text": _instrument_text(instrument, controls),
        "test": _test_text(th),
        "experiment": data.experiment, "sweep": data.sweep, "tracking_uri": data.tracking_uri,
        "parent_run_id": data.parent_run_id,
        "reference_source": source,
        "thresholds": {**asdict(th), "num_classes": n_classes, "num_classes_source": classes_how,
                       "chance_accuracy_floor": chance_floor,
                       "dead_tau": sorted({_plain(v) for v in trials.get("train.dead_tau", pd.Series(
                           dtype=str)).dropna()}) or "training default (0.01)"},
        "rules": RULES,
        "counts": {"trials": int(len(trials)), "configurations": len(configs), "candidates": len(cands),
                   "controls": len(controls),
                   **{s: int(status_counts.get(s, 0)) for s in STATUS_ORDER},
                   **{str(s): int(n) for s, n in status_counts.items() if s not in STATUS_ORDER}},
        "swept_params": swept,
        "escapes": escapes,
        "configurations": configs,
        "failed_trials": failed,
        "trends": [t.as_dict() for t in trend_rows],
        "notes": notes,
    }


def _narrow_columns(trials: pd.DataFrame, swept: list[str], match_cols: list[str]) -> list[str]:
    """The columns the per-configuration verdict reads, in the table's order."""
    want = ({"config_id", "status", "arch", "depth", "role", "seed", "run_id", "trial.role"}
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


def _answer(escaped: str, escapes: list, cands: list, undecided: list) -> str:
    n = len(cands)
    what = "candidate configuration(s) (CapsNet, depth >= 1)"
    if escaped == "yes":
        return (f"Yes: {len(escapes)} of {n} {what} escape vanishing gradients and capsule starvation: "
                + ", ".join(e["id"] for e in escapes))
    if escaped == "no":
        return f"No: each of the {n} {what} is shown not to escape (some check fails)"
    if not cands:
        return "Undecided: the sweep has no candidate configuration (CapsNet, depth >= 1)"
    return (f"Undecided: none of {n} {what} is shown to escape, and {len(undecided)} are not decided "
            f"either way ({', '.join(undecided)})")


def _instrument_text(instrument: str, controls: list) -> str:
    """The sentence after 'Instrument: <status>.' on the report's second line."""
    if instrument == "no control":
        return ("not validated: the sweep has no cnn control at depth >= 1, so nothing shows that the "
                "thresholds let a healthy deep network pass")
    if instrument == "validated":
        return (f"all {len(controls)} cnn control configuration(s) (depth >= 1, healthy networks) pass the "
                "same checks")
    bad = [c["id"] for c in controls if c["outcome"] != PASS]
    if instrument == "control failed":
        return (f"NOT validated: cnn control(s) {', '.join(bad)} fail the same checks, so the thresholds are "
                "wrong for this sweep and its 'no' may be the instrument's, not the networks'")
    return (f"not validated: cnn control(s) {', '.join(bad)} do not pass the same checks (undecided: more "
            "seeds needed)")


def _test_text(th: Thresholds) -> str:
    return (f"Accuracy: Welch one-sided non-inferiority test of candidate - matched depth-0 reference, "
            f"margin {th.acc_margin:g}, level alpha = {th.alpha:g}; gradient floor: the same test on log10 min "
            f"act_grad, margin {th.grad_margin:g} decade(s); structural checks: one-sided t bounds of the seed "
            f"mean at level {th.alpha:g}")


RULES = [
    "seeds: every seed finished (a diverged, failed, stopped-early, interrupted or incomplete seed fails; "
    "one still running is undecided)",
    "accuracy: Welch one-sided non-inferiority of test_acc, candidate - matched depth-0 reference: pass "
    "when the lower bound L > -acc_margin, fail when the upper bound U < -acc_margin",
    "gradient floor: the same test on log10(min over capsule layers of act_grad), margin grad_margin decades",
    "grad_ratio (act_grad/l1 / act_grad/l{L}, on log10): pass when the lower t bound of the mean is at least "
    "log10 grad_ratio_min, fail when the upper bound is below it",
    "starved / dead / frozen: worst hidden layer's starved_frac, dead_frac, frozen_frac: pass when the "
    "upper t bound is at most its maximum, fail when the lower bound is above it",
    "chance: test_acc's lower t bound at least 1/num_classes + chance_margin (fail: upper bound below)",
    "a configuration escapes when every check passes, is not escaped when one fails, else is undecided; "
    "no reference makes the reference checks undecided, never failed; n/a (a probe not logged) is never "
    "evidence either way",
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
        raw = pd.Series([c["params"].get(factor) for c in configs], dtype=object)
        kind = factor_kind(raw)
        xs = factor_values(raw, kind)
        for probe in PROBES:
            means = [c["figures"][probe]["mean"] for c in configs]
            if probe in LOG_PROBES:
                means = [None if m is None or m <= 0 else math.log10(m) for m in means]
            out.append(trend(factor, probe, xs, means, kind))
    adjusted = holm([t.p_value for t in out])
    return [replace(t, p_holm=p) for t, p in zip(out, adjusted)]


def verdict_json(verdict: dict) -> str:
    """The verdict as JSON text whose first line reads `{"escaped": "yes", "instrument": ..., "answer": ...,`."""
    head = {k: verdict[k] for k in ("escaped", "instrument", "answer")}
    rest = {k: v for k, v in verdict.items() if k not in head}
    body = json.dumps(rest, indent=2, allow_nan=False, default=_plain)
    first = json.dumps(head)[:-1]
    return first + ",\n" + body[2:] + "\n"
