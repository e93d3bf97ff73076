"""The GPU-throughput levers that a CPU can check (issue 22; docs/PROBES.md, "Throughput"):
1. no host read per step: the training loop reads the loss back once per check window, and a run that
   diverges still stops, reports and checkpoints exactly where a per-step check stops it;
4. train.compile: the hand-written dynamic-routing backward traced by torch.compile in one graph, and
   compiled training against eager within float32 rounding;
6. seed batching (capsmodels.seeds): each seed of a batched fit against the same seed trained alone."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode

from capsmodels import config as runcfg
from capsmodels import fast, networks
from capsmodels.datasets import RawData
from capsmodels.seeds import fit_seeds
from capsmodels.splits import make_splits
from capsmodels.train import fit
from tests.helpers.training import RAW, cfg, stable

# lr 5e11 overflows the weights within a few steps: a real divergence, not an injected NaN
DIVERGING = {"lr": 5e11}


def run(config: dict) -> tuple[list, list]:
    """(stable reports, checkpointed states) of one fit."""
    reports, states = [], []
    fit(config, lambda m: reports.append(stable(m)), data=RAW, checkpoint=states.append)
    return reports, states


def diverging(check_every: int, **train) -> dict:
    c = cfg(depth=0)
    c["data"]["augment"] = False          # no draw for the step that is not taken: generators compare too
    c["train"].update({**DIVERGING, "check_every": check_every, "epochs": 2, **train})
    return c


def same_state(a: dict, b: dict) -> bool:
    """Model, optimiser (moments and step counts) and shuffling generator equal bit for bit."""
    def leaves(d):
        if isinstance(d, dict):
            return [x for k in sorted(d, key=str) for x in leaves(d[k])]
        if isinstance(d, (list, tuple)):
            return [x for v in d for x in leaves(v)]
        return [d]
    pairs = list(zip(leaves(a["model"]), leaves(b["model"]))) + \
        list(zip(leaves(a["optimizer"]["state"]), leaves(b["optimizer"]["state"])))
    return all(torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y for x, y in pairs) \
        and torch.equal(a["generator"], b["generator"])


@pytest.fixture(scope="module")
def diverged():
    """A run whose third step's loss is non-finite, checked once per epoch (the default), and the same
    configuration capped at the two steps before it: the plain loop, which no check ever stops."""
    reports, states = run(diverging(0))
    capped = run(diverging(0, max_steps_per_epoch=2, epochs=1))
    return reports, states, capped


def test_the_diverging_configuration_diverges_at_its_third_step(diverged):
    reports, _, (capped, _) = diverged
    assert [r["status"] for r in reports] == ["diverged"]
    assert capped[0]["train_loss"] < 1e3                     # two finite steps (their loss is finite)
    two = run(diverging(0, max_steps_per_epoch=3, epochs=1))[0]
    assert two[0]["status"] == "diverged"


def test_a_diverged_run_reports_and_checkpoints_the_steps_before_the_non_finite_loss(diverged):
    """Checked once per epoch, the run still ends exactly where a per-step check ends it: its training
    figures and its checkpointed model, optimiser and generator are those of the two steps before."""
    reports, states, (capped, capped_states) = diverged
    last = reports[-1]
    for k in ("train_loss", "train_acc", "grad_norm/l0", "grad_norm/l1", "grad_rms/l1"):
        assert last[k] == capped[0][k], k
    assert "val_acc" not in last and last["stop_reason"] == "diverged"
    assert same_state(states[-1], capped_states[-1])


@pytest.mark.parametrize("check_every", [1, 2, 5])
def test_every_check_window_stops_a_diverged_run_at_the_same_step(diverged, check_every):
    reports, states = run(diverging(check_every))
    assert reports == diverged[0]
    assert same_state(states[-1], diverged[1][-1])


def test_a_run_that_diverges_in_a_later_epoch_keeps_its_earlier_epochs():
    c = diverging(0, lr=1e12, warmup_epochs=3.0, epochs=3)     # the warmup delays it to epoch 1, step 5
    every = diverging(1, lr=1e12, warmup_epochs=3.0, epochs=3)
    a, b = run(c), run(every)
    assert [r["status"] for r in a[0]] == ["running", "diverged"]
    assert a[0] == b[0] and same_state(a[1][-1], b[1][-1])
    assert a[0][-1]["best_epoch"] == 0 and "val_loss" not in a[0][-1]      # ended in training, not by eval


class HostReads(TorchFunctionMode):
    """Counts the tensor -> Python conversions that wait for the device (bool, float, int, tolist)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in ("__bool__", "__float__", "__int__", "tolist"):
            self.count += 1
        return func(*args, **(kwargs or {}))


