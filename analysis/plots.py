"""The report's figures, as PNG files. matplotlib's object API with the Agg canvas (no pyplot, no global
backend switch, no display needed), so it runs on a head node or in CI.

Every plot function takes the annotated trial table (analysis.verdict.annotate) and returns either
{"file", "title", "caption"} for a written PNG or {"title", "skipped": reason} when its factor did not vary
in the sweep. Values are over finished CapsNet trials; lines are means over seeds, bars the standard
deviation across seeds.
"""
from __future__ import annotations

import os
import re
from typing import Optional

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

DPI = 110
HEATMAP_FACTORS = ("model.depth", "model.iterations", "model.caps_dim", "data.train_size")
_GRAD = re.compile(r"^grad_norm/l(\d+)$")


def _figure(ncols: int = 1, width: float = 6.4) -> tuple[Figure, list]:
    fig = Figure(figsize=(width * ncols, 4.4), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]
    for ax in axes:
        ax.grid(True, alpha=0.3)
    return fig, axes


def _save(fig: Figure, out_dir: str, name: str) -> str:
    fig.savefig(os.path.join(out_dir, name), dpi=DPI)
    return name


def _num(s: pd.Series) -> pd.Series:
    return pd.to_numeric(s, errors="coerce")


def _levels(df: pd.DataFrame, col: str) -> int:
    return df[col].dropna().astype(str).nunique() if col in df else 0


def _capsnets(trials: pd.DataFrame) -> pd.DataFrame:
    return trials[(trials["status"] == "finished") & (trials["arch"] == "capsnet")]


def routing_setting(df: pd.DataFrame) -> pd.Series:
    """'dynamic, 3 it' per trial: the routing algorithm and its iterations, the 'routing setting'."""
    routing = df["model.routing"].astype(str) if "model.routing" in df else pd.Series("routing", index=df.index)
    if "model.iterations" in df:
        return routing + ", " + df["model.iterations"].astype(str) + " it"
    return routing


def _mean_std_line(ax, df: pd.DataFrame, x: str, y: str, group: Optional[pd.Series], **kw) -> None:
    groups = [("", df)] if group is None else sorted(df.groupby(group), key=lambda t: str(t[0]))
    for name, g in groups:
        agg = g.assign(_x=_num(g[x])).groupby("_x")[y].agg(["mean", "std"]).dropna(subset=["mean"])
        if agg.empty:
            continue
        ax.errorbar(agg.index, agg["mean"], yerr=agg["std"].fillna(0), marker="o", capsize=3,
                    label=str(name) if name != "" else None, **kw)


def plot_grad_norms(trials: pd.DataFrame, out_dir: str) -> dict:
    title = "Gradient norm per capsule layer against depth"
    df = _capsnets(trials)
    grad_cols = sorted((c for c in df.columns if _GRAD.match(str(c))), key=lambda c: int(_GRAD.match(c).group(1)))
    if df.empty or not grad_cols or df["depth"].isna().all():
        return {"title": title, "skipped": "no finished CapsNet trial logs grad_norm/l*"}
    fig, (ax1, ax2) = _figure(2)
    df = df.assign(_setting=routing_setting(df))
    for setting, g in sorted(df.groupby("_setting"), key=lambda t: str(t[0])):
        first, last = [], []
        for depth, gd in sorted(g.groupby("depth")):
            first.append((depth, gd["grad_norm/l1"].median() if "grad_norm/l1" in gd else np.nan))
            key = f"grad_norm/l{int(depth) + 1}"
            last.append((depth, gd[key].median() if key in gd else np.nan))
        line, = ax1.plot(*zip(*first), marker="o", label=f"{setting}: first routed layer l1")
        ax1.plot(*zip(*last), marker="s", ls="--", color=line.get_color(),
                 label=f"{setting}: class capsules l(depth+1)")
    _log_y(ax1)
    ax1.set_xlabel("hidden capsule layers (depth)")
    ax1.set_ylabel("gradient norm ||dL/dW||_F (median over seeds)")
    ax1.set_title("first and last routed layer")
    ax1.xaxis.get_major_locator().set_params(integer=True)
    ax1.legend(fontsize=7)
    for depth, gd in sorted(df.groupby("depth")):
        ls = list(range(0, int(depth) + 2))
        med = [gd[f"grad_norm/l{l}"].median() if f"grad_norm/l{l}" in gd else np.nan for l in ls]
        ax2.plot(ls, med, marker="o", label=f"depth {int(depth)}")
    _log_y(ax2)
    ax2.set_xlabel("capsule layer l (0 = primary capsules, depth+1 = class capsules)")
    ax2.set_ylabel("gradient norm ||dL/dW||_F (median over trials)")
    ax2.set_title("per-layer profile, all routing settings")
    ax2.xaxis.get_major_locator().set_params(integer=True)
    ax2.legend(fontsize=7)
    fig.suptitle(title)
    return {"file": _save(fig, out_dir, "grad_norm_by_depth.png"), "title": title,
            "caption": "Left: median gradient norm of the first routed layer (solid) and of the class "
                       "capsules (dashed) per routing setting; a widening gap with depth is the vanishing "
                       "gradient. Right: the norm of every capsule layer, one line per depth. Log scale."}


