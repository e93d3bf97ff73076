"""Optuna samplers that survive pickling: the ones `search.sampler` names (tpe, cmaes, nsga2, random).

Why: Tune pickles the search algorithm, and with it Ray's OptunaSearch, its study and the sampler, when
the Tuner is created (`tuner.pkl`) and at every experiment snapshot (`--resume` restores from it).
Optuna 5.1's NSGA-II (its `BaseGASampler`) keeps a `threading.Lock`, which pickle refuses, so a sweep
with `sampler: nsga2` died inside `tune.Tuner` before its first trial. Optuna's own storages solve the
same problem with `__getstate__`/`__setstate__` that drop the lock and make a new one; the samplers here
do that for every lock a sampler holds (now or in a later Optuna), and keep the rest of its state
(the RNG included), so a resumed search draws what the interrupted one would have drawn.
"""
from __future__ import annotations

import threading
from typing import Any

import optuna

_LOCK_TYPES = (type(threading.Lock()), type(threading.RLock()))
_LOCKS_KEY = "__capsweep_locks__"     # the names of the locks dropped, and whether each was an RLock


class PicklableSampler:
    """Mixin placed before an Optuna sampler class: pickles the sampler without its thread locks and
    gives the copy fresh ones (a lock guards this process's threads; it has no state worth keeping)."""

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        locks = {k: isinstance(v, type(threading.RLock())) for k, v in state.items() if isinstance(v, _LOCK_TYPES)}
        for k in locks:
            del state[k]
        state[_LOCKS_KEY] = locks
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        locks = state.pop(_LOCKS_KEY, {})
        self.__dict__.update(state)
        for k, reentrant in locks.items():
            setattr(self, k, threading.RLock() if reentrant else threading.Lock())


class TPESampler(PicklableSampler, optuna.samplers.TPESampler):
    pass


class CmaEsSampler(PicklableSampler, optuna.samplers.CmaEsSampler):
    pass


class NSGAIISampler(PicklableSampler, optuna.samplers.NSGAIISampler):
    pass


class RandomSampler(PicklableSampler, optuna.samplers.RandomSampler):
    pass
