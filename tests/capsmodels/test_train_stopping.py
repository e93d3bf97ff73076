"""Patience-based stopping, the best-validation epoch and the lr warmup (capsmodels.train), and the
contract they report through (capsmodels.contract): the stop epoch against a plain reference of the
rule on a real val_acc sequence, best/<name> and the test correctness of the best epoch, the weights
the run ends with, resume equivalence mid-patience, and the lr of every optimiser step against the
schedule's formula. The sweep side (tags and models in MLflow) is tests/e2e/test_sweep.py."""
from __future__ import annotations

import base64
import math

import numpy as np
import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from capsmodels import config as runcfg
from capsmodels.contract import (BEST_EXCLUDED, TAG_TEST_CORRECT, correct_from_tags, correct_tags,
                                 decode_correct, encode_correct)
from capsmodels.train import fit, prepare
from tests.helpers.training import RAW, cfg, stable
from tests.helpers.training import reference_stop

FIT_EPOCHS = 6


def run(config, state=None):
    """(stable reports, checkpointed states, the model's weights when fit returned)."""
    c = runcfg.from_dict(config)
    prepared = prepare(c, RAW)
    reports, states = [], []
    fit(c, lambda m: reports.append(stable(m)), state=state, checkpoint=states.append, prepared=prepared)
    return reports, states, {k: v.clone() for k, v in prepared[1].state_dict().items()}


def quick(patience=0, epochs=FIT_EPOCHS, **train):
    c = cfg(depth=0)
    c["data"]["augment"] = False
    # 4 steps at lr 0.05: val_acc 0.10, 0.12, 0.20, 0.15, 0.13, 0.33 (a best mid-way, then one at the end)
    c["train"].update({"epochs": epochs, "patience": patience, "max_steps_per_epoch": 4, "lr": 0.05, **train})
    return c


@pytest.fixture(scope="module")
def uncapped():
    """One run of FIT_EPOCHS epochs without patience: the val_acc sequence the references read."""
    return run(quick())


@pytest.fixture(scope="module")
def patient():
    """The same with patience 2: it stops at epoch 4, its best epoch 2."""
    return run(quick(patience=2))




# ---- the contract's encoding -----------------------------------------------------------------------
@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 1000, 10_001])
def test_correctness_code_is_numpy_packbits_in_base64_and_round_trips(n):
    flags = np.random.default_rng(n).integers(0, 2, n).astype(np.uint8)
    text = encode_correct(np.packbits(flags).tobytes(), n)
    assert text == f"n:{n};" + base64.b64encode(np.packbits(flags).tobytes()).decode()
    m, packed = decode_correct(text)
    assert m == n and np.array_equal(np.unpackbits(np.frombuffer(packed, np.uint8), count=n), flags)


def test_correctness_code_fits_one_tag_or_is_split_and_joined_in_order():
    flags = np.random.default_rng(0).integers(0, 2, 10_000).astype(np.uint8)
    text = encode_correct(np.packbits(flags).tobytes(), len(flags))
    assert len(text) == 1676 and correct_tags(text) == {TAG_TEST_CORRECT: text}
    parts = correct_tags(text, limit=500)
    assert sorted(parts) == sorted(f"{TAG_TEST_CORRECT}.{i}" for i in range(4))
    assert all(len(v) <= 500 for v in parts.values())
    assert correct_from_tags({**parts, "other": "x"}) == text
    assert correct_from_tags({"other": "x", TAG_TEST_CORRECT: float("nan")}) is None


@pytest.mark.parametrize("bad", ["", "n:3", "x:3;AA==", "n:9;AA==", "n:3;!!"])
def test_a_malformed_correctness_code_is_refused(bad):
    with pytest.raises(ValueError):
        decode_correct(bad)


def bits_of(text: str) -> np.ndarray:
    n, packed = decode_correct(text)
    return np.unpackbits(np.frombuffer(packed, np.uint8), count=n)


# ---- patience ---------------------------------------------------------------------------------------
def test_a_model_that_cannot_improve_stops_after_patience_epochs():
    """lr 1e-30 moves no float32 weight: val_acc is the same every epoch, so epoch 0 stays the best
    (a tie is no improvement) and patience 2 ends the run at epoch 2, finished, not at the cap 6."""
    reports, _, _ = run(quick(patience=2, lr=1e-30))
    assert [m["epoch"] for m in reports] == [0, 1, 2]
    assert len({m["val_acc"] for m in reports}) == 1
    assert [m["best_epoch"] for m in reports] == [0, 0, 0]
    assert [m["status"] for m in reports] == ["running", "running", "finished"]
    assert "stop_reason" not in reports[0] and reports[-1]["stop_reason"] == "patience"
    assert any(k.startswith("best/") for k in reports[0])
    assert not any(k.startswith("best/") for m in reports[1:] for k in m)


