"""The training loop: exact repeatability on the CPU, resume equivalence, divergence, probes that
leave training untouched, and the per-epoch report contract."""
from __future__ import annotations

import math

import pytest
import torch

from capsmodels import config as runcfg
from capsmodels import losses, networks, probes
from capsmodels.train import fit
from tests.helpers.training import RAW, cfg, stable







def collect(config, state=None, checkpoints=False):
    """[(stable metrics, the state checkpointed with them or None)] per epoch."""
    reports, states = [], []
    fit(config, lambda m: reports.append(stable(m)), data=RAW, state=state,
        checkpoint=states.append if checkpoints else None)
    return list(zip(reports, states if checkpoints else [None] * len(reports)))


def test_report_once_per_epoch_with_every_probe():
    reports = collect(cfg(), checkpoints=True)
    assert [m["epoch"] for m, _ in reports] == [0, 1]
    assert [m["status"] for m, _ in reports] == ["running", "finished"]
    last = reports[-1][0]
    per_layer = ("grad_norm", "grad_rms", "act_grad", "starved_frac", "act_mean", "dead_frac", "frozen_frac")
    routing = ("tree_score", "tree_score_null", "routing_dynamics", "routing_dynamics_null")
    for name in ["train_loss", "train_acc", "val_loss", "val_acc", "test_loss", "test_acc", "grad_ratio",
                 "dead_frac_max", "frozen_frac_max", "starved_frac_max"] \
            + [f"{p}/l{l}" for p in per_layer for l in range(3)] + [f"{p}/l{l}" for p in routing for l in (1, 2)]:
        assert name in last, name
    assert 0 <= last["val_acc"] <= 1
    assert last["grad_ratio"] == pytest.approx(last["act_grad/l1"] / last["act_grad/l2"])
    assert last["starved_frac_max"] == last["starved_frac/l1"]            # the one hidden layer
    assert all(math.isfinite(v) for v in last.values() if isinstance(v, float))


def test_each_epoch_is_checkpointed_before_it_is_reported():
    events = []
    c = cfg()
    c["train"]["max_steps_per_epoch"] = 2
    fit(c, lambda m: events.append(("report", m["epoch"])), data=RAW,
        checkpoint=lambda s: events.append(("checkpoint", s["epoch"])))
    assert events == [("checkpoint", 0), ("report", 0), ("checkpoint", 1), ("report", 1)]


def test_uniform_routing_reports_no_routing_probes_and_init_data_trains():
    reports = collect(cfg(routing="uniform", init="data", bias=True))
    last = reports[-1][0]
    assert last["status"] == "finished"
    assert not any(k.startswith(("tree_score", "routing_dynamics")) for k in last)
    assert last["act_grad/l0"] > 0 and last["dead_frac_max"] == 0.0


def test_seeded_runs_repeat_exactly_on_cpu():
    a = [m for m, _ in collect(cfg())]
    b = [m for m, _ in collect(cfg())]
    assert a == b
    c = cfg()
    c["train"]["seed"] = 8
    assert [m for m, _ in collect(c)] != a


def test_resume_from_a_checkpoint_repeats_the_uninterrupted_run():
    full = collect(cfg(), checkpoints=True)
    state0 = full[0][1]
    resumed = collect(cfg(), checkpoints=True, state=state0)
    assert [m for m, _ in resumed] == [full[1][0]]


def test_resume_after_the_last_epoch_reports_the_final_metrics_again():
    full = collect(cfg(), checkpoints=True)
    again = collect(cfg(), checkpoints=True, state=full[-1][1])
    assert [m["epoch"] for m, _ in again] == [1] and again[0][0]["status"] == "finished"


def test_non_finite_loss_ends_the_run_as_diverged():
    c = cfg(init="std", init_std=1e38, depth=0)        # predictions overflow float32: s = inf, loss NaN
    reports = collect(c)
    assert reports[-1][0]["status"] == "diverged"
    assert len(reports) == 1                       # stops at the first epoch, no exception


def test_probes_do_not_touch_training_state_grads_or_rng():
    c = runcfg.from_dict(cfg())
    torch.manual_seed(0)
    model = networks.build(c.model, (1, 8, 8), 10)
    x, y = torch.rand(16, 1, 8, 8), torch.arange(16) % 10
    loss, _ = losses.total_loss(model(x, y), x, y, 0.0005)
    loss.backward()                                                 # .grad as between backward and step
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grads = [p.grad.clone() for p in model.parameters()]
    rng = torch.get_rng_state()
    model.train()
    out = probes.evaluation_probes(model, x, y, tau=0.01, recon_weight=0.0005)
    assert torch.equal(rng, torch.get_rng_state())
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, model.parameters()))
    assert all(math.isfinite(v) for v in out.values())
    assert out == probes.evaluation_probes(model, x, y, tau=0.01, recon_weight=0.0005)   # repeatable


@pytest.mark.parametrize("field, value", [("init_target", 0.0), ("init_target", -1.0),
                                          ("init_target", float("inf")), ("bias_init", float("nan")),
                                          ("bias_init", float("-inf"))])
def test_config_refuses_bad_init_target_and_bias_init(field, value):
    c = runcfg.RunConfig()
    setattr(c.model, field, value)
    with pytest.raises(runcfg.ConfigError) as e:
        runcfg.validate(c)
    assert str(e.value).startswith(f"model.{field}: ") and "\n" not in str(e.value)
    with pytest.raises(runcfg.ConfigError, match=f"^model.{field}: "):      # and from a file
        runcfg.from_dict({"model": {field: value}})


def test_config_new_model_fields_defaults():
    m = runcfg.from_dict({"model": {"init": "data"}}).model
    assert (m.init, m.init_target, m.bias_init) == ("data", 1.0, 0.1)
    assert runcfg.from_dict({"model": {"bias_init": 0, "init_target": 2}}).model.bias_init == 0.0


def test_config_from_dict_applies_preset_below_file():
    c = runcfg.from_dict({"model": {"preset": "sabour", "depth": 2}})
    assert c.model.conv_channels == [256] and c.model.depth == 2
    with pytest.raises(runcfg.ConfigError, match="model.preset"):
        runcfg.from_dict({"model": {"preset": "huge"}})


@pytest.mark.parametrize("raw, field", [
    ({"model": 3}, "model"),                                   # a section that is not a mapping
    ({"train": ["epochs", 2]}, "train"),
    ({"model": {"conv_channels": ["abc"]}}, "model.conv_channels"),
    ({"model": {"conv_channels": [64.5]}}, "model.conv_channels"),   # not silently truncated to 64
    ({"model": {"conv_channels": [True]}}, "model.conv_channels"),   # not silently read as 1
    ({"model": {"conv_channels": 64}}, "model.conv_channels"),
])
def test_config_refuses_malformed_sections_and_lists(raw, field):
    with pytest.raises(runcfg.ConfigError) as e:
        runcfg.from_dict(raw)
    assert str(e.value).startswith(field + ":") and "\n" not in str(e.value)


def test_config_list_of_whole_floats_becomes_ints():
    assert runcfg.from_dict({"model": {"conv_channels": [64.0, 32]}}).model.conv_channels == [64, 32]
