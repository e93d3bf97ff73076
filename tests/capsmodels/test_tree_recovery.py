"""tree_recovery (docs/PROBES.md): its scale pinned on the `parts` truth (an oracle built from the truth
scores 1, uniform and input-shuffled couplings about 0), against a slow loop written from the definition
on tiny inputs, and its n/a rules inside trace_probes."""
import itertools

import pytest
import torch
import torch.nn.functional as F

from capsmodels import parts, probes
from tests.helpers.tree import activations, oracles, parts_truth, slow_tree_recovery, trace









@pytest.fixture(scope="module")
def truth():
    return parts_truth()


def test_oracles_score_one_uniform_zero(truth):
    a = activations(truth)
    B, I = truth.role.shape
    for c in oracles(truth):
        assert probes.tree_recovery(c, a, truth) == pytest.approx(1.0, abs=0.05)
    uniform = torch.full((B, I, 10), 0.1, dtype=torch.float64)
    assert probes.tree_recovery(uniform, a, truth) == pytest.approx(0.0, abs=0.05)


def test_input_shuffled_and_static_couplings_score_about_zero(truth):
    """Couplings of another input (the oracle's, permuted across D), or the same for every input (a static
    routing, which is what a 'no parse tree' network does), know nothing of this input's parts."""
    a = activations(truth)
    B, I = truth.role.shape
    scores = []
    for c, seed in itertools.product(oracles(truth), range(3)):
        perm = torch.randperm(B, generator=torch.Generator().manual_seed(seed))
        scores.append(probes.tree_recovery(c[perm], a, truth))
    print("shuffled oracles:", [f"{s:.4f}" for s in scores])
    assert all(abs(s) < 0.05 for s in scores), scores
    g = torch.Generator().manual_seed(1)
    static = torch.softmax(3 * torch.randn(1, I, 10, generator=g, dtype=torch.float64), -1).expand(B, I, 10)
    assert probes.tree_recovery(static, a, truth) == pytest.approx(0.0, abs=1e-9)
    # a half-and-half mixture of the oracle and input-independent noise lands in between
    noise = torch.softmax(3 * torch.randn(B, I, 10, generator=g, dtype=torch.float64), -1)
    mid = probes.tree_recovery(0.5 * oracles(truth)[0] + 0.5 * noise, a, truth)
    print(f"half oracle: {mid:.3f}")
    assert 0.1 < mid < 0.9




def test_matches_a_slow_loop_reference_on_tiny_inputs():
    # 5 inputs of 3 wholes, 4 primaries, 3 parents; the part types of a made-up hierarchy share types
    g = torch.Generator().manual_seed(5)
    ptype = torch.tensor([[0, 1], [1, 2], [0, 2]])
    whole = torch.tensor([0, 1, 2, 0, 1])
    role = torch.tensor([[0, 1, -1, 1], [1, 1, 0, -1], [0, -1, 1, 1], [-1, 0, 0, 1], [1, 0, -1, 0]])
    truth = probes.Truth(role, whole, ptype)
    c = torch.softmax(2 * torch.randn(5, 4, 3, generator=g, dtype=torch.float64), -1)
    a = torch.rand(5, 4, generator=g, dtype=torch.float64)
    fast, slow = probes.tree_recovery(c, a, truth), slow_tree_recovery(c, a, truth)
    print(f"fast {fast:.12f} slow {slow:.12f}")
    assert fast == pytest.approx(slow, abs=1e-12)
    assert abs(fast) > 1e-3                              # not a degenerate case that any formula passes
    # and a tree built from the truth: every item to parent = its whole
    oracle = F.one_hot(whole, 3).double().unsqueeze(1).expand(5, 4, 3)
    assert probes.tree_recovery(oracle, a, truth) == pytest.approx(slow_tree_recovery(oracle, a, truth))


