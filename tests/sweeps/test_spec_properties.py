"""Property-based: generated specs and trial configs with wrong types, unknown keys, out-of-range
values and empty spaces all get a one-line error and exit code 2, and start nothing."""
from __future__ import annotations

import copy
import dataclasses
import math
import string

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from capsmodels import config as runcfg
from sweeps import cli
from sweeps.spec import SCALAR_METRICS, SpecError, SweepSpec, from_config

VALID = {
    "name": "prop",
    "base": {"model": {"preset": "tiny"}, "data": {"name": "digits"}, "train": {"epochs": 1}},
    "space": {"model.depth": {"grid": [0, 1]}},
    "metric": "val_acc", "mode": "max", "seeds": [0],
}
TOP_FIELDS = {f.name for f in dataclasses.fields(SweepSpec)}
identifiers = st.text(string.ascii_lowercase + "_", min_size=3, max_size=12)
not_an_int = st.one_of(st.text(string.ascii_letters, min_size=1, max_size=8), st.lists(st.integers(), max_size=2),
                       st.floats(allow_nan=False).filter(lambda f: not float(f).is_integer()))


def _set(d: dict, path: tuple, value) -> dict:
    d = copy.deepcopy(d)
    cur = d
    for k in path[:-1]:
        cur = cur.setdefault(k, {})
    cur[path[-1]] = value
    return d


mistakes = st.one_of(
    identifiers.filter(lambda k: k not in TOP_FIELDS).map(lambda k: _set(VALID, (k,), 1)),
    not_an_int.map(lambda v: _set(VALID, ("num_samples",), v)),
    st.integers(max_value=0).map(lambda v: _set(VALID, ("num_samples",), v)),
    st.integers(max_value=-1).map(lambda v: _set(VALID, ("max_failures",), v)),
    st.lists(st.integers(max_value=-1), min_size=1, max_size=3).map(lambda v: _set(VALID, ("seeds",), v)),
    st.just(_set(VALID, ("seeds",), [])),
    st.just(_set(VALID, ("space", "model.depth"), {"grid": []})),
    identifiers.filter(lambda k: k not in ("grid", "choice", "uniform", "loguniform", "int", "logint"))
    .map(lambda k: _set(VALID, ("space", "model.depth"), {k: [0, 1]})),
    st.tuples(st.floats(0.01, 10), st.floats(0, 1)).map(
        lambda t: _set(_set(VALID, ("search",), {"algorithm": "random"}), ("space", "train.lr"),
                       {"uniform": [t[0], t[0] - t[1]]})),
    st.integers(max_value=-1).map(lambda v: _set(VALID, ("base", "model", "depth"), v)),
    st.integers(max_value=0).map(lambda v: _set(VALID, ("base", "model", "iterations"), v)),
    identifiers.filter(lambda r: r not in runcfg.ROUTINGS).map(lambda v: _set(VALID, ("base", "model", "routing"), v)),
    identifiers.filter(lambda k: k not in {f for f in runcfg.ModelConfig.__dataclass_fields__})
    .map(lambda k: _set(VALID, ("base", "model", k), 1)),
    not_an_int.map(lambda v: _set(VALID, ("base", "train", "epochs"), v)),
    st.sampled_from([math.inf, -math.inf, math.nan]).map(lambda v: _set(VALID, ("base", "train", "epochs"), v)),
    identifiers.filter(lambda m: m not in SCALAR_METRICS)
    .map(lambda m: _set(VALID, ("metric",), m)),
    identifiers.filter(lambda m: m not in ("min", "max")).map(lambda m: _set(VALID, ("mode",), m)),
    st.floats(1.01, 7.9).filter(lambda g: not g.is_integer()).map(lambda g: _set(VALID, ("resources", "gpu"), g)),
)


@settings(max_examples=80, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=mistakes)
def test_generated_bad_specs_fail_in_one_line(raw):
    try:
        from_config(raw)
    except SpecError as e:
        assert "\n" not in str(e) and str(e)
    else:
        raise AssertionError(f"accepted a bad spec: {raw}")


@settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=mistakes)
def test_generated_bad_specs_exit_2_and_start_nothing(raw, tmp_path_factory, capsys):
    import ray
    work = tmp_path_factory.mktemp("prop")
    path = work / "spec.yaml"
    path.write_text(yaml.safe_dump(raw))
    import os
    old = os.getcwd()
    os.chdir(work)
    try:
        code = cli.main(["run", str(path)])
    finally:
        os.chdir(old)
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert not ray.is_initialized()
    assert not (work / "mlflow.db").exists() and not (work / "ray_results").exists()


bad_run_values = st.one_of(
    st.tuples(st.just("model.depth"), st.integers(max_value=-1)),
    st.tuples(st.just("model.iterations"), st.integers(max_value=0)),
    st.tuples(st.just("train.lr"), st.floats(max_value=0)),
    st.tuples(st.just("train.batch_size"), st.integers(max_value=0)),
    st.tuples(st.just("data.train_size"), st.floats(1.01, 5).filter(lambda f: not f.is_integer())),
    st.tuples(st.just("model.squash"), identifiers.filter(lambda s: s not in runcfg.SQUASHES)),
    st.tuples(st.just("data.name"), identifiers.filter(lambda s: s not in runcfg.DATASETS)),
    st.tuples(st.just("train.device"), identifiers.filter(lambda s: s not in runcfg.DEVICES)),
    st.tuples(st.just("train.weight_decay"), st.floats(max_value=-1e-9)),
    # YAML .inf/.nan: past every range check unless refused at the type level
    st.tuples(st.sampled_from(["train.epochs", "model.depth", "train.lr", "train.lr_decay", "train.weight_decay",
                               "model.init_std", "model.recon_weight", "data.train_size", "train.dead_tau"]),
              st.sampled_from([math.inf, -math.inf, math.nan])),
)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(item=bad_run_values)
def test_generated_bad_trial_configs(item):
    key, value = item
    sec, name = key.split(".")
    raw = {"model": {"preset": "tiny"}, sec: {name: value}} if sec != "model" else {"model": {"preset": "tiny", name: value}}
    try:
        runcfg.from_dict(raw)
    except runcfg.ConfigError as e:
        assert key in str(e) and "\n" not in str(e)
    else:
        raise AssertionError(f"accepted {key}={value!r}")
