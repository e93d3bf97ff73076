"""A sweep whose driver died says so (issue 18, item 4): the driver's heartbeat on its parent run, and
`capsweep ls`, `status` and the report calling a sweep interrupted once the heartbeat is older than
HEARTBEAT_STALE_S (60 s), with the command that continues it.

The passage of time is the heartbeat tag's value set back (what 120 s without a driver leaves in the
store); the real driver's heartbeat thread is checked on a real store, with a short period."""
from __future__ import annotations

import time

import pytest

from capsmodels.contract import (FAILED, FINISHED, HEARTBEAT_STALE_S, INTERRUPTED, RUNNING, TAG_HEARTBEAT,
                                 resume_command, sweep_state)
from sweeps.cli import main
from tests.helpers.probe_metrics import capsnet_metrics
from tests.helpers.runs import log_trial, start_sweep

@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    """MLflow puts a new experiment's artifacts in ./mlruns of the working folder: keep them out of the repo."""
    monkeypatch.chdir(tmp_path)


NOW = 1_800_000_000.0


@pytest.mark.parametrize("run_status, tags, state", [
    ("RUNNING", {"capsweep.status": "running", TAG_HEARTBEAT: str(int(NOW - 5))}, RUNNING),
    ("RUNNING", {"capsweep.status": "running", TAG_HEARTBEAT: str(int(NOW - HEARTBEAT_STALE_S + 1))}, RUNNING),
    ("RUNNING", {"capsweep.status": "running", TAG_HEARTBEAT: str(int(NOW - HEARTBEAT_STALE_S - 1))}, INTERRUPTED),
    ("RUNNING", {"capsweep.status": "running"}, RUNNING),           # an earlier capsweep: no heartbeat
    ("FINISHED", {"capsweep.status": "finished", TAG_HEARTBEAT: "0"}, FINISHED),
    ("KILLED", {"capsweep.status": "interrupted", TAG_HEARTBEAT: str(int(NOW))}, INTERRUPTED),
    ("FAILED", {"capsweep.status": "running", TAG_HEARTBEAT: str(int(NOW))}, FAILED),
])
def test_sweep_state_from_the_parent_and_its_heartbeat(run_status, tags, state):
    assert sweep_state(run_status, tags, NOW) == state


def test_resume_command_is_the_starting_command_with_resume():
    tags = {"mlflow.source.name": "capsweep run depth base.train.epochs=2 --num-cpus 2"}
    assert resume_command(tags, "depth") == "capsweep run depth base.train.epochs=2 --num-cpus 2 --resume"
    assert resume_command({"mlflow.source.name": "capsweep run depth --resume"}, "d") == "capsweep run depth --resume"
    assert resume_command({}, "d") == "capsweep run <the spec of 'd'> --resume"


@pytest.fixture()
def dead_sweep(tmp_path):
    """A parent tagged running with one finished and one running trial, as a driver SIGKILLed 120 s
    ago leaves them."""
    from analysis.store import open_client as open_store
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = open_store(uri, create=True)
    exp = client.create_experiment("capsweep")
    parent = start_sweep(client, exp, "dead")
    for k, v in {"capsweep.status": "running", TAG_HEARTBEAT: str(int(time.time() - 120)),
                 "mlflow.source.name": "capsweep run dead.yaml --num-cpus 2"}.items():
        client.set_tag(parent, k, v)
    client.log_param(parent, "sweep.trials", "2")
    params = {"model.depth": 0, "model.arch": "capsnet", "train.seed": 0, "trial.role": "candidate"}
    log_trial(client, exp, parent, "dead", "t0", params,
              capsnet_metrics(0, grad_ratio=1.0, dead_hidden=0.0, test_acc=0.9, seed=0))
    log_trial(client, exp, parent, "dead", "t1", {**params, "train.seed": 1},
              capsnet_metrics(0, grad_ratio=1.0, dead_hidden=0.0, test_acc=0.9, seed=1), status="running")
    return uri, client, parent


def test_ls_and_status_call_a_dead_drivers_sweep_interrupted(dead_sweep, capsys):
    uri, client, parent = dead_sweep
    assert main(["ls", "--tracking-uri", uri]) == 0
    out, err = capsys.readouterr()
    row = next(line for line in out.splitlines() if line.startswith("dead "))
    assert " interrupted " in row and "1 finished, 1 interrupted" in row and "running" not in row
    assert err.startswith("capsweep: sweep 'dead' is interrupted: its driver stopped (no heartbeat for 1")
    assert err.strip().endswith("continue it with: capsweep run dead.yaml --num-cpus 2 --resume")
    assert main(["status", "dead", "--tracking-uri", uri]) == 0
    out = capsys.readouterr().out
    assert out.startswith("sweep 'dead' (experiment 'capsweep'): interrupted, 1/2 trials ended")
    assert "continue it with: capsweep run dead.yaml --num-cpus 2 --resume" in out
    client.set_tag(parent, TAG_HEARTBEAT, str(int(time.time())))      # a live driver: running again
    assert main(["status", "dead", "--tracking-uri", uri]) == 0
    out = capsys.readouterr().out
    assert ": running, 1/2 trials ended" in out and "interrupted" not in out


def test_the_report_says_the_sweep_is_interrupted(dead_sweep):
    from analysis.load import load_sweep
    uri, client, parent = dead_sweep
    data = load_sweep("capsweep", uri, "dead")
    (note,) = [n for n in data.notes if "interrupted" in n]
    assert "no heartbeat for 1" in note and "limit 60 s" in note
    assert note.endswith("continue it with: capsweep run dead.yaml --num-cpus 2 --resume")


def test_the_driver_heartbeat_renews_the_tag_until_it_stops(tmp_path):
    from sweeps.heartbeat import Heartbeat
    from analysis.store import open_client as open_store
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = open_store(uri, create=True)
    run_id = client.create_run(client.create_experiment("e")).info.run_id
    client.set_tag(run_id, TAG_HEARTBEAT, "0")
    with Heartbeat(uri, run_id, every_s=0.2):
        first = int(client.get_run(run_id).data.tags[TAG_HEARTBEAT])      # written on entry
        assert abs(first - time.time()) < 5
        client.set_tag(run_id, TAG_HEARTBEAT, "0")
        deadline = time.monotonic() + 30
        while client.get_run(run_id).data.tags[TAG_HEARTBEAT] == "0":     # the thread renews it
            assert time.monotonic() < deadline, "no heartbeat from the thread"
            time.sleep(0.1)
    client.set_tag(run_id, TAG_HEARTBEAT, "0")
    time.sleep(0.6)
    assert client.get_run(run_id).data.tags[TAG_HEARTBEAT] == "0"          # stopped with the block
