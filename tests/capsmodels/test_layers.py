"""Squash variants, PrimaryCaps grouping and CapsuleLayer predictions against closed forms and loops."""
import math

import numpy as np
import pytest
import torch

from capsmodels.functional import safe_norm, squash, squash_gain, squash_length
from capsmodels.layers import CapsuleLayer, PrimaryCaps, fan_std
from capsmodels.routing import dynamic_routing_reference, uniform_routing

CLOSED = {
    "sabour": lambda n: n * n / (1 + n * n),
    "exp": lambda n: 1 - math.exp(-n),
    "tanh": lambda n: math.tanh(n),
}


@pytest.mark.parametrize("kind", ["sabour", "exp", "tanh"])
def test_squash_closed_form(kind):
    rng = np.random.default_rng(0)
    s = rng.normal(size=(5, 3, 4)) * rng.uniform(0.01, 10, size=(5, 3, 1))
    v = squash(torch.tensor(s), kind=kind).numpy()
    for idx in np.ndindex(5, 3):
        n = np.linalg.norm(s[idx])
        np.testing.assert_allclose(v[idx], CLOSED[kind](n) * s[idx] / n, rtol=1e-10)
    assert (np.linalg.norm(v, axis=-1) <= 1 + 1e-12).all()      # tanh reaches 1.0 in floating point


def test_squash_dim_argument():
    s = torch.tensor([[3.0, 0.0], [4.0, 0.0]], dtype=torch.float64)   # vectors along dim 0: (3,4), (0,0)
    v = squash(s, dim=0)
    np.testing.assert_allclose(v[:, 0].numpy(), [25 / 26 * 0.6, 25 / 26 * 0.8])   # n=5: 25/26 * s/5
    np.testing.assert_allclose(v[:, 1].numpy(), [0.0, 0.0])


