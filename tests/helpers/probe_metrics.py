"""Final-epoch metrics of a trial as the model side logs them (the probes of docs/PROBES.md), with chosen gradients, dead, starved and frozen fractions and accuracy: for stores whose verdict a test derives by hand."""
from __future__ import annotations



BASE = {"model.arch": "capsnet", "model.routing": "dynamic", "model.iterations": 3, "model.caps_dim": 8,
        "data.name": "mnist5k", "data.train_size": 1.0, "train.dead_tau": 0.01}


N_TEST = 10_000      # the test images every new-probe trial logs as `test_n`


def capsnet_metrics(depth: int, *, grad_ratio: float, dead_hidden: float, test_acc: float,
                    grad_scale: float = 0.05, seed: int = 0, starved: float = 0.0, frozen: float = 0.0,
                    new_probes: bool = True) -> dict[str, float]:
    """Final-epoch metrics of a CapsNet with `depth` hidden layers. act_grad (and grad_norm) fall
    geometrically from l1 (= grad_scale, times 1 + 0.05 seed so seeds differ) to l{depth+1} (= that / 
    grad_ratio), so their ratio is grad_ratio; l0 = l1. Hidden layers have dead_frac = dead_hidden,
    starved_frac = starved, frozen_frac = frozen; primaries and class capsules 0. new_probes=False: the
    metrics an old sweep logged (no act_grad, grad_rms, starved, frozen, nulls)."""
    last = depth + 1
    ratio = grad_ratio if depth > 0 else 1.0
    scale = grad_scale * (1 + 0.05 * seed)
    m = {"test_acc": test_acc, "val_acc": test_acc + 0.01, "train_acc": test_acc + 0.02,
         "test_loss": 1 - test_acc, "val_loss": 1 - test_acc, "train_loss": 0.9 - test_acc,
         "grad_ratio": ratio, "images_per_s": 500.0, "peak_mem_mb": 100.0, "time_s": 1.0}
    if new_probes:
        m["test_n"] = float(N_TEST)
    for l in range(0, last + 1):
        frac = (l - 1) / (last - 1) if last > 1 and l >= 1 else 0.0
        g = scale * (1.0 / ratio) ** frac
        m[f"grad_norm/l{l}"] = g
        hidden = 1 <= l <= depth
        m[f"dead_frac/l{l}"] = dead_hidden if hidden else 0.0
        m[f"act_mean/l{l}"] = 0.3
        m[f"squash_gain/l{l}"] = 0.4
        if new_probes:
            m[f"act_grad/l{l}"] = g
            m[f"grad_rms/l{l}"] = g / 100
            m[f"starved_frac/l{l}"] = starved if hidden else 0.0
            m[f"frozen_frac/l{l}"] = frozen if hidden else 0.0
        if l >= 1:
            m[f"tree_score/l{l}"] = 0.3
            m[f"routing_dynamics/l{l}"] = 0.02
            if new_probes:
                m[f"tree_score_null/l{l}"] = 0.1
                m[f"routing_dynamics_null/l{l}"] = 0.005
    m["dead_frac_max"] = dead_hidden if depth else 0.0
    if new_probes:
        m["starved_frac_max"] = starved if depth else 0.0
        m["frozen_frac_max"] = frozen if depth else 0.0
    return m


def cnn_metrics(depth: int, test_acc: float, seed: int) -> dict[str, float]:
    """A healthy cnn control: act_grad 0.1 on every layer, nothing dead, starved or frozen, no routing."""
    m = {"test_acc": test_acc, "val_acc": test_acc, "grad_ratio": 1.0, "test_n": float(N_TEST)}
    for l in range(depth + 2):
        m[f"grad_norm/l{l}"] = m[f"act_grad/l{l}"] = 0.1 * (1 + 0.05 * seed)
        for name in ("dead_frac", "starved_frac", "frozen_frac"):
            m[f"{name}/l{l}"] = 0.0
    return m
