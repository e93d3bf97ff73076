"""Self-routing (Hahn, Pyeon, Kim, NeurIPS 2019), registered as `model.routing: self`. Shapes as in
`capsmodels.routing`.

Checked against the authors' code (github.com/coder3000/SR-CapsNet, modules.py `SelfRouting2d`, here
fully connected): each child routes on its own, with no agreement between children and no iterations,
  b_ij = <w_ij, u_hat_ij> + b0_ij            routing logits, w (I, J, D) and b0 (I, J) learned, both 0 at
                                             the start (their W2, b2: `nn.init.constant_(..., 0)`)
  c_ij = softmax_j(b_ij)
  a_j  = sum_i c_ij a_i / sum_i a_i          parent activation (their `ar_sum / a.sum`)
  v_j  = sum_i c_ij a_i u_hat_ij / sum_i c_ij a_i   (+ the layer's bias)
One difference, forced by the registry's signature (a family sees the predictions u_hat, not the child
poses u): the authors' logits are W2_i u_i, a linear map of the child's INPUT pose; here they are a
linear map of its predictions, <w_ij, u_hat_ij> = (W_ij^T w_ij) . u_i, which is again linear in u_i
(every such map when d_out >= d_in and W_ij has full rank), parametrised through W_ij.
No squash: s is None (the layer reports ||v_j|| as the pre-squash length and no squash gain).
Activations sum to 1 over the parents (sum_j c_ij = 1), so a layer of J capsules averages 1/J, and at
the zero start every parent has exactly a_j = 1/J. Routing null: child i's couplings depend on child
i alone, so re-routing children permuted across inputs gives the same statistics (docs/PROBES.md,
"Routing families and remedies").
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from capsmodels.registry import RouteOptions, Routed, register_routing


def _safe_div(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num / den with den floored at the dtype's smallest normal number: 0 (not NaN) where every
    child is silent (a collapsed layer below: a_i = 0 exactly)."""
    return num / den.clamp_min(torch.finfo(den.dtype).tiny)


def self_routing(u_hat: torch.Tensor, a_in: torch.Tensor, w_route: torch.Tensor, b_route: torch.Tensor,
                 bias: Optional[torch.Tensor] = None):
    """u_hat (B, I, J, D), a_in (B, I) >= 0, w_route (I, J, D), b_route (I, J) ->
    (v (B, J, D), a_out (B, J), c (B, I, J))."""
    c = torch.softmax(torch.einsum("bijd,ijd->bij", u_hat, w_route) + b_route, dim=2)
    ca = c * a_in.unsqueeze(-1)                                     # (B, I, J)
    mass = ca.sum(1)                                                # (B, J)
    a_out = _safe_div(mass, a_in.sum(1, keepdim=True))
    v = _safe_div(torch.einsum("bij,bijd->bjd", ca, u_hat), mass.unsqueeze(-1))
    if bias is not None:
        v = v + bias
    return v, a_out, c


def _self_params(n_in: int, n_out: int, d_out: int) -> dict:
    """Per-child routing weights w (I, J, D) and offsets b0 (I, J), both 0: uniform couplings at the
    start, as the authors' code."""
    return {"w_route": nn.Parameter(torch.zeros(n_in, n_out, d_out)),
            "b_route": nn.Parameter(torch.zeros(n_in, n_out))}


@register_routing("self", child_params=_self_params, iterative=False,
                  doc="self-routing, each child's own routing weights (Hahn et al. 2019)")
def route_self(u_hat: torch.Tensor, a_in: torch.Tensor, layer, opts: RouteOptions) -> Routed:
    """The registry's signature; `iterations` and the squash are not used."""
    v, a_out, c = self_routing(u_hat, a_in, layer.w_route, layer.b_route, layer.bias)
    return Routed(v, a_out, c, None)
