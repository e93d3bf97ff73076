"""Tests of the analysis package against a real MLflow store (sqlite in tmp), no mocks.

The store holds runs written in the sweep runner's layout with known values, with the probes of
docs/PROBES.md (act_grad, starved_frac, frozen_frac, routing nulls):
  sweep "s1": a depth-0 reference (3 seeds) and depth >= 1 configurations, one built to escape
  (E: healthy gradients, few dead capsules, better accuracy), one built to be undecided (U: accuracy
  whose interval straddles the margin) and the others built not to escape, one reason each (V vanishing
  grad_ratio + a failed seed, D many dead capsules, F frozen capsules, T starved capsules, A accuracy
  below the shallow net, C collapsed: grad_ratio 1 but every layer's act_grad 1e-6, X a diverged seed,
  S a seed stopped early by the scheduler), plus cnn at depth 0 (the controls' reference) and depth 2
  (a control that passes);
  sweep "deep": one healthy depth-2 CapsNet without any depth-0 trial (for --reference s1);
  sweep "tiny" (logged last): depth 0..3, one seed each, logged with the old probes only (no act_grad,
  starved, frozen or nulls), accuracies chosen for a hand-computed Spearman rho;
  experiments "empty", "othertool" (runs without capsweep tags or probes) and "noprobes" (capsweep tags,
  no probes).
Expected numbers are derived here independently (t bounds and Welch's test from the formula with
scipy.stats.t, rho by hand).
"""
from __future__ import annotations

from pathlib import Path
import time
from mlflow.entities import Metric, Param
from tests.helpers.runs import log_trial, make_store, start_sweep
from tests.helpers.probe_metrics import BASE, capsnet_metrics, cnn_metrics

EPOCHS = 3
E_GRAD, E_DEAD, E_ACC = [0.5, 0.6, 0.7], [0.02, 0.0, 0.1], [0.95, 0.96, 0.94]
TINY_ACC = [0.9, 0.7, 0.8, 0.6]  # depth 0, 1, 2, 3
U_ACC = [0.88, 0.91, 0.86]       # mean 0.883 against the reference's 0.90: straddles the margin


