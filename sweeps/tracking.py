"""MLflow logging of a sweep: one parent run, one nested child run per Ray Tune trial.

Why a driver-side Tune callback and not `setup_mlflow` in the trials:
- one writer process, so a local SQLite store is never written by several processes at once;
- each trial gets its own run through `MlflowClient` (no fluent global "active run"), found again by
  its trial id after a retry or `--resume`: no duplicate runs, and params are logged exactly once,
  which avoids "Changing param values is not allowed" (ray-project/ray #30649, #20473);
- the tracking URI is used explicitly by the client, never read from a worker's environment
  (ray-project/ray #36257).

Delivery is at-least-once from Tune and exactly-once into MLflow: every write is a record in a
queue, retried with exponential backoff while the tracking server is away, and metric steps already
in a run are skipped. If the server stays away past `max_outage_s`, the queue is spooled to
`<experiment dir>/mlflow_pending.jsonl` and the sweep stops with a message; `--resume` replays it.
After a driver crash, epochs Tune recorded in its own result.json files but MLflow never got are
backfilled on resume.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import time
from collections import deque
from pathlib import Path
from typing import Any, Iterable, Optional

from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from ray.tune import Callback

from analysis.mlflowio import mlflow_http_env, search_all
from capsmodels.contract import (DIVERGED, ENDED, FAILED, FINAL, FINISHED, GIT_COMMIT_ENV, INTERRUPTED, RUN_PARENT, RUN_TRIAL, TAG_COMMIT as COMMIT,
                                 TAG_ERROR as ERROR, TAG_PARENT as PARENT_TAG, TAG_RETRIES,
                                 RUNNING, STOPPED, TAG_ROLE as ROLE, TAG_RUN_NAME, TAG_SEED as SEED, TAG_STATUS as STATUS,
                                 TAG_SWEEP as SWEEP, TAG_TRIAL as TRIAL_ID)

log = logging.getLogger("capsweep.tracking")

PENDING_FILE = "mlflow_pending.jsonl"
MAX_BATCH = 900          # MLflow's log_batch takes at most 1000 metrics per call


class TrackingUnavailable(RuntimeError):
    """The tracking server could not be reached (at start), or stayed away too long (mid-sweep)."""


def git_commit() -> Optional[str]:
    """The project's git commit, when it runs from a checkout (tag `capsweep.git_commit`)."""
    if os.environ.get(GIT_COMMIT_ENV):
        return os.environ[GIT_COMMIT_ENV]      # set by `capsweep submit` for cluster jobs
    here = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def _transient(e: BaseException) -> bool:
    """Errors worth retrying: the server is away or overloaded, not a bad request."""
    if isinstance(e, MlflowException):
        code = getattr(e, "error_code", "")
        text = str(e)
        return (code in ("TEMPORARILY_UNAVAILABLE", "INTERNAL_ERROR", "REQUEST_LIMIT_EXCEEDED")
                or "Max retries" in text or "Connection" in text or "API request" in text
                or "database is locked" in text)
    return isinstance(e, (OSError, ConnectionError, TimeoutError, socket.timeout))


def check_reachable(tracking_uri: str, timeout_s: float = 10.0) -> None:
    """Fail fast, before any training, when the tracking store cannot be used."""
    try:
        with mlflow_http_env(max_retries=0, timeout_s=timeout_s, override=True):
            MlflowClient(tracking_uri).search_experiments(max_results=1)
    except Exception as e:  # noqa: BLE001 - any failure here means "cannot track"
        raise TrackingUnavailable(
            f"mlflow.tracking_uri: cannot reach {tracking_uri} ({' '.join(str(e).split())[:160]}); "
            "start the tracking server or fix the URI") from None


