"""Apply the tracking records of sweeps/write_queue.py to MLflow: one parent run, one child per trial.

Each write is idempotent, so the queue's at-least-once delivery gives exactly-once runs: a `Start`
finds the run a half-delivered earlier try created (by parent and trial id) and logs params only
once (MLflow refuses to change a param: "Changing param values is not allowed"); a `Metrics` record
for a step the run already has is skipped; a `Lineage` record logs only the params and datasets the
run lacks; a `Model` record finds the model an earlier try logged (sweeps/models.py). Knows nothing
of Ray Tune.

Params that only say "not set" (None) are not logged, nor `train.device` at the start: the trial logs
the device it used (`Lineage`), where the config may say `auto`.
"""
from __future__ import annotations

import json
import math
import socket
import time
from typing import Any, Iterable, Optional

from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from capsmodels.contract import (EPOCH_METRIC, FAILED, ROLE_KEY, SEED_KEY, FINISHED, INTERRUPTED, REPORT_STOP_REASON,
                                 REPORT_TEST_CORRECT, RUN_TRIAL, RUNNING, STOP_SCHEDULER, STOPPED, TAG_COMMIT,
                                 TAG_ERROR, TAG_PARENT, TAG_ROLE, TAG_RUN_NAME, TAG_SEED, TAG_STATUS,
                                 TAG_STOP_REASON, TAG_SWEEP, TAG_TRIAL, correct_tags, log10_name)
from sweeps import models
from sweeps.provenance import DATA_CONTEXT, SPLIT_ROWS, git_commit, standard_tags
from sweeps.write_queue import (End, Interrupt, Lineage, Metrics, Model, ParentEnd, ParentInterrupt, ParentTags,
                                Record, Reopen, Start, Tag)

MAX_BATCH = 900          # MLflow's log_batch takes at most 1000 metrics per call
DEVICE_PARAM = "train.device"
TAG_MODEL_ERROR = "capsweep.model_error"     # why a trial's model could not be logged (its files kept)
# MLflow 3's experiment type: its UI opens an experiment of this kind on its runs, not on the GenAI
# traces overview (the values of the UI's ExperimentKind; `genai_development` is the other one)
EXPERIMENT_KIND_TAG, MODEL_TRAINING = "mlflow.experimentKind", "custom_model_development"


def mark_experiment(client: MlflowClient, experiment_id: str) -> None:
    """Mark the experiment as model training, unless someone chose its kind already."""
    if EXPERIMENT_KIND_TAG not in client.get_experiment(experiment_id).tags:
        client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING)


def get_or_create_experiment(client: MlflowClient, name: str) -> str:
    """The experiment's id, created (and marked as model training, run_writer.mark_experiment) if new."""
    exp = client.get_experiment_by_name(name)
    if exp is None:
        exp_id = client.create_experiment(name)
    else:
        exp_id = exp.experiment_id
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp_id)
    mark_experiment(client, exp_id)
    return exp_id


# run names: the axes of the paper first (depth, iterations, routing), then the other swept keys
NAME_ABBREV = {"model.depth": "d", "model.iterations": "it", SEED_KEY: "s", "model.caps_dim": "cd",
               "model.num_caps": "nc", "data.train_size": "n", "train.lr": "lr"}
NAME_FIXED = ("model.arch", "model.depth", "model.iterations", "model.routing", SEED_KEY, ROLE_KEY)


def _name_part(key: str, value: Any) -> str:
    abbr = NAME_ABBREV.get(key) or key.rsplit(".", 1)[-1].replace("_", "")
    if isinstance(value, bool):
        return abbr if value else f"no{abbr}"
    if isinstance(value, str):
        return value
    if isinstance(value, float):
        return f"{abbr}{value:.3g}"
    if isinstance(value, (list, tuple)):
        return abbr + "x".join(map(str, value))
    return f"{abbr}{value}"


def run_name(params: dict, swept: Iterable[str]) -> str:
    """`d3-it3-dynamic-s0`: depth, routing iterations and algorithm (a cnn: `cnn-d3`), the other swept
    keys (strings as they are, numbers after a short key, booleans as the key or `no`+key), the seed."""
    cnn = params.get("model.arch") == "cnn"
    parts = ["cnn"] if cnn else []
    parts.append(_name_part("model.depth", params.get("model.depth")))
    if not cnn:
        parts += [_name_part("model.iterations", params.get("model.iterations")), str(params.get("model.routing"))]
    parts += [_name_part(k, params.get(k)) for k in swept if k not in NAME_FIXED]
    parts.append(_name_part(SEED_KEY, params.get(SEED_KEY)))
    return "-".join(parts)


