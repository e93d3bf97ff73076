"""The sweep's Tune callback (sweeps/tracking.py, MlflowSweepLogger) driven hook by hook with fake trial
objects (what Tune hands a callback: an id, a config, a status, the last result) against a real SQLite
MLflow store: the runs it creates, names, reopens and closes, and the parent's summary. No Ray run, and
nothing of capsweep replaced."""
from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from typing import Optional

import pytest

from capsmodels.contract import (DIVERGED, FAILED, FINISHED, INTERRUPTED, TAG_RETRIES, TAG_RUN_NAME, TAG_STATUS, TAG_TRIAL)
from sweeps.tracking import MlflowSweepLogger
from tests.helpers.runs import start_sweep

SWEEP = "fake"


@dataclass
class FakeTrial:
    """The attributes of ray.tune's Trial that the callback reads."""
    trial_id: str
    config: dict
    status: str = "RUNNING"
    last_result: dict = field(default_factory=dict)
    error_msg: Optional[str] = None


def trial_params(config: dict) -> tuple[dict, int]:
    """config -> (flat params, seed), as the runner's _TrialParams gives them (module level: picklable)."""
    return {"model.depth": config["model.depth"], "model.iterations": 3, "model.routing": "dynamic",
            "train.seed": config.get("train.seed", 0)}, int(config.get("train.seed", 0))


def trial_yaml(config: dict) -> str:
    return f"model:\n  depth: {config['model.depth']}\n"


@pytest.fixture
def store(mlflow_store, tmp_path):
    parent = start_sweep(mlflow_store.client, mlflow_store.experiment_id, SWEEP)
    return mlflow_store.uri, mlflow_store.client, mlflow_store.experiment_id, parent, tmp_path


def _logger(store, expected: int = 0) -> MlflowSweepLogger:
    uri, _, eid, parent, tmp = store
    return MlflowSweepLogger(uri, eid, parent, SWEEP, tmp / "local", trial_params, trial_yaml,
                             expected_trials=expected, storage_root=str(tmp / "exp"))


def _children(store) -> dict:
    uri, client, eid, parent, _ = store
    runs = client.search_runs([eid], f"tags.mlflow.parentRunId = '{parent}'")
    return {r.data.tags[TAG_TRIAL]: r for r in runs}


def _epoch(logger, trials, trial, epoch: int, **extra) -> None:
    trial.last_result = {"epoch": epoch, "val_acc": 0.5 + epoch / 10, **extra}
    logger.on_trial_result(epoch, trials, trial, trial.last_result)


def test_a_sweep_of_three_trials_ends_with_their_statuses_and_the_parents_summary(store, capsys):
    logger = _logger(store, expected=3)
    a, b, c = (FakeTrial(t, {"model.depth": d}) for t, d in (("a", 1), ("b", 1), ("c", 2)))
    trials = [a, b, c]
    logger.setup()
    logger.on_step_begin(0, trials)
    for t in trials:
        logger.on_trial_start(0, trials, t)
    _epoch(logger, trials, a, 0)
    _epoch(logger, trials, a, 1, status=FINISHED)
    a.status = "TERMINATED"
    logger.on_trial_complete(1, trials, a)
    _epoch(logger, trials, b, 0, status=DIVERGED)
    b.status = "TERMINATED"
    logger.on_trial_complete(1, trials, b)
    c.status, c.error_msg = "ERROR", "RuntimeError: boom"
    logger.on_trial_error(1, trials, c)
    logger.on_experiment_end(trials)

    runs = _children(store)
    assert {t: r.data.tags[TAG_STATUS] for t, r in runs.items()} == {"a": FINISHED, "b": DIVERGED, "c": FAILED}
    assert {t: r.data.tags[TAG_RUN_NAME] for t, r in runs.items()} == \
        {"a": "d1-it3-dynamic-s0", "b": "d1-it3-dynamic-s0-2", "c": "d2-it3-dynamic-s0"}
    assert all(r.info.status != "RUNNING" for r in runs.values())
    uri, client, _, parent, _ = store
    assert [m.step for m in client.get_metric_history(runs["a"].info.run_id, "val_acc")] == [0, 1]
    p = client.get_run(parent)
    assert p.data.metrics["trials_total"] == 3 and p.data.metrics["trials_finished"] == 1
    assert p.data.metrics["trials_diverged"] == 1 and p.data.metrics["trials_failed"] == 1
    assert p.info.status == "FINISHED" and logger.statuses == {"a": FINISHED, "b": DIVERGED, "c": FAILED}
    out = capsys.readouterr().out
    assert "1/3" in out and "3/3" in out          # the overall progress line as each trial ends


