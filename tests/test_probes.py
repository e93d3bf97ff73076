"""Probe formulas against values worked out by hand on tiny inputs (DESIGN.md, "Probes")."""
import math
from types import SimpleNamespace

import pytest
import torch

from capsmodels import probes


def trace(act, coupling=None, gain=None):
    return SimpleNamespace(act=torch.tensor(act, dtype=torch.float32),
                           coupling=None if coupling is None else torch.tensor(coupling, dtype=torch.float32),
                           gain=None if gain is None else torch.tensor(gain, dtype=torch.float32))


def test_tree_score_one_hot_uniform_and_half():
    # one child, J = 2 parents: one-hot -> H = 0 -> score 1; uniform -> H = log 2 -> score 0
    one_hot = torch.tensor([[[1.0, 0.0]]])
    uniform = torch.tensor([[[0.5, 0.5]]])
    assert float(probes.coupling_entropy_score(one_hot)) == pytest.approx(1.0)
    assert float(probes.coupling_entropy_score(uniform)) == pytest.approx(0.0, abs=1e-7)
    # c = (0.9, 0.1): H = -(0.9 ln 0.9 + 0.1 ln 0.1) = 0.325083; score = 1 - H / ln 2 = 0.531004
    c = torch.tensor([[[0.9, 0.1]]])
    assert float(probes.coupling_entropy_score(c)) == pytest.approx(0.5310044, abs=1e-6)
    # mean over x and i: the average of the three cases above
    both = torch.tensor([[[1.0, 0.0], [0.5, 0.5]], [[0.9, 0.1], [0.9, 0.1]]])
    assert float(probes.coupling_entropy_score(both)) == pytest.approx((1 + 0 + 2 * 0.5310044) / 4, abs=1e-6)


def test_tree_score_three_parents():
    # c = (0.5, 0.25, 0.25): H = 0.5 ln 2 + 0.5 ln 4 = 1.5 ln 2; score = 1 - 1.5 ln 2 / ln 3
    c = torch.tensor([[[0.5, 0.25, 0.25]]])
    assert float(probes.coupling_entropy_score(c)) == pytest.approx(1 - 1.5 * math.log(2) / math.log(3), abs=1e-6)


def test_routing_dynamics_is_population_std_over_inputs():
    # two inputs, one child, two parents: c_00 = 0.2 then 0.6 -> std 0.2; c_01 = 0.8 then 0.4 -> 0.2
    c = torch.tensor([[[0.2, 0.8]], [[0.6, 0.4]]])
    assert float(probes.routing_dynamics(c)) == pytest.approx(0.2, abs=1e-7)
    static = torch.tensor([[[0.3, 0.7]], [[0.3, 0.7]], [[0.3, 0.7]]])
    assert float(probes.routing_dynamics(static)) == pytest.approx(0.0, abs=1e-7)


def test_activation_stats_dead_fraction():
    # 3 inputs x 4 capsules; capsule 2 peaks at 0.009 < tau = 0.01 -> dead; capsule 3 reaches 0.01 -> alive
    act = torch.tensor([[0.5, 0.0, 0.001, 0.0],
                        [0.1, 0.2, 0.009, 0.01],
                        [0.3, 0.0, 0.0, 0.0]])
    mean, dead = probes.activation_stats(act, 0.01)
    assert float(mean) == pytest.approx(act.sum().item() / 12)
    assert float(dead) == pytest.approx(0.25)


def test_routing_probes_names_and_worst_hidden_layer():
    layers = [
        trace([[0.5, 0.5], [0.5, 0.5]], gain=[[0.4, 0.4], [0.4, 0.4]]),          # l0 primaries
        trace([[0.0, 0.3], [0.0, 0.2]], coupling=[[[1.0, 0.0], [1.0, 0.0]], [[1.0, 0.0], [1.0, 0.0]]],
              gain=[[0.1, 0.2], [0.3, 0.4]]),                                        # l1: half dead
        trace([[0.9, 0.1], [0.8, 0.2]], coupling=[[[0.5, 0.5], [0.5, 0.5]], [[0.5, 0.5], [0.5, 0.5]]]),
    ]
    out = probes.routing_probes(layers, tau=0.01)
    assert set(out) == {"act_mean/l0", "dead_frac/l0", "squash_gain/l0", "act_mean/l1", "dead_frac/l1",
                        "squash_gain/l1", "tree_score/l1", "routing_dynamics/l1", "act_mean/l2",
                        "dead_frac/l2", "tree_score/l2", "routing_dynamics/l2", "dead_frac_max"}
    assert out["dead_frac/l1"] == pytest.approx(0.5)
    assert out["dead_frac_max"] == pytest.approx(0.5)        # worst hidden layer (l1 only)
    assert out["tree_score/l1"] == pytest.approx(1.0)
    assert out["tree_score/l2"] == pytest.approx(0.0, abs=1e-6)
    assert out["squash_gain/l1"] == pytest.approx(0.25)
    assert out["act_mean/l2"] == pytest.approx(0.5)


def test_grad_tracker_mean_of_last_k_steps_and_ratio():
    w = [torch.nn.Parameter(torch.zeros(2, 2)) for _ in range(3)]
    tracker = probes.GradTracker(w, window=2)
    for step, scale in enumerate([100.0, 1.0, 3.0]):        # the first step falls out of the window
        for l, p in enumerate(w):
            p.grad = torch.full((2, 2), scale * (l + 1))     # ||g||_F = 2 * scale * (l + 1)
        tracker.record()
    out = tracker.summary()
    # mean over steps 2 and 3: scale 2 -> norms 4, 8, 12
    assert out["grad_norm/l0"] == pytest.approx(4.0)
    assert out["grad_norm/l1"] == pytest.approx(8.0)
    assert out["grad_norm/l2"] == pytest.approx(12.0)
    assert out["grad_ratio"] == pytest.approx(8.0 / 12.0)