def numeric_metrics(result: dict) -> dict[str, float]:
    """The numbers of a Tune result (or a fit report) that are metrics: Tune's bookkeeping left out."""
    out = {}
    for k, v in result.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        if k in ("epoch", "training_iteration") or k.startswith(("time_", "timestamp")) and k != "time_s":
            continue
        if k in ("pid", "done", "iterations_since_restore", "timesteps_total", "episodes_total"):
            continue
        out[k] = float(v)    # NaN is data (0/0 grad_ratio of a network with no gradient at all)
        companion = log10_name(k)         # tiny probes chart in MLflow's UI on their log10 too (contract)
        if companion and math.isfinite(out[k]) and out[k] > 0:
            out[companion] = math.log10(out[k])
    return out


def end_tags(status: str, last: dict) -> dict[str, str]:
    """The tags of how a trial ended, from its last result: why it stopped (the trial says patience,
    epochs or diverged in the report that ended it; ASHA's stop is the scheduler's) and the test split's
    per-image correctness at its best-val epoch (every report carries the best so far), which the
    analysis pairs across trials (capsmodels.contract). None for a failed trial: its model is not
    logged either."""
    if status == FAILED:
        return {}
    tags = {}
    reason = STOP_SCHEDULER if status == STOPPED else last.get(REPORT_STOP_REASON)
    if reason:
        tags[TAG_STOP_REASON] = str(reason)
    if isinstance(last.get(REPORT_TEST_CORRECT), str):
        tags.update(correct_tags(last[REPORT_TEST_CORRECT]))
    return tags


def run_params(params: dict) -> list[Param]:
    """MLflow params of a flat dict: None ("not set") left out."""
    return [Param(k, param_str(v)) for k, v in params.items() if v is not None]


def log_datasets(client: MlflowClient, run_id: str, datasets: list[dict]) -> None:
    """Each split (sweeps/provenance.py, dataset_inputs) as one of the run's dataset inputs."""
    client.log_inputs(run_id, datasets=[DatasetInput(
        Dataset(d["name"], d["digest"], "capsweep", json.dumps({"dataset": d["name"], "split": d["context"]}),
                profile=json.dumps({"num_rows": d["rows"]})),
        tags=[InputTag(DATA_CONTEXT, d["context"]), InputTag(SPLIT_ROWS, str(d["rows"]))]) for d in datasets])


def transient(e: BaseException) -> bool:
    """Errors worth retrying: the server is away or overloaded, not a bad request."""
    if isinstance(e, MlflowException):
        code = getattr(e, "error_code", "")
        text = str(e)
        return (code in ("TEMPORARILY_UNAVAILABLE", "INTERNAL_ERROR", "REQUEST_LIMIT_EXCEEDED")
                or "Max retries" in text or "Connection" in text or "API request" in text
                or "database is locked" in text)
    return isinstance(e, (OSError, ConnectionError, TimeoutError, socket.timeout))


FULL_DISK_S = 120.0      # a full store disk is waited for this long (someone may free space), then the sweep stops


def disk_full(e: BaseException) -> bool:
    """The store (its database or artifact folder) is out of space: errno ENOSPC anywhere in the error's
    chain, or the database's own words for it (SQLite, PostgreSQL, MySQL), also as a server passes them on."""
    import errno
    seen: Optional[BaseException] = e
    for _ in range(8):
        if seen is None:
            break
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)):
            return True
        seen = seen.__cause__ or seen.__context__
    text = str(e)
    return any(w in text for w in ("disk is full", "No space left on device", "could not extend file",
                                   "Disk quota exceeded", "The table is full"))


def store_trouble(tracking_uri: str, full_disk_s: float = FULL_DISK_S):
    """The write queue's `explain` for this store: a full disk is named (the SQLite file's folder and its
    free space, the artifact file, or the server's word) and waited for `full_disk_s`, not 15 minutes."""
    from analysis.store import sqlite_path
    from capsmodels.contract import redact

    def explain(e: BaseException) -> Optional[tuple[str, float]]:
        if not disk_full(e):
            return None
        import shutil
        db = sqlite_path(tracking_uri)
        where = getattr(e, "filename", None)
        if where:
            where = f"writing {where}"
        elif db is not None:
            try:
                free = shutil.disk_usage(db.parent).free / 1e6
                where = f"{db.parent}: {free:.1f} MB free"
            except OSError:
                where = str(db.parent)
        else:
            where = f"the server says: {redact(' '.join(str(e).split())[:120])}"
        return f"the store's disk is full ({where})", full_disk_s
    return explain


def param_str(v: Any) -> str:
    s = json.dumps(v) if isinstance(v, (list, dict)) else str(v)
    return s[:6000]