def test_the_training_loop_reads_nothing_back_per_step():
    """As many host reads for 6 steps as for 2 (the per-epoch ones: the check, the sums, evaluation,
    probes). Adam's own `.item()` of its step counter is not counted: that counter lives on the host."""
    counts = []
    for steps in (2, 6):
        c = cfg()
        c["train"].update({"max_steps_per_epoch": steps, "epochs": 1})
        with HostReads() as reads:
            fit(c, None, data=RAW)
        counts.append(reads.count)
    assert counts[0] == counts[1] > 0


def test_a_run_that_does_not_diverge_is_the_same_for_every_check_window():
    base = run(cfg())
    for every in (1, 3):
        c = cfg()
        c["train"]["check_every"] = every
        other = run(c)
        assert other[0] == base[0]
        assert all(same_state(x, y) for x, y in zip(other[1], base[1]))


@pytest.mark.parametrize("field, value", [("check_every", -1), ("compile", "max-autotune"), ("compile", True)])
def test_bad_check_every_or_compile_is_refused_in_one_line(field, value):
    c = cfg()
    c["train"][field] = value
    with pytest.raises(runcfg.ConfigError, match=f"^train.{field}: ") as e:
        runcfg.from_dict(c)
    assert "\n" not in str(e.value)


# ----------------------------------------------------------------------------------------------------
# lever 4: train.compile
# ----------------------------------------------------------------------------------------------------

def small_net():
    c = runcfg.from_dict(cfg())
    torch.manual_seed(0)
    return networks.build(c.model, (1, 8, 8), 10)


def test_the_training_step_with_the_hand_written_routing_backward_is_one_graph():
    """TorchDynamo captures forward, loss and the dynamic-routing Function (forward and backward)
    without a graph break (fullgraph=True raises on one), and AOTAutograd's backward of that graph gives
    eager's gradients exactly. The aot_eager backend runs the captured graphs without Inductor's code
    generation: the capture is what train.compile relies on, in seconds instead of minutes."""
    model = small_net()
    x, y = torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(1)), torch.arange(16) % 10
    eager = fast.training_step(model, 0.0005, "none")
    captured = torch.compile(eager, backend="aot_eager", fullgraph=True)
    (le, se), (lc, sc) = eager(x, y), captured(x, y)
    ge = torch.autograd.grad(le, list(model.parameters()))
    gc = torch.autograd.grad(lc, list(model.parameters()))
    assert torch.equal(le, lc) and torch.equal(se, sc)
    assert all(torch.equal(a, b) for a, b in zip(ge, gc))


@pytest.mark.slow
def test_compiled_training_matches_eager_within_float32_rounding():
    """train.compile: default (Inductor's fused kernels; minutes of compilation on a small CPU) against
    eager: training figures within 1e-4 relative, accuracies within one image of 100, probes within 1e-2
    relative (fused kernels sum in another order; the differences grow over the steps)."""
    eager = collect_reports(cfg())
    c = cfg()
    c["train"]["compile"] = "default"
    compiled = collect_reports(c)
    for a, b in zip(eager, compiled):
        assert a["status"] == b["status"]
        for k in ("train_loss", "val_loss", "test_loss"):
            assert b[k] == pytest.approx(a[k], rel=1e-4), k
        for k in ("train_acc", "val_acc", "test_acc"):
            assert abs(b[k] - a[k]) <= 0.0101, k
        for k in a:
            if k.startswith(("act_grad/", "grad_norm/", "act_mean/", "tree_score/")):
                assert b[k] == pytest.approx(a[k], rel=1e-2), k


def collect_reports(config: dict) -> list:
    reports = []
    fit(config, lambda m: reports.append(stable(m)), data=RAW)
    return reports


