"""The Ray Tune function trainable: one trial = `capsmodels.train.fit` on one resolved config.

The raw dataset arrives through Ray's object store (`tune.with_parameters` puts it there once; each
node keeps one shared copy and the trials on it map the same memory), so a trial never re-reads the
files. Each epoch's report carries a checkpoint (model, optimiser, scheduler and RNG state), so a
retried or resumed trial continues from its last epoch and repeats exactly what it would have done.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch
from ray import tune

from capsmodels import config as runcfg
from capsmodels.train import fit
from sweeps.spec import trial_config

STATE_FILE = "state.pt"
FAIL_ENV = "CAPSWEEP_INJECT_FAILURE"   # tests: "key=value" makes matching trials raise


def run_trial(config: dict[str, Any], base: dict, raws: Optional[dict] = None, cpus: float = 1.0) -> None:
    """Tune trainable. config: the sampled dotted params (plus `train.seed`); raws: the datasets the
    driver loaded, by name (a dataset missing there is read from disk by `fit`)."""
    cfg = runcfg.from_dict(trial_config(base, config))
    raw = (raws or {}).get(cfg.data.name)
    cfg.train.progress = False
    if cfg.train.threads == 0:
        cfg.train.threads = max(1, int(cpus))
    _maybe_inject_failure(config)

    state = None
    ckpt = tune.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state = torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=False)

    def report(metrics: dict, state: dict) -> None:
        with tempfile.TemporaryDirectory() as d:
            torch.save(state, Path(d) / STATE_FILE)
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(d))

    fit(cfg, report, data=raw, state=state, with_state=True)


def _maybe_inject_failure(config: dict) -> None:
    """Fault injection for the reliability tests: raise on trials whose params match."""
    rule = os.environ.get(FAIL_ENV)
    if not rule:
        return
    key, _, value = rule.partition("=")
    if str(config.get(key)) == value:
        raise RuntimeError(f"injected failure for {key}={value}")
