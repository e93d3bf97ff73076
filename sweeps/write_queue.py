"""A retrying, journalled queue of tracking writes: typed records delivered in order, at least once.

Why a queue: the tracking server may be away for minutes in a long sweep (a restart, a network cut,
a full disk), and the sweep must neither stall nor lose a write. Each write is a record; `flush`
delivers from the front and, on a transient error, keeps the record and backs off exponentially
(1 s .. 60 s) without blocking.

Why a journal: Ray Tune counts a result as handled when the callback returns, so a record that lived
only in memory was lost with a driver killed during an outage. `put` appends the record to a
JSON-lines file on the driver's local disk and fsyncs it before it returns; the file is emptied
whenever every record in it has been delivered. A driver that starts (`--resume`) replays what it
finds there first. Delivery may repeat a record (a crash between a delivery and the journal's
truncation): the `apply` callable's writes are idempotent (sweeps/run_writer.py), so at-least-once
delivery gives exactly-once runs. If the outage lasts past `max_outage_s` or the queue grows past
`max_pending`, `TrackingUnavailable` stops the sweep; its records are in the journal already.
The queue knows nothing of Ray Tune.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Union

from capsmodels.errors import CapsweepError


class TrackingUnavailable(CapsweepError, RuntimeError):
    """The tracking server could not be reached (at start), or stayed away too long (mid-sweep)."""


# ---- records: one per kind of write, fields in the order older spool files list them --------------
@dataclass
class Start:
    """Create (or find again) the trial's run, with its params and resolved config."""
    trial_id: str
    run_name: str
    params: dict
    seed: int
    yaml_text: str


@dataclass
class Tag:
    trial_id: str
    key: str
    value: str


@dataclass
class Reopen:
    """A trial interrupted by an earlier driver runs again."""
    trial_id: str


@dataclass
class Interrupt:
    trial_id: str


@dataclass
class Metrics:
    """One epoch (step) of a trial; `ts` in ms since the epoch."""
    trial_id: str
    step: int
    metrics: dict
    ts: int


@dataclass
class End:
    """The trial's run closed with its final status, and the tags of how it ended (stop reason, the
    best epoch's test correctness: capsmodels.contract) in the same write."""
    trial_id: str
    status: str
    error: Optional[str]
    tags: dict = dataclasses.field(default_factory=dict)


@dataclass
class Lineage:
    """What the trial found at its start (its trial.json, sweeps/models.py): params and tags it alone
    knows (the device used, its name) and its datasets (sweeps/provenance.py, dataset_inputs)."""
    trial_id: str
    params: dict
    tags: dict
    datasets: list


@dataclass
class Model:
    """The trial ended: log its final model from its files on the storage (once), then delete the
    weights and the per-epoch state unless `keep`. `log` False (a failed trial): only the deletion."""
    trial_id: str
    model_dir: str
    state_path: str
    keep: bool
    log: bool = True


@dataclass
class ParentTags:
    """MLflow's standard tags on the parent run; the experiment marked as model training."""
    tags: dict


@dataclass
class ParentInterrupt:
    pass


@dataclass
class ParentEnd:
    summary: dict
    status: str


Record = Union[Start, Tag, Reopen, Interrupt, Metrics, Lineage, Model, End, ParentTags, ParentInterrupt, ParentEnd]
# spool names: those an earlier version wrote as the first item of a positional list
KINDS: dict[str, type] = {"start": Start, "tag": Tag, "reopen": Reopen, "interrupt": Interrupt,
                          "metrics": Metrics, "end": End, "parent_interrupt": ParentInterrupt,
                          "parent_end": ParentEnd, "lineage": Lineage, "model": Model, "parent_tags": ParentTags}
_KIND_OF = {cls: kind for kind, cls in KINDS.items()}


def to_json(rec: Record) -> str:
    return json.dumps({"kind": _KIND_OF[type(rec)], **dataclasses.asdict(rec)})


def from_json(line: str) -> Record:
    """A spooled record; also reads the positional lists (`["start", trial_id, ...]`) of older drivers."""
    data = json.loads(line)
    if isinstance(data, list):
        return KINDS[data[0]](*data[1:])
    return KINDS[data.pop("kind")](**data)


