"""Efficient-CapsNet's self-attention routing (Mazzia, Salvetti, Chiaberge 2021), registered as
`model.routing: efficient`. Shapes as in `capsmodels.routing`.

Checked against the authors' code (github.com/EscVM/Efficient-CapsNet, utils/layers.py `FCCaps.call`):
  A_j   = U_j U_j^T / sqrt(D)           agreement (I, I) between the children's votes for parent j
  c_ij  = softmax_j(sum_k A_j[i, k])    softmax over the PARENTS (their axis=1 of (B, J, I, 1))
  s_j   = sum_i u_hat_ij (c_ij + p_ij)  (+ the layer's bias), p (I, J) the learned priors (their `b`,
                                        zero at the start)
  v_j   = squash(s_j)
One pass, no iterations. sum_k A_j[i, k] = <u_hat_ij, sum_k u_hat_kj> / sqrt(D), so the (I, I)
matrices are never formed. The authors' squash is `model.squash: exp` ((1 - e^-||s||) s/||s||); the
family uses whatever `model.squash` says; `model.family_defaults: published` sets it, and the authors'
W init (`mazzia`). The optional bias (`model.bias`) is not in the authors' layer. Couplings returned
are c (sum 1 over parents); the weights that really multiply the votes are c + p, which need not
(docs/PROBES.md, "Routing families and remedies").
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn

from capsmodels.functional import safe_norm, squash
from capsmodels.registry import PublishedStart, RouteOptions, Routed, register_routing


def efficient_routing(u_hat: torch.Tensor, priors: Optional[torch.Tensor] = None,
                      bias: Optional[torch.Tensor] = None, squash_kind: str = "sabour"):
    """u_hat (B, I, J, D), priors (I, J) or None -> (v (B, J, D), c (B, I, J), s (B, J, D))."""
    D = u_hat.shape[-1]
    total = u_hat.sum(1)                                            # (B, J, D): sum_k u_hat_kj
    c = torch.softmax(torch.einsum("bijd,bjd->bij", u_hat, total) / math.sqrt(D), dim=2)
    w = c if priors is None else c + priors
    s = torch.einsum("bij,bijd->bjd", w, u_hat)
    if bias is not None:
        s = s + bias
    return squash(s, kind=squash_kind), c, s


def _efficient_params(n_in: int, n_out: int, d_out: int) -> dict:
    """The priors p (I, J), zero at the start as the authors' `tf.zeros_initializer()`."""
    return {"priors": nn.Parameter(torch.zeros(n_in, n_out))}


REPO = "EscVM/Efficient-CapsNet@4b337f5"
PUBLISHED = PublishedStart(
    init="mazzia", squash="exp",
    sources=(("init", f"{REPO} utils/layers.py:158,168: FCCaps.W of shape (J, I, d_in, d_out) drawn by Keras' "
                      "he_normal: a normal truncated at 2 sigma' with sigma' = sqrt(2 / fan_in) / 0.8796 (its "
                      "std sqrt(2 / fan_in)), Keras' fan_in = d_in * J * I for this 4-d kernel; :169 priors b "
                      "start at 0 (as here)"),
             ("squash", f"{REPO} utils/layers.py:76-78: squash (1 - 1/e^||s||) s/||s|| (`exp`), applied to "
                        "the primaries (:131) and the FCCaps output (:181)")))


@register_routing("efficient", child_params=_efficient_params, iterative=False, published=PUBLISHED,
                  doc="Efficient-CapsNet self-attention routing (Mazzia et al. 2021)")
def route_efficient(u_hat: torch.Tensor, a_in: torch.Tensor, layer, opts: RouteOptions) -> Routed:
    """The registry's signature; child activations and `iterations` are not used."""
    v, c, s = efficient_routing(u_hat, layer.priors, layer.bias, opts.squash)
    return Routed(v, safe_norm(v), c, s)
