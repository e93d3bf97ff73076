"""`model.init: data`: a data-dependent (LSUV-style) start for CapsNets. Definition: docs/PROBES.md.

Why measure: sabour's squash maps a short pre-squash vector of length x to about x^2, so a layer that
starts below ||s|| ~ 1 hands the next layer inputs shorter still and lengths collapse layer after
layer; `init: fan` derives its scale from an assumed input length (squash_length(1)) that the
primaries do not have (docs/PROBES.md, "Initialisation"). Here each capsule layer's weights are scaled,
in order from the primaries up, until the mean pre-squash length ||s|| measured on one training batch
equals `target` (Mishkin & Matas 2016, "All you need is a good init", do the same for activations'
variance). The layer's weights are drawn as for `init: std` first; only their scale is set here.

Deterministic: no random draws here; train.prepare passes a fixed seeded sample of IMAGES training
images (`capsmodels.train.fixed_batch`), so the same seed gives the same network.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from capsmodels.config import ConfigError

MAX_ITER = 20        # secant steps per layer; 2-4 are typical (exactly 1 for a linear layer)
REL_TOL = 1e-3       # stop when the measured mean ||s|| is within 0.1% of the target
MAX_STEP = 1e3       # one step scales the weights by at most this factor (or 1/MAX_STEP)
IMAGES = 1024        # train.prepare fits on this many training images (a seeded sample; all if fewer)


def fit_scale(tensors: list, measure: Callable[[], float], target: float) -> list[float]:
    """Scale `tensors` in place by one common factor alpha so that measure() == target.

    measure() must be positive and grow with alpha. Its value at alpha = 0 is the floor f (a layer's
    bias alone; 0 for the primary conv, whose bias is scaled too). Roughly m(alpha)^2 = f^2 + k alpha^2
    (the bias and the weighted votes add up in a random direction), so the search runs secant steps
    on log(m^2 - f^2) vs log alpha from the slope 2 that model predicts: exact in one step for a
    linear layer, 2-4 steps for routed ones (couplings sharpen as alpha grows). Returns the measured
    values in order; the tensors are left at the factor of the one nearest the target.
    Raises ValueError when the target is not above the floor: no factor reaches it.
    """
    base = [t.detach().clone() for t in tensors]

    def at(log_alpha: float) -> float:
        alpha = math.exp(log_alpha) if log_alpha > -math.inf else 0.0
        for t, b in zip(tensors, base):
            t.copy_(b * alpha)
        return float(measure())

    floor2 = at(-math.inf) ** 2
    if not target ** 2 > floor2 * (1 + REL_TOL):
        at(0.0)
        raise ValueError(f"the bias alone gives mean ||s|| = {math.sqrt(floor2):.4g} >= {target}")
    goal = math.log(target ** 2 - floor2)

    def excess(m: float) -> float:                                  # log(m^2 - f^2), the alpha^2 part
        return math.log(max(m * m - floor2, 1e-300))

    tried = [(0.0, at(0.0))]                                        # (log alpha, measured)
    slope = 2.0
    for _ in range(MAX_ITER):
        log_a, m = tried[-1]
        if not (m > 0 and math.isfinite(m)):
            raise ValueError(f"the measured mean ||s|| is {m}; cannot scale it to {target}")
        if abs(m / target - 1) < REL_TOL:
            break
        step = max(-math.log(MAX_STEP), min(math.log(MAX_STEP), (goal - excess(m)) / slope))
        new_m = at(log_a + step)
        new_slope = (excess(new_m) - excess(m)) / step
        # a point within 1% of the floor has no measurable alpha^2 part: its slope would be noise
        if min(m, new_m) ** 2 > 1.01 * floor2 and math.isfinite(new_slope) and new_slope > 0:
            slope = min(20.0, max(0.2, new_slope))
        tried.append((log_a + step, new_m))
    best = min(tried, key=lambda t: abs(math.log(t[1] / target)) if t[1] > 0 else math.inf)
    if best is not tried[-1]:
        at(best[0])
    return [m for _, m in tried]


def _chunks(n: int, size: int) -> list[slice]:
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def _mean(values: list[torch.Tensor]) -> float:
    """Mean over all entries of a list of tensors (chunks of one batch)."""
    return float(sum(v.sum() for v in values) / sum(v.numel() for v in values))


def _fit(l: int, tensors: list, measure: Callable[[], float], target: float) -> None:
    try:
        fit_scale(tensors, measure, target)
    except ValueError as e:
        raise ConfigError(f"model.init_target: {target} is not reachable at capsule layer l{l} with init "
                          f"data: {e}; use a larger init_target or a smaller bias_init") from None


@torch.no_grad()
def data_init(model: torch.nn.Module, x: torch.Tensor, target: float = 1.0, chunk: int = 256) -> list[float]:
    """Scale a CapsNet's capsule layers so each one's mean ||s|| over the images x equals `target`.

    Order: the primary conv (weight and bias together: s is linear in them, so one step is exact; not
    when `model.primary_norm` normalises the primaries' poses), then every CapsuleLayer W in turn, its
    input fixed by the layers below (already set). EM layers have no squash: their "||s||" is the
    output pose length ||mu_j (+ bias)|| (self-routing: ||v_j||; attention: the pre-LayerNorm ||s_j||).
    Each layer's input is what `CapsNet.pass_on` hands it (residual skips and pose_norm included), as in
    the forward. The bias (bias_init) is left as it is. x: (N, C, H, W) on the model's device, run `chunk` images at a time (memory as
    a training batch of that size, without gradients). Returns the mean ||s|| per layer l = 0..L at
    the end, on x.

    N matters more than it seems: the mean over one batch of 64 images differs from the population's
    by up to 20% at depth 6 (sabour, 28x28), because each layer's error passes on to the next with
    gain ~1 at ||s|| = 1 (sabour); 1024 images keep it within ~3% (docs/PROBES.md, "Initialisation").
    """
    parts = _chunks(len(x), chunk)
    primary = model.primary

    def primaries():
        return [primary(model.stem(x[p])) for p in parts]              # [PrimaryOut] per chunk

    if not primary.normalised():       # a LayerNorm'd or BatchNorm'd pose has no scale of the conv's to set
        _fit(0, [primary.conv.weight, primary.conv.bias], lambda: _mean([o.s_norm for o in primaries()]), target)
    outs = primaries()
    measured = [_mean([o.s_norm for o in outs])]
    routed = [torch.cat([o.pose for o in outs])]                       # (N, I, d) per layer, as forward
    u, a = model.pass_on(0, routed), torch.cat([o.act for o in outs])   # residual / pose_norm as forward
    for l, layer in enumerate(model.caps, start=1):
        def run(layer=layer, u=u, a=a):
            return [layer(u[p], a[p]) for p in parts]
        _fit(l, [layer.W], lambda run=run: _mean([o.s_norm for o in run()]), target)
        outs = run()
        measured.append(_mean([o.s_norm for o in outs]))
        routed.append(torch.cat([o.pose for o in outs]))
        u, a = model.pass_on(l, routed), torch.cat([o.act for o in outs])
    return measured
