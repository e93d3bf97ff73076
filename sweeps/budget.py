"""A sweep's size before Ray starts: each trial's network against the bounds, and the sweep's cost.

Why: `capsweep validate smoke --set num_samples=1000000000` once answered "ok (8000000000 trials)",
and `space.model.depth: {grid: [0, 100000]}` "ok"; the second would have failed on every worker after
the cluster had started. Here, with no Ray and no model built (capsmodels/estimate.py is closed-form):

- `check_sizes` (called by spec validation): the base config, every probe value of every space key
  (`spec.probe_values`: grid/choice values, a range's two ends) and the probe values taken together
  (every combination while there are at most MAX_COMBINATIONS, else each key's largest) must fit
  `budget.max_params` and the trial's memory: `budget.max_memory_gb`, or when 0 `resources.gpu` x the
  GPU's memory (the local GPU's when this machine has one, else DEFAULT_GPU_GB, the A10G of
  cluster.yaml), or this machine's memory for CPU trials. A refusal is one SpecError line naming the
  key, the estimate and the bound.
- `cost` / `confirmation`: the trial count (references and controls included) and the estimated
  GPU-hours (CPU core-hours without GPUs). The time model: an epoch costs (3 x training images +
  evaluation images) x the forward FLOPs per image at GPU_FLOPS per whole GPU (CPU_FLOPS_PER_CORE per
  core) plus EPOCH_FIXED_S for the probes and the report, on the trial's share of the device; a trial
  is its config's epochs of that. Averaged over the combinations of probe values (their largest
  when there are more than MAX_COMBINATIONS). It is an order of magnitude, not a schedule: it says
  whether a sweep is an hour or a month. Over `budget.max_trials` or `budget.max_hours`, `capsweep
  run` and `submit` ask for `--yes`; `validate` prints it.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Iterator, Optional

from capsmodels import config as runcfg
from capsmodels import estimate as est
from capsmodels.catalogue import SPLIT_SIZES
from sweeps.extras import total_trials
from sweeps.schema import SpecError, SweepSpec, configs, probe_values

MAX_COMBINATIONS = 512
DEFAULT_GPU_GB = 24.0            # NVIDIA A10G (cluster.yaml's g5 workers), when no GPU is visible here
GPU_FLOPS = 2e12                 # sustained FLOP/s of a whole GPU on these small networks (an A10G
                                 # peaks at 31e12 in float32; small batched matmuls reach a few percent)
CPU_FLOPS_PER_CORE = 1.8e10      # from README's `tiny` epoch: 10,000 images in 6.6 s on one thread
EPOCH_FIXED_S = 1.0              # probes, evaluation bookkeeping and the report, per epoch


def _count(size: Optional[float], n: int) -> int:
    """data.train_size / val_size / test_size as a count of n images (fraction or count)."""
    if size is None:
        return n
    return int(round(size * n)) if size <= 1.0 else min(n, int(size))


def epoch_images(cfg: runcfg.RunConfig) -> tuple[int, int]:
    """(training images, evaluation images: validation + test) of one epoch of `cfg`."""
    d = cfg.data
    n_all, n_test = SPLIT_SIZES.get(d.name, (d.sign_samples * 3 // 4, d.sign_samples // 4))
    n_val = _count(d.val_size, n_all) if d.val_size < 1 else int(d.val_size)
    n_train = n_all - n_val if float(d.train_size) == 1.0 else _count(d.train_size, n_all)
    return n_train, n_val + _count(d.test_size, n_test)


def device_share(spec: SweepSpec) -> tuple[float, float, str]:
    """(FLOP/s a trial gets, the share of a device it holds, the unit of hours) from resources."""
    r = spec.resources
    if r.gpu > 0:
        return GPU_FLOPS * min(r.gpu, 1.0), r.gpu, "GPU-hours"
    return CPU_FLOPS_PER_CORE * r.cpu, r.cpu, "CPU core-hours"


def trial_hours(spec: SweepSpec, cfg: runcfg.RunConfig) -> float:
    """Estimated device-hours (GPU-hours, or core-hours) of one trial of `cfg`."""
    flops, share, _ = device_share(spec)
    train, evaluation = epoch_images(cfg)
    per_epoch = est.train_seconds_per_epoch(cfg, est.estimate(cfg), train, evaluation, flops, EPOCH_FIXED_S)
    return cfg.train.epochs * per_epoch * share / 3600


# ---------------------------------------------------------------------------------------------------
# Trial sizes against the bounds

def memory_bound(spec: SweepSpec) -> tuple[int, str]:
    """(bytes, what) one trial may use: budget.max_memory_gb, else its share of its device."""
    b, gpu = spec.budget, spec.resources.gpu
    if b.max_memory_gb > 0:
        return int(b.max_memory_gb * 1e9), "budget.max_memory_gb"
    if gpu > 0:
        total, what = local_gpu_memory()
        share = min(gpu, 1.0)
        return int(share * total), f"resources.gpu {gpu:g} x {what}; set budget.max_memory_gb"
    return est.physical_memory(), "this machine's memory; set budget.max_memory_gb"


def local_gpu_memory() -> tuple[float, str]:
    import torch
    if torch.cuda.is_available():
        return float(torch.cuda.get_device_properties(0).total_memory), "this machine's GPU"
    return DEFAULT_GPU_GB * 1e9, f"a {DEFAULT_GPU_GB:g} GB GPU (cluster.yaml's A10G)"


def _space_probes(spec: SweepSpec) -> list[tuple[str, list]]:
    return [(key, probe_values(*next(iter(entry.items())))) for key, entry in spec.space.items()]


def combinations(spec: SweepSpec) -> tuple[list[dict], bool]:
    """(probe-value combinations of the space, whether that is all of them). Over MAX_COMBINATIONS:
    one combination of each key's values whose trial is largest on its own (an upper corner)."""
    if spec.points:                  # a sweep of explicit points: exactly those
        return [dict(p) for p in spec.points], True
    probes = _space_probes(spec)
    n = math.prod(len(v) for _, v in probes) if probes else 1
    if n <= MAX_COMBINATIONS:
        return [dict(zip([k for k, _ in probes], combo))
                for combo in itertools.product(*[v for _, v in probes])], True
    corner = {}
    for key, values in probes:
        corner[key] = max(values, key=lambda v: _size_or_zero(spec, {key: v}))
    return [corner], False