def plot_dead_heatmap(trials: pd.DataFrame, out_dir: str) -> dict:
    title = "Dead-capsule fraction (worst hidden layer)"
    df = _capsnets(trials)
    factors = sorted((f for f in HEATMAP_FACTORS if _levels(df, f) > 1), key=lambda f: -_levels(df, f))[:2]
    if not factors:
        return {"title": title, "skipped": "none of depth, routing iterations, capsule dimension, "
                                           "dataset size varied"}
    if df["dead_worst"].notna().sum() == 0:
        return {"title": title, "skipped": "no trial has a hidden capsule layer (all depth 0)"}
    fy = factors[0]
    fx = factors[1] if len(factors) > 1 else None
    df = df.assign(_y=_num(df[fy]), _x=_num(df[fx]) if fx else 0)
    table = df.pivot_table(index="_y", columns="_x", values="dead_worst", aggfunc="mean", dropna=False)
    table = table.reindex(sorted(df["_y"].dropna().unique())).reindex(columns=sorted(df["_x"].dropna().unique()))
    fig, (ax,) = _figure(1, width=7.0)
    ax.grid(False)
    vals = table.to_numpy(dtype=float)
    cmap = colormaps["Reds"].with_extremes(bad="#dddddd")
    im = ax.imshow(np.ma.masked_invalid(vals), cmap=cmap, vmin=0, vmax=1, aspect="auto", origin="lower")
    for (i, j), v in np.ndenumerate(vals):
        ax.text(j, i, "n/a" if not np.isfinite(v) else f"{v:.2f}", ha="center", va="center",
                fontsize=8, color="white" if np.isfinite(v) and v > 0.6 else "black")
    ax.set_yticks(range(len(table.index)), [f"{v:g}" for v in table.index])
    ax.set_ylabel(_factor_label(fy))
    if fx:
        ax.set_xticks(range(len(table.columns)), [f"{v:g}" for v in table.columns])
        ax.set_xlabel(_factor_label(fx))
    else:
        ax.set_xticks([])
        ax.set_xlabel("(only one of the heatmap factors varied)")
    fig.colorbar(im, ax=ax, label="fraction of hidden capsules dead (0-1), mean over seeds")
    ax.set_title(title)
    return {"file": _save(fig, out_dir, "dead_frac_heatmap.png"), "title": title,
            "caption": f"Mean over seeds of the worst hidden layer's dead_frac by {_factor_label(fy)}"
                       + (f" and {_factor_label(fx)}" if fx else "") + "; grey n/a: no hidden layer "
                       "(depth 0) or no trial in that cell."}


def plot_routing(trials: pd.DataFrame, out_dir: str) -> dict:
    title = "Parse-tree score and routing dynamics against routing iterations"
    df = _capsnets(trials)
    if _levels(df, "model.iterations") < 2:
        return {"title": title, "skipped": "routing iterations did not vary"}
    fig, (ax1, ax2) = _figure(2)
    group = df["model.routing"].astype(str) if "model.routing" in df else None
    _mean_std_line(ax1, df, "model.iterations", "tree_score", group)
    _mean_std_line(ax2, df, "model.iterations", "routing_dynamics", group)
    ax1.set_ylabel("tree score (0 = uniform couplings, 1 = one parent)")
    ax2.set_ylabel("routing dynamics: std over inputs of c_ij")
    for ax in (ax1, ax2):
        ax.set_xlabel("routing iterations")
        ax.xaxis.get_major_locator().set_params(integer=True)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(title="routing", fontsize=8)
    fig.suptitle(title)
    return {"file": _save(fig, out_dir, "routing_vs_iterations.png"), "title": title,
            "caption": "Mean over routed layers and seeds (bars: std over seeds). Routing dynamics near 0 "
                       "means the same routing for every input: no input-dependent parse tree."}


def plot_accuracy(trials: pd.DataFrame, out_dir: str, factor: str) -> dict:
    name = _factor_label(factor)
    title = f"Test accuracy against {name}"
    df = _capsnets(trials)
    if _levels(df, factor) < 2:
        return {"title": title, "skipped": f"{name} did not vary"}
    fig, (ax,) = _figure(1, width=7.0)
    _mean_std_line(ax, df, factor, "test_acc", routing_setting(df))
    cnn = trials[(trials["status"] == "finished") & (trials["arch"] != "capsnet")]
    if len(cnn) and factor != "model.depth" and _levels(cnn, factor) > 1:
        _mean_std_line(ax, cnn, factor, "test_acc", pd.Series("CNN baseline", index=cnn.index), ls=":")
    elif len(cnn):
        ax.axhline(cnn["test_acc"].mean(), ls=":", color="grey", label="CNN baseline (mean)")
    x = _num(df[factor]).dropna()
    if factor == "data.train_size" and len(x) and x.min() > 0 and x.max() / x.min() >= 10:
        ax.set_xscale("log")
    ax.set_xlabel(name)
    ax.set_ylabel("test accuracy (fraction, last epoch)")
    if factor == "model.depth":
        ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend(fontsize=8, title="routing setting")
    ax.set_title(title)
    slug = factor.split(".")[-1]
    return {"file": _save(fig, out_dir, f"accuracy_vs_{slug}.png"), "title": title,
            "caption": "Mean over seeds (bars: std), one line per routing setting."}


