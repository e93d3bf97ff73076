"""Probe formulas (docs/PROBES.md) against values worked out by hand on tiny inputs, the routing null on a
constructed parse tree, and the logged gradient probes of collapsed networks against an independent
float64 autograd reference (a CapsNet forward written out here with plain torch ops)."""
import math

import pytest
import torch
import torch.nn.functional as F

from capsmodels import probes
from capsmodels.config import from_dict
from capsmodels.layers import CapsuleLayer
from capsmodels.losses import total_loss
from capsmodels.networks import LayerTrace, build

CERT_91 = 1 - (-(0.9 * math.log(0.9) + 0.1 * math.log(0.1))) / math.log(2)   # 0.531004...


def t(values):
    return None if values is None else torch.tensor(values, dtype=torch.float64)


def trace(act, coupling=None, gain=None, routes=True):
    return LayerTrace(t(act), t(coupling), t(gain), routes=routes)


# ----------------------------------------------------------------------------------------------------
# routing statistics
# ----------------------------------------------------------------------------------------------------

def test_coupling_certainty_by_hand():
    # one-hot -> H = 0 -> 1; uniform -> H = log J -> 0; (0.9, 0.1) -> 1 - H / ln 2 = 0.531004
    c = t([[[1.0, 0.0], [0.5, 0.5], [0.9, 0.1]]])
    torch.testing.assert_close(probes.coupling_certainty(c), t([[1.0, 0.0, CERT_91]]))
    assert CERT_91 == pytest.approx(0.5310044, abs=1e-7)
    # J = 3, c = (0.5, 0.25, 0.25): H = 1.5 ln 2 -> 1 - 1.5 ln 2 / ln 3
    c3 = t([[[0.5, 0.25, 0.25]]])
    assert float(probes.coupling_certainty(c3)) == pytest.approx(1 - 1.5 * math.log(2) / math.log(3))


def test_tree_score_is_weighted_by_the_child_activations():
    # x0: child 0 one-hot (1) with a = 0.3, child 1 uniform (0) with a = 0.1
    # x1: child 0 (0.9, 0.1) but silent (a = 0), child 1 (0.9, 0.1) with a = 0.2
    c = t([[[1.0, 0.0], [0.5, 0.5]], [[0.9, 0.1], [0.9, 0.1]]])
    a = t([[0.3, 0.1], [0.0, 0.2]])
    expected = (0.3 * 1 + 0.1 * 0 + 0.0 * CERT_91 + 0.2 * CERT_91) / (0.3 + 0.1 + 0.0 + 0.2)
    assert probes.tree_score(c, a) == pytest.approx(expected, abs=1e-12)          # 0.677001
    assert probes.tree_score(c, torch.ones(2, 2, dtype=torch.float64)) == pytest.approx((1 + 2 * CERT_91) / 4)
    assert probes.tree_score(c, torch.zeros(2, 2, dtype=torch.float64)) is None   # nothing fires
    assert probes.tree_score(t([[[1.0], [1.0]]]), t([[1.0, 1.0]])) is None         # J = 1


def test_routing_dynamics_is_population_std_over_inputs():
    # c_00 = 0.2 then 0.6 -> std 0.2; c_01 = 0.8 then 0.4 -> 0.2
    assert probes.routing_dynamics(t([[[0.2, 0.8]], [[0.6, 0.4]]])) == pytest.approx(0.2, abs=1e-12)
    assert probes.routing_dynamics(t([[[0.3, 0.7]]] * 3)) == pytest.approx(0.0, abs=1e-12)


def test_permute_children_takes_each_childs_row_from_its_own_permutation():
    x = t([[1, 10], [2, 20], [3, 30]])                                 # (B=3, I=2)
    idx = torch.tensor([[2, 0], [0, 2], [1, 1]])
    torch.testing.assert_close(probes.permute_children(x, idx), t([[3, 10], [1, 30], [2, 20]]))
    y = torch.arange(3 * 2 * 2, dtype=torch.float64).view(3, 2, 2)    # trailing dims follow their row
    out = probes.permute_children(y, idx)
    torch.testing.assert_close(out[0, 0], y[2, 0])
    torch.testing.assert_close(out[1, 1], y[2, 1])


