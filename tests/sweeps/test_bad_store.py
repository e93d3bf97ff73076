"""A bad store costs one line, in a stated time, never the training (issue 18, item 6).

- A server that takes connections and never answers: `ls`, `status`, `eval`, `report` and `train
  --save` give up within STORE_TIMEOUT_S (10 s) in one line, exit 2; `train --save` before training.
- A database URI whose driver is not installed: one line naming the driver, password hidden.
- `train --save` logs live: the run exists before the first epoch and each epoch lands as it ends.
- A full store disk (a real tmpfs, filled): named, waited for a stated time, then the sweep's queue
  stops in one line; the journal keeps the writes and delivers them once space is freed.
- A read-only or full storage_path: one line before anything starts; a full disk mid-sweep: one line.
The mounts need root (tests/helpers/disk.py); without it those tests skip.
"""
from __future__ import annotations

import errno
import time

import pytest
import yaml

from sweeps.cli import main
from analysis.store import STORE_TIMEOUT_S
from tests.helpers.disk import fill, read_only, small_disk
from tests.helpers.sweep import TINY_BASE, unanswered_address, write_spec


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    """MLflow puts a new experiment's artifacts in ./mlruns of the working folder: keep them out of the repo."""
    monkeypatch.chdir(tmp_path)


def _one_line(capsys, says: str) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("capsweep") and says in err, err
    return err


@pytest.fixture()
def run_yaml(tmp_path):
    base = yaml.safe_load(TINY_BASE % {"epochs": 2})["base"]
    base["train"]["max_steps_per_epoch"] = 2
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(base))
    return path


@pytest.mark.parametrize("argv, timeout", [(["ls"], None), (["status", "s"], "2"), (["eval", "0123abc"], "2"),
                                           (["report", "s"], "2"), (["train", "RUN_YAML", "--save", "--quiet"], "2")])
def test_a_server_that_never_answers_is_refused_in_one_line_within_the_timeout(argv, timeout, run_yaml, capsys,
                                                                                monkeypatch):
    """`ls` at the stated 10 s; the others at 2 s ($CAPSWEEP_STORE_TIMEOUT), to keep the run short."""
    if timeout:
        monkeypatch.setenv("CAPSWEEP_STORE_TIMEOUT", timeout)
    limit = float(timeout or STORE_TIMEOUT_S)
    argv = [str(run_yaml) if a == "RUN_YAML" else a for a in argv]
    with unanswered_address() as address:
        t0 = time.monotonic()
        code = main([*argv, "--tracking-uri", f"http://alice:S3cretPw@{address}"])
        took = time.monotonic() - t0
    assert code == 2
    out, err = capsys.readouterr()
    assert err.strip().count("\n") == 0 and f"did not answer within {limit:.0f} s" in err, err
    assert "S3cretPw" not in err and "***@" in err
    assert "epoch" not in out                                   # train --save: refused before training
    assert took < limit + 15


def test_a_database_uri_without_its_driver_is_one_line_naming_it(capsys):
    import importlib.util
    uri = "postgresql://alice:S3cretPw@127.0.0.1:9/mlflow"
    code = main(["ls", "--tracking-uri", uri])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "S3cretPw" not in err, err
    if importlib.util.find_spec("psycopg") is None:
        assert "needs the Python driver 'psycopg'" in err and "pip install" in err
    else:                           # the cluster extra is installed here: the database is simply not there
        assert "cannot read the MLflow store at postgresql://***@127.0.0.1:9/mlflow" in err


def test_train_save_opens_its_run_before_training_and_logs_each_epoch_as_it_ends(tmp_path, run_yaml, capsys):
    from mlflow.tracking import MlflowClient
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    assert main(["train", str(run_yaml), "--save", "--quiet", "--tracking-uri", uri]) == 0
    client = MlflowClient(uri)
    (r,) = client.search_runs([client.get_experiment_by_name("capsweep").experiment_id])
    hist = sorted(client.get_metric_history(r.info.run_id, "val_acc"), key=lambda m: m.step)
    assert [m.step for m in hist] == [0, 1]
    assert r.info.start_time <= hist[0].timestamp < hist[1].timestamp     # written as each epoch ended
    assert r.info.status == "FINISHED" and r.data.tags["capsweep.status"] == "finished"
    assert r.data.tags["capsweep.model_id"]


