"""Inverted dot-product attention routing (Tsai, Srivastava, Goh, Salakhutdinov, ICLR 2020), registered
as `model.routing: attention`. Shapes as in `capsmodels.routing`.

Checked against the authors' code (github.com/apple/ml-capsules-inverted-attention-routing,
src/layers.py `CapsuleFC.forward`, and src/capsule_model.py's sequential routing):
  pass 1:      c_ij = 1/J (softmax of zeros over parents), v_j = LayerNorm(sum_i c_ij u_hat_ij)
  passes 2..R: a_ij = <u_hat_ij, v_j> / sqrt(D),  c_ij = softmax_j(a_ij)  ("inverted": the softmax is
               over the PARENTS j of each child i, so children compete for nothing and each child
               spreads its vote over the parents that agree with it), v_j = LayerNorm(sum_i c_ij u_hat_ij)
LayerNorm over the D pose entries of each parent, with a learned gain and offset (D,) shared by the
layer's parents (their `nn.LayerNorm(out_d_capsules)`); the authors' dropout and matrix poses are left
out. Their network has no activation: a linear head reads the last poses. The margin loss and the
probes need one in [0, 1], so here a_j = squash_length(||s_j||) with s_j = sum_i c_ij u_hat_ij (+ bias)
the pose BEFORE the LayerNorm (whose output has length ~sqrt(D) whatever the input), squashed by
`model.squash`; s is returned as the squash input, so `squash_gain` reads ||s_j|| (docs/PROBES.md,
"Routing families and remedies").
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from capsmodels.functional import safe_norm, squash
from capsmodels.registry import RouteOptions, Routed, register_routing

LN_EPS = 1e-5        # nn.LayerNorm's default, as the authors' code


def attention_routing(u_hat: torch.Tensor, iterations: int, ln_weight: Optional[torch.Tensor] = None,
                      ln_bias: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None,
                      detach_inner: bool = False):
    """u_hat (B, I, J, D) -> (v (B, J, D) normalised poses, c (B, I, J) final couplings, s (B, J, D)
    the last pre-norm pose, bias included). ln_weight / ln_bias (D,) the LayerNorm's gain and offset
    (None: 1 and 0). iterations R >= 1 passes; R = 1 gives uniform couplings. detach_inner: u_hat is
    a constant in all but the last pass (as `dynamic`)."""
    if iterations < 1:
        raise ValueError(f"iterations: {iterations} is not allowed; must be >= 1")
    B, I, J, D = u_hat.shape
    c = u_hat.new_full((1, 1, 1), 1.0 / J).expand(B, I, J)
    for r in range(iterations):
        u = u_hat.detach() if (detach_inner and r < iterations - 1) else u_hat
        if r > 0:                                                   # agreement with the last poses
            c = torch.softmax(torch.einsum("bijd,bjd->bij", u, v) / math.sqrt(D), dim=2)
        s = torch.einsum("bij,bijd->bjd", c, u)
        if bias is not None:
            s = s + bias
        v = F.layer_norm(s, (D,), ln_weight, ln_bias, LN_EPS)
    return v, c, s


def _attention_params(n_out: int, d_out: int) -> dict:
    """The LayerNorm's gain and offset (D,), shared over the layer's parents (nn.LayerNorm's init)."""
    return {"ln_weight": nn.Parameter(torch.ones(d_out)), "ln_bias": nn.Parameter(torch.zeros(d_out))}


@register_routing("attention", params=_attention_params,
                  doc="inverted dot-product attention routing with LayerNorm (Tsai et al. 2020)")
def route_attention(u_hat: torch.Tensor, a_in: torch.Tensor, layer, opts: RouteOptions) -> Routed:
    """The registry's signature; child activations are not used (the paper's routing has none)."""
    v, c, s = attention_routing(u_hat, opts.iterations, layer.ln_weight, layer.ln_bias, layer.bias,
                                opts.detach_inner)
    return Routed(v, safe_norm(squash(s, kind=opts.squash)), c, s)