def parse_tree_layer(B=64, I=6, J=8, seed=0):
    """A layer and inputs whose children all agree on one parent per input: input b has class k = b % J,
    every child's pose is e_k, and W_ij's column k is 3 e_j when j == k (the same vote from every
    child: agreement) and a random vector of length 3 otherwise (votes that cancel)."""
    g = torch.Generator().manual_seed(seed)
    d = J
    layer = CapsuleLayer(I, d, J, d, routing="dynamic", iterations=3).double()
    rand = torch.randn(I, J, d, d, generator=g, dtype=torch.float64)
    rand = 3 * rand / rand.norm(dim=2, keepdim=True)                  # columns of length 3
    eye = torch.eye(J, dtype=torch.float64)
    agree = 3 * eye.view(1, J, J, 1) * eye.view(1, J, 1, J)           # W_ij[:, j] = 3 e_j
    mask = eye.view(1, J, 1, J).expand(I, J, d, J).bool()               # column k == j
    with torch.no_grad():
        layer.W.copy_(torch.where(mask, agree.expand(I, J, d, J), rand))
    k = torch.arange(B) % J
    u = eye[k].unsqueeze(1).expand(B, I, d).clone()                     # (B, I, d): e_k for every child
    return layer, u, u.norm(dim=-1)


def test_null_of_an_input_consistent_tree_is_below_the_trees_own_score():
    layer, u, a = parse_tree_layer()
    out = layer(u, a)
    score = probes.tree_score(out.coupling, a)
    gen = torch.Generator().manual_seed(probes.NULL_SEED)
    c_null, a_null = probes.routing_null(layer, u, a, gen)
    null = probes.tree_score(c_null, a_null)
    assert c_null.shape == out.coupling.shape
    torch.testing.assert_close(c_null.sum(-1), torch.ones(64, 6, dtype=torch.float64))
    print(f"tree_score {score:.3f}, null {null:.3f}")
    assert score > 0.5 and null < score - 0.2, (score, null)
    # the couplings follow the input's class: routing varies across inputs, more than under the null
    assert probes.routing_dynamics(out.coupling) > probes.routing_dynamics(c_null)
    # a plain shuffle of the couplings across inputs would be no null at all: the score is invariant
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(1))
    assert probes.tree_score(out.coupling[perm], a[perm]) == pytest.approx(score)
    # and the same generator seed gives the same null
    again, _ = probes.routing_null(layer, u, a, torch.Generator().manual_seed(probes.NULL_SEED))
    torch.testing.assert_close(again, c_null)


# ----------------------------------------------------------------------------------------------------
# activation statistics and the trace probes
# ----------------------------------------------------------------------------------------------------

def test_activation_stats_dead_and_frozen_fractions():
    # 3 inputs x 5 capsules
    act = t([[0.5, 0.500, 0.1, 0.0, 0.009],
             [0.5, 0.505, 0.2, 0.0, 0.0],
             [0.5, 0.495, 0.3, 0.0, 0.001]])
    mean, dead, frozen = probes.activation_stats(act, 0.01)
    assert mean == pytest.approx(float(act.mean()))
    assert dead == pytest.approx(2 / 5)          # capsules 3 (all 0) and 4 (peaks at 0.009 < tau)
    # capsule 0: std 0; capsule 1: population std 0.00408 <= 0.01 x 0.5; capsule 3: 0 <= 0.
    # capsule 2: std 0.0816 > 0.002; capsule 4: std 0.0040 > 0.01 x 0.00333
    assert frozen == pytest.approx(3 / 5)


