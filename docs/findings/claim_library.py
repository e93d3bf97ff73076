"""Claims: named functions of the committed reports, each returning one number, list or table of
docs/FINDINGS.md, and the registry the template's placeholders look them up in.

A placeholder `{{depth.fig(test_acc, depth=1, init=data)|.3f}}` calls claim `fig` on report `depth`
(docs/findings/depth/) with positional argument `test_acc` and the selector depth=1, init=data, and
formats the number with `.3f`. A claim registered under a dotted name (`depth.std_chance_count`)
belongs to one report; one registered under a bare name (`fig`, `count`, `rho`, ...) works on any
report, so a new report folder needs no code for lookups, counts, ranges and trends, only for what it
computes in its own way.

Selectors pick configurations by their swept params (short names: `depth`, `init`, `routing`, ...)
or by the verdict's own fields (`id`, `arch`, `role`, `verdict`): `key=value` (alternatives with
`|`: routing=dynamic|efficient), `key!=value`, and `key>=v`, `<=`, `>`, `<` on numbers. Booleans
match true/on/yes and false/off/no. A claim that needs exactly one configuration fails loudly when a
selector matches none or several: a changed report cannot silently render a different row.
"""
from __future__ import annotations

import math
import re
import sys
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np
import pandas as pd

import report_data
from report_data import Report, geometric

FLOAT_MIN = sys.float_info.min        # the report's floor for a gradient that underflowed float64


class ClaimError(Exception):
    """A placeholder the data cannot answer (unknown claim, a selector matching no row, ...)."""


@dataclass
class Num:
    """A number with its default format (a placeholder's `|fmt` overrides it)."""
    value: float
    fmt: str = ".3g"


CLAIMS: dict[str, Callable] = {}


def claim(name: Optional[str] = None):
    """Register a claim under `name` (default: the function's name). Every claim says in its
    docstring what number it is, since FINDINGS.md's prose relies on that meaning."""
    def deco(fn):
        if not (fn.__doc__ or "").strip():
            raise TypeError(f"claim {fn.__name__} needs a docstring saying what it computes")
        CLAIMS[name or fn.__name__] = fn
        return fn
    return deco


# ---------------------------------------------------------------------------------------------------
# Formatting

def fmt_sci(x: float, digits: int) -> str:
    """`digits` significant digits, plain between 1e-3 and 1e3, else compact scientific (5.5e-14);
    a gradient at float64's floor reads as such."""
    if x is None or x != x:
        return "n/a"
    if x <= FLOAT_MIN * 1.000001 and x > 0:
        return "below float64's range"
    if x == 0 or 1e-3 <= abs(x) < 1e3:
        return f"{x:.{digits}g}"
    mant, exp = f"{x:.{digits - 1}e}".split("e")
    return f"{mant}e{int(exp)}"


def fmt(value: Any, spec: str) -> str:
    """Render a claim's value: Python format specs (`.3f`, `,d`, `.0f`, `+.3f`) and
    sci1/sci2/sci3 (`fmt_sci`), pts (a fraction as whole percentage points), pct (as a percentage)."""
    if isinstance(value, Num):
        spec, value = spec or value.fmt, value.value
    if isinstance(value, str):
        return value
    if value is None or (isinstance(value, float) and value != value):
        return "n/a"
    if spec.startswith("sci"):
        return fmt_sci(float(value), int(spec[3:] or 2))
    if spec == "pts":
        return f"{abs(value) * 100:.0f}"
    if spec == "pct":
        return f"{value * 100:.0f}%"
    if spec.endswith("d"):
        return format(int(round(value)), spec)
    return format(value, spec or ".3g")


def default_fmt(key: str) -> str:
    """The format a figure reads in unless the template says otherwise."""
    base = key.split(".")[0]
    if base.startswith(("act_grad", "grad_ratio")):
        return "sci2"
    if base.startswith(("starved", "dead", "frozen")):
        return ".2g"
    return ".3f"