def test_na_without_pairs_to_compare():
    # one whole only: no pairs of different wholes; a single input: no pairs at all
    truth = probes.Truth(torch.tensor([[0, 1], [1, 0]]), torch.tensor([0, 0]), torch.tensor([[0, 1]]))
    c = torch.full((2, 2, 2), 0.5, dtype=torch.float64)
    assert probes.tree_recovery(c, torch.ones(2, 2, dtype=torch.float64), truth) is None
    one = probes.Truth(torch.tensor([[0, 1]]), torch.tensor([0]), torch.tensor([[0, 1]]))
    assert probes.tree_recovery(c[:1], torch.ones(1, 2, dtype=torch.float64), one) is None


def test_capsule_roles_take_the_part_covering_most_of_the_field():
    roles = torch.full((1, 8, 8), -1, dtype=torch.int8)
    roles[0, 0:3, 0:4] = 0          # 12 pixels of role 0 in the top-left 4x4 field
    roles[0, 3, 0:4] = 1            # 4 of role 1
    roles[0, 5:8, 5:8] = 2          # bottom-right field: role 2 only
    out = parts.capsule_roles(roles, 4, 4, channels=2)
    # fields (y, x) in row order: TL -> 0, TR -> none, BL -> none, BR -> 2; repeated per channel
    assert out.tolist() == [[0, -1, -1, 2, 0, -1, -1, 2]]




def test_trace_probes_report_tree_recovery_where_tree_score_is(truth):
    """l1 on the primaries' couplings, l2 on the product of l1's and l2's; absent without a truth, where
    routing cannot act, and for a dead layer (the n/a rules of tree_score)."""
    a = activations(truth)
    B, I = truth.role.shape
    c1, _ = oracles(truth, J=10)                         # l1: every primary to its whole's parent
    c2 = torch.eye(10, dtype=torch.float64).expand(B, 10, 10)    # l2 passes parent j to class j
    act1, act2 = torch.rand(B, 10, dtype=torch.float64), torch.rand(B, 10, dtype=torch.float64)
    layers = [trace(a), trace(act1, c1), trace(act2, c2)]
    out = probes.trace_probes(layers, 0.01, truth=truth)
    assert out["tree_recovery/l1"] == pytest.approx(1.0)
    assert out["tree_recovery/l2"] == pytest.approx(1.0)      # the composed path is still the oracle
    assert not any(k.startswith("tree_recovery") for k in probes.trace_probes(layers, 0.01))
    frozen = [trace(a), trace(act1, c1, routes=False), trace(act2, c2, routes=False)]
    assert not any(k.startswith("tree_recovery") for k in probes.trace_probes(frozen, 0.01, truth=truth))
    dead = [trace(a), trace(torch.zeros(B, 10, dtype=torch.float64), c1), trace(act2, c2)]
    out = probes.trace_probes(dead, 0.01, truth=truth)
    assert "tree_recovery/l1" not in out and "tree_recovery/l2" not in out


def test_fit_on_parts_reports_tree_recovery_where_routing_acts():
    """The whole path: parts' role maps -> D's truth under the primaries -> tree_recovery/l1 and /l2 of a
    depth-1 dynamic-routing CapsNet (2 steps); none for uniform routing or another dataset."""
    from capsmodels.train import fit
    cfg = {"model": {"preset": "tiny", "depth": 1, "init": "data"},
           "data": {"name": "parts", "train_size": 200, "val_size": 60, "test_size": 100},
           "train": {"epochs": 1, "batch_size": 32, "eval_batch": 40, "threads": 1, "seed": 7,
                     "max_steps_per_epoch": 2}}
    m = fit(cfg)
    print({k: round(v, 4) for k, v in m.items() if k.startswith("tree_")})
    assert -1 <= m["tree_recovery/l1"] <= 1 and -1 <= m["tree_recovery/l2"] <= 1
    for l in (1, 2):                     # and its split, each beside its null (tests/capsmodels/test_tree_direction.py)
        assert -1 <= m[f"tree_direction/l{l}"] <= 1 and -1 <= m[f"tree_direction_null/l{l}"] <= 1
        assert 0 <= m[f"tree_concentration/l{l}"] <= 1 and 0 <= m[f"tree_concentration_null/l{l}"] <= 1
    cfg["model"]["routing"] = "uniform"
    assert not any(k.startswith(("tree_recovery", "tree_direction", "tree_concentration")) for k in fit(cfg))
