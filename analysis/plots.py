"""The report's figures, as PNG files. matplotlib's object API with the Agg canvas (no pyplot, no global
backend switch, no display needed), so it runs on a head node or in CI.

Every figure shows every swept factor (docs/PROBES.md, "The verdict"): one factor on the x axis, one as
the line colour (the legend names it; `model.arch` when it varies, so the cnn control sits beside the
CapsNets), and one panel per combination of the others (small multiples). In a panel a line is one
configuration per x value: its seeds as small points, and its mean over seeds as a marker with the
two-sided (1 - 2 alpha) t interval of that mean (each end a one-sided bound at level alpha, the verdict's
bounds). Bars of quantities that cannot be negative are clipped at 0 (fractions also at 1) and the
caption says so. A probe a trial does not log (n/a) is not drawn, never drawn as 0.

Every plot function takes the annotated trial table (analysis.verdict.annotate) and returns either
{"file", "title", "caption"} for a written PNG or {"title", "skipped": reason}.
"""
from __future__ import annotations

import math
import multiprocessing as mp
import os
import sys
import textwrap
from typing import Optional

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from analysis.results import Verdict
from analysis.stats import t_interval
from analysis.verdict import factor_kind, short_names
from capsmodels.contract import CANDIDATE, CONTROL, parse_layer_metric

DPI = 100
DPI_MANY = 80           # figures of more than 6 panels: 2/3 of the pixels to draw and encode, text still legible
MAX_PANELS = 12         # more panel combinations: the first 12 (by factor level) are drawn, the caption says so
SEED_POINTS_MAX = 1500  # more finished trials in a figure: configuration means and intervals only, no seed points
PROBE_AXES = {  # probe -> (axis label, bounds for clipping, title)
    "test_acc": ("test accuracy (fraction, last epoch)", (0.0, 1.0), "Test accuracy"),
    "grad_ratio": ("log10 grad_ratio (act_grad/l1 / act_grad/l{L})", None, "Gradient ratio (log10)"),
    "act_grad_min": ("log10 min over layers of act_grad", None, "Gradient floor: log10 min act_grad"),
    "starved_worst": ("worst hidden layer starved_frac", (0.0, 1.0), "Starved capsules (worst hidden layer)"),
    "dead_worst": ("worst hidden layer dead_frac", (0.0, 1.0), "Dead capsules (worst hidden layer)"),
    "frozen_worst": ("worst hidden layer frozen_frac", (0.0, 1.0), "Frozen capsules (worst hidden layer)"),
    "tree_score": ("tree score (mean over routed layers)", (0.0, 1.0), "Parse-tree score"),
    "routing_dynamics": ("routing dynamics: std over inputs of c_ij", (0.0, None), "Routing dynamics"),
}
HIDDEN_ONLY = {"starved_worst", "dead_worst", "frozen_worst"}


def _grid(n: int, width: float = 4.3, height: float = 3.3) -> tuple[Figure, list]:
    """n panels sharing one y axis (so panels compare at a glance), 2 or 3 to a row (4 beyond 6
    panels, each smaller: the PNG's pixels, and so its drawing and encoding time, stay bounded). One
    panel alone is drawn wider: a figure title is as long whatever the panels, and it must fit."""
    if n == 1:
        width = max(width, 6.2)
    ncols = 2 if n in (2, 4) else min(3 if n <= 6 else 4, n)
    nrows = math.ceil(n / ncols)
    many = n > 6
    if many:
        width, height = 0.8 * width, 0.8 * height
    w, h = width * ncols + 0.4, height * nrows + 0.9
    # Beyond 6 panels fixed margins instead of the constrained layout, whose solver draws the whole
    # figure once more before it is saved (half the figure's cost); outer panels carry the axis labels.
    fig = Figure(figsize=(w, h), dpi=DPI_MANY if many else DPI, layout=None if many else "constrained")
    if many:
        fig.subplots_adjust(left=0.75 / w, right=1 - 0.15 / w, bottom=1.05 / h, top=1 - 0.6 / h,
                            wspace=0.12, hspace=0.45)
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(nrows, ncols, 1)]
    axes += [fig.add_subplot(nrows, ncols, i + 1, sharey=axes[0]) for i in range(1, n)]
    for ax in axes:
        ax.grid(True, alpha=0.3)
    return fig, axes