@pytest.mark.parametrize("kind", ["sabour", "exp", "tanh"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_squash_at_zero_is_finite_with_finite_gradient(kind, dtype):
    s = torch.zeros(2, 3, 4, dtype=dtype, requires_grad=True)
    v = squash(s, kind=kind)
    assert torch.equal(v, torch.zeros_like(v))
    (g,) = torch.autograd.grad((v * torch.ones_like(v)).sum(), s)
    assert torch.isfinite(g).all()
    # the true slope at 0 is 0 for sabour (v ~ ||s|| s) and the identity for exp and tanh
    expected = 0.0 if kind == "sabour" else 1.0
    np.testing.assert_allclose(g.detach().numpy(), expected, atol=1e-5)


def test_squash_gain_and_length():
    n = torch.tensor([0.0, 0.5, 1.0, 2.0])
    np.testing.assert_allclose(squash_gain(n).numpy(), [0.0, 0.4, 0.5, 0.4], rtol=1e-6)
    assert squash_length(1.0) == 0.5 and squash_length(2.0, "sabour") == 0.8
    assert abs(squash_length(1.0, "exp") - (1 - math.exp(-1))) < 1e-12
    # the gain is what the squash scales s by: v = gain * s
    s = torch.tensor([[0.6, 0.8]]) * 3
    torch.testing.assert_close(squash(s), squash_gain(torch.tensor([[3.0]])) * s)


def test_primary_caps_grouping():
    """Identity 1x1 conv: capsule n = k*H*W + y*W + x must be channels k*D..k*D+D-1 at (y, x)."""
    K, D, H, W = 3, 4, 2, 5
    pc = PrimaryCaps(K * D, K, D, kernel=1, stride=1)
    with torch.no_grad():
        pc.conv.weight.copy_(torch.eye(K * D).view(K * D, K * D, 1, 1))
        pc.conv.bias.zero_()
    x = torch.randn(2, K * D, H, W, dtype=torch.float32)
    with torch.no_grad():
        v, s_norm, act = pc(x)
    assert v.shape == (2, K * H * W, D) and s_norm.shape == (2, K * H * W)
    torch.testing.assert_close(act, v.norm(dim=-1))
    for b in range(2):
        for k in range(K):
            for y in range(H):
                for xx in range(W):
                    n = k * H * W + y * W + xx
                    vec = x[b, k * D:(k + 1) * D, y, xx].numpy()
                    length = np.linalg.norm(vec)
                    np.testing.assert_allclose(s_norm[b, n].item(), length, rtol=1e-5)
                    np.testing.assert_allclose(v[b, n].numpy(), vec * length / (1 + length ** 2),
                                               rtol=1e-5, atol=1e-7)


def test_capsule_layer_predictions_match_loop():
    torch.manual_seed(0)
    layer = CapsuleLayer(5, 3, 4, 2, init_std=0.5).double()
    u = torch.randn(2, 5, 3, dtype=torch.float64)
    u_hat = layer.predict(u)
    assert u_hat.shape == (2, 5, 4, 2)
    W = layer.W.detach().numpy()
    for b in range(2):
        for i in range(5):
            for j in range(4):
                np.testing.assert_allclose(u_hat[b, i, j].detach().numpy(), W[i, j] @ u[b, i].numpy(),
                                           rtol=1e-12)


def test_uniform_layer_uses_fixed_couplings():
    """The layer's single-matmul shortcut equals uniform routing of the explicit predictions."""
    torch.manual_seed(1)
    layer = CapsuleLayer(6, 3, 4, 5, routing="uniform", bias=True, init_std=0.3).double()
    with torch.no_grad():
        layer.bias.normal_()
    u = torch.randn(3, 6, 3, dtype=torch.float64)
    out = layer(u)
    u_hat = torch.einsum("ijek,bik->bije", layer.W, u)
    v, c = uniform_routing(u_hat, layer.bias)
    torch.testing.assert_close(out.pose, v)
    torch.testing.assert_close(out.coupling, c)
    torch.testing.assert_close(out.act, v.norm(dim=-1))


@pytest.mark.parametrize("routing", ["dynamic", "em", "uniform"])
def test_capsule_layer_outputs(routing):
    torch.manual_seed(2)
    layer = CapsuleLayer(7, 4, 3, 5, routing=routing, iterations=2, bias=True, init="fan")
    u = torch.randn(2, 7, 4) * 0.3
    out = layer(u, u.norm(dim=-1))
    assert out.pose.shape == (2, 3, 5) and out.act.shape == (2, 3) and out.coupling.shape == (2, 7, 3)
    torch.testing.assert_close(out.coupling.sum(-1), torch.ones(2, 7))
    assert ((out.act >= 0) & (out.act <= 1)).all()
    assert (out.gain is None) == (routing == "em")
    out.act.sum().backward()
    assert layer.W.grad is not None and layer.W.grad.abs().sum() > 0


@pytest.mark.parametrize("kind", ["sabour", "tanh"])
def test_fan_init_keeps_lengths_near_one(kind):
    """Inputs of length squash_length(1) (what a layer at ||s|| = 1 emits) give ||s|| ~ 1 with fan
    init, while the public std 0.01 gives ||s|| ~ 0.14 rho (the start of the collapse)."""
    torch.manual_seed(3)
    I, d_in, J, d_out = 1152, 8, 10, 16
    rho = squash_length(1.0, kind)
    u = torch.nn.functional.normalize(torch.randn(64, I, d_in), dim=-1) * rho
    assert abs(fan_std(I, J, d_out, kind) - J / (rho * math.sqrt(I * d_out))) < 1e-12
    fan = CapsuleLayer(I, d_in, J, d_out, routing="uniform", init="fan", squash_kind=kind)
    std = CapsuleLayer(I, d_in, J, d_out, routing="uniform", init="std", init_std=0.01, squash_kind=kind)
    with torch.no_grad():
        s_fan = (u.reshape(64, -1) @ fan.W.permute(0, 3, 1, 2).reshape(I * d_in, -1)) / J
        s_std = (u.reshape(64, -1) @ std.W.permute(0, 3, 1, 2).reshape(I * d_in, -1)) / J
    ms_fan = s_fan.view(64, J, d_out).pow(2).sum(-1).mean().item()
    ms_std = s_std.view(64, J, d_out).pow(2).sum(-1).mean().item()
    assert 0.8 < ms_fan < 1.2
    expected_std = I * d_out * 0.01 ** 2 * rho ** 2 / J ** 2       # E||s||^2 for sigma = 0.01
    assert 0.8 * expected_std < ms_std < 1.2 * expected_std
    with torch.no_grad():                                          # the layer outputs ~ squash_length(1)
        assert abs(fan(u).act.mean().item() - rho) < 0.1
    scaled = CapsuleLayer(I, d_in, J, d_out, init="fan", init_scale=2.0, squash_kind=kind)
    assert abs(scaled.W.std().item() / fan.W.std().item() - 2.0) < 0.05


@pytest.mark.parametrize("scale", [1.0, 1e-5, 1e-12, 1e-25, 1e-35])
def test_safe_norm_value_and_gradient_for_tiny_vectors_in_float32(scale):
    """||x|| and its gradient x/||x|| against float64 numpy, for lengths down to 1e-35 in float32
    (a plain sum of squares is 0 below ~1e-19; the old floor ||x||^2 >= 1e-12 was wrong below 1e-6)."""
    rng = np.random.default_rng(0)
    x64 = rng.normal(size=(3, 5)) * scale
    x = torch.tensor(x64, dtype=torch.float32, requires_grad=True)
    n = safe_norm(x)
    ref = np.linalg.norm(x.detach().double().numpy(), axis=-1)        # of the float32 entries
    np.testing.assert_allclose(n.detach().double().numpy(), ref, rtol=1e-6)
    (g,) = torch.autograd.grad(n.sum(), x)
    np.testing.assert_allclose(g.double().numpy(), x.detach().double().numpy() / ref[:, None], rtol=1e-5)
    assert (n > 0).all()


def test_safe_norm_is_exactly_zero_at_zero_with_zero_gradient_and_keeps_dims():
    x = torch.zeros(2, 3, requires_grad=True)
    n = safe_norm(x, keepdim=True)
    assert n.shape == (2, 1) and torch.equal(n, torch.zeros(2, 1))
    (g,) = torch.autograd.grad(n.sum(), x)
    assert torch.equal(g, torch.zeros(2, 3))
    y = torch.tensor([[3.0, 0.0], [4.0, 0.0]])                        # along dim 0: (3, 4) and (0, 0)
    torch.testing.assert_close(safe_norm(y, dim=0), torch.tensor([5.0, 0.0]))


@pytest.mark.parametrize("kind", ["sabour", "exp", "tanh"])
def test_squash_of_short_vectors_in_float32_matches_float64(kind):
    """A collapsed layer's ||s|| of 1e-9 must give sabour's ||s||^2 = 1e-18, not 1e-6 * ||s|| as with
    the old floor; exp/tanh pass short vectors on nearly unchanged."""
    rng = np.random.default_rng(1)
    s64 = rng.normal(size=(4, 6)) * 1e-9
    s = torch.tensor(s64, dtype=torch.float32, requires_grad=True)
    v = squash(s, kind=kind)
    s_ref = s.detach().double()
    v_ref = squash(s_ref, kind=kind)
    n = np.linalg.norm(s_ref.numpy(), axis=-1, keepdims=True)
    # (1 - exp(-n) in float64 loses ~1e-7 of its value to cancellation at n = 1e-9: hence rtol 1e-6)
    np.testing.assert_allclose(v_ref.numpy(), np.vectorize(CLOSED[kind])(n) * s_ref.numpy() / n, rtol=1e-6)
    np.testing.assert_allclose(v.detach().double().numpy(), v_ref.numpy(), rtol=1e-5)
    # gradient: float32 against float64 autograd of the closed form
    w = torch.randn(4, 6, dtype=torch.float64)
    (g,) = torch.autograd.grad((v * w.float()).sum(), s)
    s_ref.requires_grad_(True)
    nn_ = torch.linalg.vector_norm(s_ref, dim=-1, keepdim=True)
    closed = {"sabour": nn_ * nn_ / (1 + nn_ * nn_), "exp": -torch.expm1(-nn_), "tanh": torch.tanh(nn_)}[kind]
    (g_ref,) = torch.autograd.grad((closed * s_ref / nn_ * w).sum(), s_ref)
    np.testing.assert_allclose(g.double().numpy(), g_ref.numpy(), rtol=1e-4, atol=1e-30)


@pytest.mark.parametrize("kind", ["sabour", "exp", "tanh"])
def test_squash_of_long_vectors_in_float32_has_length_one(kind):
    s = torch.tensor([[3e30, -4e30], [1e20, 0.0], [2.0, 0.0]], requires_grad=True)
    v = squash(s, kind=kind)
    expected = [1.0, 1.0, CLOSED[kind](2.0)]
    np.testing.assert_allclose(v.detach().norm(dim=-1).numpy(), expected, rtol=1e-6)
    np.testing.assert_allclose(v[0].detach().numpy(), [0.6, -0.8], rtol=1e-6)
    (g,) = torch.autograd.grad(v.sum(), s)
    assert torch.isfinite(g).all()


def test_bias_starts_at_bias_init_and_routes_flag():
    layer = CapsuleLayer(4, 3, 5, 2, bias=True)
    assert torch.equal(layer.bias.detach(), torch.full((5, 2), 0.1))    # Peer's and Sabour's 0.1
    assert torch.equal(CapsuleLayer(4, 3, 5, 2, bias=True, bias_init=-0.25).bias.detach(),
                       torch.full((5, 2), -0.25))
    assert CapsuleLayer(4, 3, 5, 2, bias=False).bias is None
    assert CapsuleLayer(4, 3, 5, 2, iterations=3).routes
    assert not CapsuleLayer(4, 3, 5, 2, iterations=1).routes
    assert not CapsuleLayer(4, 3, 5, 2, routing="uniform", iterations=3).routes
    assert CapsuleLayer(4, 3, 5, 2, routing="em", iterations=2).routes


@pytest.mark.parametrize("routing", ["dynamic", "em", "uniform"])
def test_route_of_the_predictions_is_the_forward_pass(routing):
    torch.manual_seed(4)
    layer = CapsuleLayer(6, 3, 4, 5, routing=routing, iterations=3, bias=True, init_std=0.5).double()
    u = torch.randn(2, 6, 3, dtype=torch.float64)
    a = torch.rand(2, 6, dtype=torch.float64)
    out = layer(u, a)
    again = layer.route(layer.predict(u), a)
    for x, y in zip(out, again):
        torch.testing.assert_close(x, y)
    if routing == "dynamic":                                            # and the readable reference loop
        u_hat = torch.einsum("ijek,bik->bije", layer.W, u)
        v, c, s = dynamic_routing_reference(u_hat, 3, layer.bias)
        torch.testing.assert_close(out.pose, v)
        torch.testing.assert_close(out.s_norm, s.norm(dim=-1))
    elif routing == "em":
        torch.testing.assert_close(out.s_norm, out.pose.norm(dim=-1))   # EM: the pose length
    else:                                   # the forward's matmul shortcut: s_j = sum_i u_hat_ij / J
        u_hat = torch.einsum("ijek,bik->bije", layer.W, u)
        s = u_hat.sum(1) / 4 + layer.bias
        torch.testing.assert_close(out.s_norm, s.norm(dim=-1))
        torch.testing.assert_close(out.coupling, torch.full((2, 6, 4), 0.25, dtype=torch.float64))


def test_unknown_routing_names_the_registered_families():
    with pytest.raises(ValueError, match="routing 'bogus' is not allowed; choose one of dynamic, em, uniform"):
        CapsuleLayer(6, 3, 4, 5, routing="bogus")
