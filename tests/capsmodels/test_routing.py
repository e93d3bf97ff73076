"""Routing algorithms against hand-worked values, independent numpy loops and finite differences."""
import math

import numpy as np
import pytest
import torch

from capsmodels.routing import (dynamic_routing, dynamic_routing_full, dynamic_routing_reference,
                                em_lambda_schedule, em_routing, uniform_routing)


def np_squash(s):
    n2 = float((s * s).sum())
    return s * (n2 / (1 + n2)) / math.sqrt(n2) if n2 > 0 else s * 0


def np_dynamic(u_hat, iterations, bias=None):
    """Independent loop version: u_hat (I, J, D) for one example. Returns (v (J, D), c (I, J))."""
    I, J, D = u_hat.shape
    b = np.zeros((I, J))
    for r in range(iterations):
        c = np.exp(b) / np.exp(b).sum(1, keepdims=True)
        v = np.zeros((J, D))
        for j in range(J):
            s = sum(c[i, j] * u_hat[i, j] for i in range(I))
            if bias is not None:
                s = s + bias[j]
            v[j] = np_squash(s)
        if r < iterations - 1:
            for i in range(I):
                for j in range(J):
                    b[i, j] += u_hat[i, j] @ v[j]
    return v, c


def sig(x):
    return 1 / (1 + math.exp(-x))


# u_hat[i, j]: both children vote (1, 0) for parent 0, and opposite votes (0, 1), (0, -1) for parent 1.
HAND = np.array([[[1.0, 0.0], [0.0, 1.0]],
                 [[1.0, 0.0], [0.0, -1.0]]])


def hand_worked(iterations):
    """Worked by hand: s_1 is always 0 (votes cancel), so v_1 = 0 and b_i1 stays 0; b_i0 grows by v_0[0].
    iteration 1: c = 1/2, s_0 = (1, 0), v_0 = (1/2, 0).
    iteration 2: b_i0 = 1/2, c_i0 = sig(1/2), s_0 = (2 sig(1/2), 0), v_0 = (n^2/(1+n^2), 0) with n = 2 sig(1/2).
    iteration 3: b_i0 = 1/2 + v_0[0], and the same again."""
    b0 = 0.0
    for r in range(iterations):
        c0 = sig(b0)
        n = 2 * c0
        v0 = n * n / (1 + n * n)
        b0 += v0
    return c0, v0


@pytest.mark.parametrize("iterations", [1, 2, 3])
def test_dynamic_routing_hand_worked(iterations):
    c0, v0 = hand_worked(iterations)
    assert iterations != 2 or abs(c0 - 0.6224593312) < 1e-9   # sigmoid(0.5), by hand
    v, c = dynamic_routing(torch.tensor(HAND)[None], iterations)
    np.testing.assert_allclose(v[0].numpy(), [[v0, 0.0], [0.0, 0.0]], atol=1e-6)
    np.testing.assert_allclose(c[0].numpy(), [[c0, 1 - c0], [c0, 1 - c0]], atol=1e-9)


@pytest.mark.parametrize("iterations", [1, 2, 3])
@pytest.mark.parametrize("with_bias", [False, True])
def test_dynamic_routing_matches_numpy_loop(iterations, with_bias):
    rng = np.random.default_rng(iterations)
    u_hat = rng.normal(size=(3, 5, 4, 3))                      # B=3, I=5, J=4, D=3
    bias = rng.normal(size=(4, 3)) if with_bias else None
    v, c = dynamic_routing(torch.tensor(u_hat), iterations,
                           None if bias is None else torch.tensor(bias))
    for bi in range(3):
        v_ref, c_ref = np_dynamic(u_hat[bi], iterations, bias)
        np.testing.assert_allclose(v[bi].numpy(), v_ref, atol=1e-10)
        np.testing.assert_allclose(c[bi].numpy(), c_ref, atol=1e-10)


def test_one_iteration_is_uniform_and_couplings_sum_over_parents():
    torch.manual_seed(0)
    u_hat = torch.randn(2, 7, 5, 4)
    _, c1 = dynamic_routing(u_hat, 1)
    assert torch.equal(c1, torch.full_like(c1, 0.2))
    _, c3 = dynamic_routing(u_hat, 3)
    assert c3.shape == (2, 7, 5)
    torch.testing.assert_close(c3.sum(2), torch.ones(2, 7))
    assert c3.std() > 0.01                                       # routing moved the couplings