CHAR_EM = 0.62     # the mean advance of a DejaVu Sans character, in ems (measured on our titles: ~0.55-0.6)


def fit_text(text: str, inches: float, fontsize: float) -> str:
    """`text` broken into lines that fit `inches` at `fontsize` points: matplotlib neither wraps nor
    shrinks a title or an axis label, it cuts it at the figure's edge (a one-panel figure's title read
    "adient reaching each capsule layer ... by lay")."""
    chars = max(12, int(inches * 72 / (fontsize * CHAR_EM)))
    return textwrap.fill(text, chars, break_on_hyphens=False)


def _save(fig: Figure, out_dir: str, name: str) -> str:
    fig.savefig(os.path.join(out_dir, name), dpi=fig.dpi)
    return name


def _levels(df: pd.DataFrame, col: str) -> list:
    """The levels of a factor that occur in df, numbers sorted numerically and before strings."""
    vals = df[col].fillna("").astype(str).unique().tolist() if col in df else []
    return sorted(vals, key=lambda v: (0, float(v), "") if _is_num(v) else (1, 0.0, v))


def _is_num(v) -> bool:
    try:
        float(v)
        return True
    except (TypeError, ValueError):
        return False


def layout(df: pd.DataFrame, x: str, swept: list[str], hue: Optional[str] = None) -> tuple[Optional[str], list[str]]:
    """(hue factor, panel factors) for a plot of df against x: every swept factor that varies in df
    besides x is either the hue (`model.arch` if it varies, else the one with the fewest levels) or a
    panel factor."""
    others = [f for f in swept if f != x and f in df and len(_levels(df, f)) > 1]
    if hue is None and others:
        hue = "model.arch" if "model.arch" in others else min(others, key=lambda f: len(_levels(df, f)))
    return hue, [f for f in others if f != hue]


def _panels(df: pd.DataFrame, panel_factors: list[str]) -> list[tuple[str, dict]]:
    """(title, {factor: level}) per combination of the panel factors that occurs in df."""
    if not panel_factors:
        return [("", {})]
    names = short_names(panel_factors)
    rank = {f: {v: i for i, v in enumerate(_levels(df, f))} for f in panel_factors}
    combos = df[panel_factors].fillna("").astype(str).drop_duplicates().itertuples(index=False, name=None)
    out = []
    for combo in sorted(combos, key=lambda c: tuple(rank[f][v] for f, v in zip(panel_factors, c))):
        out.append((", ".join(f"{names[f]}={v}" for f, v in zip(panel_factors, combo)),
                    dict(zip(panel_factors, combo))))
    return out


def _select(df: pd.DataFrame, levels: dict) -> pd.DataFrame:
    """The rows of df at the given factor levels."""
    keep = np.ones(len(df), dtype=bool)
    for f, v in levels.items():
        keep &= (df[f].fillna("").astype(str) == v).to_numpy()
    return df[keep]


def _x_positions(df: pd.DataFrame, x: str) -> tuple[pd.Series, list, Optional[list]]:
    """Numeric x per row, the positions of all levels, and the tick labels when x is categorical (levels
    at 0, 1, ...)."""
    if factor_kind(df[x]) == "numeric":
        xs = pd.to_numeric(df[x], errors="coerce")
        return xs, sorted(xs.dropna().unique().tolist()), None
    levels = _levels(df, x)
    xs = df[x].fillna("").astype(str).map({v: i for i, v in enumerate(levels)}).astype(float)
    return xs, list(range(len(levels))), levels


def _clip(v: float, bounds) -> float:
    if bounds is None or not math.isfinite(v):
        return v
    lo, hi = bounds
    return max(lo, v) if hi is None else min(hi, max(lo, v))


