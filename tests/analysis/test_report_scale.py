"""The report's vectorised steps (analysis/verdict.py, analysis/load.py) give exactly what the
one-row-at-a-time code they replaced gave.

A synthetic store of capsweep-shaped trials (benchmarks/report_scale.py's builder: 60 trials, 10
epochs, cnn controls) is read back, edge cases are planted in the table (non-finite and missing
probes, a missing depth param, a hidden layer not logged), and the per-trial probes, the references
and the best-epoch summaries are compared, value for value, with the earlier implementations, kept
here as the reference: a loop over rows calling verdict's own one-row helpers, the per-configuration
`find_reference`, and a per-run loop over the histories.
"""
from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from analysis import verdict as V
from analysis.load import _add_history_summaries, load_sweep

ROOT = Path(__file__).resolve().parents[2]


def _builder():
    spec = importlib.util.spec_from_file_location("report_scale", ROOT / "benchmarks" / "report_scale.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    uri = f"sqlite:///{tmp_path_factory.mktemp('scale') / 'mlflow.db'}"
    _builder().build_store_sql(uri, "synthetic", 240, 10, progress=False)     # 80 configurations
    return load_sweep("capsweep", uri, "synthetic")


def old_trial_probes(trials: pd.DataFrame) -> pd.DataFrame:
    """The row loop trial_probes was, on verdict's one-row helpers."""
    rows = []
    for _, r in trials.iterrows():
        depth = V._depth_of(r)
        a = r.get("model.arch")
        arch = a if isinstance(a, str) and a else "capsnet"
        act = V._layer_metrics(r, "act_grad")
        ratio = r.get("grad_ratio", math.nan)
        row = {"run_id": r["run_id"], "arch": arch, "depth": depth,
               "test_acc": float(r.get("test_acc", math.nan)),
               "grad_ratio": V._log10(float(ratio)) if act and ratio is not None else math.nan,
               "act_grad_min": V._log10(min(v for l, v in act.items() if l >= 1))
               if any(l >= 1 for l in act) else math.nan,
               "act_grad_class": V._log10(act[max(act)]) if act and max(act) >= 1 else math.nan}
        for probe, metric in (("starved_worst", "starved_frac"), ("dead_worst", "dead_frac"),
                              ("frozen_worst", "frozen_frac")):
            row[probe] = V._worst_hidden(r, metric, depth)
        for stat in ("tree_score", "routing_dynamics"):
            for name in (stat, V.NULLS[stat]):
                row[name] = V._mean_or_nan([v for l, v in V._layer_metrics(r, name).items() if l >= 1])
        rows.append(row)
    return pd.DataFrame(rows, columns=["run_id", "arch", "depth", *V.FIGURES])


def old_history_summaries(trials: pd.DataFrame, histories: pd.DataFrame) -> pd.DataFrame:
    trials = trials.copy()
    for col in ("n_epochs", "best_val_acc", "best_test_acc", "test_acc_at_best_val"):
        trials[col] = np.nan
    wide = histories.pivot_table(index=["run_id", "step"], columns="key", values="value", aggfunc="last")
    idx = trials.set_index("run_id").index
    for run_id, g in wide.groupby(level=0):
        i = idx.get_loc(run_id)
        g = g.droplevel(0)
        trials.iloc[i, trials.columns.get_loc("n_epochs")] = len(g)
        if "val_acc" in g and g["val_acc"].notna().any():
            trials.iloc[i, trials.columns.get_loc("best_val_acc")] = g["val_acc"].max()
            if "test_acc" in g:
                trials.iloc[i, trials.columns.get_loc("test_acc_at_best_val")] = g["test_acc"].get(
                    g["val_acc"].idxmax(), np.nan)
        if "test_acc" in g and g["test_acc"].notna().any():
            trials.iloc[i, trials.columns.get_loc("best_test_acc")] = g["test_acc"].max()
    return trials


def planted(trials: pd.DataFrame) -> pd.DataFrame:
    """Edge cases the synthetic sweep lacks, one per row."""
    t = trials.copy()
    t.loc[0, "act_grad/l1"] = np.inf                     # non-finite: absent
    t.loc[1, [c for c in t if c.startswith("act_grad/")]] = np.nan     # no act_grad at all
    t.loc[2, "model.depth"] = None                        # depth from the logged layers
    t.loc[3, "dead_frac/l1"] = np.nan                     # a hidden layer missing: the others, or _max
    t.loc[4, [c for c in t if c.startswith("starved_frac/")]] = np.nan
    t.loc[5, "grad_ratio"] = -1.0                         # negative: NaN on the log scale
    t.loc[6, "grad_ratio"] = 0.0                          # an exact 0: the smallest normal float
    t.loc[7, "tree_score/l2"] = np.nan                    # a mean over the layers left
    return t


def test_trial_probes_equal_the_row_loop(data):
    assert len(data.trials) == 240 and data.trials["model.depth"].nunique() == 6
    for trials in (data.trials, planted(data.trials)):
        new, old = V.trial_probes(trials), old_trial_probes(trials)
        # Same values, not the same bits: the row loop takes math.log10 and np.mean of a list, the
        # vectorised code numpy's log10 (its SIMD path may round the last bit differently on another
        # CPU) and row-wise means. 1e-12 (relative, and absolute on the log10 columns, i.e. decades) is
        # far below any difference a rule could see; NaN positions, columns and dtypes must still match.
        pd.testing.assert_frame_equal(new, old, check_exact=False, rtol=1e-12, atol=1e-12)
    assert old["grad_ratio"].notna().any() and old["tree_score"].notna().any()


def test_verdict_configurations_and_references_equal_the_per_config_search(data):
    trials, labels, swept = V.annotate(data)
    assert "model.depth" in swept and len(labels) == 80
    pool = V.reference_pool(trials)
    match = [c for c in swept if c not in V.MATCH_EXCLUDED]
    find = V.reference_finder(pool, match, "this sweep")
    seen = 0
    for cid, g in trials.groupby("config_id"):
        first = g.iloc[0]
        old = V.find_reference(first, pool, match, "this sweep")
        new = find(first)
        assert {k: v for k, v in new.items() if k != "trials"} == {k: v for k, v in old.items() if k != "trials"}
        pd.testing.assert_frame_equal(new["trials"], old["trials"])
        seen += old["how"] == "matched"
    assert seen > 10
    # a candidate whose reference has no trial of its arch, and one whose values match no trial
    lone = trials.iloc[0].copy()
    lone["arch"] = "transformer"
    for first in (lone, trials.iloc[0].replace({trials.iloc[0][match[0]]: "no such value"})):
        old, new = V.find_reference(first, pool, match, "x"), V.reference_finder(pool, match, "x")(first)
        assert {k: v for k, v in new.items() if k != "trials"} == {k: v for k, v in old.items() if k != "trials"}


def test_history_summaries_equal_the_per_run_loop(data):
    h = data.histories.copy()
    h.loc[(h["key"] == "val_acc") & (h["step"] == 9), "value"] = h["value"].max() + 1   # ties across runs
    h.loc[(h["key"] == "test_acc") & (h["run_id"] == data.trials["run_id"][0]), "value"] = np.nan
    h = h[~((h["key"] == "val_acc") & (h["run_id"] == data.trials["run_id"][1]))]        # no val_acc
    base = data.trials.drop(columns=["n_epochs", "best_val_acc", "best_test_acc", "test_acc_at_best_val"])
    for hist in (data.histories, h):
        pd.testing.assert_frame_equal(_add_history_summaries(base, hist), old_history_summaries(base, hist),
                                      check_exact=True)


def test_verdict_per_configuration_fields_equal_a_groupby(data):
    """compute_verdict's per-configuration loop (row positions over a narrow copy) against a plain
    pandas groupby of the annotated table, with planted failed/running seeds and a `trial.role`
    missing (pd.NA in an arrow string column) on some trials."""
    from dataclasses import replace

    from analysis.stats import t_interval
    from capsmodels.contract import FINISHED
    t = data.trials.copy()
    t["trial.role"] = t["trial.role"].astype("string[pyarrow]")
    t.loc[t.index[:4], "trial.role"] = pd.NA
    t.loc[t.index[4:7], "status"] = "failed"
    t.loc[t.index[7], "status"] = "running"
    d = replace(data, trials=t)
    v = V.compute_verdict(d)
    by_id = {c.id: c for c in v.configurations}
    trials, _, _ = V.annotate(d)
    alpha = v.thresholds["alpha"]
    assert len(by_id) == trials["config_id"].nunique() == 80
    for cid, g in trials.groupby("config_id"):
        c, fin = by_id[cid], g[g["status"] == FINISHED]
        assert c.run_ids == list(g["run_id"])
        assert (c.n_seeds, c.seeds) == (len(fin), [V._plain(s) for s in fin["seed"]])
        assert c.statuses == {str(k): int(n) for k, n in g["status"].value_counts().items()}
        assert c.trial_role == sorted({str(r) for r in g["trial.role"].dropna()})
        for p in V.FIGURES:
            assert c.figures[p] == V._figure_dict(p, t_interval(fin[p].tolist(), alpha)), (cid, p)
        if c.role != "reference":
            seeds = next(ch for ch in c.checks if ch["name"] == "seeds")
            bad = set(g["status"]) - {FINISHED}
            assert seeds["outcome"] == ("pass" if not bad else "inconclusive" if bad == {"running"} else "fail")
    assert any(c.trial_role == [] for c in by_id.values())
    assert sum(c.n_seeds for c in by_id.values()) == len(trials) - 4