# ----------------------------------------------------------------------------------------------------
# lever 6: seed batching
# ----------------------------------------------------------------------------------------------------

SEEDS = [7, 8]
LOSS_REL, PROBE_REL = 1e-5, 2e-3      # measured at most 2e-7 and 4e-4 (self-routing with BatchNorm)


def alone_and_batched(config: dict, data=RAW) -> tuple[list, list]:
    """Per seed: the reports of `fit` with that seed, and those of one batched `fit_seeds`."""
    alone = []
    for s in SEEDS:
        c = {k: dict(v) for k, v in config.items()}
        c["train"]["seed"] = s
        reports = []
        fit(c, lambda m: reports.append(stable(m)), data=data)
        alone.append(reports)
    batched = [[] for _ in SEEDS]
    fit_seeds(config, SEEDS, lambda i, m: batched[i].append(stable(m)), data=data)
    return alone, batched


def assert_same_run(alone: list, batched: list) -> None:
    """The same epochs, statuses, keys, per-image test correctness and accuracies; losses and probes
    within float32 rounding's spread (the batched kernels sum in another order)."""
    assert [m["status"] for m in batched] == [m["status"] for m in alone]
    for a, b in zip(alone, batched):
        assert set(a) == set(b)
        for k, v in a.items():
            if k.endswith(("_acc", "frac", "frac_max")) or not isinstance(v, float):
                assert b[k] == v, k
            elif v == v:                                    # NaN (a diverged epoch's train figures) aside
                rel = LOSS_REL if "loss" in k else PROBE_REL
                assert b[k] == pytest.approx(v, rel=rel, abs=1e-30), k


@pytest.mark.parametrize("model", [{}, {"routing": "self", "primary_norm": "batchnorm"}])
def test_each_seed_of_a_batched_fit_is_that_seed_trained_alone(model):
    alone, batched = alone_and_batched(cfg(**model))
    for a, b in zip(alone, batched):
        assert len(a) == len(b) == 2
        assert_same_run(a, b)
    assert alone[0][-1]["val_loss"] != alone[1][-1]["val_loss"]     # two seeds, two runs


def test_seeds_stop_on_their_own_patience_in_a_batched_fit():
    c = cfg(depth=0)
    c["data"]["augment"] = False
    c["train"].update({"epochs": 6, "patience": 2, "max_steps_per_epoch": 4, "lr": 0.05})
    alone, batched = alone_and_batched(c)
    assert sorted(len(a) for a in alone) != [6, 6]                  # patience stops a seed early
    for a, b in zip(alone, batched):
        assert len(a) == len(b)
        assert_same_run(a, b)


def poisoned_for(sick: int, healthy: int) -> RawData:
    """RAW with one training image made NaN: one that seed `sick` trains on and seed `healthy` never
    sees (neither its training nor its validation split). Which raw images a seed's splits take depends
    on the labels and the seed only, so they are read off splits of images that carry their index."""
    data = runcfg.from_dict(cfg()).data
    x = RAW.x_train.astype(np.float32)
    index = np.broadcast_to(np.arange(len(x), dtype=np.float32)[:, None, None, None], x.shape).copy()
    coded = replace(RAW, x_train=index * 2.0 - 1.0)               # splits map v to (v + 1) / 2 = index
    def taken(seed, part):
        return set(getattr(make_splits(coded, data, seed), part).tensors[0][:, 0, 0, 0].round().long().tolist())
    pick = min(taken(sick, "train") - taken(healthy, "train") - taken(healthy, "val"))
    x = x / 255.0 * 2.0 - 1.0
    x[pick] = np.nan
    return replace(RAW, x_train=x)


def test_a_seed_that_diverges_stops_alone_and_the_others_train_on():
    """Seed 7 meets a NaN image in its first epoch (its loss there is NaN whatever the rounding);
    seed 8 never sees it. Batched, seed 7 reports what it reports alone (diverged, the figures of its
    steps before) and seed 8 trains its two epochs as alone."""
    data = poisoned_for(7, 8)
    alone, batched = alone_and_batched(cfg(), data)
    assert [m["status"] for m in alone[0]] == ["diverged"]
    assert [m["status"] for m in alone[1]] == ["running", "finished"]
    for a, b in zip(alone, batched):
        assert_same_run(a, b)