def build_store(root: Path) -> dict:
    """The store this module's docstring describes, written into `root`; returns its uri, root, parent
    ids and the run ids of each named configuration."""
    st = make_store(root)
    uri, c, exp = st.uri, st.client, st.experiment_id
    ids: dict = {"uri": uri, "root": root, "configs": {}}

    parent = start_sweep(c, exp, "s1")
    ids["parent"] = parent
    count = iter(range(1000))

    def trial(name, params, seed, final, status="finished", error=""):
        p = {**BASE, **params, "train.seed": seed}
        rid = log_trial(c, exp, parent, "s1", f"t{next(count):03d}", p, final, status, error)
        ids["configs"].setdefault(name, []).append(rid)

    def cfg(depth, init, lr):
        return {"model.depth": depth, "model.init": init, "train.lr": lr}

    for s, a in enumerate([0.90, 0.91, 0.89]):
        trial("R", cfg(0, "std", 0.001), s, capsnet_metrics(0, grad_ratio=1, dead_hidden=0, test_acc=a,
                                                            grad_scale=0.04, seed=s))
    for s, (g, d, a) in enumerate(zip(E_GRAD, E_DEAD, E_ACC)):
        trial("E", cfg(2, "fan", 0.001), s, capsnet_metrics(2, grad_ratio=g, dead_hidden=d, test_acc=a,
                                                            grad_scale=0.04, seed=s))
    for s, a in enumerate(U_ACC):
        trial("U", cfg(3, "std", 0.01), s, capsnet_metrics(3, grad_ratio=0.5, dead_hidden=0.1, test_acc=a, seed=s))
    for s, g in enumerate([0.01, 0.02, 0.015]):
        trial("V", cfg(2, "std", 0.001), s, capsnet_metrics(2, grad_ratio=g, dead_hidden=0.1, test_acc=0.92,
                                                            seed=s))
    trial("V", cfg(2, "std", 0.001), 3, {}, status="failed", error="RuntimeError: CUDA out of memory")
    for s, d in enumerate([0.8, 0.7, 0.9]):
        trial("D", cfg(1, "fan", 0.001), s, capsnet_metrics(1, grad_ratio=0.5, dead_hidden=d, test_acc=0.92,
                                                            seed=s))
    for s, f in enumerate([0.8, 0.9, 0.85]):
        trial("F", cfg(1, "fan", 0.01), s, capsnet_metrics(1, grad_ratio=0.5, dead_hidden=0.1, frozen=f,
                                                           test_acc=0.92, seed=s))
    for s, st in enumerate([0.7, 0.8, 0.75]):
        trial("T", cfg(3, "std", 0.001), s, capsnet_metrics(3, grad_ratio=0.5, dead_hidden=0.1, starved=st,
                                                            test_acc=0.92, seed=s))
    for s, a in enumerate([0.80, 0.82, 0.81]):
        trial("A", cfg(3, "fan", 0.001), s, capsnet_metrics(3, grad_ratio=0.5, dead_hidden=0.1, test_acc=a,
                                                            seed=s))
    for s in range(3):
        trial("C", cfg(2, "fan", 0.01), s, capsnet_metrics(2, grad_ratio=1.0, dead_hidden=0.1, test_acc=0.92,
                                                           grad_scale=1e-6, seed=s))
    for s in range(2):
        trial("X", cfg(3, "fan", 0.01), s, capsnet_metrics(3, grad_ratio=0.5, dead_hidden=0.1, test_acc=0.92,
                                                           seed=s))
    diverged = {**capsnet_metrics(3, grad_ratio=0.5, dead_hidden=0.1, test_acc=0.1),
                "test_loss": float("nan"), "val_loss": float("nan")}
    trial("X", cfg(3, "fan", 0.01), 2, diverged, status="diverged")
    for s in range(3):  # healthy, but the scheduler stopped one seed early: it must not escape
        trial("S", cfg(1, "std", 0.01), s, capsnet_metrics(1, grad_ratio=0.5, dead_hidden=0.1, test_acc=0.92,
                                                           seed=s),
              status="stopped" if s == 2 else "finished")
    for depth, name, accs in ((0, "CNN0", [0.95, 0.955, 0.95]), (2, "CNN2", [0.955, 0.96, 0.955])):
        for s, a in enumerate(accs):
            trial(name, {**cfg(depth, "std", 0.001), "model.arch": "cnn"}, s, cnn_metrics(depth, a, s))
    c.set_terminated(parent, "FINISHED")

    time.sleep(0.01)
    deep = start_sweep(c, exp, "deep")
    for s, (g, d, a) in enumerate(zip(E_GRAD, E_DEAD, E_ACC)):
        rid = log_trial(c, exp, deep, "deep", f"deep{s}", {**BASE, **cfg(2, "fan", 0.001), "train.seed": s},
                        capsnet_metrics(2, grad_ratio=g, dead_hidden=d, test_acc=a, grad_scale=0.04, seed=s))
        ids["configs"].setdefault("deep", []).append(rid)
    c.set_terminated(deep, "FINISHED")

    time.sleep(0.01)  # "tiny" starts later: the most recent sweep
    tiny = start_sweep(c, exp, "tiny")
    ids["tiny_parent"] = tiny
    for depth, a in enumerate(TINY_ACC):
        log_trial(c, exp, tiny, "tiny", f"d{depth}", {**BASE, "model.depth": depth, "train.seed": 0},
                  capsnet_metrics(depth, grad_ratio=0.5, dead_hidden=0.1, test_acc=a, new_probes=False))
    c.set_terminated(tiny, "FINISHED")

    c.create_experiment("empty")
    other = c.create_experiment("othertool")
    for i in range(2):
        rid = c.create_run(other, run_name=f"other{i}").info.run_id
        c.log_batch(rid, metrics=[Metric("loss", 0.5, 0, 0)], params=[Param("lr", "0.1")])
        c.set_terminated(rid, "FINISHED")
    noprobes = c.create_experiment("noprobes")
    p = start_sweep(c, noprobes, "np")
    log_trial(c, noprobes, p, "np", "t0", {**BASE, "model.depth": 1, "train.seed": 0}, {"loss": 0.3})
    return ids
