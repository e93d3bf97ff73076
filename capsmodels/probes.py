"""Probes: the per-layer measurements the research question needs. Definitions: docs/PROBES.md.

Names are stable because analysis and MLflow dashboards key on them. Layer index l counts capsule
layers from the primaries: l0 = PrimaryCaps, l1..l{depth} = hidden layers, l{L} = l{depth+1} the
class capsules (the CNN control has the same layout: capsmodels.networks.CNN). A probe that cannot
say anything (n/a) is left out of the result, never reported as 0 or NaN.

Three kinds of probe:
- weight-gradient norms, accumulated during training by `GradTracker` from `.grad` after backward
  (no extra passes, the optimiser's trajectory unchanged): grad_norm/l{l}, grad_rms/l{l};
- activation-gradient probes on the fixed evaluation batch D (`gradient_probes`): one extra
  forward + backward of the training loss w.r.t. each layer's output poses: act_grad/l{l},
  starved_frac/l{l}, starved_frac_max, grad_ratio;
- activation and routing statistics of the same forward (`trace_probes`), routing ones against a
  null that re-routes predictions shuffled across inputs (`routing_null`), and on the `parts` dataset
  the routing against the true parse tree (`tree_recovery`, split into `tree_direction` and
  `tree_concentration`).
`evaluation_probes` runs the last two on a float64 copy of the model in eval mode with the RNG forked,
so training is bit-for-bit the same with or without them, and no probe underflows to 0.
"""
from __future__ import annotations

import copy
import math
from collections import deque
from typing import NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F

from capsmodels.contract import layer_metric

STARVED_REL = 1e-3        # starved: per-capsule act_grad < STARVED_REL x the class layer's median
FROZEN_REL = 0.01         # frozen: std_x a_j(x) <= FROZEN_REL x mean_x a_j(x)
NULL_SEED = 0             # the routing null's permutations (fixed: the same null every epoch)


# ----------------------------------------------------------------------------------------------------
# routing statistics
# ----------------------------------------------------------------------------------------------------

def coupling_certainty(c: torch.Tensor) -> torch.Tensor:
    """1 - H(c_i.(x)) / log J per input x and child i: c (B, I, J), rows summing to 1 -> (B, I).

    1 when child i sends all of its output to one parent (a parse tree), 0 for uniform couplings.
    0 log 0 = 0. Needs J >= 2 (log 1 = 0).
    """
    plogp = torch.where(c > 0, c * torch.log(c.clamp_min(1e-300)), torch.zeros_like(c))
    return 1.0 - (-plogp.sum(-1)) / math.log(c.shape[-1])


def tree_score(c: torch.Tensor, a_child: torch.Tensor) -> Optional[float]:
    """Activation-weighted mean over x, i of 1 - H(c_i.(x)) / log J, weights a_i(x) (B, I).

    A child that does not fire sends nothing whatever its couplings say, so it must not count: an
    unweighted mean is dominated by dead children's couplings. None (n/a) when J < 2 or all weights
    are 0.
    """
    if c.shape[-1] < 2:
        return None
    c, w = c.detach(), a_child.detach().to(c.dtype)
    total = w.sum()
    if not total > 0:
        return None
    return float((w * coupling_certainty(c)).sum() / total)


def routing_dynamics(c: torch.Tensor) -> float:
    """Mean over i, j of the population std over inputs x of c_ij(x). c: (B, I, J).

    0 means the routing is the same for every input: a static, input-independent assignment, which is
    what Mitterreiter et al. report for trained CapsNets.
    """
    return float(c.detach().std(dim=0, unbiased=False).mean())