def _draw_series(ax, g: pd.DataFrame, xs: pd.Series, y: str, color, label: Optional[str], alpha: float,
                 bounds, offset: float, width: float, ls: str = "-", hollow: bool = False,
                 seeds: bool = True) -> list[int]:
    """One line: the mean with its t interval per x value, and (seeds=True) the seed points. Three
    artists per line whatever the number of trials (one scatter, one vlines, one line), so a figure of
    thousands of trials draws as fast as one of ten. Returns the seed counts."""
    vals, xv = g[y].to_numpy(dtype=float), xs.to_numpy(dtype=float)
    ok = np.isfinite(vals) & np.isfinite(xv)
    order = np.argsort(xv[ok], kind="stable")                   # by x, trials in table order within x
    vals, xv = vals[ok][order], xv[ok][order]
    uniq, starts = np.unique(xv, return_index=True)
    counts, px, py, bx, blo, bhi, sx = [], [], [], [], [], [], []
    for x0, v in zip(uniq, np.split(vals, starts[1:])):
        iv = t_interval(v, alpha)
        counts.append(iv.n)
        if seeds:
            sx.append(x0 + offset + (np.linspace(-width, width, len(v)) if len(v) > 1 else np.zeros(1)))
        lo, hi = _clip(iv.lo, bounds), _clip(iv.hi, bounds)
        if iv.n > 1 and math.isfinite(lo) and math.isfinite(hi):
            bx.append(x0 + offset)
            blo.append(lo)
            bhi.append(hi)
        px.append(x0 + offset)
        py.append(iv.mean)
    if sx:
        ax.scatter(np.concatenate(sx), vals, s=9, color=color, alpha=0.45, linewidths=0, zorder=2)
    if bx:
        ax.vlines(bx, blo, bhi, color=color, lw=1.6, zorder=3)
    if px:
        ax.plot(px, py, ls=ls, marker="o", ms=5 if len(px) <= 60 else 3, color=color, label=label, zorder=4,
                mfc="white" if hollow else color)
    return counts


