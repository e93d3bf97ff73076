"""The parse-tree probes' test inputs: a parts batch with its true roles, oracle couplings and activations, and slow per-item references of tree_recovery and the routing trace."""
from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

from capsmodels import parts, probes
from capsmodels.networks import LayerTrace

PART_TYPE = torch.from_numpy(parts.part_type_table())


def parts_truth(B=256, seed=3, field=6, stride=4, channels=8):
    """The truth of B generated images under the tiny preset's primaries (6x6 fields, stride 4, 8 channels)."""
    _, y, roles = parts.generate(B, seed)
    role = parts.capsule_roles(torch.from_numpy(roles), field, stride, channels)
    return probes.Truth(role, torch.from_numpy(y), PART_TYPE)


def oracles(truth: probes.Truth, J: int = 10):
    """Two parse trees built from the truth: every primary to its whole's parent (a class layer), and
    every primary to its part type's parent (a hidden layer of part capsules)."""
    B, I = truth.role.shape
    whole = F.one_hot(truth.whole, J).double().unsqueeze(1).expand(B, I, J)
    k = truth.part_type[truth.whole].gather(1, truth.role.clamp_min(0))          # (B, I)
    return whole, F.one_hot(k, J).double()


def activations(truth, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(truth.role.shape, generator=g, dtype=torch.float64)


def slow_tree_recovery(c, a, truth):
    """The definition of docs/PROBES.md written out as loops over every pair of items."""
    B, I, J = c.shape
    c, a = c.tolist(), a.tolist()
    role, whole, ptype = truth.role.tolist(), truth.whole.tolist(), truth.part_type.tolist()

    def dot(p, q):
        return sum(p[j] * q[j] for j in range(J))

    def null(i, k):
        vals = [dot(c[z][i], c[zz][k]) for z in range(B) for zz in range(B) if z != zz]
        return sum(vals) / len(vals)

    acc = {"M": [0.0, 0.0, 0.0], "N": [0.0, 0.0, 0.0]}       # weight, weighted s, weighted e
    for x, xx in itertools.product(range(B), repeat=2):
        if x == xx:
            continue
        for i, k in itertools.product(range(I), repeat=2):
            r, rr = role[x][i], role[xx][k]
            if r < 0 or rr < 0:
                continue
            w, ww = whole[x], whole[xx]
            if w == ww and r == rr:
                kind = "M"
            elif w != ww and ptype[w][r] != ptype[ww][rr]:
                kind = "N"
            else:
                continue
            weight = a[x][i] * a[xx][k]
            acc[kind][0] += weight
            acc[kind][1] += weight * dot(c[x][i], c[xx][k])
            acc[kind][2] += weight * null(i, k)
    d = acc["M"][1] / acc["M"][0] - acc["N"][1] / acc["N"][0]
    d0 = acc["M"][2] / acc["M"][0] - acc["N"][2] / acc["N"][0]
    return (d - d0) / (1 - d0)


def trace(act, coupling=None, routes=True):
    return LayerTrace(act, coupling, None, routes=routes)