def permute_children(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """t (B, I, ...) -> t' with t'[b, i] = t[idx[b, i], i]; idx (B, I), each column a permutation."""
    B, I = idx.shape
    return t.gather(0, idx.view(B, I, *([1] * (t.dim() - 2))).expand_as(t))


def routing_null(layer: torch.nn.Module, u: torch.Tensor, a_in: torch.Tensor,
                 generator: torch.Generator, iterations: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Couplings of `layer` re-routed on predictions whose children come from other inputs.

    u (B, I, d_in) the layer's input poses, a_in (B, I) its child activations. Child i's votes and
    activation are taken from input pi_i(x), an independent permutation of the batch per child drawn
    from `generator` (CPU): the votes keep their magnitudes and the layer's weights, but the children
    no longer agree about one input's parts. (A plain shuffle of the couplings would be useless:
    tree_score and routing_dynamics are invariant to permuting inputs.)
    iterations: re-route with this many passes instead of the layer's own (a layer routed concurrently:
    its couplings come from pass t(l), capsmodels.networks.CapsNet._route_concurrent; the null runs t(l)
    passes of the layer's routing on the shuffled votes).
    Returns (c_null (B, I, J), a_null (B, I): the children's activations, the tree_score weights).
    """
    return reroute_permuted(layer, u, a_in, null_permutation(*a_in.shape, generator).to(u.device), iterations)


def null_permutation(B: int, I: int, generator: torch.Generator) -> torch.Tensor:
    """(B, I) long: column i an independent permutation of the B inputs, drawn from `generator` (CPU)."""
    return torch.rand(B, I, generator=generator).argsort(0)


def reroute_permuted(layer: torch.nn.Module, u: torch.Tensor, a_in: torch.Tensor,
                     idx: torch.Tensor, iterations: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`routing_null` for a given permutation idx (B, I): child i of row x taken from input idx[x, i].
    Separate so the caller can keep idx (the truth's roles of the null's children: tree_concentration_null).
    Returns (c_null (B, I, J), a_null (B, I))."""
    a_null = permute_children(a_in, idx)
    return layer.route(permute_children(layer.predict(u), idx), a_null, iterations).coupling, a_null


class Truth(NamedTuple):
    """The true parse tree of the inputs of D (capsmodels.parts; docs/PROBES.md, "tree_recovery")."""
    role: torch.Tensor         # (B, I0) long: the part role under primary capsule i of input x, -1 none
    whole: torch.Tensor        # (B,) long: the whole (class) of input x
    part_type: torch.Tensor    # (K, R) long: the part type of role r of whole w


def _grouped_pair_sums(V: torch.Tensor, A: torch.Tensor, S: torch.Tensor, Q: torch.Tensor,
                       E: torch.Tensor, gid: torch.Tensor) -> torch.Tensor:
    """Sums over cross-input pairs ((x, i), (x', i')), x != x', whose items fall in the same group:
    (sum w w', sum w w' c_i(x).c_i'(x'), sum w w' E_ii') as a (3,) tensor.

    Items split by role r: V (B, I, R) their weights (V[x, i, r] = a_i(x) when primary i shows role r
    in x, else 0), A (B, R) = sum_i V, S (B, R, J) = sum_i V c_i(x), Q (B, R, R) = V_r^T E V_s per x;
    E (I, I) the null agreement; gid (B, R) the group of role r of input x. All-input sums minus the
    same-input terms: nothing of size B^2 I^2.
    """
    O = F.one_hot(gid, int(gid.max()) + 1).to(V.dtype)                 # (B, R, H)
    same = (gid.unsqueeze(2) == gid.unsqueeze(1)).to(V.dtype)          # (B, R, R) same group in x
    weight = (torch.einsum("brh,br->h", O, A) ** 2).sum() - torch.einsum("brs,br,bs->", same, A, A)
    agree = (torch.einsum("brh,brj->hj", O, S) ** 2).sum() - torch.einsum("brs,brj,bsj->", same, S, S)
    T = torch.einsum("brh,bir->hi", O, V)                              # (H, I)
    null = ((T @ E) * T).sum() - (same * Q).sum()
    return torch.stack([weight, agree, null])


def tree_recovery(c: torch.Tensor, a: torch.Tensor, truth: Truth) -> Optional[float]:
    """How much more the routing of D agrees with the true parse tree than input-independent routing
    does: 1 = a parse tree built from the truth, 0 = uniform couplings, couplings taken from other
    inputs, or any routing that is the same for every input. Definition: docs/PROBES.md.

    c (B, I, J) the couplings from the primaries (l1's, or the product of the couplings up to layer
    l), a (B, I) the primaries' activations (weights), truth the roles under the primaries.
    Over pairs of items (x, i), (x', i') of different inputs, both on a part, weighted a_i(x) a_i'(x'):
      s = sum_j c_ij(x) c_i'j(x')  (the chance both children pick the same parent),
      e = mean over inputs z != z' of sum_j c_ij(z) c_i'j(z')  (its value if couplings ignored the input),
      M = same whole and same role (must share a parent), N = different wholes and different part types
      (must not), D = mean_M s - mean_N s, D0 = the same of e,  score = (D - D0) / (1 - D0).
    None (n/a) when there are no M or no N pairs, or D0 >= 1.
    """
    c = c.detach().double()
    B, I, J = c.shape
    if B < 2:
        return None
    role, whole, ptype = truth.role.to(c.device), truth.whole.to(c.device), truth.part_type.to(c.device)
    K, R = ptype.shape
    P = int(ptype.max()) + 1
    V = F.one_hot(role.clamp_min(0), R).to(c.dtype) * (a.detach().to(c.dtype) * (role >= 0)).unsqueeze(-1)
    C = c.sum(0)                                                        # (I, J)
    E = (C @ C.T - torch.einsum("zij,zkj->ik", c, c)) / (B * (B - 1))  # (I, I)
    r = torch.arange(R, device=c.device)
    w = whole.view(B, 1).expand(B, R)
    k = ptype[whole]                                                    # (B, R)
    VE = torch.einsum("bir,ik->brk", V, E)                             # (B, R, I)
    parts = (V, V.sum(1), torch.einsum("bir,bij->brj", V, c), torch.einsum("brk,bks->brs", VE, V), E)
    sums = {name: _grouped_pair_sums(*parts, gid) for name, gid in (
        ("must", w * R + r), ("all", torch.zeros_like(w)), ("whole", w), ("type", k), ("both", w * P + k))}
    must = sums["must"]
    cannot = sums["all"] - sums["whole"] - sums["type"] + sums["both"]  # different whole and type
    if not (must[0] > 0 and cannot[0] > 1e-12 * sums["all"][0]):
        return None
    d_obs = must[1] / must[0] - cannot[1] / cannot[0]
    d_null = must[2] / must[0] - cannot[2] / cannot[0]
    if not d_null < 1 - 1e-12:
        return None
    return float((d_obs - d_null) / (1 - d_null))


TIE_TOL = 1e-12           # couplings within this of a row's maximum tie for it (rows sum to 1)


def argmax_couplings(c: torch.Tensor) -> torch.Tensor:
    """The hard parse tree the couplings point to: c (B, I, J) -> h (B, I, J) float64, 1 on each row's
    largest coupling, 0 elsewhere; a tie (within TIE_TOL of the maximum) shares the 1 equally.

    Why share: any fixed tie-break (torch.argmax takes the first) depends on how the parents happen
    to be numbered, and turns an all-tied row (uniform couplings) into a certain choice of parent 0.
    With the 1 shared, h.h' is the chance that two children pick the same parent when each tie is
    broken at random, and the pair statistic of tree_recovery is linear in it.
    """
    c = c.detach().double()
    top = (c >= c.amax(-1, keepdim=True) - TIE_TOL).double()
    return top / top.sum(-1, keepdim=True)


def tree_direction(c: torch.Tensor, a: torch.Tensor, truth: Truth) -> Optional[float]:
    """Does each child's largest coupling point to its true parent, chance-corrected: tree_recovery of
    the one-hot argmax couplings (`argmax_couplings`). Definition: docs/PROBES.md, "tree_direction".

    c (B, I, J) the couplings of the path from the primaries, a (B, I) the primaries' activations.
    1 = every child's top coupling on its parent in a parse tree built from the truth, however soft
    the couplings; 0 = uniform, static or input-shuffled couplings. None (n/a) as for tree_recovery.
    """
    return tree_recovery(argmax_couplings(c), a, truth)


def tree_concentration(c: torch.Tensor, a: torch.Tensor, on_part: torch.Tensor) -> Optional[float]:
    """How decisive the path couplings are, on the items tree_recovery scores: tree_score of c (B, I, J)
    weighted by a (B, I) times on_part (B, I) (the primary lies on a part: truth.role >= 0).

    1 = every such child sends everything to one parent, right or wrong; 0 = uniform. None (n/a) when
    J < 2 or no weight lies on a part.
    """
    return tree_score(c.detach().double(), a.detach().double() * on_part.to(device=c.device, dtype=torch.float64))


def shuffle_inputs(c: torch.Tensor, seed: int = NULL_SEED) -> torch.Tensor:
    """c (B, ...) with its rows (inputs) permuted by a fixed-seed permutation: couplings of another input."""
    perm = torch.randperm(c.shape[0], generator=torch.Generator().manual_seed(seed))
    return c[perm.to(c.device)]


def activation_stats(act: torch.Tensor, tau: float) -> tuple[float, float, float]:
    """(act_mean, dead_frac, frozen_frac) of one layer. act: (B, n) activations a_j(x).

    dead: max over x of a_j(x) < tau (never fires on D). frozen: population std over x of a_j(x) <=
    FROZEN_REL x its mean: alive or not, the capsule says the same for every input (a dead capsule
    is also frozen).
    """
    dead = (act.max(dim=0).values < tau).to(act.dtype).mean()
    frozen = (act.std(dim=0, unbiased=False) <= FROZEN_REL * act.mean(dim=0)).to(act.dtype).mean()
    return float(act.mean()), float(dead), float(frozen)


def _hidden_max(out: dict, name: str, n_layers: int) -> None:
    """out[name + '_max'] = max over the hidden layers l1..l{L-1} of out[name/l]; 0.0 without hidden
    layers (the depth-0 network has none to starve)."""
    hidden = [out[layer_metric(name, l)] for l in range(1, n_layers - 1) if layer_metric(name, l) in out]
    out[f"{name}_max"] = max(hidden) if hidden else 0.0


def trace_probes(layers: Sequence, tau: float, nulls: Optional[dict] = None,
                 truth: Optional[Truth] = None) -> dict[str, float]:
    """Activation and routing probes of one forward pass.

    layers: LayerTrace per layer (act, coupling, gain, routes; see capsmodels.networks).
    nulls: {l: (c_null, a_null)} for the layers whose routing null was computed (`routing_null`),
    optionally (c_null, a_null, idx) with the permutation idx (B, I) that made it (`reroute_permuted`).
    truth: the parse tree of the inputs (`parts` only): tree_recovery/l{l}, tree_direction/l{l} and
    tree_concentration/l{l} on the couplings from the primaries to layer l (the product c^(1) ... c^(l),
    (B, I0, J_l)), wherever tree_score/l{l} is reported; tree_direction and tree_concentration only
    beside tree_recovery. tree_direction_null/l{l}: the same on the path shuffled across inputs
    (`shuffle_inputs`). tree_concentration_null/l{l}: on the path of the routing nulls (c_null^(k) for
    every layer k <= l that has one, the real couplings for the others), weighted by l1's null
    activations on the null's own parts (needs l1's idx; absent without it).
    Routing probes of layer l are n/a (absent) where routing cannot act: `routes` false (uniform
    routing, 1 iteration), or a dead child or parent layer (dead_frac == 1).
    """
    out: dict[str, float] = {}
    for l, tr in enumerate(layers):
        act = tr.act.detach()
        mean_act, dead, frozen = activation_stats(act, tau)
        out[layer_metric("act_mean", l)], out[layer_metric("dead_frac", l)] = mean_act, dead
        out[layer_metric("frozen_frac", l)] = frozen
        if tr.gain is not None:
            out[layer_metric("squash_gain", l)] = float(tr.gain.detach().mean())
    nulls = nulls or {}
    path = None                                  # (B, I0, J_l): primaries -> layer l, c^(1) ... c^(l)
    null_path = None                             # (B, I0, J_l): the same through the routing nulls
    for l, tr in enumerate(layers):
        if l > 0 and tr.coupling is not None and truth is not None:
            c_l = tr.coupling.detach()
            n_l = nulls[l][0].detach() if l in nulls else c_l
            path = c_l if path is None else torch.bmm(path, c_l.to(path.dtype))
            null_path = n_l if null_path is None else torch.bmm(null_path, n_l.to(null_path.dtype))
        if l == 0 or tr.coupling is None or not tr.routes:
            continue
        if out[layer_metric("dead_frac", l - 1)] == 1.0 or out[layer_metric("dead_frac", l)] == 1.0:
            continue
        c = tr.coupling.detach()
        score = tree_score(c, layers[l - 1].act.detach())
        if score is None:
            continue
        out[layer_metric("tree_score", l)] = score
        if truth is not None:
            recovered = tree_recovery(path, layers[0].act, truth)
            if recovered is not None:
                out[layer_metric("tree_recovery", l)] = recovered
                out.update(_tree_split(l, path, null_path, layers[0].act, truth, nulls))
        out[layer_metric("routing_dynamics", l)] = routing_dynamics(c)
        if l in nulls:
            c_null, a_null = nulls[l][:2]
            null_score = tree_score(c_null, a_null)
            if null_score is not None:
                out[layer_metric("tree_score_null", l)] = null_score
            out[layer_metric("routing_dynamics_null", l)] = routing_dynamics(c_null)
    if len(layers) >= 2:
        _hidden_max(out, "dead_frac", len(layers))
        _hidden_max(out, "frozen_frac", len(layers))
    return out


def _tree_split(l: int, path: torch.Tensor, null_path: torch.Tensor, a0: torch.Tensor, truth: Truth,
                nulls: dict) -> dict[str, float]:
    """tree_direction and tree_concentration of layer l's path, each beside its null (n/a ones left out).
    The two are reported together or not at all (the report's columns rely on it)."""
    on_part = truth.role.to(path.device) >= 0                          # (B, I0)
    vals = {"tree_direction": tree_direction(path, a0, truth),
            "tree_direction_null": tree_direction(shuffle_inputs(path), a0, truth),
            "tree_concentration": tree_concentration(path, a0, on_part)}
    if vals["tree_direction"] is None or vals["tree_concentration"] is None:
        return {}
    if l in nulls and 1 not in nulls:            # the null path starts with l1's real couplings
        vals["tree_concentration_null"] = tree_concentration(null_path, a0, on_part)
    elif l in nulls and len(nulls[1]) > 2:
        _, a_null, idx = nulls[1]                # l1's null: child i of row x is input idx[x, i]'s
        vals["tree_concentration_null"] = tree_concentration(
            null_path, a_null, permute_children(on_part, idx.to(path.device)))
    return {layer_metric(name, l): v for name, v in vals.items() if v is not None}


# ----------------------------------------------------------------------------------------------------
# gradient probes
# ----------------------------------------------------------------------------------------------------

def gradient_probes(grads: Sequence[torch.Tensor]) -> dict[str, float]:
    """act_grad, starved_frac and grad_ratio from dL/dv per layer: grads[l] (B, n_l, d_l).

    Per capsule j: act_grad_j = mean over x of ||dL/dv_j(x)|| (in float64); act_grad/l{l} = mean over
    j. starved_frac/l{l} = fraction of capsules with act_grad_j < STARVED_REL x the median over the
    class layer's capsules (absent when that median is 0: nothing to compare with). grad_ratio =
    act_grad/l1 / act_grad/l{L} (1.0 at depth 0, where l1 is the class layer; absent for 0/0).
    """
    per_cap = [torch.linalg.vector_norm(g.detach(), dim=-1, dtype=torch.float64).mean(0) for g in grads]
    out = {layer_metric("act_grad", l): float(p.mean()) for l, p in enumerate(per_cap)}
    ref = float(torch.quantile(per_cap[-1], 0.5))
    if ref > 0:
        for l, p in enumerate(per_cap):
            out[layer_metric("starved_frac", l)] = float((p < STARVED_REL * ref).double().mean())
        _hidden_max(out, "starved_frac", len(per_cap))
    if len(per_cap) >= 2 and out[layer_metric("act_grad", len(per_cap) - 1)] > 0:
        out["grad_ratio"] = out[layer_metric("act_grad", 1)] / out[layer_metric("act_grad", len(per_cap) - 1)]
    return out


class GradTracker:
    """Frobenius norms ||dL/dW_l||_F of each layer's weights, averaged over the last K steps.

    Call `record()` after `loss.backward()` and before `optimizer.step()`/`zero_grad()`. The norms are
    taken in float64 (a float32 sum of squares of entries ~1e-26 is 0) in one fused `torch.stack`
    per step, kept on the device: no wait per step.
    """

    def __init__(self, weights: Sequence[torch.Tensor], window: int):
        self.weights = list(weights)
        self.window: deque = deque(maxlen=window)

    def record(self) -> None:
        norms = [torch.linalg.vector_norm(w.grad.detach(), dtype=torch.float64) if w.grad is not None
                 else torch.zeros((), dtype=torch.float64, device=w.device) for w in self.weights]
        if norms:
            self.window.append(torch.stack(norms))

    def summary(self) -> dict[str, float]:
        """grad_norm/l{l} and grad_rms/l{l} = grad_norm / sqrt(numel W_l); empty if no steps.

        grad_rms does not grow with the size of W_l: it compares layers of different shapes."""
        if not self.window:
            return {}
        mean = torch.stack(list(self.window)).mean(0).tolist()
        out = {layer_metric("grad_norm", l): v for l, v in enumerate(mean)}
        out.update({layer_metric("grad_rms", l): v / math.sqrt(w.numel())
                    for l, (v, w) in enumerate(zip(mean, self.weights))})
        return out

    def reset(self) -> None:
        self.window.clear()

    def steps(self) -> list:
        """The recorded steps (a copy: the loop's rewind, capsmodels.train.Snapshot, keeps it)."""
        return list(self.window)

    def restore(self, steps: list) -> None:
        self.window.clear()
        self.window.extend(steps)


# ----------------------------------------------------------------------------------------------------
# the evaluation pass
# ----------------------------------------------------------------------------------------------------

def evaluation_probes(model: torch.nn.Module, x_eval: torch.Tensor, y_eval: torch.Tensor, tau: float,
                      recon_weight: float = 0.0, truth: Optional[Truth] = None) -> dict[str, float]:
    """All probes of the fixed evaluation batch D = (x_eval, y_eval), leaving training untouched.

    Runs on a float64 copy of the model in eval mode, under fork_rng: the model's parameters, .grad,
    mode and the RNG streams are as before. One forward (labels mask the decoder as in training), one
    backward of the per-example training loss (margin + recon_weight x reconstruction, summed over D)
    w.r.t. every layer's output pose, and the routing nulls. truth: D's parse tree (`parts`), for
    tree_recovery, tree_direction and tree_concentration.
    """
    from capsmodels import losses                   # local: losses is light, but keep probes leaf-like
    devices = [x_eval.device] if x_eval.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        probe = copy.deepcopy(model).double().eval()
        for p in probe.parameters():
            p.grad = None
        x = x_eval.double()
        with torch.enable_grad():
            out = probe(x, y_eval)
            loss, _ = losses.total_loss(out, x, y_eval, recon_weight)
            # a layer routed concurrently hands a pose on at every pass: dL/dv is the sum over them (the
            # gradient of a perturbation added to all), else the one pose the next layer consumes
            passes = [tr.passes or [tr.pose] for tr in out.layers]
            flat = [p for ps in passes for p in ps]
            # the loss is a mean over D; times |D| it is the sum of per-example losses, whose gradient
            # w.r.t. v_j(x) is input x's own dL(x)/dv_j(x) (inputs do not interact in eval mode)
            flat_grads = iter(torch.autograd.grad(loss * len(y_eval), flat, allow_unused=True))
        grads = []
        for ps in passes:
            gs = [torch.zeros_like(p) if g is None else g for p, g in zip(ps, (next(flat_grads) for _ in ps))]
            grads.append(gs[0] if len(gs) == 1 else torch.stack(gs).sum(0))
        with torch.no_grad():
            nulls = _routing_nulls(probe, out.layers)
        result = trace_probes(out.layers, tau, nulls, truth)
        result.update(gradient_probes(grads))
    return result


def _routing_nulls(model: torch.nn.Module, layers: Sequence) -> dict:
    """{l: routing_null(...)} for the CapsNet layers where routing can act (nothing for the CNN)."""
    caps = getattr(model, "caps", None)
    if caps is None:
        return {}
    gen = torch.Generator().manual_seed(NULL_SEED)
    out = {}
    for l in range(1, len(layers)):
        if layers[l].routes:                     # the same draws, in the same order, as routing_null's
            u, a = layers[l - 1].pose, layers[l - 1].act
            idx = null_permutation(*a.shape, gen).to(u.device)
            out[l] = (*reroute_permuted(caps[l - 1], u, a, idx, layers[l].iterations), idx)
    return out
