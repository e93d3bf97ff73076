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

Each trial's run is named after its params (`d3-it3-dynamic-s0`: depth, routing iterations and
algorithm, the other swept keys, the seed; `cnn-d1-s0` for a control), unique within the sweep. At a
trial's first result the logger reads what the trial wrote at its start (sweeps/models.py: the device
it used, its datasets) and logs it; when the trial ends, its model (sweeps/models.py: the best-val
epoch's weights), before the run is closed with the tags of how it ended (`end_tags`: the stop reason,
the best epoch's per-image test correctness), and its state file is deleted unless `keep_state`.

This module is the Tune side only: a thin callback that turns Tune's hooks into typed write records.
What it decides about the trials (statuses, retries, run names, the parent's summary) is
sweeps/trial_book.py; the queue (retries, spool) sweeps/write_queue.py; the MLflow writes of each
typed record sweeps/run_writer.py; the git commit and the standard tags sweeps/provenance.py; the model
files sweeps/models.py.
"""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Iterable, Optional

from mlflow.tracking import MlflowClient
from ray.tune import Callback

from analysis.store import StoreInitError, check_store, child_runs
from capsmodels.contract import (FAILED, FINISHED, RUN_PARENT, RUNNING, TAG_RETRIES, TAG_ROLE, TAG_RUN_NAME,
                                 TAG_STATUS, TAG_SWEEP, TAG_TRIAL, redact)
from sweeps import models, storage, tune_guard
from sweeps.provenance import git_commit, standard_tags
from sweeps.run_writer import (DEVICE_PARAM, RunWriter, end_tags, get_or_create_experiment, numeric_metrics,
                               run_name, store_trouble, transient)
from sweeps.trial_book import TrialBook
from sweeps.write_queue import (End, Interrupt, Lineage, Metrics, Model, ParentEnd, ParentInterrupt, ParentTags,
                                Record, Reopen, Start, Tag, TrackingUnavailable, WriteQueue, queued)

log = logging.getLogger("capsweep.tracking")

PENDING_FILE = "mlflow_pending.jsonl"
__all__ = ["MlflowSweepLogger", "TrackingUnavailable", "check_reachable", "find_parent",
           "get_or_create_experiment"]


def check_reachable(tracking_uri: str, timeout_s: Optional[float] = None) -> None:
    """Fail fast, before any training, when the tracking store cannot be used: one line within about
    `timeout_s` (analysis/store.py, check_store), also for a database that does not answer or whose
    driver is missing."""
    try:
        check_store(tracking_uri, timeout_s, flag="mlflow.tracking_uri")
    except StoreInitError as e:
        hint = "" if "driver" in str(e) else "; start the tracking server or fix the URI"
        raise TrackingUnavailable(f"{e}{hint}") from None


def find_parent(client: MlflowClient, experiment_id: str, sweep: str):
    runs = client.search_runs([experiment_id],
                              f"tags.`{TAG_ROLE}` = '{RUN_PARENT}' and tags.`{TAG_SWEEP}` = '{sweep}'",
                              max_results=10)
    return runs[0] if runs else None


class MlflowSweepLogger(Callback):
    """Ray Tune callback that mirrors a sweep into MLflow (see the module docstring): each hook asks the
    trial book (`self.book`) what happened and queues the writes that follow. Made by the runner's one
    factory (sweeps/runner.py, `sweep_logger`)."""

    def __init__(self, tracking_uri: str, experiment_id: str, parent_run_id: str, sweep: str,
                 experiment_dir: Path, trial_params: Any, trial_yaml: Any,
                 max_outage_s: float = 900.0, max_pending: int = 200_000, expected_trials: int = 0,
                 storage_root: Optional[str] = None, keep_state: bool = False, trust: bool = False):
        # Tune pickles its callbacks into the experiment state (tuner.pkl); only these arguments
        # travel, and a restored logger re-reads its state from MLflow itself (__setstate__).
        self._args = dict(tracking_uri=tracking_uri, experiment_id=experiment_id,
                          parent_run_id=parent_run_id, sweep=sweep, experiment_dir=str(experiment_dir),
                          trial_params=trial_params, trial_yaml=trial_yaml,
                          max_outage_s=max_outage_s, max_pending=max_pending,
                          expected_trials=expected_trials, storage_root=storage_root, keep_state=keep_state,
                          trust=trust)
        # the trials' files (sweeps/models.py): <storage_root>/trial_state, trial_models; a URI or a folder
        self.state_dir = storage.join(storage_root or str(experiment_dir), models.STATE_DIR)
        self.keep_state = keep_state
        self.book = TrialBook(expected_trials=expected_trials)     # statuses, retries, names
        self.parent_closed = False
        self.uri = tracking_uri
        self.experiment_id = experiment_id
        self.parent_id = parent_run_id
        self.sweep = sweep
        self.experiment_dir = Path(experiment_dir)
        self.trial_params = trial_params      # config dict -> (flat params dict, seed)
        self.trial_yaml = trial_yaml          # config dict -> resolved trial config YAML text
        self.client = MlflowClient(tracking_uri)
        self.commit = git_commit()
        self.writer = RunWriter(self.client, experiment_id, parent_run_id, sweep, self.commit, tracking_uri, trust)
        self.queue = WriteQueue(self._apply, transient, self.experiment_dir / PENDING_FILE,
                                f"MLflow at {redact(tracking_uri)}", max_outage_s, max_pending, on_reject=_log_rejected,
                                explain=store_trouble(tracking_uri))
        self.run_ids = self.writer.run_ids          # trial id -> run id
        self.last_step = self.writer.last_step      # trial id -> last epoch MLflow has
        self.guard: Optional[tune_guard.TuneStateGuard] = None   # set by the runner (not pickled)
        self._reconciled = False
        self._t0 = time.monotonic()          # this driver's start, for the overall progress line
        self._ended_here = 0                 # trials this driver saw end (the pace of the estimate)
        self._load_existing()

    def __getstate__(self) -> dict:
        return {"_args": self._args}

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state["_args"])

    @property
    def statuses(self) -> dict[str, str]:
        """Trial id -> status, as the book has them (the runner reads them after `fit`)."""
        return self.book.statuses

    def setup(self, stop=None, num_samples=None, total_num_samples=None, **info) -> None:
        """Experiment start (also after --resume): deliver writes an earlier driver spooled."""
        self._watch_sigint()
        self._put(ParentTags(standard_tags(self.commit)))
        n = self.queue.replay_spool()
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
            self.book.interrupted = True
            if callable(ray_handler):
                ray_handler(sig, frame)
        signal.signal(signal.SIGINT, handler)

    # ---- writes --------------------------------------------------------------------------------
    def _put(self, rec: Record) -> None:
        self.queue.put(rec)

    def _apply(self, rec: Record) -> None:
        """Deliver one record (the queue calls this; benchmarks/ time it per kind of record)."""
        self.writer.apply(rec)

    # ---- state from an earlier driver ---------------------------------------------------------
    def _load_existing(self) -> None:
        """Map trial ids to the runs an earlier driver created, with their last logged epoch."""
        for run in child_runs(self.client, self.experiment_id, self.parent_id):
            tid = run.data.tags.get(TAG_TRIAL)
            if not tid:
                continue
            self.run_ids[tid] = run.info.run_id
            # the latest `epoch` value is the one at the largest step, and value == step
            epoch = run.data.metrics.get("epoch")
            self.last_step[tid] = int(epoch) if epoch is not None else -1
            self.book.known(tid, run.data.tags.get(TAG_RUN_NAME, ""), run.data.tags.get(TAG_STATUS, RUNNING),
                            closed=run.info.status != "RUNNING", retries=int(run.data.tags.get(TAG_RETRIES, "0")),
                            lineage=DEVICE_PARAM in run.data.params)

    def backfill(self, trial_id: str, trial_dir: Optional[Path], trial=None) -> None:
        """Deliver epochs that Ray recorded (the trial's result.json, and its last result in Tune's
        experiment state) but MLflow never received (a driver that died with writes in flight).
        Epochs MLflow has are skipped here already, so a resume costs no write for them."""
        results = _results(trial_dir, trial)
        have = self.last_step.get(trial_id, -1)
        for result in results:
            if "epoch" in result and int(result["epoch"]) > have:
                have = int(result["epoch"])
                self._put(Metrics(trial_id, have, numeric_metrics(result),
                                  int(result.get("timestamp", time.time()) * 1000)))

    def reconcile(self, trials: list) -> None:
        """Once, at the first step (after a restore: every trial Tune knows, whatever its state): each
        trial that reported gets its run and every epoch Tune recorded, and one Tune already ended gets
        its model and end. What an earlier driver lost with writes in flight is made good here, also for
        trials that Tune will not run again (it restores a TERMINATED trial as it was)."""
        for trial in trials:
            tid = trial.trial_id
            if tid in self.book.ended and tid in self.run_ids:
                self.backfill(tid, _trial_dir(trial), trial)
                continue
            if self._has_run(tid) or trial.last_result or _results(_trial_dir(trial), trial):
                self._ensure_run(trial)
            if trial.status == "TERMINATED":
                self._finish(trial, None)
            elif trial.status == "ERROR":
                tune_guard.forget_pickled_error(trial)
                self._finish(trial, _error_text(trial))

    # ---- Tune callback hooks --------------------------------------------------------------------
    def on_trial_start(self, iteration: int, trials: list, trial, **info) -> None:
        self._ensure_run(trial)

    def on_trial_restore(self, iteration: int, trials: list, trial, **info) -> None:
        self._ensure_run(trial)

    def _has_run(self, tid: str) -> bool:
        """The trial's MLflow run exists, or its creation is queued (the server is away)."""
        return tid in self.run_ids or queued(self.queue, Start, tid) > 0

    def _ensure_run(self, trial) -> None:
        """The trial's run exists (created, or reopened after an interruption) and has every epoch Tune
        recorded."""
        tid = trial.trial_id
        has_run = self._has_run(tid)
        if not has_run:
            params, seed = self.trial_params(trial.config)
            name = self.book.name(run_name(params, trial.config))
            self._put(Start(tid, name, params, seed, self.trial_yaml(trial.config)))
        if self.book.start(tid) and has_run:
            self._put(Reopen(tid))
        self.backfill(tid, _trial_dir(trial), trial)

    def on_trial_result(self, iteration: int, trials: list, trial, result: dict, **info) -> None:
        if trial.trial_id not in self.run_ids:
            self._ensure_run(trial)
        if "epoch" not in result:
            return
        self._log_lineage(trial.trial_id)
        self._put(Metrics(trial.trial_id, int(result["epoch"]), numeric_metrics(result),
                          int(time.time() * 1000)))
        self.book.result(trial.trial_id, result)

    def _paths(self, tid: str) -> tuple[str, str]:
        return models.trial_paths(self.state_dir, tid)

    def _log_lineage(self, tid: str) -> None:
        """Once per trial: what it wrote at its start (device used, datasets), when it is there."""
        if tid in self.book.lineage:
            return
        info = models.read_json(self._paths(tid)[1], models.INFO_FILE)
        if info is None:
            return
        self.book.lineage.add(tid)
        self._put(Lineage(tid, {DEVICE_PARAM: info["device"]}, {models.TAG_DEVICE_NAME: info["device_name"]},
                          info.get("datasets", [])))

    def on_trial_recover(self, iteration: int, trials: list, trial, **info) -> None:
        """A trial raised and Tune will retry it (FailureConfig.max_failures): same run, count it."""
        tid = trial.trial_id
        tune_guard.forget_pickled_error(trial)
        retries = self.book.retried(tid)
        if self._has_run(tid):
            self._put(Tag(tid, TAG_RETRIES, str(retries)))

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        if self._finish(trial, None):
            self._progress(trials)

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        tune_guard.forget_pickled_error(trial)
        if self._finish(trial, _error_text(trial)):
            self._progress(trials)

    def _progress(self, trials: list) -> None:
        """The overall line beside Ray Tune's table: trials ended of planned, by status, the estimate of
        what is left (capsmodels/progress.py)."""
        from capsmodels.progress import sweep_line
        self._ended_here += 1
        ended = self.book.ended
        # Tune marks the trial that just ended as terminated only after its callbacks: it is not running
        running = sum(1 for t in trials if getattr(t, "status", "") == "RUNNING" and t.trial_id not in ended)
        total = max(self.book.expected_trials, len(trials), len(ended))
        print(sweep_line(len(ended), total, self.book.ended_counts(), running, time.monotonic() - self._t0,
                         self._ended_here), flush=True)

    def _finish(self, trial, error: Optional[str]) -> bool:
        """Close the trial's run with its final status; True when this call did (not a re-report)."""
        tid = trial.trial_id
        if tid in self.book.ended:
            # Tune saves its experiment state every few seconds, so after a driver crash it can
            # restore a trial that had already finished: the trial re-reports its final epoch from its
            # state file without training, and its MLflow run, closed before the crash, stays as it was
            return False
        if tid not in self.run_ids:
            self._ensure_run(trial)
        last = trial.last_result or {}
        status = self.book.final_status(tid, last, error)
        if status is None:
            return False    # Ctrl-C: the trial continues on --resume (close() marks it interrupted)
        self._log_lineage(tid)
        state_path, model_dir = self._paths(tid)
        self._put(Model(tid, model_dir, state_path, self.keep_state, log=status != FAILED))
        self._put(End(tid, status, error, end_tags(status, last)))
        return True

    def on_step_begin(self, iteration: int, trials: list, **info) -> None:
        self._reconcile_once(trials)

    def _reconcile_once(self, trials: list) -> None:
        """At the first step, or at the end when Tune restored only ended trials and ran no step."""
        if not self._reconciled:
            self._reconciled = True
            self.reconcile(trials)

    def on_step_end(self, iteration: int, trials: list, **info) -> None:
        if self.queue:
            self.queue.flush()
        if self.guard is not None:
            self.guard.update(tune_guard.staging_dir(trials))

    def on_experiment_end(self, trials: list, **info) -> None:
        self._reconcile_once(trials)
        for trial in trials:
            tune_guard.forget_pickled_error(trial)
        self.close(trials)

    def close(self, trials: Iterable, interrupted: bool = False) -> None:
        """End-of-sweep bookkeeping: no run left RUNNING, parent summary, queue drained.

        Tune also ends the experiment on Ctrl-C; a sweep with trials not yet done (or never
        created) is closed as interrupted, so the parent is not claimed finished."""
        trials = list(trials)
        if self.book.stops_early(t.status for t in trials):
            interrupted = True
        for trial in trials:
            tid = trial.trial_id
            if tid in self.run_ids and self.book.is_open(tid):
                if trial.status == "TERMINATED":
                    self._finish(trial, None)
                elif trial.status == "ERROR":
                    self._finish(trial, _error_text(trial))
        if interrupted:
            for tid in self.book.interrupt_running(self._has_run):
                self._put(Interrupt(tid))
            if not self.parent_closed:
                self._put(ParentInterrupt())
                self.parent_closed = True
            self.queue.drain()
            return
        self._put(ParentEnd(self.book.summary(len(self.run_ids) + queued(self.queue, Start)), FINISHED))
        self.parent_closed = True
        self.queue.drain()


def _log_rejected(rec: Record, e: BaseException) -> None:
    log.warning("MLflow rejected %s: %s", type(rec).__name__, redact(str(e)))


def _results(trial_dir: Optional[Path], trial=None) -> list[dict]:
    """The results Tune recorded for a trial, oldest first: its result.json (on the storage, where
    Tune syncs it, else the local folder), then its last result as Tune's state keeps it."""
    text = None
    st = getattr(trial, "storage", None)
    if st is not None:
        try:
            with st.storage_filesystem.open_input_stream(f"{st.trial_fs_path}/result.json") as f:
                text = f.readall().decode("utf-8", errors="replace")
        except Exception:  # noqa: BLE001 - no such file yet, or no storage context: try the folder
            text = None
    if text is None and trial_dir is not None and (Path(trial_dir) / "result.json").is_file():
        text = (Path(trial_dir) / "result.json").read_text(errors="replace")
    out = []
    for line in (text or "").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue     # a line cut by the crash
    last = getattr(trial, "last_result", None) or {}
    if "epoch" in last and all(r.get("epoch") != last["epoch"] for r in out):
        out.append(dict(last))
    return [r for r in out if isinstance(r, dict)]


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
