"""The sweep driver's pieces that run before and around Tune (sweeps/runner.py), called directly, without
starting Ray: the parent run and its name claim, the trial params the logger writes, the datasets loaded
once, the shape check before Ray, the storage check, and the one logger factory. (A whole sweep through
Ray Tune is tests/e2e/test_sweep.py.)"""
from __future__ import annotations

import pickle

import pytest
import yaml

from capsmodels import config as runcfg
from capsmodels.contract import ROLE_KEY, RUN_PARENT, TAG_ROLE, TAG_STATUS, TAG_SWEEP, SweepParams
from sweeps import runner
from sweeps.spec import SpecError, from_config, to_yaml

BASE = {"model": {"preset": "tiny"}, "data": {"name": "digits"}, "train": {"epochs": 2}}


def spec_of(tmp_path, uri: str = "", **kw):
    raw = {"name": "runner-test", "base": BASE, "space": {"model.depth": {"grid": [0, 1]}}, "seeds": [0, 1],
           "storage_path": str(tmp_path / "ray"), "references": False, "controls": False}
    if uri:
        raw["mlflow"] = {"tracking_uri": uri, "experiment": "capsweep"}
    raw.update(kw)
    return from_config(raw)


def test_the_parent_run_records_the_spec_and_its_settings(mlflow_store, tmp_path):
    spec = spec_of(tmp_path, mlflow_store.uri, search={"algorithm": "grid"})
    client = mlflow_store.client
    rid = runner.create_parent(client, mlflow_store.experiment_id, spec)
    run = client.get_run(rid)
    assert run.data.tags[TAG_ROLE] == RUN_PARENT and run.data.tags[TAG_SWEEP] == spec.name
    assert run.data.tags[TAG_STATUS] == "running"
    back = SweepParams.from_params(run.data.params)
    assert back == runner.sweep_params(spec)
    assert (back.search, back.seeds, back.space, back.trials) == ("grid", [0, 1], ["model.depth"], 4)
    assert back.counts == {"candidate": 4, "reference": 0, "control": 0}
    assert client.download_artifacts(rid, "spec.yaml", str(tmp_path)) and \
        (tmp_path / "spec.yaml").read_text() == to_yaml(spec)


def test_a_second_parent_of_the_same_name_is_refused_and_deleted(mlflow_store, tmp_path):
    spec = spec_of(tmp_path, mlflow_store.uri)
    client, exp = mlflow_store.client, mlflow_store.experiment_id
    first = runner.create_parent(client, exp, spec)
    with pytest.raises(runner.SweepRefused, match="^name: another driver started a sweep named 'runner-test'"):
        runner.create_parent(client, exp, spec)
    live = client.search_runs([exp], f"tags.`{TAG_ROLE}` = 'parent'")
    assert [r.info.run_id for r in live] == [first]


def test_trial_params_are_the_resolved_config_flattened_with_role_and_seed(tmp_path):
    spec = spec_of(tmp_path)
    tp = runner._TrialParams(spec)
    config = {"model.depth": 1, "train.seed": 7, ROLE_KEY: "candidate", "__trial_index__": 3}
    params, seed = tp.params(config)
    resolved = runcfg.resolve_start(runcfg.from_dict({**BASE, "model": {"preset": "tiny", "depth": 1},
                                                      "train": {"epochs": 2, "seed": 7}}).model)
    assert seed == 7 and params[ROLE_KEY] == "candidate" and "__trial_index__" not in params
    assert params["model.depth"] == 1 and params["model.conv_channels"] == resolved.conv_channels
    assert yaml.safe_load(tp.yaml(config)) == tp.resolved(config)
    # Tune pickles the logger (and so this) into its experiment state: the copy gives the same params
    assert pickle.loads(pickle.dumps(tp)).params(config) == (params, seed)


def test_datasets_are_loaded_once_per_name(tmp_path):
    spec = spec_of(tmp_path, space={}, points=[{"data.name": "digits", "model.depth": 0},
                                                 {"data.name": "digits", "model.depth": 1}])
    raws = runner.load_datasets(spec)
    assert list(raws) == ["digits"] and raws["digits"].in_shape[-1] == 8


def test_a_network_too_large_for_its_input_is_refused_before_ray(tmp_path):
    spec = spec_of(tmp_path, space={"model.conv_kernel": {"grid": [3, 5]}})
    raws = runner.load_datasets(spec)
    runner.check_shapes(spec, raws)                                     # both fit the 8x8 digits
    spec.base["model"]["primary_kernel"] = 9       # past validation, as a spec edited after it would be
    with pytest.raises(SpecError, match=r"^base\.model\.\w+: .*\(trial with model\.conv_kernel=3\)$"):
        runner.check_shapes(spec, raws)


def test_storage_that_takes_no_files_is_refused_in_one_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    runner.check_writable(str(tmp_path / "new" / "folder"))            # missing folders: checked at the nearest
    assert not (tmp_path / "new").exists()                              # and nothing left behind
    with pytest.raises(runner.SweepRefused, match="^storage_path: cannot write "):
        runner.check_writable(str(blocker / "below"))                   # a file where a folder must be


def test_the_logger_is_made_in_one_place_with_the_specs_trial_params(mlflow_store, tmp_path):
    spec = spec_of(tmp_path, mlflow_store.uri)
    parent = runner.create_parent(mlflow_store.client, mlflow_store.experiment_id, spec)
    logger = runner.sweep_logger(spec, mlflow_store.experiment_id, parent, str(tmp_path / "exp"), expected=4)
    config = {"model.depth": 0, "train.seed": 1, ROLE_KEY: "candidate"}
    assert logger.trial_params(config) == runner._TrialParams(spec).params(config)
    assert (logger.sweep, logger.parent_id, logger.book.expected_trials) == (spec.name, parent, 4)