def facet_plot(trials: pd.DataFrame, x: str, y: str, swept: list[str], alpha: float, fname: str,
               out_dir: str, threshold: Optional[tuple[float, str]] = None, null: Optional[str] = None,
               title: Optional[str] = None, axis: Optional[tuple] = None, hue: Optional[str] = None) -> dict:
    """`y` (a per-trial column of annotate) against factor `x`, faceted by every other swept factor.
    axis: (y label, clipping bounds, title) when y is not in PROBE_AXES; hue: the colour factor
    (default: chosen by `layout`)."""
    ylabel, bounds, base_title = axis or PROBE_AXES[y]
    name_x = _factor_label(x)
    title = title or f"{base_title} against {name_x}"
    need = list(dict.fromkeys(c for c in ("status", x, y, null, hue, *swept) if c and c in trials))
    fin = trials.loc[trials["status"] == "finished", need]       # only what is drawn: rows copy cheaply
    df = fin[fin[y].notna()]
    if x not in trials or len(_levels(trials, x)) < 2:
        return {"title": title, "skipped": f"{name_x} did not vary"}
    if df.empty:
        return {"title": title, "skipped": f"n/a: no finished trial logs what {y} needs"}
    hue, panel_factors = layout(df, x, swept, hue)
    panels = _panels(df, panel_factors)
    n_panels = len(panels)
    panels = panels[:MAX_PANELS]
    seeds = len(df) <= SEED_POINTS_MAX
    fig, axes = _grid(len(panels))
    hue_levels = _levels(df, hue) if hue else [""]
    colors = {h: f"C{i % 10}" for i, h in enumerate(hue_levels)}
    xs_all, positions, ticks = _x_positions(fin, x)
    span = (max(positions) - min(positions)) or 1.0
    dodge = 0.06 * span / max(1, len(hue_levels))
    counts: list[int] = []
    for ax, (ptitle, levels) in zip(axes, panels):
        pdf = _select(df, levels)
        missing = sorted(set(xs_all.loc[_select(fin, levels).index].dropna()) - set(xs_all.loc[pdf.index]))
        for xv in missing:       # the factor level exists in this panel, the probe does not: say so
            ax.text(xv, 0.03, "n/a", transform=ax.get_xaxis_transform(), ha="center", fontsize=8, color="grey")
        for i, h in enumerate(hue_levels):
            g = pdf if not hue else pdf[pdf[hue].fillna("").astype(str) == h]
            if g.empty:
                continue
            off = (i - (len(hue_levels) - 1) / 2) * dodge
            label = f"{short_names([hue])[hue]}={h}" if hue else None
            counts += _draw_series(ax, g, xs_all.loc[g.index], y, colors[h], label, alpha, bounds, off,
                                   dodge / 3, seeds=seeds)
            if null:
                gn = g[g[null].notna()]
                if not gn.empty:
                    _draw_series(ax, gn, xs_all.loc[gn.index], null, colors[h], None, alpha, bounds, off,
                                 dodge / 3, ls="--", hollow=True, seeds=seeds)
        if threshold:
            ax.axhline(threshold[0], color="grey", ls=":", lw=1)
        ax.set_title(fit_text(ptitle, fig.get_figwidth() * ax.get_position().width, 9), fontsize=9)
        if fig.get_layout_engine() is not None or ax.get_subplotspec().is_last_row():
            ax.set_xlabel(name_x, fontsize=8)
        if fig.get_layout_engine() is not None or ax.get_subplotspec().is_first_col():
            panel_h = fig.get_figheight() * ax.get_position().height      # the label runs along the panel
            ax.set_ylabel(fit_text(ylabel, panel_h, 8), fontsize=8)
        if ticks is not None:
            step = max(1, math.ceil(len(ticks) / 30))        # at most 30 labels on a categorical axis
            ax.set_xticks(positions[::step], ticks[::step])
        elif len(positions) <= 12:
            ax.set_xticks(positions, [f"{v:g}" for v in positions])
        ax.set_xlim(min(positions) - 0.08 * span, max(positions) + 0.08 * span)
        ax.tick_params(labelsize=8)
    handles, labels = axes[0].get_legend_handles_labels()
    for ax in axes[1:]:
        for h, l in zip(*ax.get_legend_handles_labels()):
            if l not in labels:
                handles.append(h)
                labels.append(l)
    if labels:
        fig.legend(handles, labels, loc="outside lower center" if fig.get_layout_engine() else "lower center",
                   fontsize=8, ncols=min(6, len(labels)))
    suptitle = fit_text(title, fig.get_figwidth() - 0.3, 11)
    fig.suptitle(suptitle, fontsize=11)
    if fig.get_layout_engine() is None:        # fixed margins (many panels): make room for wrapped text
        lines = lambda t: t.count("\n") + 1                        # noqa: E731
        w, h = fig.get_figwidth(), fig.get_figheight()
        ylines = max((lines(ax.get_ylabel()) for ax in axes if ax.get_ylabel()), default=1)
        tlines = max((lines(ax.get_title()) for ax in axes if ax.get_title()), default=1)
        fig.subplots_adjust(left=(0.5 + 0.14 * ylines) / w,
                            top=1 - (0.3 + 0.18 * lines(suptitle) + 0.15 * tlines) / h,
                            hspace=0.45 + 0.12 * (tlines - 1))
    n_range = f"{min(counts)}" if counts and min(counts) == max(counts) else \
        f"{min(counts)}-{max(counts)}" if counts else "0"
    level = f"{100 * (1 - 2 * alpha):g}%"
    caption = ("Small points: one per finished seed. " if seeds else
               f"Seeds not drawn ({len(df):,} finished trials; drawn up to {SEED_POINTS_MAX:,}). ")
    caption += (f"Marker and bar: mean over the N seeds of each configuration "
                f"(N = {n_range} here) with its two-sided {level} t interval (each end a one-sided bound at "
                f"level {alpha:g}, as in the verdict); one seed: no bar.")
    if hue:
        caption += f" Colour: {hue}."
    if panel_factors:
        caption += f" One panel per combination of {', '.join(panel_factors)}."
    if n_panels > len(panels):
        caption += (f" Only the first {len(panels)} of {n_panels:,} panels (in factor-level order) are drawn; "
                    "every configuration is in the report's tables.")
    if bounds is not None:
        caption += " Bars clipped to the quantity's range (" + (
            "0 to 1" if bounds[1] is not None else "at least 0") + ")."
    if threshold:
        caption += f" Dotted line: {threshold[1]}."
    if null:
        caption += (" Dashed with hollow markers: the same statistic on the null (children's votes permuted "
                    "across inputs).")
    caption += " 'n/a' on the axis: configurations that exist but do not log this probe (not drawn as 0)."
    if y in HIDDEN_ONLY:
        caption += " Depth 0 has no hidden layer: n/a, not drawn."
    return {"file": _save(fig, out_dir, fname), "title": title, "caption": caption}


