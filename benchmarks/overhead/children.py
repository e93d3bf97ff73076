"""What runs inside each measured child process (benchmarks/sweep_overhead.py starts them).

Each child writes its own timestamps to a JSON file; `t0` is when its interpreter began running the
entry script, so start-up and imports count on both sides as a user would see them. Heavy imports
(torch, ray, mlflow) happen inside the functions: importing this module costs nothing, which lets the
entry script register `exit_marks_last` before any of them.
"""
from __future__ import annotations

import json
import re
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

from benchmarks.overhead.trials import with_seed


def _silent_report(metrics: dict) -> None:
    pass


def child_loop(base: dict, seeds: list[int], out: Path, t0: float) -> None:
    """The plain-loop baseline: load the dataset once, fit each config in turn."""
    import torch  # noqa: F401  - counted as import time, as the sweep's imports are
    from capsmodels import config as runcfg
    from capsmodels import datasets as datamod
    from capsmodels.train import fit
    t_imports = time.time()
    cfg0 = runcfg.from_dict(base)
    raw = datamod.load_raw(cfg0.data.name, cfg0.data.root, cfg0.data.download, cfg0.data.sign_samples)
    t_data = time.time()
    fits, fit_cpu, epochs = [], [], []
    for seed in seeds:
        marks: list[tuple[float, float]] = []
        t, c = time.perf_counter(), time.process_time()
        fit(with_seed(base, seed), lambda m: marks.append((time.perf_counter(), m["time_s"])), data=raw)
        fits.append(time.perf_counter() - t)
        fit_cpu.append(time.process_time() - c)
        # per epoch [wall since the previous report (the first: since fit began), training-loop time]
        epochs.append([[m[0] - (marks[i - 1][0] if i else t), m[1]] for i, m in enumerate(marks)])
    out.write_text(json.dumps({"t0": t0, "t_imports": t_imports, "t_data": t_data, "fits": fits,
                               "fit_cpu": fit_cpu, "epochs": epochs, "t_done": time.time()}))


_POOL_RAW: Any = None


def _pool_init(base: dict) -> None:
    global _POOL_RAW
    from capsmodels import config as runcfg
    from capsmodels import datasets as datamod
    cfg0 = runcfg.from_dict(base)
    _POOL_RAW = datamod.load_raw(cfg0.data.name, cfg0.data.root, cfg0.data.download, cfg0.data.sign_samples)


def _pool_fit(cfg: dict) -> float:
    from capsmodels.train import fit
    t = time.perf_counter()
    fit(cfg, _silent_report, data=_POOL_RAW)
    return time.perf_counter() - t


def child_pool(base: dict, seeds: list[int], workers: int, out: Path, t0: float) -> None:
    """The same loop spread over `workers` plain processes (each loads the dataset once)."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor
    t_imports = time.time()
    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_pool_init,
                             initargs=(base,)) as pool:
        fits = list(pool.map(_pool_fit, [with_seed(base, s) for s in seeds]))
    out.write_text(json.dumps({"t0": t0, "t_imports": t_imports, "fits": fits, "t_done": time.time()}))


# the runner's phases timed in a sweep child: (module, attribute, phase). A name that a refactor moved
# is reported as not timed (`untimed` in the child's JSON) instead of failing the benchmark.
PHASES = (("sweeps.spec", "load_spec", "spec"), ("sweeps.runner", "preflight", "checks"),
          ("sweeps.runner", "load_datasets", "data"), ("sweeps.runner", "acquire_lock", "lock"),
          ("sweeps.tracking", "get_or_create_experiment", "mlflow_setup"),
          ("sweeps.runner", "create_parent", "mlflow_setup"), ("sweeps.runner", "init_ray", "ray_start"),
          ("sweeps.runner", "_tune", "tune_total"), ("ray.tune", "Tuner.fit", "tuner_fit"),
          ("ray", "shutdown", "ray_shutdown"), ("sweeps.tracking", "MlflowSweepLogger.__init__", "logger_init"),
          *(("sweeps.tracking", "MlflowSweepLogger." + hook, "cb:" + hook) for hook in
            ("on_trial_start", "on_trial_result", "on_trial_complete", "on_step_end", "on_experiment_end")))


def _record_kind(rec: Any) -> str:
    """A logger write's kind, from its record's type: ParentEnd -> parent_end."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", type(rec).__name__).lower()


class PhaseTimer:
    """Wraps functions in place so that each call adds its wall time to a phase.

    timers: phase -> seconds; counts: phase -> calls; spans: phase -> [first start, last end] (epoch s).
    """

    def __init__(self) -> None:
        self.timers: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)
        self.spans: dict[str, list] = {}
        self.untimed: list[str] = []

    def wrap(self, module: str, dotted: str, phase: Callable[..., str] | str) -> None:
        import importlib
        *path, attr = dotted.split(".")
        try:
            owner: Any = importlib.import_module(module)
            for part in path:
                owner = getattr(owner, part)
            orig = getattr(owner, attr)
        except (ImportError, AttributeError):
            self.untimed.append(f"{module}.{dotted}")
            return
        key_of = phase if callable(phase) else (lambda *a, **k: phase)

        def timed(*a, **k):
            t, start = time.perf_counter(), time.time()
            try:
                return orig(*a, **k)
            finally:
                key = key_of(*a, **k)
                self.timers[key] += time.perf_counter() - t
                self.counts[key] += 1
                self.spans.setdefault(key, [start, 0.0])[1] = time.time()
        setattr(owner, attr, timed)


def child_sweep(spec_path: Path, num_cpus: int, out: Path, t0: float) -> int:
    """`capsweep run SPEC --num-cpus C` through the CLI's own main, with the runner's phases timed.

    Everything the sweep does (reuse_actors included) comes from the spec; this only adds timers.
    """
    import sweeps.trainable  # noqa: F401  - torch and the trainable, as the driver imports them anyway
    from sweeps import cli
    t_imports = time.time()
    pt = PhaseTimer()
    for module, dotted, phase in PHASES:
        pt.wrap(module, dotted, phase)
    # each MLflow write the driver's logger applies, by the kind of record
    pt.wrap("sweeps.tracking", "MlflowSweepLogger._apply", lambda self, rec, *a, **k: "mlflow:" + _record_kind(rec))
    t_main = time.time()
    rc = cli.main(["run", str(spec_path), "--num-cpus", str(num_cpus)])
    t_done = time.time()
    out.write_text(json.dumps({"t0": t0, "t_imports": t_imports, "t_main": t_main, "t_done": t_done,
                               "rc": rc, "timers": pt.timers, "counts": pt.counts, "spans": pt.spans,
                               "untimed": pt.untimed}))
    time_exit(out.with_name("exit.json"))
    return int(rc or 0)


# ---- the interpreter's exit ---------------------------------------------------------------------
_EXIT: dict = {}


def time_exit(path: Path) -> None:
    """Time the interpreter's exit: non-daemon threads are joined, then atexit handlers run, last
    registered first. `first` (registered now, after ray/mlflow registered theirs) runs before them;
    `exit_marks_last` (registered by the entry script before those imports) runs after them."""
    import atexit
    _EXIT["path"] = path

    def first() -> None:
        _EXIT["t_atexit_first"] = time.time()
    atexit.register(first)


def exit_marks_last() -> None:
    if "path" in _EXIT:
        path = _EXIT.pop("path")
        _EXIT["t_atexit_last"] = time.time()
        path.write_text(json.dumps(_EXIT))
