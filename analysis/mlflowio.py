"""Direct reads of a SQL-backed MLflow store, for the report at scale (analysis/load.py).

`search_runs` on a SQL store builds one ORM object per param, tag and metric (at 10,000 trials x ~100
of each, about 70% of the report's read); these functions read the same values straight from MLflow's
own tables through SQLAlchemy Core. Any other store is read through the client (analysis/store.py,
`search_all`). mlflow and sqlalchemy are imported inside the functions.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Mapping, Optional

from analysis.store import quote, search_all


@dataclass
class RunInfoRow:
    """The RunInfo fields the analysis reads, under MLflow's names."""
    run_id: str
    run_name: Optional[str]
    status: str
    start_time: Optional[int]
    end_time: Optional[int]


@dataclass
class RunDataRow:
    """A run's latest metric values, params and tags, as `Run.data` holds them."""
    metrics: dict = field(default_factory=dict)
    params: dict = field(default_factory=dict)
    tags: dict = field(default_factory=dict)


@dataclass
class RunRow:
    """A run read straight from MLflow's tables; quacks like `mlflow.entities.Run` for `.info`/`.data`."""
    info: RunInfoRow
    data: RunDataRow


def sql_engine(client):
    """The SQLAlchemy engine of the client's store when it is SQL-backed (sqlite, postgresql, mysql,
    mssql), else None (a tracking server, a file store): those are read through the client."""
    store = getattr(getattr(client, "_tracking_client", None), "store", None)
    return getattr(store, "engine", None) if hasattr(store, "get_metric_history_bulk") else None


def _tables():
    """MLflow's own table definitions (its ORM models' `__table__`), used through SQLAlchemy Core: the
    dialect quotes names (`key` is reserved in MySQL) and rows come back as plain tuples."""
    from mlflow.store.tracking.dbmodels import models as m
    return (m.SqlRun.__table__, m.SqlTag.__table__, m.SqlParam.__table__, m.SqlLatestMetric.__table__,
            m.SqlMetric.__table__)


def _run_ids(experiment_id: str, tags: Mapping[str, str]):
    """SELECT of the ids of the active runs of the experiment carrying every tag key = value, as
    `search_runs` with `tags.`k` = 'v' and ...` (active runs only) finds them."""
    from sqlalchemy import and_, exists, select
    runs, tag_t = _tables()[:2]
    cond = [runs.c.experiment_id == int(experiment_id), runs.c.lifecycle_stage == "active"]
    for k, v in tags.items():
        t = tag_t.alias()
        cond.append(exists().where(and_(t.c.run_uuid == runs.c.run_uuid, t.c.key == k, t.c.value == v)))
    return select(runs.c.run_uuid).where(and_(*cond))


def _rows(con, query) -> list[tuple]:
    """Every row of a SELECT as plain tuples, fetched in one call: iterating SQLAlchemy's result row
    by row cost 5 of the 13 s of reading a 10,000-trial sweep (1.5 million rows)."""
    return con.execute(query).fetchall()


def sql_search_tagged(engine, experiment_id: str, tags: Mapping[str, str]) -> list[RunRow]:
    """The active runs of `experiment_id` carrying every tag in `tags`, read from MLflow's `runs`,
    `tags`, `params` and `latest_metrics` tables in four SELECTs. Why: `search_runs` on a SQL store
    builds one ORM object per param, tag and metric (at 10,000 trials x ~100 of each, about 70% of
    the report's read); these rows carry the same values (a metric logged as NaN reads back NaN, a
    run without a name takes its `mlflow.runName` tag, as MLflow's own conversion does)."""
    from sqlalchemy import select
    runs_t, tag_t, param_t, latest_t, _ = _tables()
    ids = _run_ids(experiment_id, tags)
    runs: dict[str, RunRow] = {}
    with engine.connect() as con:
        c = runs_t.c
        for rid, name, status, start, end in con.execute(
                select(c.run_uuid, c.name, c.status, c.start_time, c.end_time).where(c.run_uuid.in_(ids))):
            runs[rid] = RunRow(RunInfoRow(rid, name, status, start, end), RunDataRow())
        for t, attr in ((tag_t, "tags"), (param_t, "params")):
            for rid, k, v in _rows(con, select(t.c.run_uuid, t.c.key, t.c.value).where(t.c.run_uuid.in_(ids))):
                getattr(runs[rid].data, attr)[k] = v
        c = latest_t.c
        for rid, k, v, is_nan in _rows(con, select(c.run_uuid, c.key, c.value, c.is_nan)
                                       .where(c.run_uuid.in_(ids))):
            runs[rid].data.metrics[k] = float("nan") if is_nan else float(v)
    for r in runs.values():
        if not r.info.run_name:
            r.info.run_name = r.data.tags.get("mlflow.runName") or r.info.run_name
    return list(runs.values())


def search_tagged(client, experiment_id: str, tags: Mapping[str, str], progress: bool = False,
                  what: str = "runs") -> list:
    """The active runs of `experiment_id` carrying every tag key = value: straight from the tables of
    a SQL store (`sql_search_tagged`), else through the client (`search_all`)."""
    engine = sql_engine(client)
    if engine is not None:
        runs = sql_search_tagged(engine, experiment_id, tags)
        if progress:
            print(f"loading {what}: {len(runs)}", file=sys.stderr, flush=True)
        return runs
    return search_all(client, experiment_id, " and ".join(f"tags.`{k}` = '{quote(v)}'" for k, v in tags.items()),
                      progress=progress, what=what)


def sql_metric_histories(engine, run_ids: list[str], keys: list[str], chunk: int = 500) -> list[tuple]:
    """(run_id, key, step, timestamp, value) of every logged point of `keys` for `run_ids`, from
    MLflow's `metrics` table (NaN where logged NaN, as `get_metric_history_bulk` returns), `chunk` run
    ids per SELECT (under every backend's bound-parameter limit)."""
    from sqlalchemy import select
    c = _tables()[4].c
    out: list[tuple] = []
    with engine.connect() as con:
        for start in range(0, len(run_ids), chunk):
            q = select(c.run_uuid, c.key, c.step, c.timestamp, c.value, c.is_nan).where(
                c.key.in_(list(keys)), c.run_uuid.in_(run_ids[start:start + chunk]))
            out += [(rid, k, int(step), int(ts), float("nan") if nan else float(v))
                    for rid, k, step, ts, v, nan in _rows(con, q)]
    return out