def plot_layer_profile(trials: pd.DataFrame, swept: list[str], alpha: float, out_dir: str) -> dict:
    """log10 act_grad per capsule layer, one line per depth, one panel per combination of the other
    swept factors (architecture included)."""
    title = "Gradient reaching each capsule layer: log10 act_grad/l{l} by layer"
    act = {c: p[1] for c in trials.columns if (p := parse_layer_metric(c)) and p[0] == "act_grad"}
    cols = sorted(act, key=act.get)
    df = trials[trials["status"] == "finished"]
    if not cols or df[cols].notna().sum().sum() == 0:
        return {"title": title, "skipped": "n/a: no finished trial logs act_grad/l*"}
    keep = ["status", *(f for f in swept if f in df and f not in cols)]     # what facet_plot reads
    long = df[keep + cols].melt(id_vars=keep, value_vars=cols, var_name="_layer", value_name="_act")
    long = long[long["_act"].notna()].copy()
    long["_l"] = pd.to_numeric(long["_layer"].str.extract(r"(\d+)$")[0])
    long["_log_act"] = np.log10(np.maximum(long["_act"].to_numpy(dtype=float), np.finfo(float).tiny))
    out = facet_plot(long, "_l", "_log_act", ["_l", *swept], alpha, "act_grad_by_layer.png", out_dir,
                     title=title, axis=("log10 act_grad (mean ||dL/dv|| over inputs, capsules)", None, title),
                     hue="model.depth" if "model.depth" in swept else None)
    if "caption" in out:
        out["caption"] = ("x: capsule layer l (0 = primary capsules, depth+1 = class capsules). " + out["caption"]
                          + " A line that falls towards l = 0 is the vanishing gradient.")
    return out


def plot_curves(trials: pd.DataFrame, histories: pd.DataFrame, verdict: Verdict, out_dir: str) -> dict:
    """Validation-accuracy curves of the escaping configurations, else of the three most accurate
    candidates."""
    escaped = [c for c in verdict.configurations if c.escaped]
    if escaped:
        chosen, which = escaped[:6], "escaping configurations"
    else:
        pool = [c for c in verdict.configurations if c.role == CANDIDATE] or verdict.configurations
        pool = [c for c in pool if c.figures["test_acc"]["mean"] is not None]
        chosen = sorted(pool, key=lambda c: -c.figures["test_acc"]["mean"])[:3]
        which = "most accurate candidates (none escaped)"
    title = f"Training curves of the {which}"
    if not chosen or histories.empty:
        return {"title": title, "skipped": "no finished configuration with a metric history"}
    fig, (ax,) = _grid(1, width=7.5, height=4.0)
    for c in chosen:
        runs = trials[(trials["config_id"] == c.id) & (trials["status"] == "finished")]["run_id"]
        h = histories[(histories["key"] == "val_acc") & histories["run_id"].isin(runs)]
        if h.empty:
            continue
        agg = h.groupby("step")["value"].agg(["mean", "min", "max", "count"])
        line, = ax.plot(agg.index, agg["mean"], marker="o",
                        label=f"{c.id} ({int(agg['count'].max())} seeds): {c.label}")
        ax.fill_between(agg.index, agg["min"], agg["max"], color=line.get_color(), alpha=0.2)
    ax.set_ylabel("validation accuracy (fraction)")
    ax.set_xlabel("epoch")
    ax.xaxis.get_major_locator().set_params(integer=True)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    ax.set_title(fit_text(title, fig.get_figwidth() * ax.get_position().width, 10), fontsize=10)
    return {"file": _save(fig, out_dir, "training_curves.png"), "title": title,
            "caption": "Line: mean over the finished seeds of the configuration (count in the legend) per "
                       "epoch; shaded: min to max over those seeds."}


def budget_curves(histories: pd.DataFrame, run_ids) -> pd.DataFrame:
    """Test accuracy each run would be scored at with a budget of E epochs, for every E: the test
    accuracy of its best-validation epoch among epochs 0..E (the first of equal bests), carried on
    after the run stopped (patience: its model stays the best epoch's). Wide: index epoch, one column
    per run. Vectorised over all runs: one pivot, running maxima down the epochs."""
    h = histories[histories["key"].isin(("val_acc", "test_acc")) & histories["run_id"].isin(list(run_ids))]
    if h.empty:
        return pd.DataFrame()
    wide = h.pivot_table(index="step", columns=["key", "run_id"], values="value", aggfunc="last").sort_index()
    if "val_acc" not in wide.columns.get_level_values(0) or "test_acc" not in wide.columns.get_level_values(0):
        return pd.DataFrame()
    val, test = wide["val_acc"], wide["test_acc"].reindex(columns=wide["val_acc"].columns)
    best_so_far = val.ffill().cummax()
    improved = val.notna() & (val >= best_so_far) & (val > best_so_far.shift(1).fillna(-np.inf))
    return test.where(improved).ffill()


