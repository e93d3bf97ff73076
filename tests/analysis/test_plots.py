"""The accuracy gap against the training budget (analysis/plots.py, docs/PROBES.md "Which epoch"):
the per-run budget curve checked against a plain loop, and the figure drawn from a real verdict."""
from __future__ import annotations

import os

import numpy as np
import pandas as pd

from analysis.plots import budget_curves, plot_gap_curves
from analysis.verdict import annotate, compute_verdict
from tests.helpers.synthetic import synthetic_sweep


def _history(runs: dict) -> pd.DataFrame:
    rows = [(rid, key, step, v) for rid, seqs in runs.items() for key, seq in seqs.items()
            for step, v in enumerate(seq)]
    return pd.DataFrame(rows, columns=["run_id", "key", "step", "value"])


def _loop(val: list, test: list, epochs: int) -> list:
    """Test accuracy at the best-val epoch among 0..E (first of equal bests), carried after the end."""
    out, best, at = [], -1.0, None
    for e in range(epochs):
        if e < len(val) and val[e] > best:
            best, at = val[e], test[e]
        out.append(at)
    return out


def test_budget_curves_equal_a_loop():
    runs = {"a": {"val_acc": [0.5, 0.7, 0.6, 0.8, 0.8], "test_acc": [0.4, 0.6, 0.9, 0.75, 0.7]},
            "b": {"val_acc": [0.6, 0.6], "test_acc": [0.5, 0.7]},              # stopped early, a tie
            "c": {"val_acc": [0.1, 0.2, 0.3], "test_acc": [0.2, 0.1, 0.3]}}
    got = budget_curves(_history(runs), runs)
    for rid, s in runs.items():
        assert got[rid].tolist() == _loop(s["val_acc"], s["test_acc"], 5), rid


def test_gap_figure_from_a_verdict(tmp_path):
    rng = np.random.default_rng(3)
    data = synthetic_sweep(rng, [("capsnet", 0, "healthy"), ("capsnet", 3, "healthy"), ("cnn", 0, "healthy"),
                                 ("cnn", 3, "healthy")], seeds=3)
    # per-epoch histories: the deep nets converge more slowly and catch up by epoch 4
    hist = {}
    for _, t in data.trials.iterrows():
        deep = t["model.depth"] == "3"
        curve = [t["test_acc"] - (0.05 * (4 - e) / 4 if deep else 0.0) for e in range(5)]
        hist[t["run_id"]] = {"val_acc": [v + 0.001 * e for e, v in enumerate(curve)], "test_acc": curve}
    data.histories = _history(hist)
    v = compute_verdict(data)
    fig = plot_gap_curves(annotate(data)[0], data.histories, v, str(tmp_path))
    assert fig.get("file") == "accuracy_gap_vs_budget.png", fig
    assert os.path.getsize(tmp_path / fig["file"]) > 10_000
    # the gap it draws closes: at epoch 0 the deep candidate is 0.05 behind, at the end about even
    cand = next(c for c in v.configurations if c.role == "candidate")
    curves = budget_curves(data.histories, cand.run_ids + cand.reference["run_ids"])
    gap = curves[cand.run_ids].mean(axis=1) - curves[cand.reference["run_ids"]].mean(axis=1)
    ref_mean = data.trials.set_index("run_id").loc[cand.reference["run_ids"], "test_acc"].mean()
    assert gap.iloc[0] < -0.04
    assert abs(gap.iloc[-1] - (cand.figures["test_acc"]["mean"] - ref_mean)) < 1e-9   # the verdict's gap