def test_train_save_on_a_read_only_store_is_refused_before_training(tmp_path, run_yaml, capsys):
    store = tmp_path / "store"
    store.mkdir()
    from analysis.store import open_client as open_store
    open_store(f"sqlite:///{store}/mlflow.db", create=True)
    with read_only(store):
        code = main(["train", str(run_yaml), "--save", "--quiet", "--tracking-uri", f"sqlite:///{store}/mlflow.db"])
        out, err = capsys.readouterr()
    assert code == 2 and err.count("\n") == 1 and "Read-only file system" in err, err
    assert "epoch" not in out


def test_a_full_store_disk_is_named_and_stops_in_the_stated_time_then_replays(tmp_path):
    """The driver's write path (queue + writer) on a SQLite store whose disk fills up: the message names
    the disk, not an unreachable server; the queue stops after the stated wait (here 1 s for the test;
    FULL_DISK_S = 120 s in a sweep); freeing space and a new queue deliver everything."""
    from mlflow.entities import Metric  # noqa: F401 - the writer's records carry MLflow metrics
    from analysis.store import open_client as open_store
    from sweeps.run_writer import RunWriter, store_trouble, transient
    from sweeps.write_queue import Metrics, Start, TrackingUnavailable, WriteQueue
    with small_disk(tmp_path / "disk", "3m") as disk:
        uri = f"sqlite:///{disk}/mlflow.db"
        client = open_store(uri, create=True)
        exp = client.create_experiment("e", artifact_location=str(disk / "art"))
        parent = client.create_run(exp).info.run_id
        writer = RunWriter(client, exp, parent, "s", None, uri)
        journal = tmp_path / "pending.jsonl"               # the journal is on the driver's own disk
        said = []
        q = WriteQueue(writer.apply, transient, journal, f"MLflow at {uri}", explain=store_trouble(uri, 1.0))
        q.put(Start("t1", "d0", {"model.depth": 0}, 0, "model: {}\n"))
        filler = fill(disk)
        wide = {f"m{j}": float(j) for j in range(400)}
        with pytest.raises(TrackingUnavailable) as e:
            for step in range(10_000):
                q.put(Metrics("t1", step, wide, 1000 + step))
                if q.outage_since is not None:
                    said.append(q.why)
                    time.sleep(1.1)
                    q.flush(force=True)
        msg = str(e.value)
        assert "\n" not in msg and "disk is full" in msg and str(disk) in msg and "free space" in msg
        assert "unreachable" not in msg and said and said[0].startswith("the store's disk is full")
        kept = journal.read_text().count("\n")
        assert kept >= 1
        filler.unlink()
        again = WriteQueue(writer.apply, transient, journal, f"MLflow at {uri}", explain=store_trouble(uri, 1.0))
        assert again.replay_spool() == kept and not journal.exists()
        steps = [m.step for m in client.get_metric_history(writer.run_ids["t1"], "m7")]
        assert steps == list(range(max(steps) + 1))            # every epoch once, none lost
        assert max(steps) == step


def test_a_read_only_or_full_storage_path_is_refused_before_anything_starts(tmp_path, capsys):
    spec = write_spec(tmp_path / "s.yaml", "s", "model.depth: {grid: [0]}", seeds="[0]",
                      tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    with read_only(tmp_path / "ro") as ro:
        assert main(["run", str(spec), f"storage_path={ro}/ray"]) == 2
        _one_line(capsys, "storage_path: cannot write")
    with small_disk(tmp_path / "full", "1m") as disk:
        fill(disk)
        assert main(["run", str(spec), f"storage_path={disk}/ray"]) == 2
        _one_line(capsys, "no space left on the disk")
        assert not (disk / "ray").exists()
    assert not (tmp_path / "mlflow.db").exists()                  # refused before any MLflow work


def test_a_disk_error_inside_tune_is_one_line_naming_the_file():
    from sweeps.cli import _disk_error
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device", "/shared/ray/s/experiment_state.json")
        except OSError as inner:
            raise RuntimeError("Trial controller checkpointing failed") from inner
    except RuntimeError as e:
        assert _disk_error(e) == "/shared/ray/s/experiment_state.json: No space left on device"
    assert _disk_error(ValueError("x")) is None
