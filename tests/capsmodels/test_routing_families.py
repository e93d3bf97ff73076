"""The routing families attention (Tsai et al. 2020), self (Hahn et al. 2019) and efficient (Mazzia et
al. 2021): hand-worked values, independent NumPy loops written from the papers' equations, gradcheck,
and what the registry and the layer make of them."""
import math

import numpy as np
import pytest
import torch

from capsmodels import probes
from capsmodels.config import ConfigError, from_dict
from capsmodels.layers import CapsuleLayer
from capsmodels.routing import get_routing, routing_names
from capsmodels.routing import attention_activation, attention_routing, efficient_routing, self_routing

NEW = ("attention", "self", "efficient")


def np_squash(s, kind="sabour"):
    n = math.sqrt(float((s * s).sum()))
    if n == 0:
        return s * 0
    length = {"sabour": n * n / (1 + n * n), "exp": 1 - math.exp(-n), "tanh": math.tanh(n)}[kind]
    return s * length / n


def np_softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def np_layer_norm(s, g, b, eps=1e-5):
    m = sum(s) / len(s)
    var = sum((x - m) ** 2 for x in s) / len(s)
    return np.array([(x - m) / math.sqrt(var + eps) * gk + bk for x, gk, bk in zip(s, g, b)])


def np_attention(u, iterations, g, beta, bias=None):
    """Tsai et al. 2020 for one example, u (I, J, D): pass 1 uniform couplings, then agreement
    <u_ij, v_j> / sqrt(D) and a softmax over the parents j of each child i."""
    I, J, D = u.shape
    c = np.full((I, J), 1.0 / J)
    for r in range(iterations):
        if r > 0:
            for i in range(I):
                c[i] = np_softmax(np.array([u[i, j] @ v[j] / math.sqrt(D) for j in range(J)]))
        s = np.zeros((J, D))
        for j in range(J):
            for i in range(I):
                s[j] += c[i, j] * u[i, j]
            if bias is not None:
                s[j] += bias[j]
        v = np.stack([np_layer_norm(s[j], g, beta) for j in range(J)])
    return v, c.copy(), s


def np_self(u, a, w, b0, bias=None):
    """Hahn et al. 2019 for one example: logits from each child alone, a_j = sum_i c_ij a_i / sum_i a_i,
    v_j = sum_i c_ij a_i u_ij / sum_i c_ij a_i."""
    I, J, D = u.shape
    c = np.stack([np_softmax(np.array([w[i, j] @ u[i, j] + b0[i, j] for j in range(J)])) for i in range(I)])
    act, v = np.zeros(J), np.zeros((J, D))
    for j in range(J):
        mass = sum(c[i, j] * a[i] for i in range(I))
        act[j] = mass / sum(a)
        v[j] = sum(c[i, j] * a[i] * u[i, j] for i in range(I)) / mass
        if bias is not None:
            v[j] += bias[j]
    return v, act, c


def np_efficient(u, priors, bias=None, kind="sabour"):
    """Mazzia et al. 2021 for one example: A_j = U_j U_j^T / sqrt(D) formed explicitly, c = softmax over
    the parents of the row sums of A_j, s_j = sum_i u_ij (c_ij + p_ij), v = squash(s)."""
    I, J, D = u.shape
    logits = np.zeros((I, J))
    for j in range(J):
        A = np.array([[u[i, j] @ u[k, j] for k in range(I)] for i in range(I)]) / math.sqrt(D)
        logits[:, j] = A.sum(1)
    c = np.stack([np_softmax(logits[i]) for i in range(I)])
    s = np.zeros((J, D))
    for j in range(J):
        for i in range(I):
            s[j] += u[i, j] * (c[i, j] + priors[i, j])
        if bias is not None:
            s[j] += bias[j]
    return np.stack([np_squash(s[j], kind) for j in range(J)]), c, s


# ----------------------------------------------------------------------------------------------------
# hand-worked values
# ----------------------------------------------------------------------------------------------------

def test_attention_hand_worked_one_pass():
    """One pass: c = 1/2, s_0 = mean of (4, 0) and (2, 2) over 2 parents' share = (3, 1)/... :
    u_00 = (4, 0), u_10 = (2, 2): s_0 = (4+2, 0+2)/2 = (3, 1); LayerNorm: mean 2, var 1 ->
    (1, -1) / sqrt(1 + eps). Parent 1 gets (0, 0) votes: LayerNorm of a constant is 0."""
    u = torch.tensor([[[4.0, 0.0], [0.0, 0.0]], [[2.0, 2.0], [0.0, 0.0]]], dtype=torch.float64)[None]
    v, c, s = attention_routing(u, 1)
    k = 1 / math.sqrt(1 + 1e-5)
    np.testing.assert_allclose(s[0].numpy(), [[3.0, 1.0], [0.0, 0.0]])
    np.testing.assert_allclose(v[0].numpy(), [[k, -k], [0.0, 0.0]], atol=1e-12)
    np.testing.assert_allclose(c[0].numpy(), np.full((2, 2), 0.5))