def join(items: list[str]) -> str:
    """'a', 'a and b', 'a, b and c'."""
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def span(lo: str, hi: str) -> str:
    """'lo-hi', or one value when both ends read the same; 'lo to hi' when an end has a sign or an
    exponent of its own (1.5e-8 to 5.1e-5, -0.30 to -0.05), where a dash would misread."""
    if lo == hi:
        return lo
    return f"{lo} to {hi}" if any("e" in x or x.startswith(("-", "+")) for x in (lo, hi)) else f"{lo}-{hi}"


# ---------------------------------------------------------------------------------------------------
# Selection

_SEL = re.compile(r"^\s*([\w.]+)\s*(>=|<=|!=|=|>|<)\s*(.*?)\s*$")
_TRUE, _FALSE = {"true", "on", "yes"}, {"false", "off", "no"}


def _norm(v) -> str:
    """A value as selectors compare it: booleans spelled one way, numbers by value (0 = 0.0)."""
    s = str(v).strip().lower()
    if s in _TRUE or s in _FALSE:
        return "true" if s in _TRUE else "false"
    try:
        return repr(float(s))
    except ValueError:
        return s


def parse_args(text: str) -> tuple[list[str], list[tuple[str, str, str]]]:
    """'test_acc, depth>=1, init=data' -> (['test_acc'], [('depth', '>=', '1'), ('init', '=', 'data')])."""
    pos, sel = [], []
    for tok in [t for t in text.split(",") if t.strip()]:
        m = _SEL.match(tok)
        if m:
            sel.append((m[1], m[2], m[3]))
        else:
            pos.append(tok.strip())
    return pos, sel


def select(r: Report, sel: list[tuple[str, str, str]]) -> pd.DataFrame:
    """The configurations of `r` matching every selector (see the module docstring)."""
    df = r.configs
    keep = pd.Series(True, index=df.index)
    for key, op, val in sel:
        if key not in df.columns:
            raise ClaimError(f"{r.name}: no field {key!r} to select on (have: "
                             f"{', '.join(c for c in df.columns if '.' not in c)})")
        col = df[key]
        if op in ("=", "!="):
            want = {_norm(v) for v in val.split("|")}
            hit = col.map(lambda v: _norm(v) in want)
            keep &= hit if op == "=" else ~hit
        else:
            num = pd.to_numeric(col, errors="coerce")
            keep &= {">=": num >= float(val), "<=": num <= float(val),
                     ">": num > float(val), "<": num < float(val)}[op]
    return df[keep]


def one(r: Report, sel) -> pd.Series:
    """The single configuration a selector names; an error naming the matches otherwise."""
    rows = select(r, sel)
    if len(rows) != 1:
        what = ", ".join(f"{k}{op}{v}" for k, op, v in sel)
        raise ClaimError(f"{r.name}: selector ({what}) matches {len(rows)} configurations "
                         f"({', '.join(rows['id']) or 'none'}), not one")
    return rows.iloc[0]


def column(rows: pd.DataFrame, key: str, r: Report) -> pd.Series:
    if key not in rows.columns:
        raise ClaimError(f"{r.name}: no figure {key!r}")
    return pd.to_numeric(rows[key], errors="coerce")


# ---------------------------------------------------------------------------------------------------
# Generic claims (any report)

@claim()
def fig(r: Report, key: str, sel) -> Num:
    """Figure `key` of the one selected configuration: `test_acc` is its mean over finished seeds,
    `test_acc.lo`/`.hi` the two-sided 90% t interval (verdict.json `figures`), `check.accuracy.diff`
    / `.lo` / `.hi` the Welch difference to its matched reference and its bounds; report.md extras
    (`tree_recovery`: mean over the routed layers, `test_acc_transformed`) the same way."""
    if key not in r.configs.columns:
        raise ClaimError(f"{r.name}: no figure {key!r}")
    return Num(float(one(r, sel)[key]), default_fmt(key))


@claim("id")
def config_id(r: Report, sel) -> str:
    """The id (cNN) of the one selected configuration, as the report names it."""
    return str(one(r, sel)["id"])


@claim()
def ids(r: Report, sel) -> str:
    """The ids of every selected configuration, joined ('c10 and c26')."""
    rows = select(r, sel)
    return join(list(rows["id"])) if len(rows) else "none"


