"""Per-trial figures after a sweep child has exited: each source for what only it records.

Ray's result.json: the time inside the trainable per epoch (`time_this_iter_s`, `time_total_s`) and
the worker's pid; the MLflow logger drops Tune's own timers. MLflow, through its client (`search_runs`
page by page, `get_metric_history`): when the driver opened and closed each trial's run (its start and
end time) and the training-loop time the trial reported per epoch (the `time_s` history), joined to
Ray's trials by trial id.
"""
from __future__ import annotations

import json
from pathlib import Path

from capsmodels.contract import RUN_TRIAL, TAG_ROLE, TAG_TRIAL


def ray_trials(storage: Path) -> dict[str, dict]:
    """Trial id -> time inside the trainable, epochs, worker pid, per-epoch wall (Tune's timer)."""
    out = {}
    for path in sorted(storage.glob("*/*/result.json")):
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if rows:
            out[rows[-1].get("trial_id")] = {
                "trial": rows[-1].get("trial_id"), "trainable_s": rows[-1]["time_total_s"],
                "epochs": len(rows), "pid": rows[-1].get("pid"),
                "iter_s": [r["time_this_iter_s"] for r in rows]}
    return out


def mlflow_trials(tracking_uri: str, experiment: str) -> list[dict]:
    """Each trial run, by start time: trial id, start and end (epoch seconds), `time_s` per epoch."""
    from mlflow.tracking import MlflowClient

    from analysis.store import search_all
    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    runs = search_all(client, exp.experiment_id, f"tags.`{TAG_ROLE}` = '{RUN_TRIAL}'")
    out = []
    for run in sorted(runs, key=lambda r: r.info.start_time or 0):
        if not (run.info.start_time and run.info.end_time):
            continue
        history = sorted(client.get_metric_history(run.info.run_id, "time_s"), key=lambda m: m.step)
        out.append({"trial": run.data.tags.get(TAG_TRIAL), "start": run.info.start_time / 1000,
                    "end": run.info.end_time / 1000, "time_s": [m.value for m in history]})
    return out


def trial_results(storage: Path, tracking_uri: str, experiment: str) -> tuple[list[dict], list[tuple]]:
    """(per-trial records, (start, end) MLflow span of each trial run).

    A record's `per_epoch` is [wall between reports as Tune measured it, the training loop's time_s
    as MLflow logged it] per epoch, present when both sources have the trial with as many epochs.
    """
    ray, logged = ray_trials(storage), mlflow_trials(tracking_uri, experiment)
    by_id = {m["trial"]: m for m in logged}
    trials = []
    for tid, t in ray.items():
        rec = {k: v for k, v in t.items() if k != "iter_s"}
        hist = by_id.get(tid, {}).get("time_s", [])
        if len(hist) == len(t["iter_s"]):
            rec["per_epoch"] = [[w, s] for w, s in zip(t["iter_s"], hist)]
        trials.append(rec)
    return trials, [(m["start"], m["end"]) for m in logged]