def test_trace_probes_names_na_rules_and_worst_hidden_layer():
    layers = [
        trace([[0.5, 0.5], [0.5, 0.5]], gain=[[0.4, 0.4], [0.4, 0.4]]),                 # l0 primaries
        trace([[0.0, 0.3], [0.0, 0.2]], coupling=[[[1.0, 0.0], [1.0, 0.0]], [[1.0, 0.0], [1.0, 0.0]]],
              gain=[[0.1, 0.2], [0.3, 0.4]]),                                             # l1: half dead
        trace([[0.9, 0.1], [0.8, 0.2]], coupling=[[[0.5, 0.5], [0.5, 0.5]], [[0.5, 0.5], [0.5, 0.5]]]),
    ]
    nulls = {2: (t([[[0.9, 0.1], [0.9, 0.1]], [[0.5, 0.5], [0.5, 0.5]]]), t([[0.0, 0.3], [0.0, 0.2]]))}
    out = probes.trace_probes(layers, tau=0.01, nulls=nulls)
    assert set(out) == {
        "act_mean/l0", "dead_frac/l0", "frozen_frac/l0", "squash_gain/l0",
        "act_mean/l1", "dead_frac/l1", "frozen_frac/l1", "squash_gain/l1", "tree_score/l1",
        "routing_dynamics/l1",
        "act_mean/l2", "dead_frac/l2", "frozen_frac/l2", "tree_score/l2", "routing_dynamics/l2",
        "tree_score_null/l2", "routing_dynamics_null/l2",
        "dead_frac_max", "frozen_frac_max"}
    assert out["dead_frac/l1"] == pytest.approx(0.5) and out["dead_frac_max"] == pytest.approx(0.5)
    assert out["frozen_frac/l0"] == 1.0 and out["frozen_frac/l1"] == pytest.approx(0.5)
    assert out["frozen_frac_max"] == pytest.approx(0.5)                  # hidden layers only (l1)
    assert out["tree_score/l1"] == pytest.approx(1.0)
    assert out["tree_score/l2"] == pytest.approx(0.0, abs=1e-12)
    # the null's weights are its own (permuted) activations: x0 weighs only child 1 ... (0.3 * 0.531 +
    # 0.2 * 0) / 0.5; its couplings vary across x: std of 0.9/0.5 = 0.2 for every (i, j)
    assert out["tree_score_null/l2"] == pytest.approx(0.3 * CERT_91 / 0.5)
    assert out["routing_dynamics_null/l2"] == pytest.approx(0.2)
    assert out["squash_gain/l1"] == pytest.approx(0.25) and out["act_mean/l2"] == pytest.approx(0.5)


def test_routing_probes_are_absent_where_routing_cannot_act():
    c = [[[0.9, 0.1]], [[0.2, 0.8]]]
    alive = trace([[0.5], [0.4]], gain=[[0.4], [0.4]])
    # 1 iteration / uniform routing: routes is false
    out = probes.trace_probes([alive, trace([[0.5, 0.2], [0.1, 0.3]], c, routes=False)], 0.01)
    assert not any(k.startswith(("tree_score", "routing_dynamics")) for k in out)
    # a dead child layer: the couplings of silent children mean nothing
    dead = trace([[0.001], [0.002]], gain=[[0.0], [0.0]])
    out = probes.trace_probes([dead, trace([[0.5, 0.2], [0.1, 0.3]], c)], 0.01)
    assert "tree_score/l1" not in out and "routing_dynamics/l1" not in out
    # a dead parent layer
    out = probes.trace_probes([alive, trace([[0.001, 0.0], [0.0, 0.002]], c)], 0.01)
    assert "tree_score/l1" not in out and "routing_dynamics/l1" not in out
    # the same layer alive and routing: reported
    out = probes.trace_probes([alive, trace([[0.5, 0.2], [0.1, 0.3]], c)], 0.01)
    assert out["routing_dynamics/l1"] == pytest.approx(0.35)
    # depth 0: no hidden layer, nothing starved, dead or frozen among them
    assert out["dead_frac_max"] == 0.0 and out["frozen_frac_max"] == 0.0


# ----------------------------------------------------------------------------------------------------
# gradient probes
# ----------------------------------------------------------------------------------------------------

def test_gradient_probes_by_hand():
    # dL/dv per layer, B = 2 inputs; per-capsule act_grad_j = mean over x of ||g_j(x)||
    g0 = t([[[3e-6, 4e-6]], [[0.0, 1e-6]]])                 # 1 capsule: (5e-6 + 1e-6) / 2 = 3e-6
    g1 = t([[[1e-4, 0.0], [0.3, 0.4]], [[1e-4, 0.0], [0.0, 0.1]]])   # capsules: 1e-4 and 0.3
    g2 = t([[[1.0], [2.0], [0.0]], [[1.0], [2.0], [6.0]]])  # class layer: 1, 2, 3 -> median 2
    out = probes.gradient_probes([g0, g1, g2])
    assert out["act_grad/l0"] == pytest.approx(3e-6)
    assert out["act_grad/l1"] == pytest.approx((1e-4 + 0.3) / 2)
    assert out["act_grad/l2"] == pytest.approx(2.0)
    # starved: act_grad_j < 1e-3 x 2 = 2e-3
    assert out["starved_frac/l0"] == 1.0 and out["starved_frac/l1"] == 0.5 and out["starved_frac/l2"] == 0.0
    assert out["starved_frac_max"] == 0.5                   # hidden layers only (l1)
    assert out["grad_ratio"] == pytest.approx(0.150050 / 2.0)
    # depth 0: l1 is the class layer -> ratio 1, nothing hidden to starve
    d0 = probes.gradient_probes([g0, g2])
    assert d0["grad_ratio"] == 1.0 and d0["starved_frac_max"] == 0.0
    # a class layer without gradient: starved_frac has no yardstick and grad_ratio is 0/0 -> absent
    none = probes.gradient_probes([g0, torch.zeros_like(g1), torch.zeros_like(g2)])
    assert none["act_grad/l2"] == 0.0
    assert not any(k.startswith(("starved_frac", "grad_ratio")) for k in none)


