"""The sweep driver's book of its trials: each trial's status, its retries, its run name, whether its start
was logged and whether it ended. Pure bookkeeping: no Ray, no MLflow, no files, so every rule here is
tested with plain values (tests/sweeps/test_trial_book.py).

Why apart from the Tune callback (sweeps/tracking.py): the callback turns Tune's hooks into MLflow
writes; what a trial's final status is, when a Ctrl-C leaves it for --resume, which run names are taken
and what the parent's summary counts are decisions, and they are the same whatever delivers the writes.

A trial is known by its Tune trial id. Statuses are capsmodels.contract's: RUNNING while it trains,
DIVERGED as soon as a result says so, one of FINAL when it ends (STOPPED: ended early by the scheduler),
INTERRUPTED when the sweep stopped before it did.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

from capsmodels.contract import DIVERGED, ENDED, FAILED, FINAL, FINISHED, INTERRUPTED, RUNNING, STOPPED

TUNE_ENDED = ("TERMINATED", "ERROR")      # Ray Tune's states of a trial that will not run again


@dataclass
class TrialBook:
    """Statuses, retries and run names of one sweep's trials, as this driver knows them."""
    expected_trials: int = 0                                 # planned, references and controls included
    statuses: dict[str, str] = field(default_factory=dict)   # trial id -> status
    ended: set[str] = field(default_factory=set)             # trials whose run is closed with a final status
    retries: dict[str, int] = field(default_factory=dict)    # trial id -> retries Tune made (FailureConfig)
    names: set[str] = field(default_factory=set)             # run names taken in this sweep
    lineage: set[str] = field(default_factory=set)           # trials whose start (device, datasets) is logged
    interrupted: bool = False                                # Ctrl-C: running trials continue on --resume

    # ---- what an earlier driver left ---------------------------------------------------------------
    def known(self, tid: str, name: str, status: str, closed: bool, retries: int, lineage: bool) -> None:
        """A trial whose run an earlier driver created: its run name, its status tag, whether its run is
        closed (not RUNNING in MLflow), its retries, whether its start was logged."""
        self.names.add(name)
        self.statuses[tid] = status
        if closed and status in FINAL:
            self.ended.add(tid)
        self.retries[tid] = retries
        if lineage:
            self.lineage.add(tid)

    # ---- a trial's life ----------------------------------------------------------------------------
    def name(self, base: str) -> str:
        """A run name unique within the sweep: `base`, else `base-2`, `base-3`, ... (taken from now on)."""
        name, n = base, 1
        while name in self.names:
            n += 1
            name = f"{base}-{n}"
        self.names.add(name)
        return name

    def start(self, tid: str) -> bool:
        """The trial (re)starts and is RUNNING. True when it was INTERRUPTED: its closed run reopens."""
        reopen = self.statuses.get(tid) == INTERRUPTED
        if reopen or tid not in self.statuses:
            self.statuses[tid] = RUNNING
        return reopen

    def result(self, tid: str, result: dict) -> None:
        """An epoch's result: a diverged one marks the trial DIVERGED at once (its end keeps it)."""
        if result.get("status") == DIVERGED:
            self.statuses[tid] = DIVERGED

    def retried(self, tid: str) -> int:
        """Tune retries the trial after it raised: the number of retries so far."""
        self.retries[tid] = self.retries.get(tid, 0) + 1
        return self.retries[tid]

    def final_status(self, tid: str, last: dict, error: Optional[str]) -> Optional[str]:
        """The status the trial ends with, now recorded (it has ended); None when it is not to be closed:
        a Ctrl-C stopped it mid-training (it continues on --resume). last: its last result; error: why
        it failed, if it did. A trial that ended already is the caller's to skip (`ended`)."""
        if self.interrupted and not error and last.get("status") not in ENDED:
            return None
        if error:
            status = FAILED
        elif last.get("status") == DIVERGED or self.statuses.get(tid) == DIVERGED:
            status = DIVERGED
        elif last.get("status") == FINISHED:
            status = FINISHED
        else:
            status = STOPPED    # ended early by the scheduler (ASHA)
        self.statuses[tid] = status
        self.ended.add(tid)
        return status

    def is_open(self, tid: str) -> bool:
        """No final status recorded yet (unknown, or RUNNING)."""
        return self.statuses.get(tid) in (None, RUNNING)

    # ---- the sweep's end ---------------------------------------------------------------------------
    def stops_early(self, tune_states: Iterable[str]) -> bool:
        """The sweep ends before every planned trial did: a Ctrl-C, a trial Tune has not ended (its Tune
        state is not TERMINATED or ERROR), or fewer trials than planned."""
        states = list(tune_states)
        return self.interrupted or any(s not in TUNE_ENDED for s in states) or \
            bool(self.expected_trials and len(states) < self.expected_trials)

    def interrupt_running(self, has_run: Callable[[str], bool]) -> list[str]:
        """Every RUNNING trial whose run exists (`has_run(tid)`) becomes INTERRUPTED; their ids."""
        out = []
        for tid, status in list(self.statuses.items()):
            if status == RUNNING and has_run(tid):
                self.statuses[tid] = INTERRUPTED
                out.append(tid)
        return out

    def ended_counts(self) -> dict[str, int]:
        """Trials ended so far, by status (the overall progress line)."""
        counts: dict[str, int] = {}
        for tid in self.ended:
            counts[self.statuses[tid]] = counts.get(self.statuses[tid], 0) + 1
        return counts

    def summary(self, runs: int) -> dict[str, int]:
        """The parent run's summary metrics: trials_<status> for each final status, trials_total = `runs`."""
        out = {f"trials_{s}": sum(1 for v in self.statuses.values() if v == s) for s in FINAL}
        out["trials_total"] = runs
        return out
