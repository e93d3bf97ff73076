"""The direct SQL read of a SQL-backed MLflow store (analysis/mlflowio.py: `sql_search_tagged`,
`sql_metric_histories`) gives exactly what MLflow's own client gives (`search_runs`,
`get_metric_history`) on a small real sqlite store written through the client, with the cases a filter
or a conversion could get wrong planted: a metric logged as NaN, a run deleted, a run of another sweep,
a run with another role, a run of another experiment, a value logged twice at one step, params and tags
with quotes and empty values."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from mlflow.entities import Metric, Param, RunTag

from analysis.load import _trials_table
from analysis.mlflowio import search_all, search_tagged, sql_engine, sql_metric_histories, sql_search_tagged
from tests.helpers.runs import make_store

TAGS = {"capsweep.sweep": "s1", "capsweep.role": "trial"}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("sqlread")
    st = make_store(root)
    uri, c, exp = st.uri, st.client, st.experiment_id
    other_exp = c.create_experiment("other", artifact_location=str(root / "b"))
    rng = np.random.default_rng(7)
    ids = {"want": [], "deleted": None}

    def run(exp_id, tags, i, name=True, nan=False):
        rid = c.create_run(exp_id, run_name=f"t{i}" if name else None, start_time=1000 + i).info.run_id
        metrics = [Metric(k, float(rng.normal()), 10 * e + j, e)
                   for e in range(4) for j, k in enumerate(("val_acc", "test_acc", "grad_norm/l1"))]
        metrics.append(Metric("val_acc", 0.123, 99, 2))            # a second value at step 2, logged later
        if nan:
            metrics.append(Metric("grad_ratio", float("nan"), 100, 3))
        c.log_batch(rid, metrics=metrics,
                    params=[Param("model.depth", str(i % 3)), Param("train.lr", "1e-3"),
                            Param("note", "it's \"quoted\""), Param("empty", "")],
                    tags=[RunTag(k, v) for k, v in tags.items()] + [RunTag("capsweep.seed", str(i))])
        c.set_terminated(rid, "FINISHED" if i % 4 else "FAILED", end_time=5000 + i)
        return rid

    for i in range(8):
        ids["want"].append(run(exp, TAGS, i, name=i != 5, nan=i == 2))
    ids["deleted"] = run(exp, TAGS, 20)
    c.delete_run(ids["deleted"])
    run(exp, {**TAGS, "capsweep.sweep": "s2"}, 21)
    run(exp, {**TAGS, "capsweep.role": "parent"}, 22)
    run(other_exp, TAGS, 23)
    return {"uri": uri, "client": c, "exp": exp, **ids}


def _same(a, b) -> bool:
    return (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b)) or a == b


def test_sql_runs_equal_the_clients_search_runs(store):
    c = store["client"]
    engine = sql_engine(c)
    assert engine is not None
    got = {r.info.run_id: r for r in sql_search_tagged(engine, store["exp"], TAGS)}
    ref = {r.info.run_id: r for r in search_all(
        c, store["exp"], "tags.`capsweep.sweep` = 's1' and tags.`capsweep.role` = 'trial'")}
    assert set(got) == set(ref) == set(store["want"])           # not the deleted, other sweep/role/experiment
    for rid, r in ref.items():
        g = got[rid]
        for f in ("run_id", "run_name", "status", "start_time", "end_time"):
            assert getattr(g.info, f) == getattr(r.info, f), f
        assert g.data.params == r.data.params and g.data.tags == r.data.tags
        assert g.data.metrics.keys() == r.data.metrics.keys()
        assert all(_same(g.data.metrics[k], v) for k, v in r.data.metrics.items())
    nan_run = store["want"][2]
    assert math.isnan(got[nan_run].data.metrics["grad_ratio"])
    assert got[store["want"][5]].info.run_name                   # from the mlflow.runName tag, as MLflow


def test_trials_table_is_identical_on_both_paths(store):
    c = store["client"]
    sql_df = _trials_table(search_tagged(c, store["exp"], TAGS), "s1")
    cli_df = _trials_table(search_all(
        c, store["exp"], "tags.`capsweep.sweep` = 's1' and tags.`capsweep.role` = 'trial'"), "s1")
    assert sql_df[0].columns.tolist() == cli_df[0].columns.tolist()
    pd.testing.assert_frame_equal(sql_df[0], cli_df[0])
    assert sql_df[1:] == cli_df[1:]


def test_sql_histories_equal_get_metric_history(store):
    c = store["client"]
    keys = ["val_acc", "grad_ratio", "grad_norm/l1"]
    got = sql_metric_histories(sql_engine(c), store["want"], keys, chunk=3)   # several chunks
    ref = [(rid, m.key, m.step, m.timestamp, m.value) for rid in store["want"] for k in keys
           for m in c.get_metric_history(rid, k)]
    assert len(got) == len(ref) == 8 * (4 + 1 + 4) + 1
    key = lambda t: (t[0], t[1], t[2], t[3])
    for g, r in zip(sorted(got, key=key), sorted(ref, key=key)):
        assert g[:4] == r[:4] and _same(g[4], r[4])
