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
out. Their network has no activation: a linear head shared by the class capsules (their `final_fc`,
nn.Linear(D, 1)) reads the last poses. The margin loss and the probes need one in [0, 1] that the loss
reads THROUGH the pose (else the class poses get no gradient and `grad_ratio` has no denominator), so
here every layer has that head with a logistic: a_j = sigmoid(<w_a, v_j> + b_a), w_a (D,) drawn as
nn.Linear's default U(-1/sqrt(D), 1/sqrt(D)), b_a 0. No squash: the family returns s (the pre-norm
pose, whose length `init: data` fits) but the layer reports no `squash_gain` (registry `squashes`
False); docs/PROBES.md, "Routing families and remedies".

Schedule: `route` runs one layer's R passes before the next layer starts (sequential). The authors'
default is CONCURRENT (`PUBLISHED` below: every layer does pass r before any does pass r + 1, each
against the layer below's pass r - 1), run by capsmodels.networks.CapsNet with `model.schedule:
concurrent` through `step`; with `model.family_defaults: published` the family also starts as the
authors' code does (W std sqrt(J / (d_in I)), LayerNorm'd primaries). The optional pre-norm bias
(`model.bias`) is not in the authors' layer.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from capsmodels.registry import PublishedStart, RouteOptions, Routed, register_routing

LN_EPS = 1e-5        # nn.LayerNorm's default, as the authors' code


def attention_step(u_hat: torch.Tensor, v_prev: Optional[torch.Tensor], ln_weight: Optional[torch.Tensor] = None,
                   ln_bias: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None):
    """ONE pass: u_hat (B, I, J, D), v_prev (B, J, D) the parents' poses of the previous pass (None: the
    first pass, c = 1/J) -> (v, c, s) as `attention_routing`. The authors' `CapsuleFC.forward` with
    `next_capsule_value` None or given."""
    B, I, J, D = u_hat.shape
    if v_prev is None:
        c = u_hat.new_full((1, 1, 1), 1.0 / J).expand(B, I, J)
    else:                                                           # agreement with the last poses
        c = torch.softmax(torch.einsum("bijd,bjd->bij", u_hat, v_prev) / math.sqrt(D), dim=2)
    s = torch.einsum("bij,bijd->bjd", c, u_hat)
    if bias is not None:
        s = s + bias
    return F.layer_norm(s, (D,), ln_weight, ln_bias, LN_EPS), c, s


def attention_routing(u_hat: torch.Tensor, iterations: int, ln_weight: Optional[torch.Tensor] = None,
                      ln_bias: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None,
                      detach_inner: bool = False):
    """u_hat (B, I, J, D) -> (v (B, J, D) normalised poses, c (B, I, J) final couplings, s (B, J, D)
    the last pre-norm pose, bias included). ln_weight / ln_bias (D,) the LayerNorm's gain and offset
    (None: 1 and 0). iterations R >= 1 passes (`attention_step` R times, each against the last);
    R = 1 gives uniform couplings. detach_inner: u_hat is a constant in all but the last pass (as
    `dynamic`). This is one layer's routing run to the end before the next layer starts: the
    SEQUENTIAL schedule (the authors' `--sequential_routing`); the concurrent one is
    capsmodels.networks.CapsNet's."""
    if iterations < 1:
        raise ValueError(f"iterations: {iterations} is not allowed; must be >= 1")
    v = None
    for r in range(iterations):
        u = u_hat.detach() if (detach_inner and r < iterations - 1) else u_hat
        v, c, s = attention_step(u, v, ln_weight, ln_bias, bias)
    return v, c, s


def _attention_params(n_out: int, d_out: int) -> dict:
    """The LayerNorm's gain and offset (D,) (nn.LayerNorm's init) and the activation head w_a (D,),
    b_a (1,) (nn.Linear(D, 1)'s init), shared over the layer's parents as the authors' are."""
    bound = 1.0 / math.sqrt(d_out)
    return {"ln_weight": nn.Parameter(torch.ones(d_out)), "ln_bias": nn.Parameter(torch.zeros(d_out)),
            "act_weight": nn.Parameter(torch.empty(d_out).uniform_(-bound, bound)),
            "act_bias": nn.Parameter(torch.zeros(1))}


def attention_activation(v: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """v (B, J, D) -> a (B, J) = sigmoid(<w_a, v_j> + b_a): the authors' linear head, made a probability."""
    return torch.sigmoid(v @ weight + bias)


REPO = "apple/ml-capsules-inverted-attention-routing@53899ae"
PUBLISHED = PublishedStart(
    init="tsai", primary_norm="layernorm", schedule="concurrent",
    sources=(("init", f"{REPO} src/layers.py:107-109: CapsuleFC.w = sqrt(out_n / (in_d * in_n)) * randn"),
             ("primary_norm", f"{REPO} src/capsule_model.py:55,138: primaries = nn.LayerNorm(caps_dim)(conv "
                              "output), no squash (the squash is commented out); :45-51 the conv has no bias"),
             ("schedule", f"{REPO} main_capsule.py:36: --sequential_routing is a store_true flag, so the "
                          "default CapsModel(sequential_routing=False) routes concurrently, "
                          "src/capsule_model.py:141-158")))


def _attention_step(u_hat: torch.Tensor, a_in: torch.Tensor, layer, opts: RouteOptions,
                    prev: Optional[torch.Tensor]) -> Routed:
    """The registry's `step`: one pass against the layer's previous output poses `prev`."""
    v, c, s = attention_step(u_hat, prev, layer.ln_weight, layer.ln_bias, layer.bias)
    return Routed(v, attention_activation(v, layer.act_weight, layer.act_bias), c, s)


@register_routing("attention", params=_attention_params, squashes=False, published=PUBLISHED, step=_attention_step,
                  doc="inverted dot-product attention routing with LayerNorm (Tsai et al. 2020)")
def route_attention(u_hat: torch.Tensor, a_in: torch.Tensor, layer, opts: RouteOptions) -> Routed:
    """The registry's signature; child activations and the squash are not used (the paper has none)."""
    v, c, s = attention_routing(u_hat, opts.iterations, layer.ln_weight, layer.ln_bias, layer.bias,
                                opts.detach_inner)
    return Routed(v, attention_activation(v, layer.act_weight, layer.act_bias), c, s)