@claim()
def count(r: Report, sel) -> Num:
    """How many configurations match the selector."""
    return Num(len(select(r, sel)), "d")


@claim()
def trials(r: Report, sel) -> Num:
    """How many trials the selected configurations ran, finished or not (the sum of their statuses)."""
    return Num(int(select(r, sel)["n_trials"].sum()), ",d")


@claim()
def finished(r: Report, sel) -> str:
    """'all finished' when every trial of the selection finished, else 'N finished, M diverged, ...'
    (the statuses of the others, most common first)."""
    rows = select(r, sel)
    n, done = int(rows["n_trials"].sum()), int(rows["n_finished"].sum())
    if n == done:
        return "all finished"
    others: dict = {}
    for _, row in rows.iterrows():
        for status, k in (r.config(row["id"]).get("statuses") or {}).items():
            if status != "finished":
                others[status] = others.get(status, 0) + int(k)
    return ", ".join([f"{done:,d} finished"] + [f"{k:,d} {s}" for s, k in sorted(others.items(), key=lambda x: -x[1])])


@claim("min")
def minimum(r: Report, key: str, sel) -> Num:
    """Smallest figure `key` over the selected configurations."""
    return Num(float(column(select(r, sel), key, r).min()), default_fmt(key))


@claim("max")
def maximum(r: Report, key: str, sel) -> Num:
    """Largest figure `key` over the selected configurations."""
    return Num(float(column(select(r, sel), key, r).max()), default_fmt(key))


@claim("range")
def value_range(r: Report, key: str, sel, spec: str = "") -> str:
    """'min-max' of figure `key` over the selected configurations (one value when equal); the
    placeholder's format applies to both ends (|pts: sizes of differences in whole points)."""
    vals = column(select(r, sel), key, r).dropna()
    if vals.empty:
        raise ClaimError(f"{r.name}: no {key} in the selection")
    return _span_of(vals, spec or default_fmt(key))


def _span_of(vals: pd.Series, f: str) -> str:
    """Both ends of `vals` in format `f`; in points (pts) the sizes, smallest first."""
    vals = vals.dropna().abs() if f == "pts" else vals.dropna()
    return span(fmt(float(vals.min()), f), fmt(float(vals.max()), f))


@claim()
def seeds(r: Report, sel) -> Num:
    """Seeds per configuration in the selection (an error when they differ)."""
    n = set(select(r, sel)["n_seeds"].astype(int))
    if len(n) != 1:
        raise ClaimError(f"{r.name}: the selection has {sorted(n)} seeds per configuration")
    return Num(n.pop(), "d")


@claim()
def labels(r: Report, sel) -> str:
    """Every selected configuration as 'cNN (its swept params but arch)', joined."""
    rows = select(r, sel)
    return join([f"{row['id']} ({short_label(row)})" for _, row in rows.iterrows()]) if len(rows) else "none"


def short_label(row) -> str:
    """The report's label without arch: 'depth=1 init=std iterations=3 squash=exp'."""
    return " ".join(p for p in str(row["label"]).split() if not p.startswith("arch="))


@claim()
def params_of(r: Report, sel) -> str:
    """What the selected configurations share and where they differ, as code spans: '`depth` 1 and 3,
    `init=data`, `iterations=3`, `squash=exp`' (params of the label, arch left out)."""
    rows = select(r, sel)
    parts = []
    for full in r.raw.get("swept_params", []):
        name = report_data.param_name(full)
        if name == "arch" or full not in rows.columns:
            continue
        vals = sorted(set(rows[full].astype(str)), key=lambda v: (len(v), v))
        parts.append(f"`{name}={vals[0]}`" if len(vals) == 1 else f"`{name}` {join(vals)}")
    return ", ".join(parts)


@claim()
def headline(r: Report, field: str, sel) -> str:
    """A top-level answer of verdict.json as written there: `escaped` (yes / no / undecided) or
    `instrument` (validated, control failed, control undecided)."""
    if field not in r.raw:
        raise ClaimError(f"{r.name}: verdict.json has no {field!r}")
    return str(r.raw[field])