def test_attention_hand_worked_second_pass():
    """Second pass of the example above: a_i0 = <u_i0, v_0> / sqrt(2) = 4k/sqrt2 (child 0), 0 (child 1);
    a_i1 = 0. So c_00 = sigmoid(4k/sqrt2), c_10 = 1/2."""
    u = torch.tensor([[[4.0, 0.0], [0.0, 0.0]], [[2.0, 2.0], [0.0, 0.0]]], dtype=torch.float64)[None]
    _, c, s = attention_routing(u, 2)
    k = 1 / math.sqrt(1 + 1e-5)
    c00 = 1 / (1 + math.exp(-4 * k / math.sqrt(2)))
    np.testing.assert_allclose(c[0].numpy(), [[c00, 1 - c00], [0.5, 0.5]], atol=1e-12)
    np.testing.assert_allclose(s[0, 0].numpy(), [4 * c00 + 1, 1.0], atol=1e-12)


def test_attention_activation_reads_the_pose():
    """a_j = sigmoid(<w_a, v_j> + b_a): v = (1, -1), w_a = (2, 1), b_a = 0.5 -> sigmoid(1.5); and the
    layer's act is that of its own pose, so the loss reaches the class layer's pose."""
    v = torch.tensor([[[1.0, -1.0]]], dtype=torch.float64)
    a = attention_activation(v, torch.tensor([2.0, 1.0], dtype=torch.float64),
                             torch.tensor([0.5], dtype=torch.float64))
    np.testing.assert_allclose(a.numpy(), [[1 / (1 + math.exp(-1.5))]])
    layer = CapsuleLayer(5, 3, 4, 3, routing="attention").double()
    out = layer(torch.randn(2, 5, 3, dtype=torch.float64))
    torch.testing.assert_close(out.act, attention_activation(out.pose, layer.act_weight, layer.act_bias))
    g, = torch.autograd.grad(out.act.sum(), out.pose)
    assert g.abs().min() > 0


def test_self_routing_hand_worked():
    """Zero routing weights: c = 1/2; a_j = (1/2)(1 + 3) / 4 = 1/2; v_j = the a-weighted mean of the
    votes: (1 * 2 + 3 * 6) / 4 = 5 for parent 0, (1 * 0 + 3 * 4) / 4 = 3 for parent 1."""
    u = torch.tensor([[[2.0], [0.0]], [[6.0], [4.0]]], dtype=torch.float64)[None]
    a = torch.tensor([[1.0, 3.0]], dtype=torch.float64)
    v, act, c = self_routing(u, a, torch.zeros(2, 2, 1, dtype=torch.float64), torch.zeros(2, 2, dtype=torch.float64))
    np.testing.assert_allclose(v[0].numpy(), [[5.0], [3.0]])
    np.testing.assert_allclose(act[0].numpy(), [0.5, 0.5])
    # a routing weight of 1 on child 1's vote for parent 1 (4): logits (0, 4) for child 1
    w = torch.zeros(2, 2, 1, dtype=torch.float64)
    w[1, 1, 0] = 1.0
    v, act, c = self_routing(u, a, w, torch.zeros(2, 2, dtype=torch.float64))
    c11 = 1 / (1 + math.exp(-4))
    np.testing.assert_allclose(c[0, 1].numpy(), [1 - c11, c11])
    np.testing.assert_allclose(act[0].numpy(), [(0.5 + 3 * (1 - c11)) / 4, (0.5 + 3 * c11) / 4])
    np.testing.assert_allclose(v[0, 1, 0].item(), 3 * c11 * 4 / (0.5 + 3 * c11))


def test_efficient_hand_worked():
    """I = J = 2, D = 1, both children vote 1 for parent 0 and 0 for parent 1: the row sums of A_0 are
    1 * (1 + 1) = 2, of A_1 0, so c_i0 = sigmoid(2); s_0 = 2 sigmoid(2) (+ priors 0), s_1 = 0."""
    u = torch.tensor([[[1.0], [0.0]], [[1.0], [0.0]]], dtype=torch.float64)[None]
    v, c, s = efficient_routing(u)
    c0 = 1 / (1 + math.exp(-2))
    np.testing.assert_allclose(c[0].numpy(), [[c0, 1 - c0], [c0, 1 - c0]])
    np.testing.assert_allclose(s[0].numpy(), [[2 * c0], [0.0]])
    n = 2 * c0
    np.testing.assert_allclose(v[0].numpy(), [[n * n / (1 + n * n)], [0.0]])


