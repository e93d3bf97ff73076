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
The consequence (docs/PROBES.md, "Routing families and remedies"): the same forward, but the gradients
differ. Here dL/dW_ij gets, beside the vote path, the logit path's (dL/db_ij) w_ij u_i^T, and
dL/dw_ij = (dL/db_ij) u_hat_ij scales with the votes' length, where the authors' dL/dW2_ij =
(dL/db_ij) u_i scales with the child's own; at the zero start of w the logit path adds nothing to
dL/dW, and the routing weights learn at a rate set by ||u_hat|| (about ||W|| ||u||) rather than ||u||.
`model.family_defaults: published` starts from the authors' W (init `hahn`) and primaries (BatchNorm'd
poses, sigmoid(BN(conv)) activations) but keeps this parametrisation. The optional bias (`model.bias`)
is not in the authors' layer.
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

from capsmodels.registry import PublishedStart, RouteOptions, Routed, register_routing


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


REPO = "coder3000/SR-CapsNet@7622d38"
PUBLISHED = PublishedStart(
    init="hahn", primary_norm="batchnorm",
    sources=(("init", f"{REPO} modules.py:232-233: W1 of shape (kkA, B*D, C) drawn by nn.init.kaiming_uniform_ "
                      "(a = 0): U(-b, b), b = sqrt(6 / fan_in) with torch's fan_in = size(1) * size(2) = "
                      "J * d_out * d_in; :235-239 the routing weights W2, b2 start at 0 (as here)"),
             ("primary_norm", f"{REPO} models/convnet.py:79-82,137-138 (models/smallnet.py:24-27,90-91): "
                              "pose = BatchNorm2d(conv_pose(x)), a = sigmoid(BatchNorm2d(conv_a(x))), both "
                              "convs without bias, no squash; utils.py:57-62 BatchNorm gain 1, offset 0")))


@register_routing("self", child_params=_self_params, iterative=False, published=PUBLISHED,
                  doc="self-routing, each child's own routing weights (Hahn et al. 2019)")
def route_self(u_hat: torch.Tensor, a_in: torch.Tensor, layer, opts: RouteOptions) -> Routed:
    """The registry's signature; `iterations` and the squash are not used."""
    v, a_out, c = self_routing(u_hat, a_in, layer.w_route, layer.b_route, layer.bias)
    return Routed(v, a_out, c, None)