def plot_gap_curves(trials: pd.DataFrame, histories: pd.DataFrame, verdict: Verdict, out_dir: str) -> dict:
    """The accuracy gap against the budget: for each candidate (left) and control (right), the mean
    over its finished seeds of the test accuracy it would be scored at with E epochs, minus the same
    for its matched depth-0 reference, against E. A gap that closes as E grows is the budget's, not
    the architecture's (docs/PROBES.md, "Which epoch")."""
    title = "Accuracy gap to the depth-0 reference against the training budget"
    margin = verdict.thresholds["acc_margin"]
    finished = trials[trials["status"] == "finished"]
    runs_of = finished.groupby("config_id")["run_id"].apply(list).to_dict()
    judged = [c for c in verdict.configurations if c.role in (CANDIDATE, CONTROL) and c.reference
              and c.reference.get("run_ids") and runs_of.get(c.id)]
    if not judged or histories.empty:
        return {"title": title, "skipped": "no judged configuration with a reference and a metric history"}
    all_runs = {r for c in judged for r in runs_of[c.id] + c.reference["run_ids"]}
    curves = budget_curves(histories, all_runs)
    if curves.empty:
        return {"title": title, "skipped": "the histories hold no val_acc and test_acc per epoch"}
    highlight = {c.id for c in judged if c.escaped or c.verdict == "to confirm"}
    if not highlight:
        cands = [c for c in judged if c.role == CANDIDATE and c.figures["test_acc"]["mean"] is not None]
        highlight = {c.id for c in sorted(cands, key=lambda c: -c.figures["test_acc"]["mean"])[:3]}
    roles = [r for r in (CANDIDATE, CONTROL) if any(c.role == r for c in judged)]
    fig, axes = _grid(len(roles), width=5.6, height=3.8)
    for ax, role in zip(axes, roles):
        for c in (c for c in judged if c.role == role):
            mine = [r for r in runs_of[c.id] if r in curves.columns]
            ref = [r for r in c.reference["run_ids"] if r in curves.columns]
            if not mine or not ref:
                continue
            gap = (curves[mine].mean(axis=1) - curves[ref].mean(axis=1)).dropna()
            if gap.empty:
                continue
            if c.id in highlight or role == CONTROL:
                ax.plot(gap.index, gap.values, marker="o", ms=3, lw=1.5, label=f"{c.id}: {c.label}"[:60])
            else:
                ax.plot(gap.index, gap.values, color="0.6", lw=0.6, alpha=0.6)
        ax.axhline(-margin, color="crimson", ls="--", lw=1, label=f"-acc_margin = -{margin:g}")
        ax.axhline(0.0, color="0.3", lw=0.8)
        ax.set_xlabel("training budget (epochs)")
        ax.set_ylabel("test accuracy - reference's (fraction)")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_title("candidates (CapsNet) - depth-0 CapsNet" if role == CANDIDATE else
                     "controls (cnn) - depth-0 cnn", fontsize=9)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6, loc="lower right")
    return {"file": _save(fig, out_dir, "accuracy_gap_vs_budget.png"), "title": title,
            "caption": "For each configuration, the mean over its finished seeds of the test accuracy at its "
                       "best-validation epoch among the first E epochs, minus the same for its matched depth-0 "
                       "reference, against E. Coloured: the escaping and to-confirm candidates (else the three "
                       "most accurate) and every control; grey: the other candidates. Dashed: the margin the "
                       "accuracy check allows. A gap that closes as E grows is the budget's, not the network's."}


def _factor_label(col: str) -> str:
    return {"model.depth": "hidden capsule layers (depth)", "model.iterations": "routing iterations",
            "model.caps_dim": "capsule dimension", "data.train_size": "training set size (fraction or count)",
            "model.num_caps": "capsules per hidden layer", "_l": "capsule layer l"}.get(col, col)


