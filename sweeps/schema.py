"""The sweep spec's schema: its typed fields, its error, and how one trial's run config is built.

The bottom of the spec modules: `sweeps/extras.py` (the references and controls a sweep adds) and
`sweeps/budget.py` (its size before Ray starts) build on it, and `sweeps/spec.py` (reading a spec file
and validating its meaning, which asks both) builds on all three, so none of them imports a module that
imports it back. Callers read these names from `sweeps.spec`, which re-exports them.
"""
from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from typing import Any, Optional

from capsmodels import config as runcfg
from capsmodels.contract import DEFAULT_EXPERIMENT, DEFAULT_TRACKING_URI, SEED_KEY  # noqa: F401 - SEED_KEY re-exported
from capsmodels.errors import CapsweepError

SPACE_KINDS = ("grid", "choice", "uniform", "loguniform", "int", "logint")
ALGORITHMS = ("grid", "random", "optuna")
SAMPLERS = ("tpe", "cmaes", "nsga2", "random")
SCHEDULERS = ("none", "asha")
MODES = ("min", "max")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
KEEP_BASE = "__base__"         # a param value meaning "leave this key to the base config"
RUN_SECTIONS = ("model", "data", "train")


class SpecError(CapsweepError, ValueError):
    """A spec mistake: one line naming the field and what is allowed."""


@dataclass
class SearchSpec:
    algorithm: str = "grid"     # grid | random | optuna
    # optuna's sampler: tpe (its default) | cmaes | nsga2 (several objectives) | random; grid and random
    # searches sample no Optuna study, so they have none (null: a sampler given to them is dropped, and
    # neither the parent run nor --dry-run shows one)
    sampler: Optional[str] = None
    seed: int = 0               # the searcher's own seed (trial seeds are `seeds`)


@dataclass
class SchedulerSpec:
    name: str = "none"          # none | asha
    grace_period: int = 1       # epochs before ASHA may stop a trial
    reduction_factor: int = 2


@dataclass
class ResourcesSpec:
    cpu: float = 1.0            # CPUs per trial (also sets torch threads)
    gpu: float = 0.0            # GPUs per trial; fractions share a GPU between trials


@dataclass
class BudgetSpec:
    """Bounds checked before Ray starts (sweeps/budget.py). A trial over max_params or max_memory_gb
    is refused; a sweep over max_trials or max_hours asks for `--yes` in `capsweep run`/`submit`."""
    max_params: int = 1_000_000_000   # parameters per trial (capsmodels.estimate.MAX_PARAMS)
    max_memory_gb: float = 0.0        # estimated training memory per trial; 0: the trial's device
                                      # (resources.gpu x its GPU's memory, else this machine's memory)
    max_trials: int = 2000            # trials per sweep, references and controls included
    max_hours: float = 200.0          # estimated GPU-hours (CPU core-hours when resources.gpu is 0)


@dataclass
class MlflowSpec:
    tracking_uri: str = DEFAULT_TRACKING_URI    # MLflow's own default store, in the working folder
    experiment: str = DEFAULT_EXPERIMENT


@dataclass
class SweepSpec:
    name: str = "sweep"
    base: dict = field(default_factory=dict)         # a `capsweep train` config (model/data/train)
    space: dict = field(default_factory=dict)        # dotted key -> {kind: values}
    points: list = field(default_factory=list)       # or explicit configurations: [{dotted key: value}]
    search: SearchSpec = field(default_factory=SearchSpec)
    metric: Any = "val_acc"                          # a name, or a list for several objectives
    mode: Any = "max"                                # min | max, or a list matching `metric`
    num_samples: int = 1        # configurations to sample (random/optuna); grid: repeats of the grid
    seeds: list = field(default_factory=lambda: [0])  # each configuration runs once per seed
    scheduler: SchedulerSpec = field(default_factory=SchedulerSpec)
    resources: ResourcesSpec = field(default_factory=ResourcesSpec)
    max_concurrent: int = 0     # 0: as many as resources allow
    max_failures: int = 2       # retries of a trial that raises, before it is marked failed
    reuse_actors: bool = True   # one warm trial worker serves the next trial: 10 s less per trial
                                # (README, Benchmarks); trials then share a process one after another,
                                # so sweeps/trainable.py frees its GPU memory at the end of each trial
                                # (tests/sweeps/test_warm_workers.py: a reused worker gives the same metrics)
    references: bool = True     # add the depth-0 CapsNet references the space lacks (sweeps/extras.py)
    controls: bool = True       # add model.arch: cnn controls at every depth the sweep takes
    storage_path: str = "ray_results"                # Ray Tune experiment state (resume) lives here
    mlflow: MlflowSpec = field(default_factory=MlflowSpec)
    budget: BudgetSpec = field(default_factory=BudgetSpec)   # size bounds (sweeps/budget.py)
    confirms: str = ""          # the exploration sweep this one re-runs on fresh seeds (`capsweep confirm`)
    select: list = field(default_factory=list)  # swept keys tuned on validation: per configuration of the
                                # other keys the verdict keeps the value with the best mean val_acc (e.g.
                                # [train.lr]: a learning rate chosen per depth), reports its test accuracy


