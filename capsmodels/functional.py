"""Norms and squash non-linearities of capsules: the functions every capsule module shares.

Below routing and layers in the import chain (registry <- functional <- routing <- layers <- networks),
so the routing algorithms and the layers take the squash from here and neither imports the other's
internals. The kinds' names are the registry's (`SQUASHES`), which the schema checks too. No parameters, no state: plain functions of tensors (and `squash_length` of a float).
"""
from __future__ import annotations

import math

import torch

from capsmodels.registry import SQUASHES


def safe_norm(x: torch.Tensor, dim: int = -1, keepdim: bool = False) -> torch.Tensor:
    """||x|| along `dim`, right in value and gradient for any non-zero x however short; 0 at x = 0.

    A plain sqrt(sum x^2) in float32 squares a length of 1e-25 to 1e-50 = 0, and the old floor
    ||x||^2 >= 1e-12 passed back exactly 0 below ||x|| = 1e-6, so a collapsed layer looked like one
    with no gradient at all (docs/PROBES.md, "Numerics"). Here the true gradient x / ||x|| survives:
    - float32/16 x: the sum of squares is taken in float64, where the square of any float32 number
      (1e-45 .. 3e38) is a normal number: exact, as cheap as the plain form for capsule-sized vectors;
    - float64 x (the probe pass): m ||x / m|| with m = max_k |x_k| (detached: m ||x/m|| = ||x|| for
      every m > 0, so m carries no gradient); squaring x / m, whose largest entry is 1, cannot underflow.
    At x = 0 exactly the value is 0 and the gradient 0 (no NaN).
    """
    if x.dtype != torch.float64:
        xd = x.to(torch.float64)
        n2 = (xd * xd).sum(dim, keepdim=keepdim)                    # >= 2e-90 unless x = 0
        return n2.clamp_min(1e-300).sqrt().to(x.dtype)              # sqrt(1e-300) -> 0 in float32
    m = x.detach().abs().amax(dim, keepdim=True)                    # (..., 1, ...) largest entry
    zero = m == 0
    y = x / torch.where(zero, torch.ones_like(m), m)                # entries in [-1, 1]
    n = m * ((y * y).sum(dim, keepdim=True) + zero.to(y.dtype)).sqrt()   # sqrt(1) * 0 at x = 0
    return n if keepdim else n.squeeze(dim)


def squash(s: torch.Tensor, dim: int = -1, kind: str = "sabour") -> torch.Tensor:
    """Shrink s to a length in [0, 1) keeping its direction.

    sabour: ||s||^2 / (1 + ||s||^2) * s / ||s||   (Sabour et al. 2017), computed as s * ||s|| / (1 + ||s||^2)
    exp:    (1 - exp(-||s||)) * s / ||s||          (Mazzia et al. 2021, efficient CapsNet)
    tanh:   tanh(||s||) * s / ||s||
    The scale is computed in float64 from an exact ||s|| (see `safe_norm`), so a collapsed layer's
    ||s|| of 1e-9 gives sabour's true 1e-18 (the old floor read it as 1e-6) with the right gradient,
    and ||s|| up to float32's max squashes to length ~1 without overflowing ||s||^2. At s = 0 exactly
    the value is 0 and the gradient is the true slope there: 0 for sabour (v ~ ||s|| s), the identity
    for exp and tanh (v ~ s): ||s|| is floored at 1e-300 only there.
    """
    if kind not in SQUASHES:
        raise ValueError(f"squash kind {kind!r} is not allowed; choose one of {', '.join(SQUASHES)}")
    if s.dtype == torch.float64:
        n = safe_norm(s, dim, keepdim=True).clamp_min(1e-300)      # exact to float64's underflow
        n2 = n * n
    else:                                                           # float32's squares are normal float64s
        sd = s.to(torch.float64)
        n2 = (sd * sd).sum(dim, keepdim=True).clamp_min(1e-300)
        n = n2.sqrt()
    if kind == "sabour":
        scale = n / (1.0 + n2)
    elif kind == "exp":
        scale = -torch.expm1(-n) / n
    else:
        scale = torch.tanh(n) / n
    return s * scale.to(s.dtype)


def squash_length(x: float, kind: str = "sabour") -> float:
    """Length of squash(s) for ||s|| = x (a float): what a capsule of pre-squash length x outputs."""
    if kind == "sabour":
        return x * x / (1.0 + x * x)
    if kind == "exp":
        return 1.0 - math.exp(-x)
    if kind == "tanh":
        return math.tanh(x)
    raise ValueError(f"squash kind {kind!r} is not allowed; choose one of {', '.join(SQUASHES)}")


def squash_gain(s_norm: torch.Tensor) -> torch.Tensor:
    """||s|| / (1 + ||s||^2): the factor Sabour's squash scales s by, i.e. the slope it passes back.

    It peaks at 1/2 for ||s|| = 1 and falls like ||s|| for short vectors: the probe `squash_gain`.
    """
    return s_norm / (1.0 + s_norm * s_norm)
