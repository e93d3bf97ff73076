"""tree_direction and tree_concentration (docs/PROBES.md): the two halves tree_recovery mixes. Direction ranks
always-right soft routing above often-wrong certain routing, concentration the other way round; an oracle
scores 1 on both, uniform / static / input-shuffled couplings score about 0 on direction; ties share the
argmax; both match slow loops written from the definition; their n/a rules and nulls inside trace_probes."""
import itertools

import pytest
import torch
import torch.nn.functional as F
from tests.helpers.tree import activations, oracles, parts_truth, slow_tree_recovery, trace

from capsmodels import probes

J = 10


@pytest.fixture(scope="module")
def truth():
    return parts_truth()


def soft_right(truth, top=0.23):
    """Every primary's largest coupling on its whole's parent, but only `top` of it (the rest spread evenly)."""
    B, I = truth.role.shape
    hit = F.one_hot(truth.whole, J).double().unsqueeze(1).expand(B, I, J)
    return top * hit + (1 - top) / (J - 1) * (1 - hit)


def certain_often_wrong(truth, right=0.6, seed=0):
    """One-hot couplings: each primary on its whole's parent with probability `right`, else on one of the
    other J - 1 parents at random."""
    B, I = truth.role.shape
    g = torch.Generator().manual_seed(seed)
    wrong = (truth.whole.view(B, 1) + torch.randint(1, J, (B, I), generator=g)) % J
    ok = torch.rand(B, I, generator=g) < right
    return F.one_hot(torch.where(ok, truth.whole.view(B, 1).expand(B, I), wrong), J).double()


def on_part(truth):
    return truth.role >= 0


def test_direction_ranks_always_right_soft_above_often_wrong_certain_and_concentration_the_other_way(truth):
    a = activations(truth)
    soft, certain = soft_right(truth), certain_often_wrong(truth)
    rec = {k: probes.tree_recovery(c, a, truth) for k, c in (("soft", soft), ("certain", certain))}
    dire = {k: probes.tree_direction(c, a, truth) for k, c in (("soft", soft), ("certain", certain))}
    conc = {k: probes.tree_concentration(c, a, on_part(truth)) for k, c in (("soft", soft), ("certain", certain))}
    print("recovery", rec, "direction", dire, "concentration", conc)
    # the case: tree_recovery puts the certain-but-wrong routing far above the always-right one
    assert rec["soft"] < 0.05 and rec["certain"] > 0.2
    # direction: the soft routing's top coupling is always right (an oracle), the certain one's 60% of the time
    assert dire["soft"] == pytest.approx(1.0, abs=0.01)
    assert 0.2 < dire["certain"] < 0.5 and dire["soft"] > dire["certain"] + 0.4
    # concentration: one-hot is 1 exactly; top coupling 0.23 of 10 is 1 - H / log 10 = 0.031
    H = -(0.23 * torch.log(torch.tensor(0.23, dtype=torch.float64)) + 0.77 * torch.log(torch.tensor(0.77 / 9, dtype=torch.float64)))
    assert conc["certain"] == pytest.approx(1.0, abs=1e-12)
    assert conc["soft"] == pytest.approx(float(1 - H / torch.log(torch.tensor(10.0, dtype=torch.float64))), abs=1e-12)
    assert conc["certain"] > conc["soft"]


def test_oracles_score_one_uniform_static_and_shuffled_about_zero(truth):
    a = activations(truth)
    B, I = truth.role.shape
    for c in oracles(truth):
        assert probes.tree_direction(c, a, truth) == pytest.approx(1.0, abs=0.05)
        assert probes.tree_concentration(c, a, on_part(truth)) == pytest.approx(1.0, abs=1e-12)
        # the part-type oracle made soft: still pointing the right way
        assert probes.tree_direction(0.15 * c + 0.85 / J, a, truth) == pytest.approx(1.0, abs=0.05)
    uniform = torch.full((B, I, J), 1 / J, dtype=torch.float64)
    assert probes.tree_direction(uniform, a, truth) == pytest.approx(0.0, abs=1e-12)   # all tied: h = 1/J
    assert probes.tree_concentration(uniform, a, on_part(truth)) == pytest.approx(0.0, abs=1e-12)
    g = torch.Generator().manual_seed(1)
    static = torch.softmax(3 * torch.randn(1, I, J, generator=g, dtype=torch.float64), -1).expand(B, I, J)
    assert probes.tree_direction(static, a, truth) == pytest.approx(0.0, abs=1e-9)
    shuffled = []
    for c, seed in itertools.product(oracles(truth), range(3)):
        shuffled.append(probes.tree_direction(probes.shuffle_inputs(c, seed), a, truth))
    print("shuffled:", [f"{s:.4f}" for s in shuffled])
    assert all(abs(s) < 0.05 for s in shuffled), shuffled


