"""Probes: the per-layer measurements the research question needs (DESIGN.md, "Probes").

Names are stable because analysis and MLflow dashboards key on them. Layer index l counts capsule
layers from the primaries: l0 = PrimaryCaps, l1..l{depth} = hidden layers, l{depth+1} = class capsules.

Two kinds of probe:
- gradient norms, accumulated during training by `GradTracker` (read from `.grad` after backward,
  so no extra forward/backward passes and no change to the optimiser's trajectory);
- activation/routing statistics, computed by `routing_probes` from the layer traces of one forward
  pass over a fixed evaluation batch D, under `torch.no_grad` with the RNG state forked, so training
  is bit-for-bit the same with or without the probes.
"""
from __future__ import annotations

import math
from collections import deque
from typing import Sequence

import torch


def coupling_entropy_score(c: torch.Tensor) -> torch.Tensor:
    """tree_score = mean over x, i of 1 - H(c_i.(x)) / log J.

    c: (B, n_in, J) couplings, rows summing to 1 over the J parents. 1 means every child sends all of
    its output to one parent (a parse tree), 0 means uniform couplings (no structure). 0 log 0 = 0.
    """
    J = c.shape[-1]
    if J < 2:
        return torch.tensor(float("nan"))
    plogp = torch.where(c > 0, c * torch.log(c.clamp_min(1e-30)), torch.zeros_like(c))
    entropy = -plogp.sum(-1)                               # (B, n_in)
    return (1.0 - entropy / math.log(J)).mean()


def routing_dynamics(c: torch.Tensor) -> torch.Tensor:
    """Mean over i, j of the std over inputs x of c_ij(x) (population std, ddof=0).

    c: (B, n_in, J). 0 means the routing is the same for every input: a static, input-independent
    assignment, which is what Mitterreiter et al. report for trained CapsNets.
    """
    return c.std(dim=0, unbiased=False).mean()


def activation_stats(act: torch.Tensor, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(act_mean, dead_frac) of one layer. act: (B, n) activations a_j(x) = ||v_j(x)||.

    act_mean = mean over x, j of a_j(x); dead_frac = fraction of capsules j whose activation never
    reaches tau on the evaluation batch: max over x of a_j(x) < tau.
    """
    return act.mean(), (act.max(dim=0).values < tau).float().mean()


def routing_probes(layers: Sequence, tau: float) -> dict[str, float]:
    """All trace-based probes of one forward pass. `layers`: list of LayerTrace (act, coupling, gain)."""
    out: dict[str, float] = {}
    for l, tr in enumerate(layers):
        act_mean, dead = activation_stats(tr.act.detach().float(), tau)
        out[f"act_mean/l{l}"] = float(act_mean)
        out[f"dead_frac/l{l}"] = float(dead)
        if tr.gain is not None:
            out[f"squash_gain/l{l}"] = float(tr.gain.detach().float().mean())
        if tr.coupling is not None:
            c = tr.coupling.detach().float()
            score = coupling_entropy_score(c)
            if not torch.isnan(score):
                out[f"tree_score/l{l}"] = float(score)
            out[f"routing_dynamics/l{l}"] = float(routing_dynamics(c))
    if len(layers) >= 2:
        # worst hidden layer (l1..l{depth}); the shallow CapsNet has none, so nothing is starved
        hidden = [out[f"dead_frac/l{l}"] for l in range(1, len(layers) - 1)]
        out["dead_frac_max"] = max(hidden) if hidden else 0.0
    return out


class GradTracker:
    """Frobenius norms ||dL/dW_l||_F of each capsule layer, averaged over the last K steps.

    Call `record()` after `loss.backward()` and before `optimizer.step()`/`zero_grad()`. One fused
    `torch.stack` of per-tensor norms per step keeps the cost negligible next to the step itself.
    """

    def __init__(self, weights: Sequence[torch.Tensor], window: int):
        self.weights = list(weights)
        self.window: deque = deque(maxlen=window)

    def record(self) -> None:
        norms = [w.grad.detach().norm() if w.grad is not None else torch.zeros((), device=w.device)
                 for w in self.weights]
        if norms:
            self.window.append(torch.stack(norms).float())     # on the device: no wait per step

    def summary(self) -> dict[str, float]:
        """grad_norm/l{l} and grad_ratio (first routed layer l1 over the last, l{L}); empty if no steps."""
        if not self.window:
            return {}
        mean = torch.stack(list(self.window)).mean(0)
        out = {f"grad_norm/l{l}": float(v) for l, v in enumerate(mean)}
        if len(mean) >= 2:
            first, last = float(mean[1]), float(mean[-1])
            out["grad_ratio"] = first / last if last > 0 else float("nan")
        return out

    def reset(self) -> None:
        self.window.clear()


def evaluation_probes(model: torch.nn.Module, x_eval: torch.Tensor, tau: float) -> dict[str, float]:
    """Trace probes on the fixed evaluation batch, leaving training state and RNG untouched."""
    was_training = model.training
    devices = [x_eval.device] if x_eval.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        model.eval()
        out = model(x_eval)
        probes = routing_probes(out.layers, tau)
    model.train(was_training)
    return probes
