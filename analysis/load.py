"""Read one sweep back from MLflow into a tidy pandas table (one row per trial) plus per-epoch histories.

The sweep runner writes one parent run per sweep (tags capsweep.role=parent, capsweep.sweep=NAME) and
one child run per trial (capsweep.role=trial, capsweep.sweep, capsweep.trial_id, capsweep.seed,
capsweep.status, capsweep.error, capsweep.git_commit: the names are capsmodels/contract.py's), params
flattened with dots, per-epoch metrics with step = epoch. Runs of several sweeps in one experiment are
kept apart by the capsweep.sweep tag.

Final metrics are each metric's latest value on the run (no history call needed). A SQL store
(sqlite, postgres, mysql) is read straight from MLflow's runs/tags/params/latest_metrics tables
(analysis.mlflowio.search_tagged: `search_runs` builds an ORM object per value, most of the read at
10,000 trials); any other store through `search_runs`. Histories are fetched in bulk, because
`MlflowClient.get_metric_history` is one round trip per metric per run (thousands for a big sweep):
  - SQL stores: MLflow's `metrics` table, one SELECT for all keys per 500 runs;
  - a tracking server (http/https): the REST endpoint `GET /api/2.0/mlflow/metrics/get-history-bulk-interval`
    (up to 100 runs per request, up to 2,500 points per run: an epoch history is never sampled);
  - anything else (or an old server that lacks the endpoint): per-run `get_metric_history`.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

import numpy as np
import pandas as pd

from analysis.errors import AnalysisError
from capsmodels.errors import one_line
from analysis.mlflowio import search_tagged, sql_engine, sql_metric_histories
from analysis.store import missing_store, resolve_tracking_uri, search_all
from capsmodels.contract import (DEFAULT_EXPERIMENT, FAILED, FINISHED, GRAD_PROBES,
                                 INCOMPLETE, INTERRUPTED, RUN_PARENT, RUN_TRIAL, RUNNING, SEED_KEY, TAG_COMMIT,
                                 TAG_ERROR, TAG_PARENT, TAG_ROLE, TAG_SEED, TAG_STATUS, TAG_SWEEP,
                                 TAG_TRIAL, layer_metric, TAG_CONFIRMS, HEARTBEAT_STALE_S,
                                 correct_from_tags, heartbeat_age, resume_command, sweep_state)

DEFAULT_HISTORY_KEYS = ("val_acc", "test_acc", "grad_ratio")
GRAD_PROBE_PREFIXES = tuple(layer_metric(m, "") for m in GRAD_PROBES)
# a finished capsweep trial logs these
REQUIRED_PROBES = ("test_acc", " or ".join(f"{p}*" for p in GRAD_PROBE_PREFIXES))

_SQL_CHUNK = 500        # run ids per SQL IN (...) list, well under every backend's parameter limit
_REST_CHUNK = 100       # the server's MAX_RUNS_GET_METRIC_HISTORY_BULK
_REST_MAX_PER_RUN = 2500  # the server's MAX_RESULTS_PER_RUN
_TRIAL_COLUMNS = ("run_id", "run_name", "sweep", "trial_id", "seed", "status", "run_status", "error",
                  "git_commit", "parent_run_id", "start_time", "end_time", "test_correct")


@dataclass
class SweepData:
    """One sweep, read back. `trials` has one row per trial run:
    identity columns (`run_id, run_name, sweep, trial_id, seed, status, run_status, error, git_commit,
    parent_run_id, start_time, end_time`, and `test_correct`: the trial's per-image test correctness
    tag, capsmodels.contract.encode_correct, None where not logged), the params under their dotted names (strings, as MLflow
    stores them; names in `param_cols`), final metric values under their metric names (`test_acc`,
    `grad_norm/l1`, ...; names in `metric_cols`), and from the histories `n_epochs`, `best_val_acc`,
    `best_test_acc`, `test_acc_at_best_val`. `histories` is long: run_id, key, step, value.
    """
    experiment: str
    experiment_id: str
    tracking_uri: str
    sweep: str
    parent_run_id: Optional[str]
    trials: pd.DataFrame
    histories: pd.DataFrame
    param_cols: list[str]
    metric_cols: list[str]
    notes: list[str] = field(default_factory=list)
    sweeps_in_experiment: list[str] = field(default_factory=list)
    history_method: str = ""
    load_seconds: float = 0.0
    parent_record: dict = field(default_factory=dict)   # the parent run's {'tags', 'params'} as read
    confirmed_by: list[str] = field(default_factory=list)  # sweeps whose parent says they confirm this one

    def history(self, key: str) -> pd.DataFrame:
        """Wide per-epoch table of one metric: index step (epoch), one column per run id."""
        h = self.histories[self.histories["key"] == key]
        return h.pivot_table(index="step", columns="run_id", values="value", aggfunc="last")


def check_store_exists(tracking_uri: str) -> None:
    """A store named by a path that does not exist is refused (analysis/store.py, missing_store)."""
    path = missing_store(tracking_uri)
    if path is not None:
        raise AnalysisError(f"tracking store {path} does not exist (from tracking URI {tracking_uri}); "
                            "run a sweep first or pass --tracking-uri")


def load_sweep(experiment: str = DEFAULT_EXPERIMENT, tracking_uri: Optional[str] = None,
               sweep: Optional[str] = None, history_keys: Iterable[str] = DEFAULT_HISTORY_KEYS,
               progress: Optional[bool] = None) -> SweepData:
    """Read sweep `sweep` of MLflow experiment `experiment` (None: the most recent sweep, with a note).

    Raises AnalysisError (one line) when the store, experiment or sweep is missing, when the sweep has
    no finished trial, or when its runs do not carry the capsweep probes. `progress`: a counter on
    stderr while loading (None: only when stderr is a terminal).
    """
    import mlflow
    from mlflow import MlflowClient
    t0 = time.perf_counter()
    uri = resolve_tracking_uri(tracking_uri)
    check_store_exists(uri)
    client = MlflowClient(tracking_uri=uri)
    try:
        exp = client.get_experiment_by_name(experiment)
    except mlflow.exceptions.MlflowException as e:
        raise AnalysisError(f"cannot read tracking store {uri}: {one_line(e)}") from None
    except Exception as e:  # connection refused, DNS, ... from requests/sqlalchemy
        raise AnalysisError(f"cannot reach tracking store {uri}: {one_line(e)}") from None
    if exp is None or exp.lifecycle_stage == "deleted":
        names = sorted(e.name for e in client.search_experiments())
        hint = f"; experiments there: {', '.join(names)}" if names else "; the store has no experiments"
        raise AnalysisError(f"experiment {experiment!r} not found at {uri}{hint}")
    exp_id = exp.experiment_id
    notes: list[str] = []
    show = sys.stderr.isatty() if progress is None else progress

    parents = search_all(client, exp_id, f"tags.`{TAG_ROLE}` = '{RUN_PARENT}'")
    parents_by_sweep: dict[str, list] = {}
    for r in parents:
        name = r.data.tags.get(TAG_SWEEP) or r.info.run_name
        parents_by_sweep.setdefault(name, []).append(r)
    trial_filter = f"tags.`{TAG_ROLE}` = '{RUN_TRIAL}'"
    everything: Optional[list] = None     # every trial run of the experiment: read only when needed

    def sweeps_of(runs: list) -> list[str]:
        return sorted(set(parents_by_sweep) | {r.data.tags.get(TAG_SWEEP, "") for r in runs} - {""})

    if sweep is None and parents_by_sweep:
        sweep = max(parents_by_sweep, key=lambda s: max(r.info.start_time or 0 for r in parents_by_sweep[s]))
        if len(parents_by_sweep) > 1:
            notes.append(f"experiment {experiment!r} holds {len(parents_by_sweep)} sweeps "
                         f"({', '.join(sorted(parents_by_sweep))}); analysing the most recent, {sweep!r} "
                         "(name another: capsweep report SWEEP)")
    elif sweep is None:   # trials without a parent (an interrupted start?): the trials' own tags say
        everything = search_all(client, exp_id, trial_filter, progress=show, what="trial runs")
        tagged = [r for r in everything if r.data.tags.get(TAG_SWEEP)]
        if not tagged:
            if not client.search_runs([exp_id], max_results=1):
                raise AnalysisError(f"experiment {experiment!r} has no runs; run a sweep into it first")
            raise AnalysisError(f"experiment {experiment!r} has runs but none written by capsweep "
                                f"(no '{TAG_SWEEP}' tag); pass the experiment a sweep logged to")
        sweep = max(tagged, key=lambda r: r.info.start_time or 0).data.tags[TAG_SWEEP]
        if len(sweeps_of(tagged)) > 1:
            notes.append(f"experiment {experiment!r} holds {len(sweeps_of(tagged))} sweeps "
                         f"({', '.join(sweeps_of(tagged))}); analysing the most recent, {sweep!r} "
                         "(name another: capsweep report SWEEP)")
    sweep_parents = sorted(parents_by_sweep.get(sweep, []), key=lambda r: r.info.start_time or 0)
    parent_id = sweep_parents[-1].info.run_id if sweep_parents else None
    if len(sweep_parents) > 1:
        notes.append(f"{len(sweep_parents)} parent runs are named {sweep!r}; their trials are analysed "
                     f"together and the report is logged on the most recent ({parent_id})")

    if everything is not None:
        runs = [r for r in everything if r.data.tags.get(TAG_SWEEP) == sweep]
    else:
        runs = search_tagged(client, exp_id, {TAG_SWEEP: sweep, TAG_ROLE: RUN_TRIAL},
                             progress=show, what=f"trial runs of sweep {sweep}")
    if not runs and parent_id is None:
        known = sweeps_of(search_all(client, exp_id, trial_filter))
        raise AnalysisError(f"sweep {sweep!r} not found in experiment {experiment!r}; "
                            f"sweeps there: {', '.join(known) or '(none)'}")
    if parent_id is None:
        notes.append(f"sweep {sweep!r} has no parent run; the report cannot be logged to MLflow")
    elif sweep_state(sweep_parents[-1].info.status, sweep_parents[-1].data.tags, time.time()) == INTERRUPTED:
        tags = sweep_parents[-1].data.tags
        notes.append(f"sweep {sweep!r} is interrupted (its driver stopped"
                     + (f": no heartbeat for {heartbeat_age(tags, time.time()):.0f} s, limit {HEARTBEAT_STALE_S:.0f} s"
                        if tags.get(TAG_STATUS, RUNNING) == RUNNING else "")
                     + f"); this report covers the trials logged so far; continue it with: "
                     + resume_command(tags, sweep))
    if not runs:
        raise AnalysisError(f"sweep {sweep!r} of experiment {experiment!r} has no trial runs yet")
    trials, param_cols, metric_cols = _trials_table(runs, sweep)

    finished = trials["status"] == FINISHED
    if not finished.any():
        counts = ", ".join(f"{n} {s}" for s, n in trials["status"].value_counts().items())
        raise AnalysisError(f"sweep {sweep!r} has no finished trials ({counts}); nothing to analyse")
    # A metric the trial does not log is absent (n/a), never 0: grad_ratio = 0/0 stays absent
    # (docs/PROBES.md). A capsweep trial always logs test_acc and per-layer gradient probes.
    grad_cols = [c for c in trials.columns if str(c).startswith(GRAD_PROBE_PREFIXES)]
    has_acc = trials["test_acc"].notna().to_numpy() if "test_acc" in trials else np.zeros(len(trials), bool)
    has_grad = trials[grad_cols].notna().any(axis=1).to_numpy() if grad_cols else np.zeros(len(trials), bool)
    has_probes = has_acc & has_grad
    if not (has_probes & finished.to_numpy()).any():
        raise AnalysisError(f"no finished trial of sweep {sweep!r} logs the capsweep probes "
                            f"({', '.join(REQUIRED_PROBES)}); were these runs written by another tool?")
    lacking = finished.to_numpy() & ~has_probes
    if lacking.any():
        trials.loc[lacking, "status"] = INCOMPLETE
        notes.append(f"{int(lacking.sum())} finished trial(s) lack the probes "
                     f"({', '.join(REQUIRED_PROBES)}) and are counted as incomplete")

    histories, method = fetch_histories(client, list(trials["run_id"]), list(history_keys),
                                        progress=show)
    trials = _add_history_summaries(trials, histories)
    return SweepData(experiment=experiment, experiment_id=exp_id, tracking_uri=uri, sweep=sweep,
                     parent_run_id=parent_id, trials=trials, histories=histories,
                     param_cols=param_cols, metric_cols=metric_cols, notes=notes,
                     sweeps_in_experiment=sweeps_of(everything or []), history_method=method,
                     load_seconds=time.perf_counter() - t0,
                     confirmed_by=sorted(name for name, rs in parents_by_sweep.items()
                                         if any(r.data.tags.get(TAG_CONFIRMS) == sweep for r in rs)),
                     parent_record={"tags": dict(sweep_parents[-1].data.tags),
                                    "params": dict(sweep_parents[-1].data.params)} if sweep_parents else {})


def _status_of(run) -> str:
    tag = run.data.tags.get(TAG_STATUS)
    if tag:
        return tag
    return {"FINISHED": FINISHED, "FAILED": FAILED, "KILLED": INTERRUPTED,
            "RUNNING": RUNNING, "SCHEDULED": RUNNING}.get(run.info.status, FAILED)


def _trials_table(runs: list, sweep: str) -> tuple[pd.DataFrame, list[str], list[str]]:
    rows, param_keys, metric_keys = [], set(), set()
    for r in runs:
        tags, params, metrics = r.data.tags, r.data.params, r.data.metrics
        seed = tags.get(TAG_SEED, params.get(SEED_KEY))
        row = {
            "run_id": r.info.run_id, "run_name": r.info.run_name, "sweep": sweep,
            "trial_id": tags.get(TAG_TRIAL, r.info.run_name),
            "seed": int(seed) if seed is not None and str(seed).lstrip("-").isdigit() else seed,
            "status": _status_of(r), "run_status": r.info.status, "error": tags.get(TAG_ERROR, ""),
            "git_commit": tags.get(TAG_COMMIT, ""), "parent_run_id": tags.get(TAG_PARENT),
            "start_time": r.info.start_time, "end_time": r.info.end_time,
            "test_correct": correct_from_tags(tags),    # per-image test correctness (contract)
        }
        row.update(params)
        row.update({k: float(v) for k, v in metrics.items()})
        param_keys.update(params)
        metric_keys.update(metrics)
        rows.append(row)
    df = pd.DataFrame(rows)
    param_cols = sorted(param_keys)
    metric_cols = sorted(metric_keys)
    for c in metric_cols:
        df[c] = pd.to_numeric(df[c], errors="coerce").astype(float)
    df = df[list(_TRIAL_COLUMNS) + param_cols + metric_cols]
    return df.sort_values(["trial_id", "run_id"], key=lambda s: s.astype(str)).reset_index(drop=True), \
        param_cols, metric_cols


def _add_history_summaries(trials: pd.DataFrame, histories: pd.DataFrame) -> pd.DataFrame:
    """Best-epoch figures: best val/test accuracy, test accuracy at the best validation epoch (the
    first epoch reaching the best val_acc). Grouped reductions over all runs at once, not a loop."""
    trials = trials.copy()
    for col in ("n_epochs", "best_val_acc", "best_test_acc", "test_acc_at_best_val"):
        trials[col] = np.nan
    if histories.empty:
        return trials
    wide = histories.pivot_table(index=["run_id", "step"], columns="key", values="value", aggfunc="last")
    runs = trials["run_id"]
    trials["n_epochs"] = runs.map(wide.groupby(level=0).size()).astype(float).to_numpy()
    if "val_acc" in wide:
        val = wide["val_acc"].dropna()
        trials["best_val_acc"] = runs.map(val.groupby(level=0).max()).astype(float).to_numpy()
        if "test_acc" in wide and len(val):
            best = val.groupby(level=0).idxmax()                      # (run_id, step) of the first best
            at = pd.Series(wide["test_acc"].reindex(list(best.to_numpy())).to_numpy(), index=best.index)
            trials["test_acc_at_best_val"] = runs.map(at).astype(float).to_numpy()
    if "test_acc" in wide:
        trials["best_test_acc"] = runs.map(wide["test_acc"].dropna().groupby(level=0).max()).astype(float).to_numpy()
    return trials


# ---------------------------------------------------------------------------------------------------
# Metric histories in bulk

def fetch_histories(client, run_ids: list[str], keys: list[str],
                    progress: bool = False) -> tuple[pd.DataFrame, str]:
    """Per-epoch values of `keys` for `run_ids` as a long table (run_id, key, step, value), with the
    fetch method used. A metric logged twice at one step (a resumed trial) keeps its latest value."""
    from mlflow.store.tracking.rest_store import RestStore
    store = getattr(getattr(client, "_tracking_client", None), "store", None)
    records: list[tuple] = []
    method = "per-run get_metric_history"
    fetch: Callable[[list[str], str], list[tuple]]
    engine = sql_engine(client)
    if engine is not None and keys:
        records = sql_metric_histories(engine, run_ids, keys, _SQL_CHUNK)
        if progress:
            print(f"loading histories: {len(records)} points", file=sys.stderr, flush=True)
        return _history_frame(records), "SQL bulk (MLflow's metrics table, read directly)"
    if store is not None and hasattr(store, "get_metric_history_bulk"):
        method, chunk = "SQL bulk (get_metric_history_bulk)", _SQL_CHUNK

        def fetch(ids, key):
            got = store.get_metric_history_bulk(run_ids=ids, metric_key=key, max_results=10**9)
            return [(m.run_id, m.key, m.step, m.timestamp, m.value) for m in got]
    elif isinstance(store, RestStore) and _rest_bulk_available(store, run_ids[:1], keys[:1]):
        method, chunk = "REST get-history-bulk-interval", _REST_CHUNK

        def fetch(ids, key):
            return _rest_bulk(store, ids, key)
    else:
        chunk = 1

        def fetch(ids, key):
            return [(ids[0], m.key, m.step, m.timestamp, m.value)
                    for m in client.get_metric_history(ids[0], key)]
    n_calls = len(keys) * ((len(run_ids) + chunk - 1) // chunk)
    done = 0
    for key in keys:
        for start in range(0, len(run_ids), chunk):
            records.extend(fetch(run_ids[start:start + chunk], key))
            done += 1
            if progress:
                print(f"\rloading histories: {done}/{n_calls}", end="", file=sys.stderr, flush=True)
    if progress and n_calls:
        print(file=sys.stderr)
    return _history_frame(records), method


def _history_frame(records: list[tuple]) -> pd.DataFrame:
    """(run_id, key, step, timestamp, value) records as the long history table, a metric logged twice
    at one step keeping its latest value."""
    df = pd.DataFrame(records, columns=["run_id", "key", "step", "timestamp", "value"])
    df["value"] = pd.to_numeric(df["value"], errors="coerce").astype(float)
    df["step"] = df["step"].astype(int)
    df = (df.sort_values(["run_id", "key", "step", "timestamp"])
            .drop_duplicates(["run_id", "key", "step"], keep="last")
            .drop(columns="timestamp").reset_index(drop=True))
    return df


def _rest_bulk(store, run_ids: list[str], key: str) -> list[tuple]:
    from mlflow.utils.rest_utils import http_request, verify_rest_response
    endpoint = "/api/2.0/mlflow/metrics/get-history-bulk-interval"
    resp = http_request(store.get_host_creds(), endpoint, "GET",
                        params={"run_ids": run_ids, "metric_key": key,
                                "max_results": _REST_MAX_PER_RUN})
    verify_rest_response(resp, endpoint)
    return [(m["run_id"], m["key"], int(m.get("step", 0)), int(m.get("timestamp", 0)),
             float(m.get("value", "nan"))) for m in resp.json().get("metrics", [])]


def _rest_bulk_available(store, run_ids: list[str], keys: list[str]) -> bool:
    """Servers older than MLflow 2.11 lack the endpoint: probe once, fall back to per-run calls."""
    if not run_ids or not keys:
        return False
    try:
        _rest_bulk(store, run_ids, keys[0])
        return True
    except Exception:
        return False