@claim()
def verdicts(r: Report, verdict: str, sel) -> Num:
    """How many selected configurations have verdict `verdict` (escaped, undecided, not escaped)."""
    rows = select(r, sel)
    return Num(int((rows["verdict"].astype(str) == verdict.replace("_", " ")).sum()), "d")


@claim()
def threshold(r: Report, name: str, sel) -> Num:
    """A threshold of the verdict (verdict.json `thresholds`: alpha, acc_margin, chance floor, ...)."""
    if name not in r.thresholds:
        raise ClaimError(f"{r.name}: no threshold {name!r}")
    return Num(r.thresholds[name], ".3g")


@claim()
def spec(r: Report, path: str, sel) -> Any:
    """A value of the sweep spec beside the report (findings-<sweep>.yaml), by dotted path
    (`base.data.train_size`); `seeds` gives the number of seeds; a grid reads '{3, 6}'."""
    node: Any = r.spec
    rest = path
    while rest:                           # keys may hold dots themselves (space: {model.depth: ...})
        keys = [k for k in (node if isinstance(node, dict) else {})
                if rest == str(k) or rest.startswith(f"{k}.")]
        if not keys:
            raise ClaimError(f"{r.name}: the spec has no {path!r}")
        key = max(keys, key=lambda k: len(str(k)))
        node, rest = node[key], rest[len(str(key)) + 1:]
    if path == "seeds":
        return Num(len(node), "d")
    if isinstance(node, dict) and "grid" in node:
        return grid_text(node["grid"])
    if isinstance(node, bool):
        return "on" if node else "off"
    if isinstance(node, (int, float)):
        return Num(node, ",d" if isinstance(node, int) else ".3g")
    return str(node)


def grid_text(values: list) -> str:
    """'{3, 6}', booleans as '{off, on}'."""
    return "{" + ", ".join(("on" if v else "off") if isinstance(v, bool) else f"{v:g}"
                           if isinstance(v, float) else str(v) for v in values) + "}"


@claim()
def trend(r: Report, factor: str, probe: str, field: str, sel) -> Num:
    """A committed rank trend of the report (one point per CapsNet configuration mean): `field` is
    statistic, p_value, p_holm or n, for `factor` (model.depth) against `probe` (test_acc)."""
    t = r.trends
    row = t[(t["factor"] == factor) & (t["probe"] == probe)] if len(t) else t
    if len(row) != 1:
        raise ClaimError(f"{r.name}: no trend of {probe} against {factor}")
    return Num(row.iloc[0][field], "d" if field == "n" else ".2f" if field == "statistic" else ".2g")


@claim()
def rho(r: Report, factor: str, probe: str, sel) -> Num:
    """Spearman's rho of `probe` against `factor` over the selected configurations' means (one
    point per configuration, as the report's trends), computed here with analysis.stats.trend so a
    subset (e.g. init=data alone) uses the report's own statistic."""
    return Num(_subset_trend(r, factor, probe, sel).statistic, ".2f")


@claim()
def rho_p(r: Report, factor: str, probe: str, sel) -> Num:
    """Two-sided p-value of `rho` over the same subset (raw: no Holm step, it is one test)."""
    return Num(_subset_trend(r, factor, probe, sel).p_value, ".1g")


@claim()
def rho_n(r: Report, factor: str, probe: str, sel) -> Num:
    """How many configuration means `rho` is computed over."""
    return Num(_subset_trend(r, factor, probe, sel).n, "d")


def _subset_trend(r: Report, factor: str, probe: str, sel):
    from analysis.stats import trend as stats_trend
    rows = select(r, sel)
    return stats_trend(factor, probe, pd.to_numeric(rows[factor]).tolist(), column(rows, probe, r).tolist(),
                       "numeric")


@claim()
def log_drops(r: Report, key: str, by: str, sel, spec: str = "") -> str:
    """Decades lost per step of `by` (e.g. depth): the log10 of the geometric mean of `key` over the
    selected configurations at each level, differenced between consecutive levels; levels whose
    value sits at float64's floor (underflow) are left out, since their drop is unknown.
    Renders 'a, b, c and d'."""
    levels = _levels(r, key, by, sel)
    logs = [math.log10(v) for _, v in levels]
    drops = [a - b for a, b in zip(logs, logs[1:])]
    return join([fmt(d, spec or ".0f") for d in drops])