@pytest.mark.parametrize("with_bias", [False, True])
def test_dynamic_routing_gradcheck(with_bias):
    torch.manual_seed(1)
    u_hat = torch.randn(2, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)
    if with_bias:
        f, inputs = (lambda u, b: dynamic_routing_full(u, 3, b)), (u_hat, bias)
    else:
        f, inputs = (lambda u: dynamic_routing_full(u, 3)), (u_hat,)
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-6)


def test_detach_inner_gradient_by_finite_differences():
    """detach_inner = the inner iterations see u_hat as a constant: the gradient is the partial derivative
    wrt the last iteration's u_hat only (bias still counts in every iteration). Central differences of
    the numpy loop with the two uses of u_hat split apart."""
    rng = np.random.default_rng(8)
    u_hat = rng.normal(size=(3, 2, 2))                          # I=3, J=2, D=2
    bias = rng.normal(size=(2, 2))
    w = rng.normal(size=(2, 2))

    def loss(u_inner, u_last, bias):
        I, J, D = u_last.shape
        b = np.zeros((I, J))
        for r in range(3):
            u = u_last if r == 2 else u_inner
            c = np.exp(b) / np.exp(b).sum(1, keepdims=True)
            v = np.stack([np_squash((c[:, j, None] * u[:, j]).sum(0) + bias[j]) for j in range(J)])
            b = b + np.einsum("ijd,jd->ij", u, v)
        return float((v * w).sum())

    def num_grad(f, x, h=1e-6):
        g = np.zeros_like(x)
        for idx in np.ndindex(x.shape):
            xp, xm = x.copy(), x.copy()
            xp[idx] += h
            xm[idx] -= h
            g[idx] = (f(xp) - f(xm)) / (2 * h)
        return g

    g_u = num_grad(lambda x: loss(u_hat, x, bias), u_hat)
    g_b = num_grad(lambda x: loss(u_hat, u_hat, x), bias)
    ut = torch.tensor(u_hat[None], requires_grad=True)
    bt = torch.tensor(bias, requires_grad=True)
    v, _ = dynamic_routing(ut, 3, bt, detach_inner=True)
    gu, gb = torch.autograd.grad((v[0] * torch.tensor(w)).sum(), (ut, bt))
    np.testing.assert_allclose(gu[0].numpy(), g_u, atol=1e-7)
    np.testing.assert_allclose(gb.numpy(), g_b, atol=1e-7)


def test_detach_inner_changes_gradients_not_values():
    torch.manual_seed(2)
    u_hat = torch.randn(2, 6, 4, 3, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 4, 3, dtype=torch.float64)
    grads = {}
    for det in (False, True):
        v, c, s = dynamic_routing_full(u_hat, 3, bias, det)
        grads[det] = torch.autograd.grad((v * w).sum(), (u_hat, bias))
        vr, cr, sr = dynamic_routing_reference(u_hat, 3, bias, det)  # plain autograd loop with .detach()
        gr = torch.autograd.grad((vr * w).sum(), (u_hat, bias))
        torch.testing.assert_close(v, vr)
        torch.testing.assert_close(c, cr.detach())
        for a, b in zip(grads[det], gr):
            torch.testing.assert_close(a, b)
        if det:
            torch.testing.assert_close(v, v_full)
        v_full = v
    assert (grads[True][0] - grads[False][0]).abs().max() > 1e-3


def test_fast_backward_matches_reference_for_all_outputs():
    """Gradients through v, the couplings c and s (the probes' inputs) equal the autograd loop's."""
    torch.manual_seed(3)
    u_hat = torch.randn(3, 5, 4, 2, dtype=torch.float64, requires_grad=True)
    for it in (1, 2, 4):
        out = dynamic_routing_full(u_hat, it)
        ref = dynamic_routing_reference(u_hat, it)
        ws = [torch.randn_like(t) for t in out]
        g = torch.autograd.grad(sum((t * w).sum() for t, w in zip(out, ws)), u_hat)[0]
        gr = torch.autograd.grad(sum((t * w).sum() for t, w in zip(ref, ws)), u_hat)[0]
        torch.testing.assert_close(g, gr)