def get_or_create_experiment(client: MlflowClient, name: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is None:
        return client.create_experiment(name)
    if exp.lifecycle_stage == "deleted":
        client.restore_experiment(exp.experiment_id)
    return exp.experiment_id


def find_parent(client: MlflowClient, experiment_id: str, sweep: str):
    runs = client.search_runs([experiment_id],
                              f"tags.`{ROLE}` = '{RUN_PARENT}' and tags.`{SWEEP}` = '{sweep}'",
                              max_results=10)
    return runs[0] if runs else None


def child_runs(client: MlflowClient, experiment_id: str, parent_id: str) -> list:
    return search_all(client, experiment_id, f"tags.`{PARENT_TAG}` = '{parent_id}'")


def _numeric_metrics(result: dict) -> dict[str, float]:
    out = {}
    for k, v in result.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        if k in ("epoch", "training_iteration") or k.startswith(("time_", "timestamp")) and k != "time_s":
            continue
        if k in ("pid", "done", "iterations_since_restore", "timesteps_total", "episodes_total"):
            continue
        out[k] = float(v)    # NaN is data (0/0 grad_ratio of a network with no gradient at all)
    return out


class MlflowSweepLogger(Callback):
    """Ray Tune callback that mirrors a sweep into MLflow (see the module docstring)."""

    def __init__(self, tracking_uri: str, experiment_id: str, parent_run_id: str, sweep: str,
                 experiment_dir: Path, trial_params: Any, trial_yaml: Any,
                 max_outage_s: float = 900.0, max_pending: int = 200_000, expected_trials: int = 0):
        # Tune pickles its callbacks into the experiment state (tuner.pkl); only these arguments
        # travel, and a restored logger re-reads its state from MLflow itself (__setstate__).
        self._args = dict(tracking_uri=tracking_uri, experiment_id=experiment_id,
                          parent_run_id=parent_run_id, sweep=sweep, experiment_dir=str(experiment_dir),
                          trial_params=trial_params, trial_yaml=trial_yaml,
                          max_outage_s=max_outage_s, max_pending=max_pending,
                          expected_trials=expected_trials)
        self.expected_trials = expected_trials
        self.parent_closed = False
        self.interrupted = False
        self.uri = tracking_uri
        self.experiment_id = experiment_id
        self.parent_id = parent_run_id
        self.sweep = sweep
        self.experiment_dir = Path(experiment_dir)
        self.trial_params = trial_params      # config dict -> (flat params dict, seed)
        self.trial_yaml = trial_yaml          # config dict -> resolved trial config YAML text
        self.max_outage_s = max_outage_s
        self.max_pending = max_pending
        self.commit = git_commit()
        self.client = MlflowClient(tracking_uri)
        self.queue: deque = deque()
        self.run_ids: dict[str, str] = {}
        self.last_step: dict[str, int] = {}
        self.statuses: dict[str, str] = {}
        self.ended: set[str] = set()          # trials whose run is closed with a final status
        self.retries: dict[str, int] = {}
        self.outage_since: Optional[float] = None
        self.next_try = 0.0
        self.backoff = 1.0
        self._load_existing()

    def __getstate__(self) -> dict:
        return {"_args": self._args}

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state["_args"])

    def setup(self, stop=None, num_samples=None, total_num_samples=None, **info) -> None:
        """Experiment start (also after --resume): deliver writes an earlier driver spooled."""
        self._watch_sigint()
        n = self.replay_spool()
        if n:
            print(f"capsweep: delivered {n} MLflow writes saved by an earlier run", flush=True)

    def _watch_sigint(self) -> None:
        """Ray Tune ends the run on Ctrl-C and then completes the running trials like finished ones;
        chain onto its handler to know that those trials were interrupted, not done."""
        import signal
        import threading
        if threading.current_thread() is not threading.main_thread():
            return
        ray_handler = signal.getsignal(signal.SIGINT)

        def handler(sig, frame):
            self.interrupted = True
            if callable(ray_handler):
                ray_handler(sig, frame)
        signal.signal(signal.SIGINT, handler)

    # ---- queue -------------------------------------------------------------------------------
    def _put(self, *record: Any) -> None:
        self.queue.append(list(record))
        self.flush()

    def flush(self, force: bool = False) -> bool:
        """Deliver queued records in order; on a transient error keep them and back off."""
        now = time.monotonic()
        if not force and self.outage_since is not None and now < self.next_try:
            self._check_bounds(now)
            return False
        while self.queue:
            try:
                self._apply(self.queue[0])
            except Exception as e:  # noqa: BLE001
                if not _transient(e):
                    log.warning("MLflow rejected %s: %s", self.queue[0][0], e)
                    raise
                if self.outage_since is None:
                    self.outage_since = now
                    print(f"capsweep: MLflow at {self.uri} is unreachable; buffering "
                          f"{len(self.queue)} writes and retrying", flush=True)
                self.next_try = now + self.backoff
                self.backoff = min(self.backoff * 2, 60.0)
                self._check_bounds(now)
                return False
            self.queue.popleft()
        if self.outage_since is not None:
            print(f"capsweep: MLflow at {self.uri} is back; buffered writes delivered", flush=True)
        self.outage_since, self.backoff = None, 1.0
        return True

    def _check_bounds(self, now: float) -> None:
        if self.outage_since is None:
            return
        if now - self.outage_since > self.max_outage_s or len(self.queue) > self.max_pending:
            path = self.spool()
            raise TrackingUnavailable(
                f"MLflow at {self.uri} unreachable for {now - self.outage_since:.0f}s; "
                f"{len(self.queue)} pending writes saved to {path}; run again with --resume once it is back")

    def spool(self) -> Path:
        path = self.experiment_dir / PENDING_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            for rec in self.queue:
                f.write(json.dumps(rec) + "\n")
        self.queue.clear()
        return path

    def replay_spool(self) -> int:
        path = self.experiment_dir / PENDING_FILE
        if not path.exists():
            return 0
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        self.queue.extend(records)
        path.unlink()
        self.flush()
        return len(records)

    def _apply(self, rec: list) -> None:
        kind = rec[0]
        if kind == "start":
            _, trial_id, run_name, params, seed, yaml_text = rec
            if trial_id in self.run_ids:
                return
            tags = {PARENT_TAG: self.parent_id, ROLE: RUN_TRIAL, SWEEP: self.sweep,
                    TRIAL_ID: trial_id, SEED: str(seed), STATUS: RUNNING,
                    TAG_RUN_NAME: run_name}
            if self.commit:
                tags[COMMIT] = self.commit
            # idempotent: a retry after a half-delivered start finds the run it created
            found = self.client.search_runs(
                [self.experiment_id],
                f"tags.`{PARENT_TAG}` = '{self.parent_id}' and tags.`{TRIAL_ID}` = '{trial_id}'",
                max_results=1)
            run = found[0] if found else self.client.create_run(self.experiment_id, tags=tags,
                                                                run_name=run_name)
            rid = run.info.run_id
            if not run.data.params:
                self.client.log_batch(rid, params=[Param(k, _param_str(v)) for k, v in params.items()])
            self.client.log_text(rid, yaml_text, "config.yaml")
            self.run_ids[trial_id] = rid
            self.last_step.setdefault(trial_id, -1)
        elif kind == "tag":
            _, trial_id, key, value = rec
            self.client.set_tag(self.run_ids[trial_id], key, value)
        elif kind == "reopen":
            _, trial_id = rec
            rid = self.run_ids[trial_id]
            self.client.update_run(rid, status="RUNNING")
            self.client.set_tag(rid, STATUS, RUNNING)
        elif kind == "interrupt":
            _, trial_id = rec
            rid = self.run_ids[trial_id]
            self.client.set_tag(rid, STATUS, INTERRUPTED)
            self.client.set_terminated(rid, "KILLED")
        elif kind == "metrics":
            _, trial_id, step, metrics, ts = rec
            if step <= self.last_step.get(trial_id, -1):
                return       # already in MLflow (a replay after a restore): exactly once
            items = [Metric(k, v, ts, step) for k, v in metrics.items()]
            items.append(Metric("epoch", float(step), ts, step))
            for i in range(0, len(items), MAX_BATCH):
                self.client.log_batch(self.run_ids[trial_id], metrics=items[i:i + MAX_BATCH])
            self.last_step[trial_id] = step
        elif kind == "end":
            _, trial_id, status, error = rec
            rid = self.run_ids[trial_id]
            tags = [RunTag(STATUS, status)]
            if error:
                tags.append(RunTag(ERROR, error[:4900]))
            self.client.log_batch(rid, tags=tags)
            if error:
                self.client.log_text(rid, error, "error.txt")
            self.client.set_terminated(rid, "FAILED" if status == FAILED else "FINISHED")
        elif kind == "parent_interrupt":
            self.client.set_tag(self.parent_id, STATUS, INTERRUPTED)
            self.client.set_terminated(self.parent_id, "KILLED")
        elif kind == "parent_end":
            _, summary, status = rec
            self.client.log_batch(self.parent_id, metrics=[
                Metric(k, float(v), int(time.time() * 1000), 0) for k, v in summary.items()])
            self.client.set_tag(self.parent_id, STATUS, status)
            self.client.set_terminated(self.parent_id, "FINISHED" if status == FINISHED else "KILLED")
        else:
            raise ValueError(f"unknown record {kind}")

    # ---- state from an earlier driver ---------------------------------------------------------
    def _load_existing(self) -> None:
        """Map trial ids to the runs an earlier driver created, with their last logged epoch."""
        for run in child_runs(self.client, self.experiment_id, self.parent_id):
            tid = run.data.tags.get(TRIAL_ID)
            if not tid:
                continue
            self.run_ids[tid] = run.info.run_id
            # the latest `epoch` value is the one at the largest step, and value == step
            epoch = run.data.metrics.get("epoch")
            self.last_step[tid] = int(epoch) if epoch is not None else -1
            self.statuses[tid] = run.data.tags.get(STATUS, RUNNING)
            if run.info.status != "RUNNING" and self.statuses[tid] in FINAL:
                self.ended.add(tid)
            self.retries[tid] = int(run.data.tags.get(TAG_RETRIES, "0"))

    def backfill(self, trial_id: str, trial_dir: Optional[Path]) -> None:
        """Deliver epochs that Ray recorded in result.json but MLflow never received (driver crash)."""
        if trial_dir is None:
            return
        path = Path(trial_dir) / "result.json"
        if not path.exists():
            return
        for line in path.read_text().splitlines():
            try:
                result = json.loads(line)
            except json.JSONDecodeError:
                continue     # a line cut by the crash
            if "epoch" in result:
                self._put("metrics", trial_id, int(result["epoch"]), _numeric_metrics(result),
                          int(result.get("timestamp", time.time()) * 1000))

    # ---- Tune callback hooks --------------------------------------------------------------------
    def on_trial_start(self, iteration: int, trials: list, trial, **info) -> None:
        self._ensure_run(trial)

    def on_trial_restore(self, iteration: int, trials: list, trial, **info) -> None:
        self._ensure_run(trial)

    def _has_run(self, tid: str) -> bool:
        """The trial's MLflow run exists, or its creation is queued (the server is away)."""
        return tid in self.run_ids or any(r[0] == "start" and r[1] == tid for r in self.queue)

    def _ensure_run(self, trial) -> None:
        tid = trial.trial_id
        if not self._has_run(tid):
            params, seed = self.trial_params(trial.config)
            self._put("start", tid, f"{self.sweep}-{tid}", params, seed, self.trial_yaml(trial.config))
        elif self.statuses.get(tid) == INTERRUPTED:
            self._put("reopen", tid)
        self.statuses.setdefault(tid, RUNNING)
        if self.statuses[tid] == INTERRUPTED:
            self.statuses[tid] = RUNNING
        self.backfill(tid, _trial_dir(trial))

    def on_trial_result(self, iteration: int, trials: list, trial, result: dict, **info) -> None:
        if trial.trial_id not in self.run_ids:
            self._ensure_run(trial)
        if "epoch" not in result:
            return
        self._put("metrics", trial.trial_id, int(result["epoch"]), _numeric_metrics(result),
                  int(time.time() * 1000))
        if result.get("status") == DIVERGED:
            self.statuses[trial.trial_id] = DIVERGED

    def on_trial_recover(self, iteration: int, trials: list, trial, **info) -> None:
        """A trial raised and Tune will retry it (FailureConfig.max_failures): same run, count it."""
        tid = trial.trial_id
        self.retries[tid] = self.retries.get(tid, 0) + 1
        if self._has_run(tid):
            self._put("tag", tid, TAG_RETRIES, str(self.retries[tid]))

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        self._finish(trial, None)

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        self._finish(trial, _error_text(trial))

    def _finish(self, trial, error: Optional[str]) -> None:
        tid = trial.trial_id
        if tid in self.ended:
            # Tune saves its experiment state every few seconds, so after a driver crash it can
            # restore a trial that had already finished: the trial re-reports its final epoch from its
            # state file without training, and its MLflow run, closed before the crash, stays as it was
            return
        if tid not in self.run_ids:
            self._ensure_run(trial)
        last = trial.last_result or {}
        if self.interrupted and not error and last.get("status") not in ENDED:
            return          # Ctrl-C: the trial continues on --resume (close() marks it interrupted)
        if error:
            status = FAILED
        elif last.get("status") == DIVERGED or self.statuses.get(tid) == DIVERGED:
            status = DIVERGED
        elif last.get("status") == FINISHED:
            status = FINISHED
        else:
            status = STOPPED    # ended early by the scheduler (ASHA)
        self.statuses[tid] = status
        self.ended.add(tid)
        self._put("end", tid, status, error)

    def on_step_end(self, iteration: int, trials: list, **info) -> None:
        if self.queue:
            self.flush()

    def on_experiment_end(self, trials: list, **info) -> None:
        self.close(trials)

    def close(self, trials: Iterable, interrupted: bool = False) -> None:
        """End-of-sweep bookkeeping: no run left RUNNING, parent summary, queue drained.

        Tune also ends the experiment on Ctrl-C; a sweep with trials not yet done (or never
        created) is closed as interrupted, so the parent is not claimed finished."""
        trials = list(trials)
        if self.interrupted or any(t.status not in ("TERMINATED", "ERROR") for t in trials) or \
                (self.expected_trials and len(trials) < self.expected_trials):
            interrupted = True
        for trial in trials:
            tid = trial.trial_id
            if tid in self.run_ids and self.statuses.get(tid) in (None, RUNNING):
                if trial.status == "TERMINATED":
                    self._finish(trial, None)
                elif trial.status == "ERROR":
                    self._finish(trial, _error_text(trial))
        if interrupted:
            for tid, status in list(self.statuses.items()):
                if status == RUNNING and self._has_run(tid):
                    self.statuses[tid] = INTERRUPTED
                    self._put("interrupt", tid)
            if not self.parent_closed:
                self._put("parent_interrupt")
                self.parent_closed = True
            self._drain()
            return
        counts = {s: sum(1 for v in self.statuses.values() if v == s)
                  for s in FINAL}
        summary = {f"trials_{k}": v for k, v in counts.items()}
        summary["trials_total"] = len(self.run_ids) + sum(1 for r in self.queue if r[0] == "start")
        self._put("parent_end", summary, FINISHED)
        self.parent_closed = True
        self._drain()

    def _drain(self) -> None:
        deadline = time.monotonic() + self.max_outage_s
        while self.queue:
            if self.flush(force=True):
                break
            if time.monotonic() > deadline:
                path = self.spool()
                raise TrackingUnavailable(
                    f"MLflow at {self.uri} unreachable; pending writes saved to {path}; "
                    "run again with --resume once it is back")
            time.sleep(min(self.backoff, max(0.0, deadline - time.monotonic())))


def _param_str(v: Any) -> str:
    s = json.dumps(v) if isinstance(v, (list, dict)) else str(v)
    return s[:6000]


def _trial_dir(trial) -> Optional[Path]:
    for attr in ("local_path", "path"):
        p = getattr(trial, attr, None)
        if p and os.path.isdir(str(p)):
            return Path(p)
    return None


def _error_text(trial) -> str:
    msg = getattr(trial, "error_msg", None)
    if not msg:
        path = getattr(trial, "error_file", None)
        try:
            msg = Path(path).read_text() if path else None
        except OSError:
            msg = None
    return (msg or "trial failed (no error message recorded by Ray)").strip()
