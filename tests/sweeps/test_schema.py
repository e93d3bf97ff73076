"""A spec's trial configs, built once (sweeps/schema.py: TrialConfigs, configs, resolve_trial)."""
from __future__ import annotations

import pickle

import pytest

from capsmodels import config as runcfg
from sweeps.schema import TrialConfigs, configs, resolve_trial
from sweeps.spec import from_config

BASE = {"model": {"preset": "tiny"}, "data": {"name": "digits"}, "train": {"epochs": 2}}


def test_each_params_mapping_is_resolved_once_and_handed_out_as_copies():
    tc = TrialConfigs(BASE)
    a = tc.of({"model.depth": 2, "train.seed": 3})
    assert len(tc._built) == 1
    b = tc.of({"train.seed": 3, "model.depth": 2})          # the same params in another order: not rebuilt
    assert len(tc._built) == 1 and a == b and a is not b
    a.model.depth = 5                                        # a reader's edit reaches no other reader
    assert tc.of({"model.depth": 2, "train.seed": 3}).model.depth == 2
    # what it builds is resolve_trial's config: presets and defaults included, and the flat view of it
    assert a.model.__class__ is runcfg.ModelConfig and b == resolve_trial(BASE, {"model.depth": 2, "train.seed": 3})
    assert tc.base == resolve_trial(BASE, {}) and tc.flat({})["model.preset"] == "tiny"


def test_an_invalid_params_mapping_raises_every_time_it_is_asked():
    tc = TrialConfigs(BASE)
    for _ in range(2):
        with pytest.raises(runcfg.ConfigError, match="^model.routing: "):
            tc.of({"model.routing": "nosuch"})


def test_pickling_drops_what_was_built_and_the_copy_builds_the_same():
    tc = TrialConfigs(BASE)
    tc.of({"model.depth": 1})
    back = pickle.loads(pickle.dumps(tc))
    assert back._built == {} and back.of({"model.depth": 1}) == tc.of({"model.depth": 1})


def test_the_memo_is_bounded():
    tc = TrialConfigs(BASE)
    tc.MAX_BUILT = 3
    for seed in range(7):
        tc.of({"train.seed": seed})
        assert len(tc._built) <= 3
    assert tc.of({"train.seed": 0}).train.seed == 0


def test_a_spec_keeps_one_until_its_base_changes():
    spec = from_config({"name": "s", "base": BASE, "space": {"model.depth": {"grid": [0, 1]}}, "seeds": [0]})
    held = configs(spec)
    assert configs(spec) is held and held.raw == spec.base and held.raw is not spec.base
    assert "_trial_configs" not in spec.__dataclass_fields__          # not part of the spec's YAML
    spec.base["train"]["epochs"] = 4
    assert configs(spec) is not held and configs(spec).base.train.epochs == 4