def plot_curves(trials: pd.DataFrame, histories: pd.DataFrame, verdict: dict, out_dir: str) -> dict:
    """Training curves of the escaping configurations, else of the three most accurate candidates."""
    escaped = [c for c in verdict["configurations"] if c["escaped"]]
    if escaped:
        chosen, which = escaped[:6], "escaping configurations"
    else:
        pool = [c for c in verdict["configurations"] if c["role"] == "candidate"] or verdict["configurations"]
        pool = [c for c in pool if c["figures"]["test_acc"]["mean"] is not None]
        chosen = sorted(pool, key=lambda c: -c["figures"]["test_acc"]["mean"])[:3]
        which = "most accurate candidates (none escaped)"
    title = f"Training curves of the {which}"
    if not chosen or histories.empty:
        return {"title": title, "skipped": "no finished configuration with a metric history"}
    fig, (ax1, ax2) = _figure(2)
    for c in chosen:
        runs = trials[(trials["config_id"] == c["id"]) & (trials["status"] == "finished")]["run_id"]
        for ax, key in ((ax1, "val_acc"), (ax2, "grad_ratio")):
            h = histories[(histories["key"] == key) & histories["run_id"].isin(runs)]
            if h.empty:
                continue
            agg = h.groupby("step")["value"].agg(["mean", "min", "max"])
            line, = ax.plot(agg.index, agg["mean"], marker="o", label=f"{c['id']}: {c['label']}")
            ax.fill_between(agg.index, agg["min"], agg["max"], color=line.get_color(), alpha=0.2)
    ax1.set_ylabel("validation accuracy (fraction)")
    ax2.set_ylabel("grad_ratio = ||grad l1|| / ||grad l(depth+1)||")
    _log_y(ax2)
    for ax in (ax1, ax2):
        ax.set_xlabel("epoch")
        ax.xaxis.get_major_locator().set_params(integer=True)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.suptitle(title)
    return {"file": _save(fig, out_dir, "training_curves.png"), "title": title,
            "caption": "Mean over seeds per epoch; shaded: min to max over seeds."}


def _factor_label(col: str) -> str:
    return {"model.depth": "hidden capsule layers (depth)", "model.iterations": "routing iterations",
            "model.caps_dim": "capsule dimension", "data.train_size": "training set size (fraction or count)",
            "model.num_caps": "capsules per hidden layer"}.get(col, col)


def make_plots(trials: pd.DataFrame, histories: pd.DataFrame, verdict: dict, out_dir: str) -> list[dict]:
    """All report figures into out_dir; one dict per figure (written or skipped with its reason)."""
    os.makedirs(out_dir, exist_ok=True)
    jobs = [
        ("Gradient norm per capsule layer against depth", lambda: plot_grad_norms(trials, out_dir)),
        ("Dead-capsule fraction", lambda: plot_dead_heatmap(trials, out_dir)),
        ("Parse-tree score and routing dynamics", lambda: plot_routing(trials, out_dir)),
        ("Test accuracy against depth", lambda: plot_accuracy(trials, out_dir, "model.depth")),
        ("Test accuracy against training set size", lambda: plot_accuracy(trials, out_dir, "data.train_size")),
        ("Training curves", lambda: plot_curves(trials, histories, verdict, out_dir)),
    ]
    out = []
    for title, job in jobs:
        try:
            out.append(job())
        except Exception as e:  # noqa: BLE001 - one odd figure must not cost the whole report
            out.append({"title": title, "skipped": f"could not be drawn ({type(e).__name__}: {e})"})
    return out


def _log_y(ax) -> None:
    """Log y-axis when the data has a positive value; exact zeros (a gradient that vanished
    completely) cannot sit on a log axis, so they are said in the axes instead of dropped silently."""
    ys = np.concatenate([np.asarray(l.get_ydata(), dtype=float) for l in ax.get_lines()] or [np.array([])])
    ys = ys[np.isfinite(ys)]
    if (ys > 0).any():
        ax.set_yscale("log")
    if (ys == 0).any():
        ax.text(0.01, 0.01, "values of exactly 0 (no gradient) not drawn on the log axis" if (ys > 0).any()
                else "every value is exactly 0 (no gradient)", transform=ax.transAxes, fontsize=7,
                color="firebrick", va="bottom")