def _fail(msg: str) -> None:
    raise SpecError(msg)


def objectives(spec: SweepSpec) -> tuple[list[str], list[str]]:
    metrics = spec.metric if isinstance(spec.metric, list) else [spec.metric]
    modes = spec.mode if isinstance(spec.mode, list) else [spec.mode] * len(metrics)
    return [str(m) for m in metrics], [str(m) for m in modes]


def probe_values(kind: str, values: list) -> list:
    """The values of a (validated) space entry that checks try before a sweep starts: every grid or
    choice value, or a range's two ends (whole numbers for the int kinds)."""
    if kind in ("grid", "choice"):
        return list(values)
    lo, hi = values
    return [lo, hi] if kind in ("uniform", "loguniform") else [int(lo), int(hi)]


def searched_keys(spec: SweepSpec) -> list[str]:
    """The keys a sweep sets per configuration: its space's, or every key its points set (those whose
    value differs between points first). They name a configuration (param `sweep.space`)."""
    if spec.space or not spec.points:
        return list(spec.space)
    keys = list(dict.fromkeys(k for p in spec.points for k in p))
    differ = [k for k in keys if len({repr(p.get(k, KEEP_BASE)) for p in spec.points}) > 1]
    return differ + [k for k in keys if k not in differ]


class TrialConfigs:
    """The typed run configs of one sweep's trials, each built and validated once.

    Why one object: validation, the added references and controls (extras.py), the size and cost
    checks (budget.py), the datasets the driver loads and the logger's params (runner.py) all ask for
    the same trials' configs. Each used to rebuild them from the raw base (14 calls to resolve_trial);
    they now ask the spec's one TrialConfigs (`configs(spec)`), which resolves a params mapping the first
    time and hands out copies after, so a reader that edits its copy changes no other reader's.
    Picklable without what it built (Tune pickles the logger that holds one into its experiment
    state); it keeps at most MAX_BUILT configs (a 10,000-trial sweep's logger sees one per trial)."""

    MAX_BUILT = 4096

    def __init__(self, base: dict):
        self.raw = base
        self._built: dict[str, runcfg.RunConfig] = {}

    def __getstate__(self) -> dict:
        return {"raw": self.raw}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["raw"])

    def of(self, params: dict) -> runcfg.RunConfig:
        """The run config of the trial these dotted params describe (base <- params <- defaults).
        Raises ConfigError, every time it is asked, for params that give no valid config."""
        key = repr(sorted(params.items(), key=lambda kv: kv[0]))
        built = self._built.get(key)
        if built is None:
            if len(self._built) >= self.MAX_BUILT:
                self._built.clear()
            built = self._built[key] = resolve_trial(self.raw, params)
        return copy.deepcopy(built)

    @property
    def base(self) -> runcfg.RunConfig:
        """The base config as every trial starts from it (presets and defaults included)."""
        return self.of({})

    def flat(self, params: dict) -> dict:
        """The trial's config as flattened dotted params (MLflow's params, a configuration's identity)."""
        return runcfg.flatten(runcfg.to_dict(self.of(params)))


def configs(spec: "SweepSpec") -> TrialConfigs:
    """The spec's TrialConfigs, made on first use and kept on the spec (not a dataclass field: the spec's
    YAML and equality ignore it). A spec whose base was edited since gets a new one."""
    held = spec.__dict__.get("_trial_configs")
    if held is None or held.raw != spec.base:
        held = TrialConfigs(copy.deepcopy(spec.base))
        spec.__dict__["_trial_configs"] = held
    return held


def resolve_trial(base: dict, params: dict) -> runcfg.RunConfig:
    """One trial's typed run config: the sweep's raw `base` <- its sampled dotted params <- presets
    and schema defaults. The one way a trial config is built, so every reader sees the same defaults:
    in the driver through the spec's TrialConfigs (`configs`), in a worker once at the trial's edge
    (sweeps/trainable.py), which passes the typed config on to `fit`. Raises ConfigError."""
    return runcfg.from_dict(trial_config(base, params))


def trial_config(base: dict, params: dict) -> dict:
    """The raw nested run config of one trial: base <- sampled dotted params, before presets and
    defaults (resolve_trial). Params outside the run config (`trial.role`, Tune's
    `__trial_index__`) and KEEP_BASE values are left out."""
    out = copy.deepcopy(base)
    for key, value in params.items():
        sec, _, name = key.partition(".")
        if sec not in RUN_SECTIONS or isinstance(value, str) and value == KEEP_BASE:
            continue
        out.setdefault(sec, {})[name] = value
    return out


def grid_size(spec: SweepSpec) -> int:
    if spec.points:
        return len(spec.points)
    n = 1
    for entry in spec.space.values():
        kind, values = next(iter(entry.items()))
        if kind == "grid":
            n *= len(values)
    return n


def candidate_trials(spec: SweepSpec) -> int:
    """How many trials the sweep's own space asks for."""
    if spec.search.algorithm == "optuna":
        return spec.num_samples * len(spec.seeds)
    return spec.num_samples * grid_size(spec) * len(spec.seeds)