def test_self_routing_silent_children_give_zero_not_nan():
    u = torch.randn(1, 3, 2, 2)
    v, act, c = self_routing(u, torch.zeros(1, 3), torch.zeros(3, 2, 2), torch.zeros(3, 2))
    assert torch.equal(v, torch.zeros_like(v)) and torch.equal(act, torch.zeros_like(act))


# ----------------------------------------------------------------------------------------------------
# the NumPy loops on random inputs
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("iterations", [1, 2, 3])
@pytest.mark.parametrize("with_bias", [False, True])
def test_attention_matches_numpy_loop(iterations, with_bias):
    rng = np.random.default_rng(10 + iterations)
    u = rng.normal(size=(2, 5, 3, 4))                            # B=2, I=5, J=3, D=4
    g, beta = rng.normal(size=4), rng.normal(size=4)
    bias = rng.normal(size=(3, 4)) if with_bias else None
    v, c, s = attention_routing(torch.tensor(u), iterations, torch.tensor(g), torch.tensor(beta),
                                None if bias is None else torch.tensor(bias))
    for b in range(2):
        v_r, c_r, s_r = np_attention(u[b], iterations, g, beta, bias)
        np.testing.assert_allclose(v[b].numpy(), v_r, atol=1e-10)
        np.testing.assert_allclose(c[b].numpy(), c_r, atol=1e-12)
        np.testing.assert_allclose(s[b].numpy(), s_r, atol=1e-12)


@pytest.mark.parametrize("with_bias", [False, True])
def test_self_routing_matches_numpy_loop(with_bias):
    rng = np.random.default_rng(20)
    u = rng.normal(size=(3, 6, 4, 3))                            # B=3, I=6, J=4, D=3
    a = rng.uniform(0.05, 1.0, size=(3, 6))
    w, b0 = rng.normal(size=(6, 4, 3)), rng.normal(size=(6, 4))
    bias = rng.normal(size=(4, 3)) if with_bias else None
    v, act, c = self_routing(*(torch.tensor(t) for t in (u, a, w, b0)),
                             None if bias is None else torch.tensor(bias))
    for b in range(3):
        v_r, act_r, c_r = np_self(u[b], a[b], w, b0, bias)
        np.testing.assert_allclose(v[b].numpy(), v_r, atol=1e-12)
        np.testing.assert_allclose(act[b].numpy(), act_r, atol=1e-12)
        np.testing.assert_allclose(c[b].numpy(), c_r, atol=1e-12)
    assert np.allclose(act.sum(1).numpy(), 1.0)                  # activations sum to 1 over parents