def plot_workers() -> int:
    """Processes that draw the figures: CAPSWEEP_PLOT_WORKERS, else the usable cores (at most 8); 1
    where processes cannot be forked safely (drawing is matplotlib's CPU time, about 1-3 s a figure,
    whatever the number of trials: at 10,000 trials it was half of the report)."""
    if "fork" not in mp.get_all_start_methods() or sys.platform != "linux" or "ray" in sys.modules:
        return 1         # Ray's gRPC threads do not survive a fork: a report drawn inside a driver
    env = os.environ.get("CAPSWEEP_PLOT_WORKERS")
    if env:
        return max(1, int(env))
    return max(1, min(8, len(os.sched_getaffinity(0))))


_JOBS: list = []     # the figure jobs of the make_plots call in progress, inherited by forked workers


def _run_job(i: int) -> dict:
    title, job = _JOBS[i]
    try:
        return job()
    except Exception as e:  # noqa: BLE001 - one odd figure must not cost the whole report
        return {"title": title, "skipped": f"could not be drawn ({type(e).__name__}: {e})"}


def make_plots(trials: pd.DataFrame, histories: pd.DataFrame, verdict: Verdict, out_dir: str,
               swept: list[str], workers: Optional[int] = None) -> list[dict]:
    """All report figures into out_dir; one dict per figure (written or skipped with its reason), in
    a fixed order. workers: processes drawing them (None: `plot_workers()`); each figure is drawn
    and written whole by one process, so the files are the same for any number."""
    os.makedirs(out_dir, exist_ok=True)
    th = verdict.thresholds
    alpha = th["alpha"]
    thresholds = {
        "test_acc": (th["chance_accuracy_floor"], f"chance floor 1/K + chance_margin = {th['chance_accuracy_floor']:.3g}"),
        "grad_ratio": (math.log10(th["grad_ratio_min"]), f"log10 grad_ratio_min = {math.log10(th['grad_ratio_min']):.3g}"),
        "starved_worst": (th["starved_frac_max"], f"starved_frac_max = {th['starved_frac_max']:g}"),
        "dead_worst": (th["dead_frac_max"], f"dead_frac_max = {th['dead_frac_max']:g}"),
        "frozen_worst": (th["frozen_frac_max"], f"frozen_frac_max = {th['frozen_frac_max']:g}"),
    }
    jobs = []
    x_main = "model.depth"
    for probe in ("test_acc", "grad_ratio", "act_grad_min", "starved_worst", "dead_worst", "frozen_worst"):
        jobs.append((f"{PROBE_AXES[probe][2]} against depth", lambda p=probe: facet_plot(
            trials, x_main, p, swept, alpha, f"{p}_vs_depth.png", out_dir, thresholds.get(p))))
    jobs.append(("act_grad by layer", lambda: plot_layer_profile(trials, swept, alpha, out_dir)))
    x_routing = "model.iterations" if "model.iterations" in swept else x_main
    for probe in ("tree_score", "routing_dynamics"):
        jobs.append((f"{PROBE_AXES[probe][2]}", lambda p=probe: facet_plot(
            trials, x_routing, p, swept, alpha, f"{p}_vs_{x_routing.split('.')[-1]}.png", out_dir,
            null=f"{p}_null")))
    for factor in swept:
        if factor not in (x_main, "model.arch"):
            jobs.append((f"Test accuracy against {factor}", lambda f=factor: facet_plot(
                trials, f, "test_acc", swept, alpha, f"test_acc_vs_{f.split('.')[-1]}.png", out_dir,
                thresholds["test_acc"])))
    jobs.append(("Training curves", lambda: plot_curves(trials, histories, verdict, out_dir)))
    jobs.append(("Accuracy gap against the budget", lambda: plot_gap_curves(trials, histories, verdict, out_dir)))
    global _JOBS
    _JOBS = jobs
    try:
        n = min(len(jobs), plot_workers() if workers is None else workers)
        if n <= 1:
            return [_run_job(i) for i in range(len(jobs))]
        with mp.get_context("fork").Pool(n) as pool:      # forked: the jobs' data is not pickled
            return pool.map(_run_job, range(len(jobs)), chunksize=1)
    finally:
        _JOBS = []
