"""Search spaces and searchers: a validated SweepSpec -> Tune param_space, search_alg, scheduler.

- grid / random: Tune's own variant generator; seeds are one more grid axis (`train.seed`), so every
  configuration runs once per seed.
- optuna: a define-by-run space (optuna style: `trial.suggest_*` per entry) searched by TPE, CMA-ES
  or NSGA-II (several objectives); seeds through `SeedRepeater`, which gives each suggestion to
  every seed and reports the seed-mean of each objective back to Optuna.
"""
from __future__ import annotations

import logging
import math
import pickle
from typing import Any, Optional

import numpy as np
from ray import tune
from ray.tune.search import Repeater, Searcher

from sweeps.spec import SweepSpec, objectives

log = logging.getLogger("capsweep.search")
SEED_KEY = "train.seed"


def tune_domain(kind: str, values: list):
    if kind == "grid":
        return tune.grid_search(list(values))
    if kind == "choice":
        return tune.choice(list(values))
    lo, hi = values
    return {"uniform": lambda: tune.uniform(lo, hi), "loguniform": lambda: tune.loguniform(lo, hi),
            "int": lambda: tune.randint(int(lo), int(hi) + 1),
            "logint": lambda: tune.lograndint(int(lo), int(hi) + 1)}[kind]()


class OptunaSpace:
    """Define-by-run space (optuna style: one `trial.suggest_*` per entry). A class, not a closure,
    because Tune pickles the searcher into its experiment state for `--resume`."""

    def __init__(self, spec: SweepSpec):
        self.entries = [(key, *next(iter(entry.items()))) for key, entry in spec.space.items()]

    def __call__(self, trial) -> None:
        for key, kind, values in self.entries:
            if kind in ("grid", "choice"):
                trial.suggest_categorical(key, list(values))
            elif kind == "uniform":
                trial.suggest_float(key, values[0], values[1])
            elif kind == "loguniform":
                trial.suggest_float(key, values[0], values[1], log=True)
            elif kind == "int":
                trial.suggest_int(key, int(values[0]), int(values[1]))
            else:
                trial.suggest_int(key, int(values[0]), int(values[1]), log=True)


def make_sampler(spec: SweepSpec):
    import optuna
    seed = spec.search.seed
    name = spec.search.sampler
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True)
    if name == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=max(4, min(20, spec.num_samples // 2)))
    return optuna.samplers.RandomSampler(seed=seed)


class SeedRepeater(Repeater):
    """Repeater that sets `train.seed` from the sweep's seeds, averages every objective (several
    objectives for NSGA-II), and saves its own grouping state so `Tuner.restore` can resume it
    (Ray's Repeater saves only the inner searcher)."""

    def __init__(self, searcher: Searcher, seeds: list[int]):
        super().__init__(searcher, repeat=len(seeds), set_index=True)
        self.seeds = list(seeds)
        self.metrics = searcher.metric if isinstance(searcher.metric, list) else [searcher.metric]

    def suggest(self, trial_id: str) -> Optional[dict]:
        config = super().suggest(trial_id)
        if isinstance(config, dict):
            config = dict(config)
            config[SEED_KEY] = self.seeds[config.pop("__trial_index__")]
        return config

    def on_trial_complete(self, trial_id: str, result: Optional[dict] = None, error: bool = False, **kw):
        group = self._trial_id_to_group.get(trial_id)
        if group is None:
            log.warning("trial %s has no seed group (restored?); not reported to the searcher", trial_id)
            return
        # per objective: a seed whose grad_ratio is 0/0 still tells Optuna its accuracy
        scores = [float(result[m]) if result and not error and _finite(result.get(m)) else np.nan
                  for m in self.metrics]
        group.report(trial_id, scores)
        if group.finished_reporting():
            scores = np.array(group.scores(), dtype=float)           # (seeds, objectives)
            if np.isnan(scores).all(axis=0).any():
                self.searcher.on_trial_complete(group.primary_trial_id, result=None, error=True)
                return
            mean = np.nanmean(scores, axis=0)
            self.searcher.on_trial_complete(group.primary_trial_id,
                                            result=dict(zip(self.metrics, map(float, mean))))

    def save(self, checkpoint_path: str) -> None:
        inner = self.searcher
        self.searcher = None
        try:
            blob = pickle.dumps(self.__dict__)
        finally:
            self.searcher = inner
        inner.save(checkpoint_path)
        with open(checkpoint_path + ".repeater", "wb") as f:
            f.write(blob)

    def restore(self, checkpoint_path: str) -> None:
        self.searcher.restore(checkpoint_path)
        try:
            with open(checkpoint_path + ".repeater", "rb") as f:
                state = pickle.loads(f.read())
        except OSError:
            return
        state.pop("searcher", None)
        self.__dict__.update(state)


def _finite(x: Any) -> bool:
    try:
        return math.isfinite(float(x))
    except (TypeError, ValueError):
        return False


def build(spec: SweepSpec) -> tuple[dict, Any, Any, int]:
    """(param_space, search_alg, scheduler, num_samples) for tune.TuneConfig."""
    metrics, modes = objectives(spec)
    scheduler = None
    if spec.scheduler.name == "asha":
        from ray.tune.schedulers import ASHAScheduler
        max_t = int(spec.base.get("train", {}).get("epochs", 0)) or None
        scheduler = ASHAScheduler(metric=metrics[0], mode=modes[0], time_attr="training_iteration",
                                  max_t=max_t or 100, grace_period=spec.scheduler.grace_period,
                                  reduction_factor=spec.scheduler.reduction_factor)
    if spec.search.algorithm in ("grid", "random"):
        space = {k: tune_domain(*next(iter(v.items()))) for k, v in spec.space.items()}
        space[SEED_KEY] = tune.grid_search(list(spec.seeds))
        return space, None, scheduler, spec.num_samples

    from ray.tune.search.optuna import OptunaSearch
    multi = len(metrics) > 1
    searcher = OptunaSearch(space=OptunaSpace(spec), metric=metrics if multi else metrics[0],
                            mode=modes if multi else modes[0], sampler=make_sampler(spec),
                            seed=spec.search.seed)
    search_alg = SeedRepeater(searcher, spec.seeds)
    if spec.max_concurrent:
        from ray.tune.search import ConcurrencyLimiter
        search_alg = ConcurrencyLimiter(search_alg, max_concurrent=spec.max_concurrent)
    return {}, search_alg, scheduler, spec.num_samples * len(spec.seeds)
