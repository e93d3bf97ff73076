"""The Ray Tune function trainable: one trial = `capsmodels.train.fit` on one resolved config.

The raw dataset arrives through Ray's object store (`tune.with_parameters` puts it there once; each
node keeps one shared copy and the trials on it map the same memory), so a trial never re-reads the
files.

After each epoch the trial saves its state (model, optimiser, scheduler, RNG, the epoch's metrics) to
`<storage>/<sweep>/trial_state/<trial id>.pt`, replacing the previous one atomically, and only then
reports the epoch to Tune. A retried trial (on any node: the storage is shared) or a resumed sweep
starts the trial afresh, finds that file, says its last epoch again (it may not have reached Tune
before a crash; MLflow keeps one copy of each epoch) and continues with the next epoch, repeating
exactly what it would have done.

The trial also leaves its model's files (sweeps/models.py): at its start the resolved config and
`trial.json` (the device it used, the datasets' digests and sizes), at its end the weights of its
best-validation epoch (`fit` ends holding them; a trial that ASHA stops leaves its state, whose
`best_model` they are); the driver logs them to MLflow (one writer) and then deletes the weights and
the state file. Each epoch's report carries the trial's own system figures (`system/...`,
sweeps/sysmetrics.py). A trial that `train.patience` ends early returns like one that reached
`train.epochs`: Tune sees it TERMINATED and the driver logs it as finished, with its stop reason
(capsmodels.contract, TAG_STOP_REASON), not as stopped (ASHA's early stop).

Why not Tune's own checkpoints: Tune deletes the previous checkpoint (`num_to_keep`) before its next
experiment snapshot is written, so a driver killed in between leaves a snapshot that points at a
deleted checkpoint, and the resumed trial fails with "Could not recover from checkpoint as it does not
exist on storage anymore" (seen here in 1 of 6 random kills). A file the trial owns has no such window.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import torch
import yaml
from ray import tune

from capsmodels import config as runcfg
from capsmodels.train import fit, prepare
from sweeps import models, storage
from sweeps.provenance import dataset_inputs
from sweeps.sysmetrics import SystemSampler, describe_device
from sweeps.schema import resolve_trial

from capsmodels.contract import ENDED  # a state whose epoch ended the run: nothing left to train
from capsmodels.contract import INJECT_FAILURE_ENV as FAIL_ENV  # tests: "key=value" makes matching trials raise


def run_trial(config: dict[str, Any], base: dict, raws: Optional[dict] = None, cpus: float = 1.0,
              state_dir: Optional[str] = None, trust: bool = False) -> None:
    """Tune trainable. config: the sampled dotted params (plus `train.seed`); raws: the datasets the
    driver loaded, by name (a dataset missing there is read from disk by `fit`); state_dir: where this
    sweep's trials keep their per-epoch state (None: nowhere, a retry starts from scratch); trust: the
    user's `--trust`, which lets a state file that names code be unpickled (storage.load_torch)."""
    cfg = resolve_trial(base, config)      # the trial's edge: built and validated once, passed on typed
    config_yaml = yaml.safe_dump(runcfg.to_dict(cfg), sort_keys=False)     # as resolved, for the model
    raw = (raws or {}).get(cfg.data.name)
    cfg.train.progress = False
    if cfg.train.threads == 0:
        cfg.train.threads = max(1, int(cpus))
    _maybe_inject_failure(config)

    tid = tune.get_context().get_trial_id()
    path, model_dir = models.trial_paths(state_dir, tid) if state_dir else (None, None)
    state = load_state(path, trust)
    if state is not None and state.get("metrics"):
        tune.report(state["metrics"])
        if state["metrics"].get("status") in ENDED:
            return
    elif model_dir is not None:
        final = models.read_json(model_dir, models.FINAL_FILE)
        if final is not None:
            # ended, its model logged and its state deleted, then restored by a driver that crashed
            # before Tune saved the trial as done: say the end again, train nothing
            tune.report(final)
            return

    torch.set_num_threads(cfg.train.threads)      # as fit would, before prepare's `init: data` runs
    splits, model, device = prepared = prepare(cfg, raw)
    if model_dir is not None:
        models.write_start(model_dir, config_yaml, trial_info(cfg, splits, device))
    sampler = SystemSampler(device)

    def report(metrics: dict) -> None:
        tune.report({**metrics, **sampler.sample()})

    # fit checkpoints each epoch before reporting it: a crash before the report repeats it above
    try:
        final = fit(cfg, report, state=state, prepared=prepared,
                    checkpoint=(lambda s: save_state(path, s)) if path is not None else None)
        if model_dir is not None:
            models.write_final(model_dir, model, final)
    finally:
        del model, prepared, splits, state      # a reused worker (spec.reuse_actors) keeps no trial's tensors
        release_memory()


def release_memory() -> None:
    """End of a trial on a worker that Tune may reuse (spec.reuse_actors, the default): collect the
    trial's model, optimiser and state now that nothing refers to them, and hand the CUDA caching
    allocator's blocks back, so the next trial on this worker (or another process sharing the GPU)
    starts with the GPU's memory free. tests/sweeps/test_warm_workers.py checks a reused worker's metrics."""
    import gc
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def trial_info(cfg, splits, device: torch.device) -> dict:
    """What only the trial knows, for the driver to log (sweeps/models.py, trial.json): the device
    actually used (not `auto`) and its name, the network's input shape and classes, the datasets."""
    used, name = describe_device(device)
    data = {"train": splits.train.tensors, "val": splits.val.tensors, "test": splits.test.tensors}
    return {"device": used, "device_name": name, "in_shape": list(splits.in_shape),
            "num_classes": int(splits.num_classes), "datasets": dataset_inputs(cfg.data.name, data)}


def load_state(path: Optional[str | Path], trust: bool = False) -> Optional[dict]:
    """A local path or a storage URI (sweeps/storage.py); None when there is no state yet. Read with
    weights_only: the state is tensors, numbers and strings, so a file that names code is refused
    (storage.UnsafeFile) before any of it runs, unless `trust`."""
    return None if path is None else storage.load_torch(str(path), trust=trust)


def save_state(path: str | Path, state: dict) -> None:
    """The file is always a whole epoch's state: locally a temporary file beside it renamed over it,
    on an object store one PUT (sweeps/storage.py, write_bytes)."""
    storage.save_torch(str(path), state)


def _maybe_inject_failure(config: dict) -> None:
    """Fault injection for the reliability tests: raise on trials whose params match."""
    rule = os.environ.get(FAIL_ENV)
    if not rule:
        return
    key, _, value = rule.partition("=")
    if str(config.get(key)) == value:
        raise RuntimeError(f"injected failure for {key}={value}")