class Journal:
    """The queue's records on local disk, appended and fsynced one by one; `acked` counts the records
    at its head already delivered (kept beside it, best effort: a lost count only repeats deliveries)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.ack_path = self.path.with_name(self.path.name + ".acked")
        self._file = None

    def append(self, rec: "Record") -> None:
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a", encoding="utf-8")
        self._file.write(to_json(rec) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def read(self) -> list["Record"]:
        """The records not yet delivered, in order (a line cut by a crash mid-append is skipped)."""
        if not self.path.exists():
            return []
        out = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                try:
                    out.append(from_json(line))
                except (ValueError, KeyError, TypeError):
                    continue
        return out[self._acked():]

    def _acked(self) -> int:
        try:
            return int(self.ack_path.read_text().strip() or 0)
        except (OSError, ValueError):
            return 0

    def ack(self, n: int) -> None:
        """`n` records from the head delivered (written when deliveries stop short of the end)."""
        if n > 0:
            tmp = self.ack_path.with_name(self.ack_path.name + ".tmp")
            tmp.write_text(str(self._acked() + n))
            os.replace(tmp, self.ack_path)

    def clear(self) -> None:
        """Everything delivered: an empty journal."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self.path.exists():
            self.path.unlink()
        if self.ack_path.exists():
            self.ack_path.unlink()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class WriteQueue:
    """Records delivered in order through `apply`; `transient(e)` says which errors to wait out."""

    def __init__(self, apply: Callable[[Record], None], transient: Callable[[BaseException], bool],
                 spool_path: Path, where: str, max_outage_s: float = 900.0, max_pending: int = 200_000,
                 on_reject: Optional[Callable[[Record, BaseException], None]] = None,
                 explain: Optional[Callable[[BaseException], Optional[tuple[str, float]]]] = None):
        """explain(e): for a transient error that is not an outage (a full disk), what to call it and
        how long to wait for it before stopping, instead of "unreachable" and `max_outage_s`."""
        self.apply = apply
        self.explain = explain
        self.why: Optional[str] = None
        self.limit_s = max_outage_s
        self.transient = transient
        self.spool_path = Path(spool_path)
        self.journal = Journal(self.spool_path)
        self.where = where                  # named in the messages: "MLflow at <uri>"
        self.max_outage_s = max_outage_s
        self.max_pending = max_pending
        self.on_reject = on_reject
        self.records: deque = deque()
        self.outage_since: Optional[float] = None
        self.next_try = 0.0
        self.backoff = 1.0

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self):
        return iter(self.records)

    def put(self, rec: Record) -> None:
        """On disk (fsynced) before it returns, then delivered if the store answers."""
        self.journal.append(rec)
        self.records.append(rec)
        self.flush()

    def flush(self, force: bool = False) -> bool:
        """Deliver queued records in order; on a transient error keep them and back off. True when empty."""
        now = time.monotonic()
        if not force and self.outage_since is not None and now < self.next_try:
            self._check_bounds(now)
            return False
        delivered = 0
        while self.records:
            try:
                self.apply(self.records[0])
            except Exception as e:  # noqa: BLE001
                self.journal.ack(delivered)
                if not self.transient(e):
                    if self.on_reject:
                        self.on_reject(self.records[0], e)
                    raise
                if self.outage_since is None:
                    self.outage_since = now
                    found = self.explain(e) if self.explain else None
                    self.why, self.limit_s = found if found else (None, self.max_outage_s)
                    what = f"{self.where}: {self.why}" if self.why else f"{self.where} is unreachable"
                    print(f"capsweep: {what}; buffering {len(self.records)} writes (kept in {self.spool_path}) "
                          f"and retrying for up to {self.limit_s:.0f} s", flush=True)
                self.next_try = now + self.backoff
                self.backoff = min(self.backoff * 2, 60.0)
                self._check_bounds(now)
                return False
            self.records.popleft()
            delivered += 1
        if delivered or self.spool_path.exists():
            self.journal.clear()
        if self.outage_since is not None:
            print(f"capsweep: {self.where} is back; buffered writes delivered", flush=True)
        self.outage_since, self.backoff = None, 1.0
        self.why, self.limit_s = None, self.max_outage_s
        return True

    def _check_bounds(self, now: float) -> None:
        if self.outage_since is None:
            return
        if now - self.outage_since > self.limit_s or len(self.records) > self.max_pending:
            n, why = len(self.records), self.why
            path = self.spool()
            what = f"{self.where}: {why}" if why else f"{self.where} unreachable"
            raise TrackingUnavailable(
                f"{what} for {now - self.outage_since:.0f}s; {n} pending writes saved to {path}; "
                + ("free space, then run again with --resume" if why else "run again with --resume once it is back"))

    def spool(self) -> Path:
        """The records are in the journal already: let go of them here (the next driver replays them)."""
        self.records.clear()
        self.journal.close()
        return self.spool_path

    def replay_spool(self) -> int:
        """Queue what an earlier driver left undelivered in the journal (and deliver it if the store is
        there). Returns how many."""
        records = self.journal.read()
        if not records:
            self.journal.clear()
            return 0
        self.records.extend(records)
        self.flush()
        return len(records)

    def drain(self) -> None:
        """Block until every record is delivered; raise after `max_outage_s` (the journal keeps them)."""
        deadline = time.monotonic() + (self.limit_s if self.why else self.max_outage_s)
        while self.records:
            if self.flush(force=True):
                break
            if time.monotonic() > deadline:
                path = self.spool()
                raise TrackingUnavailable(
                    f"{self.where} unreachable; pending writes saved to {path}; "
                    "run again with --resume once it is back")
            time.sleep(min(self.backoff, max(0.0, deadline - time.monotonic())))


def queued(queue: Any, kind: type, trial_id: Optional[str] = None) -> int:
    """How many records of `kind` (for `trial_id`, when given) wait in the queue."""
    return sum(1 for r in queue if isinstance(r, kind) and (trial_id is None or r.trial_id == trial_id))