def test_gradient_probe_norms_do_not_underflow_in_float32():
    g = torch.full((2, 3, 4), 1e-30)                         # ||g_j|| = 2e-30; g*g = 1e-60 is 0 in float32
    out = probes.gradient_probes([g, torch.ones(2, 3, 1)])
    assert out["act_grad/l0"] == pytest.approx(2e-30, rel=1e-6)


def test_grad_tracker_mean_of_last_k_steps_rms_and_float64_norms():
    w = [torch.nn.Parameter(torch.zeros(2, 2)), torch.nn.Parameter(torch.zeros(4, 4)),
         torch.nn.Parameter(torch.zeros(3))]
    tracker = probes.GradTracker(w, window=2)
    for scale in [100.0, 1.0, 3.0]:                          # the first step falls out of the window
        for l, p in enumerate(w):
            p.grad = torch.full(p.shape, scale * (l + 1))    # ||g||_F = scale (l + 1) sqrt(numel)
        tracker.record()
    out = tracker.summary()
    # mean over steps 2 and 3: scale 2
    assert out["grad_norm/l0"] == pytest.approx(2 * 1 * 2)
    assert out["grad_norm/l1"] == pytest.approx(2 * 2 * 4)
    assert out["grad_norm/l2"] == pytest.approx(2 * 3 * math.sqrt(3))
    for l in range(3):                                       # rms = the entries' size, whatever the shape
        assert out[f"grad_rms/l{l}"] == pytest.approx(2 * (l + 1))
    assert "grad_ratio" not in out                           # now act_grad/l1 / act_grad/l{L}
    tiny = probes.GradTracker([w[0]], window=1)
    w[0].grad = torch.full((2, 2), 1e-30)                    # float32 sum of squares: 0
    tiny.record()
    assert tiny.summary()["grad_norm/l0"] == pytest.approx(2e-30, rel=1e-6)


# ----------------------------------------------------------------------------------------------------
# the logged probes of collapsed networks against a float64 autograd reference
# ----------------------------------------------------------------------------------------------------

def reference_forward(net, x, y, recon_weight):
    """The tiny CapsNet (dynamic routing, decoder) written out in float64 with plain torch ops.

    Returns (loss, poses v_l, weights W_l). Independent of capsmodels' squash, safe_norm, routing
    Function and PrimaryCaps: norms are torch.linalg.vector_norm, routing is the textbook loop."""
    P = {k: v.detach().double().requires_grad_(True) for k, v in net.named_parameters()}
    x = x.double()

    def squash(s):
        n = torch.linalg.vector_norm(s, dim=-1, keepdim=True)
        return n * n / (1 + n * n) * s / n

    h = F.relu(F.conv2d(x, P["stem.0.weight"], P["stem.0.bias"]))
    conv = net.primary.conv
    s = F.conv2d(h, P["primary.conv.weight"], P["primary.conv.bias"], stride=conv.stride)
    B, _, H, W = s.shape
    K, D = net.primary.caps_channels, net.primary.dim
    v = squash(s.view(B, K, D, H, W).permute(0, 1, 3, 4, 2).reshape(B, K * H * W, D))
    poses, weights = [v], [P["primary.conv.weight"]]
    for l, layer in enumerate(net.caps):
        Wl = P[f"caps.{l}.W"]
        u_hat = torch.einsum("ijek,bik->bije", Wl, v)
        b = torch.zeros(u_hat.shape[:3], dtype=torch.float64)
        for r in range(layer.iterations):
            c = torch.softmax(b, dim=2)
            v = squash(torch.einsum("bij,bijd->bjd", c, u_hat))
            if r < layer.iterations - 1:
                b = b + torch.einsum("bijd,bjd->bij", u_hat, v)
        poses.append(v)
        weights.append(Wl)
    a = torch.linalg.vector_norm(v, dim=-1)
    T = F.one_hot(y, a.shape[1]).double()
    margin = (T * F.relu(0.9 - a) ** 2 + 0.5 * (1 - T) * F.relu(a - 0.1) ** 2).sum(1).mean()
    z = (v * T.unsqueeze(-1)).flatten(1)
    for i in (0, 2):
        z = F.relu(F.linear(z, P[f"decoder.{i}.weight"], P[f"decoder.{i}.bias"]))
    recon = torch.sigmoid(F.linear(z, P["decoder.4.weight"], P["decoder.4.bias"]))
    rec = ((recon - x.flatten(1)) ** 2).sum(1).mean()
    return margin + recon_weight * rec, poses, weights


