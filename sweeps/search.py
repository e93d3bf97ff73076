"""Search spaces and searchers: a validated SweepSpec -> Tune param_space, search_alg, scheduler.

- grid / random: Tune's own variant generator; seeds are one more grid axis (`train.seed`), so every
  configuration runs once per seed.
- optuna: a define-by-run space (optuna style: `trial.suggest_*` per entry) searched by TPE, CMA-ES
  or NSGA-II (several objectives); seeds through `SeedRepeater`, which gives each suggestion to
  every seed and reports the seed-mean of each objective back to Optuna.
- explicit `points` (grid only): every (point, seed) is one point_to_evaluate, like the extras below.
- the references and controls of sweeps/extras.py are Tune trials too: under grid/random search
  `points_to_evaluate` of Tune's own BasicVariantGenerator (run first, each fixing every key of the
  space), under optuna `ExtrasFirst`, which hands them out before the first suggestion. Neither
  Optuna nor ASHA ever sees their results: they are yardsticks, not points of the search.
"""
from __future__ import annotations

import logging
import math
import pickle
from pathlib import Path
from typing import Any, Optional

import numpy as np
from ray import tune
from ray.tune.schedulers import AsyncHyperBandScheduler, TrialScheduler
from ray.tune.search import BasicVariantGenerator, Repeater, Searcher

from sweeps import extras
from capsmodels.contract import ROLE_KEY
from sweeps.schema import KEEP_BASE, SEED_KEY, SweepSpec, configs, objectives

