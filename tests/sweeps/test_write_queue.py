"""The tracking write queue (sweeps/write_queue.py) on its own: order, retries, spool, replay.

A store that is "away" is a list that raises ConnectionError while a flag is set: the queue's
contract is only that `apply` raises a transient error, so no MLflow server is needed. No sleeps:
`flush(force=True)` skips the backoff wait.
"""
from __future__ import annotations

import json

import pytest

from sweeps.write_queue import (End, Lineage, Metrics, Model, ParentEnd, ParentTags, Start, Tag,
                                TrackingUnavailable, WriteQueue, from_json, queued, to_json)


class Store:
    def __init__(self):
        self.away = False
        self.got: list = []

    def apply(self, rec) -> None:
        if self.away:
            raise ConnectionError("server away")
        self.got.append(rec)


def transient(e: BaseException) -> bool:
    return isinstance(e, ConnectionError)


RECORDS = [Start("t1", "s-t1", {"model.depth": 2}, 0, "model: {}\n"), Metrics("t1", 0, {"val_acc": 0.5}, 1000),
           Tag("t1", "capsweep.retries", "1"), End("t1", "finished", None), ParentEnd({"trials_total": 1}, "finished")]


def test_records_round_trip_through_json_and_old_positional_spools_are_read():
    for rec in RECORDS:
        assert from_json(to_json(rec)) == rec
    old = json.dumps(["metrics", "t1", 3, {"val_acc": 0.25}, 123])      # a driver before typed records
    assert from_json(old) == Metrics("t1", 3, {"val_acc": 0.25}, 123)
    assert from_json(json.dumps(["parent_interrupt"])).__class__.__name__ == "ParentInterrupt"


def test_model_and_lineage_records_survive_the_spool():
    """A driver that spools a trial's model and lineage writes: the next one logs them as they were."""
    recs = [Lineage("t1", {"train.device": "cuda:0"}, {"capsweep.device_name": "NVIDIA H100"},
                    [{"name": "digits", "context": "test", "digest": "ab12", "rows": 200}]),
            Model("t1", "/s/m/trial_models/t1", "/s/m/trial_state/t1.pt", keep=False),
            Model("t2", "s3://b/m/trial_models/t2", "s3://b/m/trial_state/t2.pt", keep=True, log=False),
            ParentTags({"mlflow.user": "me"})]
    for rec in recs:
        assert from_json(to_json(rec)) == rec


def test_outage_keeps_order_and_delivers_everything_once_when_back(tmp_path):
    store = Store()
    q = WriteQueue(store.apply, transient, tmp_path / "pending.jsonl", "store")
    q.put(RECORDS[0])
    store.away = True
    for rec in RECORDS[1:]:
        q.put(rec)
    assert store.got == RECORDS[:1] and len(q) == 4 and q.outage_since is not None
    assert queued(q, Start) == 0 and queued(q, Metrics, "t1") == 1 and queued(q, End, "t2") == 0
    assert not q.flush(force=True) and q.backoff == 4.0     # 1 s, doubled at each failed try
    store.away = False
    assert q.flush(force=True) and store.got == RECORDS and len(q) == 0
    assert q.outage_since is None and q.backoff == 1.0


def test_a_long_outage_spools_and_a_new_queue_replays_it(tmp_path):
    store = Store()
    store.away = True
    q = WriteQueue(store.apply, transient, tmp_path / "pending.jsonl", "store", max_pending=3)
    with pytest.raises(TrackingUnavailable, match="4 pending writes saved to .*pending.jsonl"):
        for rec in RECORDS:
            q.put(rec)
    assert len(q) == 0 and len((tmp_path / "pending.jsonl").read_text().splitlines()) == 4
    store.away = False
    again = WriteQueue(store.apply, transient, tmp_path / "pending.jsonl", "store")
    assert again.replay_spool() == 4 and store.got == RECORDS[:4]
    assert not (tmp_path / "pending.jsonl").exists()


def test_a_rejected_write_is_raised_not_retried(tmp_path):
    seen = []

    def refuse(rec):
        raise ValueError("bad request")

    q = WriteQueue(refuse, transient, tmp_path / "p.jsonl", "store", on_reject=lambda r, e: seen.append(r))
    with pytest.raises(ValueError):
        q.put(RECORDS[0])
    assert seen == [RECORDS[0]] and q.outage_since is None


# ---- the journal (issue 18, item 2): every record on disk before put returns --------------------------
def test_every_put_is_on_disk_before_it_returns_and_a_killed_driver_loses_nothing(tmp_path):
    """The driver is killed during an outage (its queue object simply vanishes): each record it had
    been given is in the journal, and the next driver delivers them all, in order, once."""
    store = Store()
    path = tmp_path / "pending.jsonl"
    q = WriteQueue(store.apply, transient, path, "store")
    q.put(RECORDS[0])
    assert store.got == RECORDS[:1] and not path.exists()       # delivered: the journal is empty again
    store.away = True
    for n, rec in enumerate(RECORDS[1:], start=1):
        q.put(rec)
        assert [from_json(line) for line in path.read_text().splitlines()] == RECORDS[1:n + 1]
    del q                                                        # kill -9: nothing of it runs again
    store.away = False
    again = WriteQueue(store.apply, transient, path, "store")
    assert again.replay_spool() == 4
    assert store.got == RECORDS and not path.exists()


def test_records_delivered_before_a_crash_are_not_replayed_and_a_cut_line_is_skipped(tmp_path):
    """The store took the first two of four journalled records, then went away; the next driver
    delivers the last two only. A line half-written by the crash is skipped, not fatal."""
    class Flaky(Store):
        def apply(self, rec) -> None:
            if len(self.got) >= self.limit:
                raise ConnectionError("server away")
            self.got.append(rec)

    store = Flaky()
    store.limit = 10**9
    path = tmp_path / "pending.jsonl"
    q = WriteQueue(store.apply, transient, path, "store")
    store.away, store.limit = False, 0
    for rec in RECORDS[:4]:
        q.put(rec)                            # all four fail: journalled, none delivered
    store.limit = 2
    assert not q.flush(force=True) and store.got == RECORDS[:2]
    with open(path, "a") as f:
        f.write('{"kind": "metrics", "trial_id": "t1", "st')       # the crash cut the next append
    store.limit = 10**9
    again = WriteQueue(store.apply, transient, path, "store")
    assert again.replay_spool() == 2 and store.got == RECORDS[:4]


def test_records_put_after_a_replay_are_delivered_behind_the_replayed_ones(tmp_path):
    """New records after a replay go behind the old ones; the order of delivery is the order of put."""
    store = Store()
    store.away = True
    path = tmp_path / "pending.jsonl"
    q = WriteQueue(store.apply, transient, path, "store")
    q.put(RECORDS[0])
    q.put(RECORDS[1])
    again = WriteQueue(store.apply, transient, path, "store")
    assert again.replay_spool() == 2 and store.got == []
    again.put(RECORDS[2])
    store.away = False
    assert again.flush(force=True) and store.got == RECORDS[:3] and not path.exists()