# ---- one run outside a sweep (capsweep train --save: sweeps/train_run.py; capsweep eval --log) ---------
def log_run(client, experiment_id: str, name: str, params: dict, history: list[dict], tags: dict,
            datasets: Optional[list] = None) -> str:
    """A run with the standard tags, `params` (None left out), each metrics dict of `history` at its
    `epoch` as the step, and the datasets; left open (the caller adds the model and ends it)."""
    commit = git_commit()
    run = client.create_run(experiment_id, run_name=name, tags={**standard_tags(commit), **tags})
    rid = run.info.run_id
    client.log_batch(rid, params=run_params(params))
    ts = int(time.time() * 1000)
    items = [Metric(k, v, ts, int(m.get("epoch", 0))) for m in history for k, v in numeric_metrics(m).items()]
    items += [Metric("epoch", float(m["epoch"]), ts, int(m["epoch"])) for m in history if "epoch" in m]
    for i in range(0, len(items), MAX_BATCH):
        client.log_batch(rid, metrics=items[i:i + MAX_BATCH])
    if datasets:
        log_datasets(client, rid, datasets)
    return rid


class RunWriter:
    """The MLflow side of one sweep: `run_ids` and `last_step` (per trial id) are what it has written."""

    def __init__(self, client: MlflowClient, experiment_id: str, parent_id: str, sweep: str,
                 commit: Optional[str], tracking_uri: str = "", trust: bool = False):
        self.client = client
        self.tracking_uri = tracking_uri
        self.trust = trust                    # --trust: trial files that name code may be unpickled
        self.experiment_id = experiment_id
        self.parent_id = parent_id
        self.sweep = sweep
        self.commit = commit
        self.run_ids: dict[str, str] = {}
        self.last_step: dict[str, int] = {}
        self._apply = {Start: self._start, Tag: self._tag, Reopen: self._reopen, Interrupt: self._interrupt,
                       Metrics: self._metrics, End: self._end, ParentInterrupt: self._parent_interrupt,
                       ParentEnd: self._parent_end, Lineage: self._lineage, Model: self._model,
                       ParentTags: self._parent_tags}

    def apply(self, rec: Record) -> None:
        self._apply[type(rec)](rec)

    def _start(self, r: Start) -> None:
        if r.trial_id in self.run_ids:
            return
        tags = {TAG_PARENT: self.parent_id, TAG_ROLE: RUN_TRIAL, TAG_SWEEP: self.sweep,
                TAG_TRIAL: r.trial_id, TAG_SEED: str(r.seed), TAG_STATUS: RUNNING, TAG_RUN_NAME: r.run_name}
        if self.commit:
            tags[TAG_COMMIT] = self.commit
        tags.update(standard_tags(self.commit))
        # idempotent: a retry after a half-delivered start finds the run it created
        found = self.client.search_runs(
            [self.experiment_id],
            f"tags.`{TAG_PARENT}` = '{self.parent_id}' and tags.`{TAG_TRIAL}` = '{r.trial_id}'",
            max_results=1)
        run = found[0] if found else self.client.create_run(self.experiment_id, tags=tags,
                                                            run_name=r.run_name)
        rid = run.info.run_id
        if not run.data.params:
            self.client.log_batch(rid, params=run_params({k: v for k, v in r.params.items() if k != DEVICE_PARAM}))
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

    def _lineage(self, r: Lineage) -> None:
        run = self.client.get_run(self.run_ids[r.trial_id])
        new = {k: v for k, v in r.params.items() if k not in run.data.params}
        if new or r.tags:
            self.client.log_batch(run.info.run_id, params=run_params(new),
                                  tags=[RunTag(k, v) for k, v in r.tags.items()])
        if r.datasets and not run.inputs.dataset_inputs:
            log_datasets(self.client, run.info.run_id, r.datasets)

    def _model(self, r: Model) -> None:
        rid = self.run_ids[r.trial_id]
        if r.log:
            try:
                models.log_trial_model(self.client, self.tracking_uri, self.experiment_id, rid, r.model_dir,
                                       r.state_path, {TAG_SWEEP: self.sweep, TAG_TRIAL: r.trial_id},
                                       trust=self.trust)
            except Exception as e:  # noqa: BLE001 - a model that cannot be logged must not stop the sweep
                if transient(e):
                    raise           # the queue waits for the store and tries again
                self.client.set_tag(rid, TAG_MODEL_ERROR, " ".join(str(e).split())[:4900])
                return              # its files stay: nothing of the trial is lost
        if not r.keep:
            models.cleanup(r.model_dir, r.state_path)

    def _parent_tags(self, r: ParentTags) -> None:
        self.client.log_batch(self.parent_id, tags=[RunTag(k, v) for k, v in r.tags.items()])
        mark_experiment(self.client, self.experiment_id)

    def _end(self, r: End) -> None:
        rid = self.run_ids[r.trial_id]
        tags = [RunTag(TAG_STATUS, r.status)] + [RunTag(k, v) for k, v in r.tags.items()]
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