def collapsed_net(depth, init_std):
    cfg = from_dict({"model": {"preset": "tiny", "depth": depth, "init": "std", "init_std": init_std}}).model
    torch.manual_seed(0)
    return build(cfg, (1, 28, 28), 10)


def test_weight_gradient_norms_of_a_collapsed_network_match_float64():
    """Depth 2, std init: class lengths ~1e-33 and weight gradients ~1e-31 are representable in
    float32 but their squares are not; the logged norms must be the float64 reference's, and > 0."""
    torch.manual_seed(1)
    x, y = torch.rand(8, 1, 28, 28), torch.arange(8)
    net = collapsed_net(2, 0.01)
    tracker = probes.GradTracker(net.layer_weights(), window=1)
    loss, _ = total_loss(net(x, y), x, y, 0.0005)
    loss.backward()
    tracker.record()
    logged = tracker.summary()
    ref_loss, _, weights = reference_forward(net, x, y, 0.0005)
    ref = [float(torch.linalg.norm(g)) for g in torch.autograd.grad(ref_loss, weights)]
    print("grad_norm", [f"{logged[f'grad_norm/l{l}']:.3e}" for l in range(4)], "reference",
          [f"{r:.3e}" for r in ref])
    assert max(ref) < 1e-25                                  # collapsed indeed
    for l, r in enumerate(ref):
        assert logged[f"grad_norm/l{l}"] > 0
        assert logged[f"grad_norm/l{l}"] == pytest.approx(r, rel=1e-3), l


def test_act_grad_of_a_collapsed_depth3_network_matches_float64():
    """Depth 3, init_std 1e-3: in float32 the class capsules are exactly 0 (training's gradient is
    truly 0 there); the probe pass is float64, and its act_grad must be the reference's, and > 0."""
    torch.manual_seed(2)
    x, y = torch.rand(16, 1, 28, 28), torch.arange(16) % 10
    net = collapsed_net(3, 1e-3)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with torch.no_grad():
        assert float(net(x).scores.abs().max()) == 0.0      # float32 underflow of the forward itself
    logged = probes.evaluation_probes(net, x, y, tau=0.01, recon_weight=0.0005)
    ref_loss, poses, _ = reference_forward(net, x, y, 0.0005)
    grads = torch.autograd.grad(ref_loss * len(y), poses)
    ref = [float(torch.linalg.vector_norm(g, dim=-1).mean(0).mean()) for g in grads]
    print("act_grad", [f"{logged[f'act_grad/l{l}']:.3e}" for l in range(5)], "reference",
          [f"{r:.3e}" for r in ref])
    assert ref[1] < 1e-80                                    # collapsed far below float32's range
    for l, r in enumerate(ref):
        assert logged[f"act_grad/l{l}"] > 0
        assert logged[f"act_grad/l{l}"] == pytest.approx(r, rel=1e-7), l
    assert logged["grad_ratio"] == pytest.approx(ref[1] / ref[-1], rel=1e-7)
    assert logged["starved_frac_max"] == 1.0
    for k, v in net.state_dict().items():                    # the model itself is untouched
        assert torch.equal(v, before[k]) and v.dtype == before[k].dtype
    assert all(p.grad is None for p in net.parameters())
