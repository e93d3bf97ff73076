"""The sweep driver's sign of life: its parent run's `capsweep.heartbeat` tag, renewed every
HEARTBEAT_EVERY_S (capsmodels/contract.py) from a thread of its own.

Why a thread: the driver's main thread can sit for minutes in one call (Ray starting or joining a
cluster, a long Tune step, an MLflow write waiting out an outage), and a heartbeat that paused there
would make `capsweep ls` call a live sweep interrupted. Why a tag on the parent: every reader (`ls`,
`status`, the report, the MLflow UI) already reads the parent. A write that fails (the store is away)
is skipped: the next one tries again, and the write queue delivers the sweep's own data.
"""
from __future__ import annotations

import threading
import time
from typing import Optional

from capsmodels.contract import HEARTBEAT_EVERY_S, TAG_HEARTBEAT


def beat_value(now: Optional[float] = None) -> str:
    return str(int(time.time() if now is None else now))


class Heartbeat:
    """`with Heartbeat(uri, parent_id):` renews the tag until the block ends (the first beat is written
    before the thread starts, so a driver that dies at once still leaves one)."""

    def __init__(self, tracking_uri: str, parent_id: str, every_s: float = HEARTBEAT_EVERY_S):
        from mlflow.tracking import MlflowClient
        self.client = MlflowClient(tracking_uri)
        self.parent_id = parent_id
        self.every_s = every_s
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def beat(self) -> bool:
        try:
            self.client.set_tag(self.parent_id, TAG_HEARTBEAT, beat_value())
            return True
        except Exception:  # noqa: BLE001 - the store is away or busy: the next beat tries again
            return False

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self.beat()

    def __enter__(self) -> "Heartbeat":
        self.beat()
        self._thread = threading.Thread(target=self._run, name="capsweep-heartbeat", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