def test_uniform_routing():
    rng = np.random.default_rng(4)
    u_hat = rng.normal(size=(2, 3, 4, 2))
    bias = rng.normal(size=(4, 2))
    v, c = uniform_routing(torch.tensor(u_hat), torch.tensor(bias))
    assert torch.equal(c, torch.full((2, 3, 4), 0.25, dtype=torch.float64))
    for bi in range(2):
        for j in range(4):
            np.testing.assert_allclose(v[bi, j].numpy(), np_squash(u_hat[bi, :, j].sum(0) / 4 + bias[j]))


# ----------------------------------------------------------------------------------------------------
# EM routing
# ----------------------------------------------------------------------------------------------------

def np_em(V, a, iterations, beta_u, beta_a, lambdas, normalize_mass, center_cost, eps=1e-6):
    """Loop reference of Hinton et al. 2018 EM routing for one example. V (I, J, P), a (I,)."""
    I, J, P = V.shape
    R = np.full((I, J), 1.0 / J)
    for t in range(iterations):
        mu = np.zeros((J, P)); var = np.zeros((J, P)); cost = np.zeros(J); act = np.zeros(J)
        for j in range(J):
            rp = R[:, j] * a
            m = rp.sum()
            w = rp / (m + eps)
            mu[j] = (w[:, None] * V[:, j]).sum(0)
            var[j] = (w[:, None] * (V[:, j] - mu[j]) ** 2).sum(0) + eps
            mass = m * (J / I if normalize_mass else 1.0)
            cost[j] = sum((beta_u[j] + math.log(math.sqrt(var[j, h]))) * mass for h in range(P))
        if center_cost:
            cost = cost - cost.mean()
        for j in range(J):
            act[j] = 1 / (1 + math.exp(-lambdas[t] * (beta_a[j] - cost[j])))
        if t < iterations - 1:
            for i in range(I):
                p = np.array([act[j] * np.prod(np.exp(-(V[i, j] - mu[j]) ** 2 / (2 * var[j]))
                                               / np.sqrt(2 * math.pi * var[j])) for j in range(J)])
                R[i] = p / p.sum()
    return mu, act, R


@pytest.mark.parametrize("iterations", [1, 2, 3])
@pytest.mark.parametrize("paper", [True, False])
def test_em_matches_numpy_reference(iterations, paper):
    rng = np.random.default_rng(5)
    V = rng.normal(scale=0.5, size=(2, 6, 3, 4))              # B=2, I=6, J=3, P=4
    a = rng.uniform(0.2, 1.0, size=(2, 6))
    bu, ba = rng.normal(size=3), rng.normal(size=3)
    lambdas = [(t + 1) / iterations for t in range(iterations)]   # the documented linear ramp to 1
    assert em_lambda_schedule(iterations, 1.0) == lambdas
    mu, act, r = em_routing(torch.tensor(V), torch.tensor(a), iterations, torch.tensor(bu),
                            torch.tensor(ba), normalize_mass=not paper, center_cost=not paper)
    for bi in range(2):
        mu_r, act_r, r_r = np_em(V[bi], a[bi], iterations, bu, ba, lambdas, not paper, not paper)
        np.testing.assert_allclose(mu[bi].numpy(), mu_r, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(act[bi].numpy(), act_r, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(r[bi].numpy(), r_r, rtol=1e-9, atol=1e-12)


def test_em_assignments_sum_to_one_and_activations_in_unit_interval():
    torch.manual_seed(6)
    V, a = torch.randn(4, 9, 5, 16, dtype=torch.float64), torch.rand(4, 9, dtype=torch.float64)
    mu, act, r = em_routing(V, a, 3, torch.zeros(5, dtype=V.dtype), torch.zeros(5, dtype=V.dtype))
    assert mu.shape == (4, 5, 16) and act.shape == (4, 5) and r.shape == (4, 9, 5)
    torch.testing.assert_close(r.sum(2), torch.ones(4, 9, dtype=V.dtype))
    assert ((act > 0) & (act < 1)).all()


def test_em_gradcheck():
    torch.manual_seed(7)
    V = torch.randn(2, 4, 3, 2, dtype=torch.float64, requires_grad=True)
    a = torch.rand(2, 4, dtype=torch.float64).add(0.1).requires_grad_()
    bu = torch.randn(3, dtype=torch.float64, requires_grad=True)
    ba = torch.randn(3, dtype=torch.float64, requires_grad=True)
    f = lambda V, a, bu, ba: em_routing(V, a, 3, bu, ba)
    assert torch.autograd.gradcheck(f, (V, a, bu, ba), eps=1e-6, atol=1e-5)