def _size_or_zero(spec: SweepSpec, params: dict) -> float:
    try:
        e = est.estimate(configs(spec).of(params))
        return float(e.peak_bytes) + e.params
    except runcfg.ConfigError:
        return 0.0


def _configs(spec: SweepSpec) -> Iterator[tuple[str, dict]]:
    """(label, params) to check: the base, each probe value alone, then the combinations."""
    yield "base", {}
    for i, point in enumerate(spec.points):
        yield f"points[{i}]", point
    probes = _space_probes(spec)
    for key, values in probes:
        for v in values:
            yield f"space.{key}: value {v!r}", {key: v}
    if len(probes) > 1:
        combos, _ = combinations(spec)
        for params in combos:
            yield "space: " + ", ".join(f"{k}={v!r}" for k, v in params.items()) + " together", params


def check_sizes(spec: SweepSpec) -> None:
    """SpecError (one line) when a trial the sweep can run exceeds budget.max_params or its memory."""
    b = spec.budget
    if b.max_params < 1 or b.max_memory_gb < 0 or b.max_trials < 1 or not b.max_hours > 0:
        raise SpecError("budget: max_params, max_trials and max_hours must be > 0 and max_memory_gb >= 0 "
                        "(0: the trial's device)")
    bound, what = memory_bound(spec)
    for label, params in _configs(spec):
        try:
            cfg = configs(spec).of(params)
            problem = est.over_bound(est.estimate(cfg), bound, what, b.max_params)
        except runcfg.ConfigError as e:
            raise SpecError(f"{label} gives an invalid trial: {e}") from None
        if problem:
            raise SpecError(f"{label} {problem}; raise budget.max_params / budget.max_memory_gb "
                            "only if it is meant")


# ---------------------------------------------------------------------------------------------------
# The sweep's cost

@dataclass(frozen=True)
class Cost:
    trials: int
    hours: float          # estimated device-hours of the whole sweep
    unit: str             # GPU-hours | CPU core-hours
    exact: bool           # averaged over every probe combination (else: each trial as the largest)

    def describe(self) -> str:
        how = "" if self.exact else "at most "
        return f"estimate: {self.trials:,} trials, {how}{self.hours:,.3g} {self.unit}"


def cost(spec: SweepSpec) -> Cost:
    combos, exact = combinations(spec)
    hours = [trial_hours(spec, configs(spec).of(p)) for p in combos]
    n = total_trials(spec)
    per_trial = sum(hours) / len(hours) if exact else max(hours)
    return Cost(trials=n, hours=n * per_trial, unit=device_share(spec)[2], exact=exact)


def confirmation(spec: SweepSpec, c: Optional[Cost] = None) -> Optional[str]:
    """Why the sweep needs `--yes` (its estimate over budget.max_trials / max_hours), or None."""
    c = c or cost(spec)
    b = spec.budget
    over = []
    if c.trials > b.max_trials:
        over.append(f"budget.max_trials {b.max_trials:,}")
    if c.hours > b.max_hours:
        over.append(f"budget.max_hours {b.max_hours:g}")
    if not over:
        return None
    return f"{c.describe()}: over {' and '.join(over)}; pass --yes to start it anyway"


def admitting(spec: SweepSpec, c: Optional[Cost] = None) -> list[str]:
    """Overrides that raise the budget to admit this sweep (`capsweep submit --yes` passes them to
    the job's own `capsweep run`, which cannot ask): empty when it is within the budget."""
    c = c or cost(spec)
    if confirmation(spec, c) is None:
        return []
    return [f"budget.max_trials={max(spec.budget.max_trials, c.trials)}",
            f"budget.max_hours={max(spec.budget.max_hours, math.ceil(c.hours))}"]