def test_ties_share_the_argmax_whatever_the_parents_numbering(truth):
    """Each primary's couplings tie between its whole's parent and the next one: a fixed tie-break (first
    index) would make the score depend on how the parents are numbered; shared, it does not, and rounding
    below TIE_TOL does not break the tie."""
    a = activations(truth)
    B, I = truth.role.shape
    w = truth.whole.view(B, 1).expand(B, I)
    c = 0.1 * F.one_hot(w, J).double() + 0.1 * F.one_hot((w + 1) % J, J).double() + 0.8 / J
    base = probes.tree_direction(c, a, truth)
    print(f"tied right/wrong: {base:.4f}")
    assert 0.2 < base < 0.8
    for perm in (torch.arange(J).flip(0), torch.randperm(J, generator=torch.Generator().manual_seed(2))):
        assert probes.tree_direction(c[..., perm], a, truth) == pytest.approx(base, abs=1e-12)
    noise = 1e-14 * torch.rand(B, I, J, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    assert probes.tree_direction((c + noise) / (c + noise).sum(-1, keepdim=True), a, truth) == pytest.approx(base, abs=1e-12)
    # a clear top coupling (1e-6 above the other) is not a tie: the score is the whole-oracle's
    c2 = c + 1e-6 * F.one_hot(w, J).double()
    assert probes.tree_direction(c2, a, truth) == pytest.approx(1.0, abs=0.05)


def slow_argmax(c):
    """One-hot of each row's maximum, ties (within TIE_TOL) sharing it: loops over the rows."""
    B, I, J_ = len(c), len(c[0]), len(c[0][0])
    out = [[[0.0] * J_ for _ in range(I)] for _ in range(B)]
    for x, i in itertools.product(range(B), range(I)):
        top = max(c[x][i])
        tied = [j for j in range(J_) if c[x][i][j] >= top - probes.TIE_TOL]
        for j in tied:
            out[x][i][j] = 1.0 / len(tied)
    return out


def slow_concentration(c, a, role):
    """Activation-weighted mean of 1 - H / log J over the items on a part, as loops."""
    import math
    num = den = 0.0
    for x, i in itertools.product(range(len(c)), range(len(c[0]))):
        if role[x][i] < 0:
            continue
        H = -sum(p * math.log(p) for p in c[x][i] if p > 0)
        num += a[x][i] * (1 - H / math.log(len(c[x][i])))
        den += a[x][i]
    return num / den


def test_matches_slow_loop_references_on_tiny_inputs():
    g = torch.Generator().manual_seed(5)
    ptype = torch.tensor([[0, 1], [1, 2], [0, 2]])
    whole = torch.tensor([0, 1, 2, 0, 1, 2])
    role = torch.tensor([[0, 1, -1, 1], [1, 1, 0, -1], [0, -1, 1, 1], [-1, 0, 0, 1], [1, 0, -1, 0], [0, 1, 1, 0]])
    truth = probes.Truth(role, whole, ptype)
    c = torch.softmax(2 * torch.randn(6, 4, 3, generator=g, dtype=torch.float64), -1)
    c[0, 1] = 1 / 3                                     # an all-tied row
    c[2, 0] = torch.tensor([0.4, 0.4, 0.2])             # a two-way tie
    c[4, 3] = torch.tensor([0.1, 0.45, 0.45])
    a = torch.rand(6, 4, generator=g, dtype=torch.float64)
    fast = probes.tree_direction(c, a, truth)
    slow = slow_tree_recovery(torch.tensor(slow_argmax(c.tolist()), dtype=torch.float64), a, truth)
    print(f"direction fast {fast:.12f} slow {slow:.12f}")
    assert fast == pytest.approx(slow, abs=1e-10) and abs(fast) > 1e-3
    shuffled = probes.shuffle_inputs(c)
    slow_null = slow_tree_recovery(torch.tensor(slow_argmax(shuffled.tolist()), dtype=torch.float64), a, truth)
    assert probes.tree_direction(shuffled, a, truth) == pytest.approx(slow_null, abs=1e-10)
    fast_c = probes.tree_concentration(c, a, role >= 0)
    slow_c = slow_concentration(c.tolist(), a.tolist(), role.tolist())
    print(f"concentration fast {fast_c:.12f} slow {slow_c:.12f}")
    assert fast_c == pytest.approx(slow_c, abs=1e-10)


def test_na_as_for_tree_recovery():
    truth = probes.Truth(torch.tensor([[0, 1], [1, 0]]), torch.tensor([0, 0]), torch.tensor([[0, 1]]))
    c = torch.full((2, 2, 2), 0.5, dtype=torch.float64)
    ones = torch.ones(2, 2, dtype=torch.float64)
    assert probes.tree_direction(c, ones, truth) is None                  # one whole: no must-differ pair
    one = probes.Truth(torch.tensor([[0, 1]]), torch.tensor([0]), torch.tensor([[0, 1]]))
    assert probes.tree_direction(c[:1], ones[:1], one) is None            # one input: no pairs
    assert probes.tree_concentration(c, ones, torch.zeros(2, 2, dtype=torch.bool)) is None   # nothing on a part
    assert probes.tree_concentration(c[..., :1] * 2, ones, torch.ones(2, 2, dtype=torch.bool)) is None  # J = 1


SPLIT = ("tree_direction", "tree_direction_null", "tree_concentration", "tree_concentration_null")


def test_trace_probes_report_the_split_beside_tree_recovery_with_their_nulls():
    """l1 on the primaries' couplings, l2 on the path; the concentration null on the nulls' path, weighted
    on the null's own parts (the roles of the inputs its children came from); absent where tree_recovery is."""
    truth = parts_truth(B=96)
    a = activations(truth)
    B, I = truth.role.shape
    c1, _ = oracles(truth, J=J)
    c2 = torch.eye(J, dtype=torch.float64).expand(B, J, J)
    act1, act2 = torch.rand(B, J, dtype=torch.float64), torch.rand(B, J, dtype=torch.float64)
    layers = [trace(a), trace(act1, c1), trace(act2, c2)]
    idx = probes.null_permutation(B, I, torch.Generator().manual_seed(0))
    # l1's null: one-hot exactly where the child it took (input idx[x, i]) lies on a part, uniform elsewhere;
    # so its concentration is 1 on the null's own parts and below 1 on the unpermuted ones
    null_on_part = probes.permute_children(truth.role, idx) >= 0
    n1 = torch.where(null_on_part.unsqueeze(-1), F.one_hot(torch.zeros(B, I, dtype=torch.long), J).double(),
                     torch.full((B, I, J), 1 / J, dtype=torch.float64))
    nulls = {1: (n1, probes.permute_children(a, idx), idx), 2: (c2, act1)}
    out = probes.trace_probes(layers, 0.01, nulls, truth=truth)
    print({k: round(v, 4) for k, v in out.items() if k.startswith("tree_")})
    for l in (1, 2):
        assert out[f"tree_direction/l{l}"] == pytest.approx(1.0, abs=1e-9)
        assert out[f"tree_concentration/l{l}"] == pytest.approx(1.0, abs=1e-12)
        assert out[f"tree_concentration_null/l{l}"] == pytest.approx(1.0, abs=1e-12)
        assert abs(out[f"tree_direction_null/l{l}"]) < 0.05
    assert probes.tree_concentration(n1, a, truth.role >= 0) < 0.9      # the roles must follow the permutation
    # without l1's permutation, no concentration null; a 2-tuple null is still read
    out = probes.trace_probes(layers, 0.01, {1: nulls[1][:2], 2: nulls[2]}, truth=truth)
    assert "tree_concentration_null/l1" not in out and "tree_direction_null/l1" in out
    assert "tree_score_null/l1" in out
    # absent without a truth, where routing cannot act, and for a dead layer
    assert not any(k.startswith(SPLIT) for k in probes.trace_probes(layers, 0.01, nulls))
    frozen = [trace(a), trace(act1, c1, routes=False), trace(act2, c2, routes=False)]
    assert not any(k.startswith(SPLIT) for k in probes.trace_probes(frozen, 0.01, nulls, truth=truth))
    dead = [trace(a), trace(torch.zeros(B, J, dtype=torch.float64), c1), trace(act2, c2)]
    out = probes.trace_probes(dead, 0.01, nulls, truth=truth)
    assert not any(k.startswith(SPLIT) for k in out)


def test_routing_null_draws_are_those_of_the_evaluation_nulls():
    """routing_null and the evaluation pass's nulls (which keep the permutation) use the same draws."""
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    ref = torch.rand(7, 5, generator=g1).argsort(0)
    assert torch.equal(probes.null_permutation(7, 5, g2), ref)


def test_the_report_shows_the_split_after_tree_recovery():
    from analysis.report import columns_for
    figs = {k: {"mean": 0.5, "lo": 0.4, "hi": 0.6} for k in ("tree_recovery", "tree_direction", "tree_concentration")}
    titles = [c[1] for c in columns_for({"c00": figs})]
    at = titles.index("tree score")
    assert titles[at + 1:at + 4] == ["tree recovery", "tree direction", "tree concentration"]
    assert "tree direction" not in [c[1] for c in columns_for({"c00": {"tree_recovery": figs["tree_recovery"]}})]