def test_ctrl_c_closes_the_sweep_as_interrupted_and_a_new_driver_reopens_the_run(store):
    logger = _logger(store, expected=2)
    a, b = FakeTrial("a", {"model.depth": 1}), FakeTrial("b", {"model.depth": 2})
    trials = [a, b]
    logger.on_step_begin(0, trials)
    for t in trials:
        logger.on_trial_start(0, trials, t)
    _epoch(logger, trials, a, 0)
    _epoch(logger, trials, b, 0, status=FINISHED)
    b.status = "TERMINATED"
    logger.on_trial_complete(0, trials, b)
    logger.book.interrupted = True                # what the SIGINT handler records
    a.status = "TERMINATED"                       # Tune completes the running trials after a Ctrl-C
    logger.on_trial_complete(1, trials, a)        # ... which is not an end: a continues on --resume
    logger.on_experiment_end(trials)
    runs = _children(store)
    assert runs["a"].data.tags[TAG_STATUS] == INTERRUPTED and runs["b"].data.tags[TAG_STATUS] == FINISHED
    uri, client, _, parent, _ = store
    assert client.get_run(parent).data.tags["capsweep.status"] == INTERRUPTED

    again = _logger(store, expected=2)            # --resume: the book is read back from MLflow
    assert again.statuses == {"a": INTERRUPTED, "b": FINISHED} and again.book.ended == {"b"}
    a2 = FakeTrial("a", {"model.depth": 1})
    again.on_trial_restore(0, [a2, b], a2)
    assert again.statuses["a"] == "running"
    assert _children(store)["a"].data.tags[TAG_STATUS] == "running"      # reopened, not a new run
    assert len(_children(store)) == 2
    _epoch(again, [a2, b], a2, 1, status=FINISHED)
    a2.status = "TERMINATED"
    again.on_trial_complete(1, [a2, b], a2)
    again.on_experiment_end([a2, b])
    assert {t: r.data.tags[TAG_STATUS] for t, r in _children(store).items()} == {"a": FINISHED, "b": FINISHED}


def test_a_retried_trial_keeps_its_run_and_counts_its_retries(store):
    logger = _logger(store)
    a = FakeTrial("a", {"model.depth": 1})
    logger.on_trial_start(0, [a], a)
    logger.on_trial_recover(0, [a], a)
    logger.on_trial_recover(0, [a], a)
    logger.on_trial_start(0, [a], a)
    logger.queue.drain()
    runs = _children(store)
    assert list(runs) == ["a"] and runs["a"].data.tags[TAG_RETRIES] == "2"


def test_a_trial_that_ended_is_not_closed_twice_after_a_restore(store):
    logger = _logger(store)
    a = FakeTrial("a", {"model.depth": 1}, status="TERMINATED", last_result={"epoch": 0, "status": FINISHED})
    logger.on_trial_start(0, [a], a)
    logger.on_trial_result(0, [a], a, a.last_result)
    logger.on_trial_complete(0, [a], a)
    logger.on_experiment_end([a])
    again = _logger(store)
    assert again.book.ended == {"a"}
    assert again._finish(a, None) is False         # Tune re-reports the final epoch of a restored trial


def test_the_pickled_logger_carries_its_arguments_only_and_reads_the_rest_back(store):
    logger = _logger(store, expected=1)
    a = FakeTrial("a", {"model.depth": 1})
    logger.on_trial_start(0, [a], a)
    logger.queue.drain()
    restored = pickle.loads(pickle.dumps(logger))
    assert restored.book.names == {"d1-it3-dynamic-s0"} and restored.book.expected_trials == 1
    assert restored.run_ids == logger.run_ids and restored.statuses == {"a": "running"}
