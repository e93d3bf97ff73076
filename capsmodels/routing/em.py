"""EM routing (Hinton, Sabour, Frosst 2018) for fully connected capsule layers, registered as
`model.routing: em`. Shapes as in `capsmodels.routing`; votes are the predictions u_hat.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from capsmodels.registry import RouteOptions, Routed, register_routing


def em_lambda_schedule(iterations: int, lambda_final: float = 1.0) -> list:
    """Inverse temperature per iteration: rises linearly to lambda_final at the last M-step.

    The paper only says lambda increases over iterations; a linear ramp ending at a value of order 1
    pairs with the mass normalisation in `em_routing` (so the cost is O(pose size) for any layer width).
    """
    return [lambda_final * (t + 1) / iterations for t in range(iterations)]


def em_routing(votes: torch.Tensor, a_in: torch.Tensor, iterations: int, beta_u: torch.Tensor,
               beta_a: torch.Tensor, lambda_final: float = 1.0, eps: float = 1e-6,
               normalize_mass: bool = True, center_cost: bool = True):
    """EM routing for a fully connected capsule layer (Hinton, Sabour, Frosst 2018), vectorised.

    votes (B, I, J, P), a_in (B, I) child activations in [0, 1], beta_u / beta_a broadcastable to (J,).
    Each parent is a Gaussian with diagonal covariance over the P pose entries; R starts uniform (1/J).
      M-step: R'_ij = R_ij a_i;  mu_jh, sigma^2_jh = R'-weighted mean and variance of the votes;
              cost_jh = (beta_u + log sigma_jh) * m_j;  a_j = sigmoid(lambda_t (beta_a - sum_h cost_jh))
      E-step (between M-steps): R_ij = softmax_j(log a_j + log N(V_ij; mu_j, sigma_j^2)).
    m_j = sum_i R'_ij in the paper; with normalize_mass it is scaled by J / I, so that a uniform
    assignment of active children gives mass 1 whatever the layer's width (the paper's sum grows with I
    and saturates the sigmoid unless lambda is retuned per layer). With center_cost the total cost of
    each parent is taken relative to the mean over parents (as common public implementations normalise
    it): a common scale of all votes shifts every log sigma by the same amount, and without centring
    small votes (weights drawn with std 0.01) drive every activation to exactly 1.0 and its gradient to 0.
    normalize_mass=False, center_cost=False is the paper's formula.
    Returns pose mu (B, J, P), activations a_out (B, J), and R (B, I, J), the assignment probabilities
    used in the last M-step (the couplings; they sum to 1 over parents).
    """
    B, I, J, P = votes.shape
    scale = J / I if normalize_mass else 1.0
    a_in = a_in.unsqueeze(-1)                                       # (B, I, 1)
    r = votes.new_full((B, I, J), 1.0 / J)
    lambdas = em_lambda_schedule(iterations, lambda_final)
    for t in range(iterations):
        # M-step
        rp = r * a_in                                               # (B, I, J)
        mass = rp.sum(1)                                            # (B, J)
        w = rp / (mass.unsqueeze(1) + eps)                          # weights over children
        mu = torch.einsum("bij,bijp->bjp", w, votes)                # (B, J, P)
        diff2 = (votes - mu.unsqueeze(1)) ** 2                      # (B, I, J, P)
        var = torch.einsum("bij,bijp->bjp", w, diff2) + eps         # (B, J, P)
        cost = (beta_u.unsqueeze(-1) + 0.5 * torch.log(var)) * (mass * scale).unsqueeze(-1)
        cost = cost.sum(-1)                                         # (B, J)
        if center_cost:
            cost = cost - cost.mean(-1, keepdim=True)
        logit = lambdas[t] * (beta_a - cost)                        # (B, J)
        a_out = torch.sigmoid(logit)
        if t < iterations - 1:
            # E-step: log of a_j * N(V_ij | mu_j, sigma_j^2), normalised over parents j
            log_p = -0.5 * (diff2 / var.unsqueeze(1)).sum(-1) \
                    - 0.5 * torch.log(2 * math.pi * var).sum(-1).unsqueeze(1)   # (B, I, J)
            r = F.softmax(F.logsigmoid(logit).unsqueeze(1) + log_p, dim=2)   # log a_j, no underflow
    return mu, a_out, r


def _em_params(n_out: int, d_out: int) -> dict:
    """EM's learned cost offsets beta_u and activation thresholds beta_a, one per parent (J,)."""
    return {"beta_u": nn.Parameter(torch.zeros(n_out)), "beta_a": nn.Parameter(torch.zeros(n_out))}


@register_routing("em", params=_em_params, doc="EM routing (Hinton, Sabour, Frosst 2018)")
def route_em(u_hat: torch.Tensor, a_in: torch.Tensor, layer, opts: RouteOptions) -> Routed:
    """The registry's signature. No squash (s is None); the layer's bias is added to the output pose."""
    pose, a_out, r = em_routing(u_hat, a_in, opts.iterations, layer.beta_u, layer.beta_a)
    if layer.bias is not None:
        pose = pose + layer.bias
    return Routed(pose, a_out, r, None)