@pytest.mark.parametrize("patience,stop", [(1, (3, 2, "patience")), (2, (4, 2, "patience")), (3, (5, 5, "epochs"))])
def test_stop_epoch_best_epoch_and_reason_follow_the_rule_on_a_real_sequence(uncapped, patience, stop):
    full, _, _ = uncapped
    val = [m["val_acc"] for m in full]
    last, best_epoch, reason = reference_stop(val, patience, FIT_EPOCHS)
    assert (last, best_epoch, reason) == stop       # the sequence does what this test needs of it
    reports, _, _ = run(quick(patience=patience))
    assert [m["val_acc"] for m in reports] == val[:last + 1]       # patience changes nothing it does not stop
    assert reports[-1]["epoch"] == last and reports[-1]["stop_reason"] == reason
    assert reports[-1]["status"] == "finished"
    # best_epoch every epoch: the first epoch of the highest val_acc so far
    assert [m["best_epoch"] for m in reports] == [int(np.argmax(val[:e + 1])) for e in range(last + 1)]
    assert reports[-1]["best_epoch"] == best_epoch


def test_the_cap_is_the_stop_reason_when_patience_does_not_run_out(uncapped):
    full, _, _ = uncapped
    assert full[-1]["stop_reason"] == "epochs" and full[-1]["status"] == "finished"
    assert all("stop_reason" not in m for m in full[:-1])


def test_best_copies_are_the_improving_epochs_figures_and_the_correctness_their_test_split(uncapped):
    full, _, _ = uncapped
    best_so_far = -1.0
    for m in full:
        improved = m["val_acc"] > best_so_far
        best_so_far = max(best_so_far, m["val_acc"])
        copies = {k[len("best/"):]: v for k, v in m.items() if k.startswith("best/")}
        if not improved:
            assert not copies
            continue
        numeric = {k for k, v in m.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
                   and not k.startswith("best/")}
        assert set(copies) == numeric - set(BEST_EXCLUDED)
        assert {"test_acc", "val_acc", "act_grad/l1", "grad_ratio", "train_loss"} <= set(copies)
        assert all(copies[k] == m[k] or (math.isnan(copies[k]) and math.isnan(m[k])) for k in copies)
    for m in full:       # every epoch carries the best epoch's correctness: n images, mean = its test_acc
        bits = bits_of(m["test_correct"])
        assert len(bits) == m["test_n"] == 100
        assert bits.mean() == pytest.approx(full[m["best_epoch"]]["test_acc"], abs=1e-12)


def test_the_run_ends_holding_the_best_epochs_weights(patient):
    full, states, weights = patient
    best = full[-1]["best_epoch"]
    assert (best, full[-1]["epoch"]) == (2, 4)
    assert all(torch.equal(weights[k], v) for k, v in states[best]["model"].items())
    assert not all(torch.equal(weights[k], v) for k, v in states[-1]["model"].items())
    assert all(torch.equal(states[-1]["best_model"][k], v) for k, v in states[best]["model"].items())


def test_resume_mid_patience_repeats_the_uninterrupted_run(patient):
    """From every epoch's checkpoint (the patience count, best val_acc and weights in it): the same
    reports, the same stop, the same weights at the end."""
    full, states, weights = patient
    for e, state in enumerate(states):
        resumed, _, w = run(quick(patience=2), state=state)
        expect = full[e + 1:] if full[e]["status"] == "running" else full[e:]    # an ended state: said again
        assert resumed == expect, e
        assert all(torch.equal(w[k], v) for k, v in weights.items())


@pytest.mark.parametrize("field,value,msg", [("patience", -1, "train.patience: -1 is not allowed"),
                                             ("patience", 1.5, "train.patience: 1.5 is not allowed"),
                                             ("warmup_epochs", -0.5, "train.warmup_epochs: -0.5 is not allowed"),
                                             ("warmup_epochs", float("inf"), "train.warmup_epochs")])
def test_bad_patience_or_warmup_is_refused_in_one_line(field, value, msg):
    c = cfg()
    c["train"][field] = value
    with pytest.raises(runcfg.ConfigError, match=msg) as e:
        runcfg.from_dict(c)
    assert "\n" not in str(e.value)


# ---- warmup -----------------------------------------------------------------------------------------
def lrs_of(config) -> list[float]:
    """The lr of every optimiser step, read by a global step pre-hook as Adam runs."""
    seen: list[float] = []
    handle = register_optimizer_step_pre_hook(
        lambda opt, args, kwargs: seen.append(opt.param_groups[0]["lr"]))
    try:
        fit(config, data=RAW)
    finally:
        handle.remove()
    return seen


@pytest.mark.parametrize("warmup", [0.0, 1.0, 1.5, 0.25])
def test_warmup_is_linear_per_step_then_the_decay_runs_from_lr(warmup):
    steps, epochs, lr, gamma = 4, 4, 0.02, 0.5
    c = quick(epochs=epochs, warmup_epochs=warmup, lr_decay=gamma, max_steps_per_epoch=steps, lr=lr)
    got = lrs_of(c)
    W = math.ceil(warmup * steps)
    expect = []
    for k in range(epochs * steps):
        e = k // steps
        expect.append(lr * (k + 1) / W if k < W else lr * gamma ** max(0, e - W // steps))
    assert got == pytest.approx(expect, rel=1e-12)
    if W:
        assert got[0] == pytest.approx(lr / W) and got[W - 1] == pytest.approx(lr)
