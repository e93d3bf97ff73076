"""What one epoch's state save costs in a trial, measured outside Tune through the public path.

The state is the one `fit` hands to its `checkpoint` callback after an epoch (model, Adam moments,
scheduler, RNG, metrics), captured from a one-epoch `fit` of the trial's own config cut to a few steps
(the size of the state does not depend on how much data the epoch saw), and written by the trainable's
own `sweeps.trainable.save_state`, as a trial does after every epoch.
"""
from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

from benchmarks.overhead.trials import with_seed

CAPTURE_STEPS = 2          # training steps of the capture run: Adam's moments exist after the first


def capture_state(base: dict) -> dict:
    """The state dict a trial would save after its first epoch."""
    from capsmodels.train import fit
    cfg = with_seed(base, 0)
    cfg["train"].update(epochs=1, max_steps_per_epoch=CAPTURE_STEPS)
    states: list[dict] = []
    fit(cfg, checkpoint=states.append)
    return states[-1]


def state_save_cost(base: dict, reps: int = 3) -> dict:
    """Size (MB), parameter count and median seconds of `save_state` over `reps` saves."""
    from sweeps.trainable import save_state
    state = capture_state(base)
    params = sum(v.numel() for v in state["model"].values() if v.is_floating_point())   # weights (+ float buffers)
    saves, size = [], 0
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "trial_state" / "trial.pt"
        for _ in range(reps):
            t = time.perf_counter()
            save_state(path, state)
            saves.append(time.perf_counter() - t)
            size = path.stat().st_size
    return {"mb": size / 2**20, "params": params, "save_s": statistics.median(saves)}
