"""No routing (the ablation): couplings fixed at 1/J, registered as `model.routing: uniform`.

Shapes as in `capsmodels.routing`. The layer's forward takes the shortcut (`_shortcut`): with fixed
couplings s_j = (1/J) sum_i W_ij u_i is one matmul of the inputs with the weights, and u_hat is never
made; `route_uniform` on materialised predictions is the definition it must agree with.
"""
from __future__ import annotations

from typing import Optional

import torch

from capsmodels.functional import safe_norm, squash
from capsmodels.registry import RouteOptions, Routed, register_routing


def _couplings(like: torch.Tensor, B: int, I: int, J: int) -> torch.Tensor:
    """c (B, I, J) = 1/J everywhere: an expanded view of one constant (no memory)."""
    return like.new_full((1, 1, 1), 1.0 / J).expand(B, I, J)


def uniform_routing_full(u_hat: torch.Tensor, bias: Optional[torch.Tensor] = None,
                         squash_kind: str = "sabour"):
    """s_j = (1/J) sum_i u_hat_ij (+ bias). Returns (v (B, J, D), c (B, I, J), s (B, J, D))."""
    B, I, J, D = u_hat.shape
    s = u_hat.sum(1) / J
    if bias is not None:
        s = s + bias
    return squash(s, kind=squash_kind), _couplings(u_hat, B, I, J), s


def uniform_routing(u_hat: torch.Tensor, bias: Optional[torch.Tensor] = None, squash_kind: str = "sabour"):
    """Couplings fixed at 1/J: s_j = (1/J) sum_i u_hat_ij (+ bias). Returns (v (B, J, D), c (B, I, J))."""
    v, c, _ = uniform_routing_full(u_hat, bias, squash_kind)
    return v, c


def _shortcut(u: torch.Tensor, layer, opts: RouteOptions) -> Routed:
    """u (B, I, d_in) -> the same result as `route_uniform(layer.predict(u), ...)` with one
    (B, I*d_in) @ (I*d_in, J*d_out) matmul and no u_hat."""
    B = u.shape[0]
    Wf = layer.W.permute(0, 3, 1, 2).reshape(layer.n_in * layer.d_in, layer.n_out * layer.d_out)
    s = (u.reshape(B, -1) @ Wf).view(B, layer.n_out, layer.d_out) / layer.n_out
    if layer.bias is not None:
        s = s + layer.bias
    v = squash(s, kind=opts.squash)
    return Routed(v, safe_norm(v), _couplings(u, B, layer.n_in, layer.n_out), s)


@register_routing("uniform", adaptive=False, shortcut=_shortcut, doc="couplings fixed at 1/J (no routing)")
def route_uniform(u_hat: torch.Tensor, a_in: torch.Tensor, layer, opts: RouteOptions) -> Routed:
    """The registry's signature; child activations are not used."""
    v, c, s = uniform_routing_full(u_hat, layer.bias, opts.squash)
    return Routed(v, safe_norm(v), c, s)
