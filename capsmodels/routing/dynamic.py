"""Dynamic routing (Sabour et al. 2017, routing by agreement), registered as `model.routing: dynamic`.

Shapes as in `capsmodels.routing`. `dynamic_routing`'s forward and backward are written by
hand (`_DynamicRouting`) because autograd's version of the same loop allocates and adds one (B, I, J, D)
gradient per use of u_hat (2R-1 uses for R iterations) and permutes between layouts: on a CPU those
memory passes, not the FLOPs, were most of a Sabour CapsNet's routing cost. The hand-written backward
collects all 2R-1 rank-one terms per (b, j) and writes the u_hat gradient once with a single batched
matmul. `dynamic_routing_reference` is the plain autograd loop, kept beside it as the readable
specification (the tests check the fast path against it and against finite differences).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch.autograd.function import once_differentiable

from capsmodels.functional import safe_norm, squash
from capsmodels.registry import RouteOptions, Routed, register_routing


# ----------------------------------------------------------------------------------------------------
# dynamic routing (Sabour et al. 2017)
# ----------------------------------------------------------------------------------------------------

def _squash_vjp(s: torch.Tensor, gv: torch.Tensor, kind: str) -> torch.Tensor:
    """dL/ds given dL/dv for v = squash(s); s is small (B, J, D), so autograd on it is cheap.
    torch.func.vjp rather than torch.autograd.grad: the same backward graph, and it composes with
    vmap (seed batching) and torch.compile, which cannot trace a nested autograd.grad."""
    _, pullback = torch.func.vjp(lambda s_: squash(s_, kind=kind), s)
    return pullback(gv)[0]


class _DynamicRouting(torch.autograd.Function):
    """Routing by agreement on uT = u_hat laid out (B, J, I, D), contiguous.

    In this layout every routing pass is one batched vector-matrix product over (b, j):
      s_j = sum_i c_ij u_ij       -> bmm((B*J, 1, I), (B*J, I, D))
      a_ij = <u_ij, v_j>          -> bmm((B*J, 1, D), (B*J, D, I))  (u transposed: a strided view, fast)
    Outputs: v (B, J, D), c (B, J, I) final couplings, s (B, J, D) the squash input (bias included),
    then the earlier iterations' c, s, v (R - 1 of each): the backward's saved intermediates, returned
    because a Function that composes with torch.func (forward without ctx, `setup_context`) can save
    only its inputs and outputs. `generate_vmap_rule`: vmap runs forward and backward per sample, so
    the seed-batched training (capsmodels.seeds) routes each seed's model with this same code.
    """
    generate_vmap_rule = True

    @staticmethod
    def forward(uT, bias, iterations: int, detach_inner: bool, kind: str):
        B, J, I, D = uT.shape
        U = uT.reshape(B * J, I, D)
        b = uT.new_zeros(B, J, I)                                   # routing logits, start at 0
        cs, ss, vs = [], [], []
        for r in range(iterations):
            c = torch.softmax(b, dim=1)                             # over parents j
            s = torch.bmm(c.reshape(B * J, 1, I), U).reshape(B, J, D)
            if bias is not None:
                s = s + bias
            v = squash(s, kind=kind)
            cs.append(c), ss.append(s), vs.append(v)
            if r < iterations - 1:                                  # agreement update between iterations
                a = torch.bmm(v.reshape(B * J, 1, D), U.transpose(1, 2)).reshape(B, J, I)
                b = b + a
        return (v, c, s, *cs[:-1], *ss[:-1], *vs[:-1])

    @staticmethod
    def setup_context(ctx, inputs, output):
        uT, bias, iterations, detach_inner, kind = inputs
        R = iterations
        v, c, s, rest = output[0], output[1], output[2], output[3:]
        cs, ss, vs = [*rest[:R - 1], c], [*rest[R - 1:2 * (R - 1)], s], [*rest[2 * (R - 1):], v]
        ctx.save_for_backward(uT, *cs, *ss, *vs)
        ctx.iterations, ctx.detach_inner, ctx.kind = iterations, detach_inner, kind
        ctx.has_bias = bias is not None
        ctx.mark_non_differentiable(*rest)

    @staticmethod
    @once_differentiable
    def backward(ctx, gv_out, gc_out, gs_out, *_intermediates):
        R = ctx.iterations
        uT, *rest = ctx.saved_tensors
        cs, ss, vs = rest[:R], rest[R:2 * R], rest[2 * R:]
        B, J, I, D = uT.shape
        U = uT.reshape(B * J, I, D)
        need_u = ctx.needs_input_grad[0]
        need_bias = ctx.has_bias and ctx.needs_input_grad[1]
        # detach_inner: u_hat gets gradient only from the last iteration's s = sum_i c_ij u_ij; the chain
        # through earlier iterations is still walked when a bias needs its gradient from there.
        walk_chain = need_bias or (need_u and not ctx.detach_inner)
        c_terms, g_terms = [], []                                   # grad u_ij = sum_t C_t[ij] G_t[j]
        gbias = torch.zeros_like(ss[0][0]) if need_bias else None
        gb_next = None                                              # dL/d b^{r+1}
        for r in range(R - 1, -1, -1):
            if r == R - 1:
                gv = gv_out if gv_out is not None else torch.zeros_like(vs[r])
            else:                                                   # b^{r+1} = b^r + <u, v^r>
                ga = gb_next
                gv = torch.bmm(ga.reshape(B * J, 1, I), U).reshape(B, J, D)
                if need_u and not ctx.detach_inner:
                    c_terms.append(ga), g_terms.append(vs[r])
            gs = _squash_vjp(ss[r], gv, ctx.kind)
            if r == R - 1 and gs_out is not None:
                gs = gs + gs_out
            if need_bias:
                gbias = gbias + gs.sum(0)
            if need_u and (r == R - 1 or not ctx.detach_inner):
                c_terms.append(cs[r]), g_terms.append(gs)
            if r == 0 or not walk_chain:                            # b^0 = 0 is a constant
                break
            gc = torch.bmm(gs.reshape(B * J, 1, D), U.transpose(1, 2)).reshape(B, J, I)
            if r == R - 1 and gc_out is not None:
                gc = gc + gc_out
            c = cs[r]
            gb = c * (gc - (gc * c).sum(1, keepdim=True))           # softmax over j, backward
            gb_next = gb if gb_next is None else gb + gb_next
        gu = None
        if need_u:
            T = len(c_terms)
            C = torch.stack(c_terms, dim=2).reshape(B * J, T, I).transpose(1, 2)   # (B*J, I, T)
            G = torch.stack(g_terms, dim=2).reshape(B * J, T, D)
            # one write of the big gradient. (Writing it straight into the (I, B, J, D) layout of the
            # GEMM that made u_hat, via a strided out=, saves a copy when the machine is idle but takes
            # a per-matrix slow path that is 100x slower when other processes compete for the cores.)
            gu = torch.bmm(C, G).reshape(B, J, I, D)
        return gu, gbias, None, None, None


def dynamic_routing_full(u_hat: torch.Tensor, iterations: int, bias: Optional[torch.Tensor] = None,
                         detach_inner: bool = False, squash_kind: str = "sabour"):
    """Dynamic routing returning (v, c, s): parent poses (B, J, D), final couplings (B, I, J) and the
    squash input s (B, J, D), bias included, whose norm gives the layer's squash gain.

    u_hat may be any (B, I, J, D) tensor; one laid out as (B, J, I, D) in memory (a permuted view of
    a contiguous (B, J, I, D) tensor, as `CapsuleLayer` makes) is routed without a copy.
    """
    if iterations < 1:
        raise ValueError(f"iterations: {iterations} is not allowed; must be >= 1")
    uT = u_hat.permute(0, 2, 1, 3).contiguous()                     # (B, J, I, D); free if laid out so
    v, c, s, *_ = _DynamicRouting.apply(uT, bias, int(iterations), bool(detach_inner), squash_kind)
    return v, c.transpose(1, 2), s


def dynamic_routing(u_hat: torch.Tensor, iterations: int, bias: Optional[torch.Tensor] = None,
                    detach_inner: bool = False, squash_kind: str = "sabour"):
    """Sabour et al. 2017 routing by agreement. u_hat (B, I, J, D) -> (v (B, J, D), c (B, I, J)).

    Logits b start at 0, c = softmax_j(b), s_j = sum_i c_ij u_hat_ij (+ bias), v_j = squash(s_j), and
    between consecutive iterations b_ij += <u_hat_ij, v_j>; so iterations=1 gives uniform couplings.
    Gradients flow through every iteration unless detach_inner, which detaches u_hat in all but the
    last iteration (as some public code does).
    """
    v, c, _ = dynamic_routing_full(u_hat, iterations, bias, detach_inner, squash_kind)
    return v, c


def dynamic_routing_reference(u_hat: torch.Tensor, iterations: int, bias: Optional[torch.Tensor] = None,
                              detach_inner: bool = False, squash_kind: str = "sabour"):
    """The same algorithm as a plain autograd loop (slow: many full-size temporaries). Returns (v, c, s)."""
    B, I, J, D = u_hat.shape
    b = u_hat.new_zeros(B, I, J)
    for r in range(iterations):
        last = r == iterations - 1
        u = u_hat if (last or not detach_inner) else u_hat.detach()
        c = torch.softmax(b, dim=2)                                 # (B, I, J), over parents
        s = torch.einsum("bij,bijd->bjd", c, u)
        if bias is not None:
            s = s + bias
        v = squash(s, kind=squash_kind)
        if not last:
            b = b + torch.einsum("bijd,bjd->bij", u, v)
    return v, c, s


@register_routing("dynamic", doc="routing by agreement (Sabour et al. 2017)")
def route_dynamic(u_hat: torch.Tensor, a_in: torch.Tensor, layer, opts: RouteOptions) -> Routed:
    """The registry's signature (capsmodels.registry); child activations are not used."""
    v, c, s = dynamic_routing_full(u_hat, opts.iterations, layer.bias, opts.detach_inner, opts.squash)
    return Routed(v, safe_norm(v), c, s)
