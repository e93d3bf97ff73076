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
from ray import tune

from capsmodels.train import fit
from sweeps.spec import resolve_trial

from capsmodels.contract import ENDED  # a state whose epoch ended the run: nothing left to train
from capsmodels.contract import INJECT_FAILURE_ENV as FAIL_ENV  # tests: "key=value" makes matching trials raise


def run_trial(config: dict[str, Any], base: dict, raws: Optional[dict] = None, cpus: float = 1.0,
              state_dir: Optional[str] = None) -> None:
    """Tune trainable. config: the sampled dotted params (plus `train.seed`); raws: the datasets the
    driver loaded, by name (a dataset missing there is read from disk by `fit`); state_dir: where this
    sweep's trials keep their per-epoch state (None: nowhere, a retry starts from scratch)."""
    cfg = resolve_trial(base, config)
    raw = (raws or {}).get(cfg.data.name)
    cfg.train.progress = False
    if cfg.train.threads == 0:
        cfg.train.threads = max(1, int(cpus))
    _maybe_inject_failure(config)

    path = Path(state_dir) / f"{tune.get_context().get_trial_id()}.pt" if state_dir else None
    state = load_state(path)
    if state is not None and state.get("metrics"):
        tune.report(state["metrics"])
        if state["metrics"].get("status") in ENDED:
            return

    # fit checkpoints each epoch before reporting it: a crash before the report repeats it above
    fit(cfg, tune.report, data=raw, state=state,
        checkpoint=(lambda s: save_state(path, s)) if path is not None else None)


def load_state(path: Optional[Path]) -> Optional[dict]:
    if path is None or not path.is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=False)


def save_state(path: Path, state: dict) -> None:
    """Write to a temporary file beside it, then rename: the file is always a whole epoch's state."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _maybe_inject_failure(config: dict) -> None:
    """Fault injection for the reliability tests: raise on trials whose params match."""
    rule = os.environ.get(FAIL_ENV)
    if not rule:
        return
    key, _, value = rule.partition("=")
    if str(config.get(key)) == value:
        raise RuntimeError(f"injected failure for {key}={value}")
