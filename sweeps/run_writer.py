"""Apply the tracking records of sweeps/write_queue.py to MLflow: one parent run, one child per trial.

Each write is idempotent, so the queue's at-least-once delivery gives exactly-once runs: a `Start`
finds the run a half-delivered earlier try created (by parent and trial id) and logs params only
once (MLflow refuses to change a param: "Changing param values is not allowed"); a `Metrics` record
for a step the run already has is skipped. Knows nothing of Ray Tune.
"""
from __future__ import annotations

import json
import socket
import time
from typing import Any, Optional

from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from capsmodels.contract import (EPOCH_METRIC, FAILED, FINISHED, INTERRUPTED, RUN_TRIAL, RUNNING,
                                 TAG_COMMIT, TAG_ERROR, TAG_PARENT, TAG_ROLE, TAG_RUN_NAME, TAG_SEED,
                                 TAG_STATUS, TAG_SWEEP, TAG_TRIAL)
from sweeps.write_queue import (End, Interrupt, Metrics, ParentEnd, ParentInterrupt, Record, Reopen,
                                Start, Tag)

MAX_BATCH = 900          # MLflow's log_batch takes at most 1000 metrics per call


def transient(e: BaseException) -> bool:
    """Errors worth retrying: the server is away or overloaded, not a bad request."""
    if isinstance(e, MlflowException):
        code = getattr(e, "error_code", "")
        text = str(e)
        return (code in ("TEMPORARILY_UNAVAILABLE", "INTERNAL_ERROR", "REQUEST_LIMIT_EXCEEDED")
                or "Max retries" in text or "Connection" in text or "API request" in text
                or "database is locked" in text)
    return isinstance(e, (OSError, ConnectionError, TimeoutError, socket.timeout))


def param_str(v: Any) -> str:
    s = json.dumps(v) if isinstance(v, (list, dict)) else str(v)
    return s[:6000]


class RunWriter:
    """The MLflow side of one sweep: `run_ids` and `last_step` (per trial id) are what it has written."""

    def __init__(self, client: MlflowClient, experiment_id: str, parent_id: str, sweep: str,
                 commit: Optional[str]):
        self.client = client
        self.experiment_id = experiment_id
        self.parent_id = parent_id
        self.sweep = sweep
        self.commit = commit
        self.run_ids: dict[str, str] = {}
        self.last_step: dict[str, int] = {}
        self._apply = {Start: self._start, Tag: self._tag, Reopen: self._reopen, Interrupt: self._interrupt,
                       Metrics: self._metrics, End: self._end, ParentInterrupt: self._parent_interrupt,
                       ParentEnd: self._parent_end}

    def apply(self, rec: Record) -> None:
        self._apply[type(rec)](rec)

    def _start(self, r: Start) -> None:
        if r.trial_id in self.run_ids:
            return
        tags = {TAG_PARENT: self.parent_id, TAG_ROLE: RUN_TRIAL, TAG_SWEEP: self.sweep,
                TAG_TRIAL: r.trial_id, TAG_SEED: str(r.seed), TAG_STATUS: RUNNING, TAG_RUN_NAME: r.run_name}
        if self.commit:
            tags[TAG_COMMIT] = self.commit
        # idempotent: a retry after a half-delivered start finds the run it created
        found = self.client.search_runs(
            [self.experiment_id],
            f"tags.`{TAG_PARENT}` = '{self.parent_id}' and tags.`{TAG_TRIAL}` = '{r.trial_id}'",
            max_results=1)
        run = found[0] if found else self.client.create_run(self.experiment_id, tags=tags,
                                                            run_name=r.run_name)
        rid = run.info.run_id
        if not run.data.params:
            self.client.log_batch(rid, params=[Param(k, param_str(v)) for k, v in r.params.items()])
        self.client.log_text(rid, r.yaml_text, "config.yaml")
        self.run_ids[r.trial_id] = rid
        self.last_step.setdefault(r.trial_id, -1)

    def _tag(self, r: Tag) -> None:
        self.client.set_tag(self.run_ids[r.trial_id], r.key, r.value)

    def _reopen(self, r: Reopen) -> None:
        rid = self.run_ids[r.trial_id]
        self.client.update_run(rid, status="RUNNING")
        self.client.set_tag(rid, TAG_STATUS, RUNNING)

    def _interrupt(self, r: Interrupt) -> None:
        rid = self.run_ids[r.trial_id]
        self.client.set_tag(rid, TAG_STATUS, INTERRUPTED)
        self.client.set_terminated(rid, "KILLED")

    def _metrics(self, r: Metrics) -> None:
        if r.step <= self.last_step.get(r.trial_id, -1):
            return       # already in MLflow (a replay after a restore): exactly once
        items = [Metric(k, v, r.ts, r.step) for k, v in r.metrics.items()]
        items.append(Metric(EPOCH_METRIC, float(r.step), r.ts, r.step))
        for i in range(0, len(items), MAX_BATCH):
            self.client.log_batch(self.run_ids[r.trial_id], metrics=items[i:i + MAX_BATCH])
        self.last_step[r.trial_id] = r.step

    def _end(self, r: End) -> None:
        rid = self.run_ids[r.trial_id]
        tags = [RunTag(TAG_STATUS, r.status)]
        if r.error:
            tags.append(RunTag(TAG_ERROR, r.error[:4900]))
        self.client.log_batch(rid, tags=tags)
        if r.error:
            self.client.log_text(rid, r.error, "error.txt")
        self.client.set_terminated(rid, "FAILED" if r.status == FAILED else "FINISHED")

    def _parent_interrupt(self, r: ParentInterrupt) -> None:
        self.client.set_tag(self.parent_id, TAG_STATUS, INTERRUPTED)
        self.client.set_terminated(self.parent_id, "KILLED")

    def _parent_end(self, r: ParentEnd) -> None:
        self.client.log_batch(self.parent_id, metrics=[
            Metric(k, float(v), int(time.time() * 1000), 0) for k, v in r.summary.items()])
        self.client.set_tag(self.parent_id, TAG_STATUS, r.status)
        self.client.set_terminated(self.parent_id, "FINISHED" if r.status == FINISHED else "KILLED")
