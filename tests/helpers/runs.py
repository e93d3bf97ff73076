"""The one way tests write sweeps into a real MLflow store: each trial through the runner's own writer
(sweeps.run_writer.RunWriter: a Start, one Metrics per epoch, an End), and the parent with the tags and
`sweep.*` params the runner gives it (capsmodels.contract; `runner.create_parent` itself when a spec is
given). So a store built here is laid out as a real sweep's: its tags, its params' spelling, its
config.yaml and its epoch metric come from the code that writes real sweeps, never from a test's copy.

`make_store` is the one SQLite store of the tests (tests/conftest.py's `mlflow_store` fixture uses it).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import yaml
from mlflow import MlflowClient
from mlflow.entities import Param

from capsmodels.contract import (FINISHED, INTERRUPTED, RUN_PARENT, RUNNING, TAG_ROLE, TAG_RUN_NAME, TAG_STATUS,
                                 TAG_SWEEP, SweepParams)
from sweeps.run_writer import RunWriter
from sweeps.write_queue import End, Interrupt, Metrics, ParentEnd, Start

EPOCHS = 3          # epochs each trial logs unless told otherwise
COMMIT = "abc1234"  # the git commit the trials record


@dataclass
class Store:
    """A real SQLite MLflow store in a folder, with one experiment."""
    uri: str
    folder: Path
    client: MlflowClient
    experiment_id: str


def make_store(folder: Path, experiment: str = "capsweep") -> Store:
    """A new SQLite store at folder/mlflow.db with `experiment` (artifacts in folder/artifacts)."""
    folder.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment(experiment, artifact_location=str(folder / "artifacts"))
    return Store(uri, folder, client, exp)


def ramp(final: dict[str, float], epochs: int = EPOCHS) -> list[dict[str, float]]:
    """`epochs` epochs of metrics rising to `final` (the last epoch is exactly `final`; NaN stays NaN)."""
    return [{k: v if e == epochs - 1 or math.isnan(v) else v * (0.5 + 0.5 * (e + 1) / epochs)
             for k, v in final.items()} for e in range(epochs)]


class SweepWriter:
    """One sweep in the store. The parent: `runner.create_parent(spec)` when a spec is given, else the
    runner's parent tags with `params` (a SweepParams) as its `sweep.*` params; `parent_id`: add to the
    sweep whose parent that is. Trials: `trial`."""

    def __init__(self, client: MlflowClient, experiment_id: str, sweep: str, *, spec=None,
                 params: Optional[SweepParams] = None, parent_id: Optional[str] = None, commit: str = COMMIT):
        if parent_id is not None:
            parent = parent_id
        elif spec is not None:
            from sweeps.runner import create_parent
            parent = create_parent(client, experiment_id, spec)
        else:
            parent = client.create_run(experiment_id, run_name=sweep, tags={
                TAG_ROLE: RUN_PARENT, TAG_SWEEP: sweep, TAG_STATUS: RUNNING, TAG_RUN_NAME: sweep}).info.run_id
            if params is not None:
                client.log_batch(parent, params=[Param(k, v) for k, v in params.to_params().items()])
        self.client = client
        self.parent_id = parent
        self.writer = RunWriter(client, experiment_id, parent, sweep, commit)
        self._step_ts = int(time.time() * 1000)

    def trial(self, trial_id: str, params: dict, history: list[dict], *, status: str = FINISHED,
              error: str = "", tags: Optional[dict] = None, run_name: Optional[str] = None) -> str:
        """One trial: its run started with `params` (train.seed is its seed), one epoch per entry of
        `history`, then ended with `status` (RUNNING: left open; INTERRUPTED: killed, as a dead driver's
        trial is). Returns its run id."""
        w = self.writer
        w.apply(Start(trial_id, run_name or trial_id, params, int(params.get("train.seed", 0)),
                      yaml.safe_dump(params, sort_keys=False)))
        for step, metrics in enumerate(history):
            w.apply(Metrics(trial_id, step, dict(metrics), self._step_ts + step))
        if status == INTERRUPTED:
            w.apply(Interrupt(trial_id))
        elif status != RUNNING:
            w.apply(End(trial_id, status, error or None, dict(tags or {})))
        return w.run_ids[trial_id]

    def end(self, status: str = FINISHED, summary: Optional[dict] = None) -> None:
        """The parent ended as the runner ends it (its status tag and MLflow status)."""
        self.writer.apply(ParentEnd(dict(summary or {}), status))


def start_sweep(client: MlflowClient, exp_id: str, sweep: str) -> str:
    """A sweep's parent run (SweepWriter's, without sweep.* params); returns its id."""
    return SweepWriter(client, exp_id, sweep).parent_id


def log_trial(client: MlflowClient, exp_id: str, parent_id: str, sweep: str, trial_id: str,
              params: dict, final: dict[str, float], status: str = FINISHED, error: str = "",
              epochs: int = EPOCHS) -> str:
    """One finished trial of the sweep whose parent is `parent_id`, written through RunWriter:
    `epochs` epochs ramping up to `final`, then `status` (with `error` for a failed one)."""
    writer = SweepWriter(client, exp_id, sweep, parent_id=parent_id)
    return writer.trial(trial_id, params, ramp(final, epochs), status=status, error=error)
