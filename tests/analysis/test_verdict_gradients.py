"""The verdict's gradient checks measure what they say (docs/PROBES.md, "The verdict"):
- the gradient floor is depth-neutral on healthy networks: real `tiny` CapsNets at initialisation
  (`init: data`) at depth 0 and 3 give floors within 0.2 decades (the primaries, left out of the floor,
  differ by 0.7), and a planted 1.5-decade drop in l1..l3 fails it;
- a collapsed class layer (the committed EM configuration: grad_ratio 1.5e4, starved 0, accuracy at
  chance) is failed by the gradient checks on their own, not only by the accuracy checks.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from analysis.verdict import compute_verdict, trial_probes
from tests.helpers.synthetic import synthetic_sweep


def _floors_at_init(depth: int) -> tuple[float, float]:
    """(log10 floor over l1..l{L}, log10 act_grad/l0) of a real tiny CapsNet at initialisation."""
    from capsmodels import config, probes, train
    cfg = config.from_dict({"model": {"preset": "tiny", "depth": depth, "init": "data"},
                            "data": {"name": "digits"}, "train": {"seed": 0, "device": "cpu"}})
    splits, model, _ = train.prepare(cfg)
    x, y = train.fixed_batch(splits.val, 128, 0)
    p = probes.evaluation_probes(model, x, y, 0.01)
    row = pd.DataFrame([{"run_id": "r", "model.depth": str(depth), **p}])
    return float(trial_probes(row)["act_grad_min"][0]), math.log10(p["act_grad/l0"])


def test_the_floor_is_depth_neutral_on_healthy_networks():
    (f0, p0), (f3, p3) = _floors_at_init(0), _floors_at_init(3)
    msg = (f"healthy tiny CapsNets at init: floor over l1..l{{L}} {f0:.2f} (depth 0) vs {f3:.2f} (depth 3); "
           f"primaries l0 {p0:.2f} vs {p3:.2f}")
    print(msg)
    assert abs(f3 - f0) < 0.2, msg
    assert abs(p3 - p0) > 0.3, msg        # why l0 is left out: it moves with depth in healthy networks


def _with_drop(sweep, layers, decades):
    t = sweep.trials
    deep = t["model.depth"].eq("3") & t["model.arch"].eq("capsnet")
    for l in layers:
        t.loc[deep, f"act_grad/l{l}"] *= 10 ** -decades
    return sweep


def test_a_planted_drop_fails_the_floor():
    """A healthy depth-3 candidate with act_grad 1.5 decades lower on l1-l3 fails the floor (margin
    1 decade); the same candidate without the drop passes it."""
    configs = [("capsnet", 0, "healthy"), ("capsnet", 3, "healthy"), ("cnn", 0, "healthy"), ("cnn", 3, "healthy")]
    rng = np.random.default_rng(21)
    healthy = compute_verdict(synthetic_sweep(rng, configs))
    rng = np.random.default_rng(21)
    dropped = compute_verdict(_with_drop(synthetic_sweep(rng, configs), (1, 2, 3), 1.5))
    floor = lambda v: next(ch for c in v.configurations if c.role == "candidate"  # noqa: E731
                           for ch in c.checks if ch["name"] == "gradient floor")
    assert floor(healthy)["outcome"] == "pass", floor(healthy)["text"]
    assert floor(dropped)["outcome"] == "fail", floor(dropped)["text"]
    assert floor(dropped)["test"]["diff"] == pytest.approx(-1.5, abs=0.15)


def test_a_collapsed_class_layer_fails_the_gradient_checks_on_their_own():
    """EM c09 as committed: the class layer's act_grad 4 decades below the first routed layer's
    (grad_ratio ~1.5e4), starved_frac 0 (its yardstick, the class layer, collapsed with it), accuracy at
    chance. With the accuracy checks set aside, grad_ratio (above grad_ratio_max) and the gradient
    floor (the class layer is in l1..l{L}, held to the reference's) fail it."""
    configs = [("capsnet", 0, "healthy"), ("capsnet", 3, "healthy"), ("cnn", 0, "healthy"), ("cnn", 3, "healthy")]
    sweep = _with_drop(synthetic_sweep(np.random.default_rng(22), configs), (4,), 4.2)
    t = sweep.trials
    deep = t["model.depth"].eq("3") & t["model.arch"].eq("capsnet")
    t.loc[deep, "grad_ratio"] = t.loc[deep, "act_grad/l1"] / t.loc[deep, "act_grad/l4"]
    for l in range(5):
        t.loc[deep, f"starved_frac/l{l}"] = 0.0
    v = compute_verdict(sweep)
    c = next(c for c in v.configurations if c.role == "candidate")
    outcomes = {ch["name"]: ch["outcome"] for ch in c.checks}
    assert c.figures["grad_ratio"]["mean"] > 1e4 and c.figures["starved_worst"]["mean"] == 0.0
    assert outcomes["grad_ratio"] == "fail" and outcomes["gradient floor"] == "fail", c.reasons
    assert outcomes["starved"] == "pass" and c.verdict == "not escaped"
