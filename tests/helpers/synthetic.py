"""Synthetic sweeps for the verdict's simulations: trial tables drawn from known truths (healthy, collapsed, ...), with the test set's own sampling error."""
from __future__ import annotations

import numpy as np
import pandas as pd

from analysis.load import SweepData
from capsmodels.contract import encode_correct

ACC_SD = 0.004       # seed-to-seed sd of test accuracy (MNIST-like nets vary by a few tenths of a percent)


def trial_metrics(rng, arch: str, depth: int, kind: str) -> dict[str, float]:
    """Last-epoch metrics of one trial as the model side logs them. kind: 'healthy' (accuracy ~
    N(0.90, ACC_SD) for a CapsNet, N(0.92, ACC_SD) for a cnn; act_grad ~ 1e-2 on every layer with 0.1
    decades of noise; a few dead hidden capsules, none starved or frozen) or 'collapsed' (act_grad
    falling 3 decades per layer towards the input, accuracy at chance, hidden layers dead, starved,
    frozen)."""
    L = depth + 1
    m: dict[str, float] = {}
    if kind in ("healthy", "margin"):
        # 'margin': healthy, but its accuracy is worse than a healthy CapsNet's by exactly the margin
        # (the boundary of non-inferiority's null: the case where a false 'yes' is likeliest)
        m["test_acc"] = rng.normal(0.92 if arch == "cnn" else 0.90 - (DELTA if kind == "margin" else 0), ACC_SD)
        act = {l: 1e-2 * 10 ** rng.normal(0, 0.1) for l in range(L + 1)}
        hidden = lambda: {"dead": rng.uniform(0, 0.05), "starved": 0.0, "frozen": rng.uniform(0, 0.02)}  # noqa: E731
    else:
        m["test_acc"] = rng.normal(0.10, 0.01)
        act = {l: 1e-2 * 10 ** (-3.0 * (L - l) + rng.normal(0, 0.3)) for l in range(L + 1)}
        hidden = lambda: {"dead": rng.uniform(0.9, 1.0), "starved": 1.0, "frozen": rng.uniform(0.8, 1.0)}  # noqa: E731
    m["val_acc"] = m["test_acc"] + 0.005
    for l, v in act.items():
        m[f"act_grad/l{l}"] = v
        m[f"grad_norm/l{l}"] = v * 30
        m[f"grad_rms/l{l}"] = v * 0.1
    m["grad_ratio"] = act[1] / act[L]
    layer = {l: hidden() if 1 <= l <= depth else {"dead": 0.0, "starved": 0.0, "frozen": 0.0}
             for l in range(L + 1)}
    for name in ("dead", "starved", "frozen"):
        for l in range(L + 1):
            m[f"{name}_frac/l{l}"] = layer[l][name]
        m[f"{name}_frac_max"] = max([layer[l][name] for l in range(1, depth + 1)], default=0.0)
    if arch == "capsnet":
        for l in range(1, L + 1):
            m[f"tree_score/l{l}"] = rng.uniform(0.2, 0.3)
            m[f"tree_score_null/l{l}"] = rng.uniform(0.05, 0.1)
            m[f"routing_dynamics/l{l}"] = rng.uniform(0.02, 0.03)
            m[f"routing_dynamics_null/l{l}"] = rng.uniform(0.005, 0.01)
    return m


N_TEST = 10_000      # test images, as Fashion-MNIST's and MNIST's test splits


class TestSet:
    """A shared test set of N_TEST images of varied difficulty, as every trial of a sweep is scored on:
    image i is classified right with probability sigmoid(z_i + b), z_i ~ N(0, 2) its ease (shared by
    every model, so models err on the same hard images, as real ones do) and b the model's offset,
    solved so that the expected accuracy is the trial's drawn accuracy. The logged test_acc is the
    realised mean of the 0/1 draws, so it carries the test set's sampling error; the draws are also
    logged as the trial's per-image correctness tag (capsmodels.contract.encode_correct)."""
    __test__ = False         # not a pytest class

    def __init__(self, rng):
        self.z = rng.normal(0.0, 2.0, N_TEST)

    def score(self, rng, acc: float) -> tuple[float, str]:
        from scipy.optimize import brentq
        from scipy.special import expit
        acc = float(np.clip(acc, 0.01, 0.995))
        b = brentq(lambda b: expit(self.z + b).mean() - acc, -30, 30)
        correct = rng.random(N_TEST) < expit(self.z + b)
        return float(correct.mean()), encode_correct(np.packbits(correct).tobytes(), N_TEST)


def synthetic_sweep(rng, configs: list[tuple[str, int, str]], seeds: int = 5, name: str = "synthetic",
                    extra: dict | None = None) -> SweepData:
    """A SweepData as analysis.load builds it: one row per trial with string params and float metrics.
    configs: (arch, depth, kind) or (arch, depth, kind, {param: value}) per configuration; every one gets
    `seeds` finished seeds, all scored on one shared TestSet."""
    rows = []
    test_set = TestSet(rng)
    for arch, depth, kind, *own in configs:
        role = "reference" if depth == 0 and arch == "capsnet" else "control" if arch == "cnn" else "candidate"
        for s in range(seeds):
            params = {"model.arch": arch, "model.depth": str(depth), "model.iterations": "3",
                      "data.name": "mnist5k", "train.seed": str(s), "trial.role": role,
                      **{k: str(v) for k, v in (extra or {}).items()},
                      **{k: str(v) for k, v in (own[0] if own else {}).items()}}
            m = trial_metrics(rng, arch, depth, kind)
            m["test_acc"], correct = test_set.score(rng, m["test_acc"])
            m["test_n"] = float(N_TEST)
            tag = "".join(f"-{v}" for v in (own[0] if own else {}).values())
            rows.append({"run_id": f"{arch}{depth}{kind[0]}{tag}s{s}", "trial_id": f"{arch}-{depth}-{kind}{tag}-{s}",
                         "seed": s, "status": "finished", "error": "", "test_correct": correct, **params, **m})
    trials = pd.DataFrame(rows)
    params = sorted(c for c in trials.columns if "." in c)
    metrics = sorted(c for c in trials.columns if c not in params and c not in
                     ("run_id", "trial_id", "seed", "status", "error", "test_correct"))
    return SweepData(experiment="sim", experiment_id="0", tracking_uri="none", sweep=name, parent_run_id=None,
                     trials=trials, histories=pd.DataFrame(columns=["run_id", "key", "step", "value"]),
                     param_cols=params, metric_cols=metrics)


HEALTHY = [("capsnet", 0, "healthy"), ("capsnet", 3, "healthy"), ("cnn", 0, "healthy"), ("cnn", 3, "healthy")]


COLLAPSED = [("capsnet", 0, "healthy"), ("capsnet", 3, "collapsed"), ("cnn", 0, "healthy"), ("cnn", 3, "healthy")]


DELTA, ALPHA = 0.01, 0.05