log = logging.getLogger("capsweep.search")


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
    """The spec's Optuna sampler, seeded; of the picklable kind (sweeps/samplers.py), since Tune pickles
    the searcher with it when the Tuner is created and at every snapshot."""
    from sweeps import samplers
    seed = spec.search.seed
    name = spec.search.sampler
    if name == "tpe":
        return samplers.TPESampler(seed=seed, multivariate=True)
    if name == "cmaes":
        return samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)
    if name == "nsga2":
        return samplers.NSGAIISampler(seed=seed, population_size=max(4, min(20, spec.num_samples // 2)))
    return samplers.RandomSampler(seed=seed)


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
        _save_wrapper(self, checkpoint_path, ".repeater")

    def restore(self, checkpoint_path: str) -> None:
        _restore_wrapper(self, checkpoint_path, ".repeater")


def _save_wrapper(wrapper: Searcher, checkpoint_path: str, suffix: str) -> None:
    """Save a wrapping searcher: the inner one at the path, the wrapper's own state beside it.
    (Tune's experiment state keeps wrappers through get_state; this is the Searcher.save API.)"""
    inner = wrapper.searcher
    wrapper.searcher = None
    try:
        blob = pickle.dumps(wrapper.__dict__)
    finally:
        wrapper.searcher = inner
    inner.save(checkpoint_path)
    with open(checkpoint_path + suffix, "wb") as f:
        f.write(blob)


def _restore_wrapper(wrapper: Searcher, checkpoint_path: str, suffix: str) -> None:
    wrapper.searcher.restore(checkpoint_path)
    try:
        with open(checkpoint_path + suffix, "rb") as f:
            state = pickle.loads(f.read())
    except OSError:
        return
    state.pop("searcher", None)
    wrapper.__dict__.update(state)


class ExtrasFirst(Searcher):
    """Hands out fixed trials (the references and controls of sweeps/extras.py) before delegating to
    the search; their results never reach it. Its state (the trials still to hand out, and which
    trial ids were extra) is saved with the experiment, so `--resume` neither repeats nor forgets them."""

    def __init__(self, searcher: Searcher, points: list[dict]):
        self.searcher = searcher
        self.pending = [dict(p) for p in points]
        self.extra_ids: set[str] = set()
        super().__init__(metric=searcher.metric, mode=searcher.mode)

    def suggest(self, trial_id: str) -> Optional[dict]:
        if self.pending:
            self.extra_ids.add(trial_id)
            return self.pending.pop(0)
        config = self.searcher.suggest(trial_id)
        if isinstance(config, dict):
            config = {**config, ROLE_KEY: extras.CANDIDATE}
        return config

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id not in self.extra_ids:
            self.searcher.on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: Optional[dict] = None, error: bool = False, **kw):
        if trial_id not in self.extra_ids:
            self.searcher.on_trial_complete(trial_id, result=result, error=error, **kw)

    def set_search_properties(self, metric: Optional[str], mode: Optional[str], config: dict, **spec) -> bool:
        return self.searcher.set_search_properties(metric, mode, config, **spec)

    def get_state(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "searcher"}

    def set_state(self, state: dict) -> None:
        self.__dict__.update(state)

    def save(self, checkpoint_path: str) -> None:
        _save_wrapper(self, checkpoint_path, ".extras")

    def restore(self, checkpoint_path: str) -> None:
        _restore_wrapper(self, checkpoint_path, ".extras")


class CandidateASHA(AsyncHyperBandScheduler):
    """ASHA that judges candidates only: a reference or control always runs all its epochs (the
    report compares at the last epoch) and never raises a rung's cutoff for the candidates."""

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        if extras.role(trial.config) != extras.CANDIDATE:
            return TrialScheduler.CONTINUE
        return super().on_trial_result(tune_controller, trial, result)

    def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
        if extras.role(trial.config) != extras.CANDIDATE:
            self._trial_info.pop(trial.trial_id, None)
            return
        super().on_trial_complete(tune_controller, trial, result)


class _DropPresetWarnings(logging.Filter):
    """Tune warns when a point_to_evaluate sets a key to a value outside its domain; the extra trials
    do that on purpose (depth 0 outside a depth grid, cnn against a constant arch)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Pre-set value")


def _finite(x: Any) -> bool:
    try:
        return math.isfinite(float(x))
    except (TypeError, ValueError):
        return False


def point_trials(spec: SweepSpec) -> list[dict]:
    """The candidate trials of a sweep of explicit points: each point once per seed (and per repeat,
    num_samples), with train.seed and trial.role; none for a sweep with a space."""
    return [{**p, SEED_KEY: seed, ROLE_KEY: extras.CANDIDATE}
            for _ in range(spec.num_samples) for p in spec.points for seed in spec.seeds]


def journal_storage(path: str | Path):
    """Optuna's JournalStorage on a file (created when absent): the study outlives the driver, so
    `optuna-dashboard <path>` opens it and `--resume` continues it (Tune restores the searcher, whose
    study re-reads every trial told so far from this file)."""
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return JournalStorage(JournalFileBackend(str(path)))


def build(spec: SweepSpec, journal: Optional[str | Path] = None) -> tuple[dict, Any, Any, int]:
    """(param_space, search_alg, scheduler, num_samples) for tune.TuneConfig; the search algorithm
    carries the concurrency limit (spec.max_concurrent). journal: the file of the Optuna study
    (study name = the sweep's name); None keeps the study in memory (tests)."""
    metrics, modes = objectives(spec)
    scheduler = None
    if spec.scheduler.name == "asha":
        epochs = configs(spec).base.train.epochs      # presets and defaults included
        scheduler = CandidateASHA(metric=metrics[0], mode=modes[0], time_attr="training_iteration",
                                  max_t=epochs, grace_period=spec.scheduler.grace_period,
                                  reduction_factor=spec.scheduler.reduction_factor)
    added = extras.extra_trials(spec)
    if spec.search.algorithm in ("grid", "random"):
        fixed = added + point_trials(spec)
        space = {k: tune_domain(*next(iter(v.items()))) for k, v in spec.space.items()}
        for point in fixed:     # keys the fixed trials set that the space leaves to the base config
            space.update({k: KEEP_BASE for k in point if k not in space and k not in (SEED_KEY, ROLE_KEY)})
        space[SEED_KEY] = tune.grid_search(list(spec.seeds))
        space[ROLE_KEY] = extras.CANDIDATE
        points = [extras.complete(spec, p, space) for p in fixed]
        if points:
            logging.getLogger("ray.tune.search.variant_generator").addFilter(_DropPresetWarnings())
        # Tune's BasicVariantGenerator takes one of num_samples for each point_to_evaluate (each fixes
        # every key, so it is one trial), then samples the space for the rest. A sweep of explicit
        # points is all points: num_samples is their number, and the space is never sampled.
        num_samples = len(points) if spec.points else spec.num_samples + len(points)
        search_alg = BasicVariantGenerator(points_to_evaluate=points, max_concurrent=spec.max_concurrent)
        return space, search_alg, scheduler, num_samples

    from ray.tune.search.optuna import OptunaSearch
    multi = len(metrics) > 1
    searcher = OptunaSearch(space=OptunaSpace(spec), metric=metrics if multi else metrics[0],
                            mode=modes if multi else modes[0], sampler=make_sampler(spec),
                            seed=spec.search.seed, study_name=spec.name,
                            storage=journal_storage(journal) if journal is not None else None)
    search_alg = ExtrasFirst(SeedRepeater(searcher, spec.seeds), added)
    if spec.max_concurrent:
        from ray.tune.search import ConcurrencyLimiter
        search_alg = ConcurrencyLimiter(search_alg, max_concurrent=spec.max_concurrent)
    return {}, search_alg, scheduler, spec.num_samples * len(spec.seeds) + len(added)
