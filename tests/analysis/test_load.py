"""Reading a sweep from a real store (analysis/load.py): one row per trial, bulk histories, which sweep
is the default.

The store: tests/helpers/analysis_store.py (the `store` and `s1` fixtures of tests/analysis/conftest.py)."""
from __future__ import annotations

import time
import numpy as np
import pytest
from mlflow import MlflowClient
from analysis.load import fetch_histories, load_sweep
from analysis.errors import AnalysisError
from tests.helpers.runs import log_trial, start_sweep
from tests.helpers.probe_metrics import BASE, capsnet_metrics
from tests.helpers.analysis_store import E_ACC, E_GRAD, EPOCHS


def test_load_table_has_one_row_per_trial_of_the_sweep(store, s1):
    data, _ = s1
    t = data.trials
    assert len(t) == 3 + 3 + 3 + 4 + 3 + 3 + 3 + 3 + 3 + 3 + 3 + 3 + 3  # R E U V D F T A C X S CNN0 CNN2
    assert set(t["sweep"]) == {"s1"} and data.parent_run_id == store["parent"]
    assert {"model.depth", "model.init", "train.lr", "train.seed"} <= set(data.param_cols)
    assert t["status"].value_counts().to_dict() == {"finished": 37, "failed": 1, "diverged": 1,
                                                  "stopped": 1}
    e = t[t["run_id"].isin(store["configs"]["E"])].sort_values("seed")
    assert e["grad_ratio"].tolist() == E_GRAD and e["test_acc"].tolist() == E_ACC
    assert e["best_val_acc"].tolist() == pytest.approx([a + 0.01 for a in E_ACC])
    assert e["n_epochs"].tolist() == [EPOCHS] * 3
    assert data.history_method.startswith("SQL bulk")


def test_bulk_histories_equal_per_run_histories(store):
    client = MlflowClient(store["uri"])
    runs = store["configs"]["E"] + store["configs"]["X"]
    bulk, method = fetch_histories(client, runs, ["val_acc", "grad_ratio", "test_loss"])
    assert method.startswith("SQL bulk")
    for rid in runs:
        for key in ("val_acc", "grad_ratio", "test_loss"):
            ref = sorted((m.step, m.value) for m in client.get_metric_history(rid, key))
            got = bulk[(bulk["run_id"] == rid) & (bulk["key"] == key)].sort_values("step")
            assert got["step"].tolist() == [s for s, _ in ref]
            np.testing.assert_array_equal(got["value"].to_numpy(), [v for _, v in ref])


def test_default_sweep_is_the_most_recent_with_a_note(store):
    data = load_sweep("capsweep", store["uri"], None, progress=False)
    assert data.sweep == "tiny" and len(data.trials) == 4
    assert any("3 sweeps" in n and "'tiny'" in n for n in data.notes)


def test_sweeps_whose_parent_run_is_gone_are_found_and_the_latest_is_the_default(store):
    """A deleted parent run (an interrupted start, a clean-up) does not hide its sweep: `--sweep` finds
    it beside sweeps that have parents, and with no parent at all the default is the sweep whose
    trials started last, not the alphabetically last name."""
    c = MlflowClient(store["uri"])
    exp = c.create_experiment("orphans")
    started = []
    for name in ("zeta", "alpha", "kept"):        # in this order: "kept" is the only one with a parent
        time.sleep(0.01)
        parent = start_sweep(c, exp, name)
        log_trial(c, exp, parent, name, f"{name}0", {**BASE, "model.depth": 0, "train.seed": 0},
                  capsnet_metrics(0, grad_ratio=1, dead_hidden=0, test_acc=0.9))
        started.append(parent)
    c.delete_run(started[0])
    c.delete_run(started[1])
    data = load_sweep("orphans", store["uri"], "zeta", progress=False)
    assert data.sweep == "zeta" and list(data.trials["trial_id"]) == ["zeta0"] and data.parent_run_id is None
    assert any("'zeta' has no parent run" in n for n in data.notes)
    with pytest.raises(AnalysisError, match="sweep 'nope' not found .*sweeps there: alpha, kept, zeta"):
        load_sweep("orphans", store["uri"], "nope", progress=False)
    c.delete_run(started[2])                       # now no sweep has a parent
    data = load_sweep("orphans", store["uri"], None, progress=False)
    assert data.sweep == "kept" and data.parent_run_id is None
    assert any("3 sweeps" in n and "'kept'" in n for n in data.notes)
    c.delete_run(c.search_runs([exp], "tags.`capsweep.sweep` = 'kept'")[0].info.run_id)
    assert load_sweep("orphans", store["uri"], None, progress=False).sweep == "alpha"   # not "zeta"