@claim()
def log_levels(r: Report, key: str, by: str, sel, spec: str = "") -> str:
    """The geometric mean of `key` at each level of `by` over the selection: '5.5e-14 at depth 1,
    2.7e-31 at depth 2, ...' (what `log_drops` differences), underflowed levels named as such."""
    rows = select(r, sel)
    out = []
    for lv, grp in rows.groupby(by):
        v = geometric(column(grp, key, r))
        out.append(f"{fmt(v, spec or 'sci2')} at {by} {lv}")
    return join(out)


def _levels(r: Report, key: str, by: str, sel) -> list[tuple[Any, float]]:
    rows = select(r, sel)
    out = [(lv, geometric(column(grp, key, r))) for lv, grp in rows.groupby(by)]
    return [(lv, v) for lv, v in out if v == v and v > FLOAT_MIN * 1.000001]


@claim()
def log_spread(r: Report, key: str, sel) -> Num:
    """Decades between the lower and upper bound of `key`'s interval for the one selected
    configuration (how far apart its seeds lie on a log scale)."""
    row = one(r, sel)
    return Num(math.log10(float(row[f"{key}.hi"])) - math.log10(float(row[f"{key}.lo"])), ".0f")


def _pair(sel) -> tuple[list, list]:
    """Split a selector into the `a.` and `b.` sides of a comparison (unprefixed keys go to both)."""
    common = [s for s in sel if not s[0].startswith(("a.", "b."))]
    a = [(k[2:], op, v) for k, op, v in sel if k.startswith("a.")]
    b = [(k[2:], op, v) for k, op, v in sel if k.startswith("b.")]
    return common + a, common + b


@claim()
def log_ratio(r: Report, key: str, sel) -> Num:
    """Decades between two configurations: log10 of `key` of the one selected by the `a.`-prefixed
    selectors over that of the one selected by the `b.` ones (e.g. how far residual skips lift the
    smallest act_grad)."""
    a, b = _pair(sel)
    return Num(math.log10(float(one(r, a)[key])) - math.log10(float(one(r, b)[key])), ".0f")


@claim()
def range_diff(r: Report, key_a: str, key_b: str, sel, spec: str = "") -> str:
    """'min-max' over the selected configurations of `key_a` minus `key_b` (e.g. test_acc minus
    test_acc_transformed, what the affine test set costs); default in whole points."""
    rows = select(r, sel)
    return _span_of(column(rows, key_a, r) - column(rows, key_b, r), spec or "pts")


POWER_DRAWS, POWER_SEED = 100_000, 20240609


@claim()
def power_equal(r: Report, n: str, sel, spec: str = "") -> str:
    """'0.87 at 5 seeds': how often the accuracy check passes a candidate exactly as good as its
    reference, with `n` seeds on each side (`seeds`: as many as the selected configurations have) and a seed standard deviation of half the margin, at the
    report's acc_margin and alpha. Simulated as docs/PROBES.md's calibration does (seeded, POWER_DRAWS
    draws, Monte Carlo error about 0.001) through the verdict's own Welch test (analysis.stats)."""
    from analysis.stats import noninferiority_p, welch
    k = seeds(r, sel).value if n == "seeds" else int(n)
    margin, alpha = float(r.thresholds["acc_margin"]), float(r.thresholds["alpha"])
    rng = np.random.default_rng(POWER_SEED)
    cand, ref = (rng.normal(0.0, margin / 2, (POWER_DRAWS, k)) for _ in range(2))
    diff = cand.mean(1) - ref.mean(1)
    se, df = welch(diff, cand.var(1, ddof=1), k, ref.var(1, ddof=1), k)
    passed = float((noninferiority_p(diff, se, df, margin) < alpha).mean())
    return f"{fmt(passed, spec or '.2f')} at {k} seeds"


def numeric_levels(r: Report, key: str) -> set[float]:
    """Every level of column `key` in the report (for checking a level the prose names)."""
    if key not in r.configs.columns:
        return set()
    return set(pd.to_numeric(r.configs[key], errors="coerce").dropna().astype(float))