@pytest.mark.parametrize("kind", ["sabour", "exp"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_efficient_matches_numpy_loop(kind, with_bias):
    rng = np.random.default_rng(30)
    u = rng.normal(scale=0.5, size=(2, 5, 3, 4))                 # B=2, I=5, J=3, D=4
    priors = rng.normal(scale=0.1, size=(5, 3))
    bias = rng.normal(size=(3, 4)) if with_bias else None
    v, c, s = efficient_routing(torch.tensor(u), torch.tensor(priors),
                                None if bias is None else torch.tensor(bias), kind)
    for b in range(2):
        v_r, c_r, s_r = np_efficient(u[b], priors, bias, kind)
        np.testing.assert_allclose(v[b].numpy(), v_r, atol=1e-12)
        np.testing.assert_allclose(c[b].numpy(), c_r, atol=1e-12)
        np.testing.assert_allclose(s[b].numpy(), s_r, atol=1e-12)


# ----------------------------------------------------------------------------------------------------
# gradients
# ----------------------------------------------------------------------------------------------------

def _f64(*shape, gen, low=None):
    t = torch.randn(*shape, dtype=torch.float64, generator=gen) if low is None else \
        torch.rand(*shape, dtype=torch.float64, generator=gen) + low
    return t.requires_grad_()


def test_attention_gradcheck():
    gen = torch.Generator().manual_seed(40)
    u, g, beta, bias = _f64(2, 4, 3, 3, gen=gen), _f64(3, gen=gen), _f64(3, gen=gen), _f64(3, 3, gen=gen)
    f = lambda u, g, beta, bias: attention_routing(u, 3, g, beta, bias)
    assert torch.autograd.gradcheck(f, (u, g, beta, bias), eps=1e-6, atol=1e-6)


def test_self_routing_gradcheck():
    gen = torch.Generator().manual_seed(41)
    u, a = _f64(2, 4, 3, 2, gen=gen), _f64(2, 4, gen=gen, low=0.1)
    w, b0, bias = _f64(4, 3, 2, gen=gen), _f64(4, 3, gen=gen), _f64(3, 2, gen=gen)
    assert torch.autograd.gradcheck(self_routing, (u, a, w, b0, bias), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", ["sabour", "exp"])
def test_efficient_gradcheck(kind):
    gen = torch.Generator().manual_seed(42)
    u, priors, bias = _f64(2, 4, 3, 3, gen=gen), _f64(4, 3, gen=gen), _f64(3, 3, gen=gen)
    f = lambda u, p, b: efficient_routing(u, p, b, kind)
    assert torch.autograd.gradcheck(f, (u, priors, bias), eps=1e-6, atol=1e-6)


def test_attention_detach_inner_changes_gradients_not_values():
    gen = torch.Generator().manual_seed(43)
    u = _f64(2, 5, 3, 4, gen=gen)
    w = torch.randn(2, 3, 4, dtype=torch.float64, generator=gen)
    (v0, _, _), (v1, _, _) = attention_routing(u, 3), attention_routing(u, 3, detach_inner=True)
    torch.testing.assert_close(v0, v1)
    g0, = torch.autograd.grad((v0 * w).sum(), u)
    g1, = torch.autograd.grad((v1 * w).sum(), u)
    assert (g0 - g1).abs().max() > 1e-3


# ----------------------------------------------------------------------------------------------------
# registry, layer, probes
# ----------------------------------------------------------------------------------------------------

def test_registered_and_validated():
    assert set(NEW) <= set(routing_names())
    for name in NEW:
        assert from_dict({"model": {"routing": name}}).model.routing == name
    assert get_routing("self").iterative is False and get_routing("efficient").iterative is False
    assert get_routing("attention").iterative is True
    with pytest.raises(ConfigError, match="model.routing: 'selfish' is not allowed; choose one of .*attention"):
        from_dict({"model": {"routing": "selfish"}})


@pytest.mark.parametrize("routing", NEW)
def test_layer_couplings_sum_to_one_and_shapes(routing):
    torch.manual_seed(44)
    layer = CapsuleLayer(7, 3, 5, 4, routing=routing, iterations=3, bias=True)
    with torch.no_grad():                                        # move the family's zero-start params
        for name, p in layer.named_parameters():
            if name not in ("W", "bias"):
                p.add_(torch.randn_like(p) * 0.3)
        layer.W.mul_(50)
    u = torch.randn(6, 7, 3)
    out = layer(u)
    assert out.pose.shape == (6, 5, 4) and out.act.shape == (6, 5) and out.coupling.shape == (6, 7, 5)
    torch.testing.assert_close(out.coupling.sum(2), torch.ones(6, 7))
    assert ((out.act >= 0) & (out.act <= 1)).all()
    assert out.coupling.std(0).mean() > 1e-3                     # couplings depend on the input
    assert (out.gain is None) == (routing in ("self", "attention"))     # no squash in either


@pytest.mark.parametrize("routing,iterations,routes", [
    ("attention", 1, False), ("attention", 2, True), ("self", 1, True), ("efficient", 1, True),
    ("dynamic", 1, False), ("uniform", 3, False)])
def test_routes_flag(routing, iterations, routes):
    assert CapsuleLayer(4, 2, 3, 2, routing=routing, iterations=iterations).routes is routes


def test_family_parameters_are_registered():
    names = lambda r: sorted(n for n, _ in CapsuleLayer(7, 3, 5, 4, routing=r).named_parameters())
    assert names("attention") == ["W", "act_bias", "act_weight", "ln_bias", "ln_weight"]
    assert names("self") == ["W", "b_route", "w_route"]
    assert names("efficient") == ["W", "priors"]
    layer = CapsuleLayer(7, 3, 5, 4, routing="self")
    assert layer.w_route.shape == (7, 5, 4) and layer.b_route.shape == (7, 5)


def test_self_routing_null_equals_the_statistic():
    """Self-routing's couplings of child i depend on child i's own vote alone, so the routing null
    (children permuted across inputs) just permutes each child's couplings: tree_score and
    routing_dynamics equal their nulls (docs/PROBES.md, "Routing families and remedies"). Efficient
    routing's couplings use the other children's votes, so its null differs."""
    torch.manual_seed(45)
    for routing, same in (("self", True), ("efficient", False)):
        layer = CapsuleLayer(6, 3, 4, 3, routing=routing)
        with torch.no_grad():
            for name, p in layer.named_parameters():
                p.add_(torch.randn_like(p) * (1.0 if name != "W" else 3.0))
            u = torch.randn(16, 6, 3)
            a = torch.rand(16, 6)
            c = layer.route(layer.predict(u), a).coupling
            gen = torch.Generator().manual_seed(0)
            c_null, _ = probes.routing_null(layer, u, a, gen)
            idx = torch.rand(16, 6, generator=torch.Generator().manual_seed(0)).argsort(0)
            permuted = probes.permute_children(c, idx)
        assert torch.allclose(c_null, permuted, atol=1e-6) is same
