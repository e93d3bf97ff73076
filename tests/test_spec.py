"""Sweep spec validation: one test per kind of mistake, each a one-line error and exit code 2,
with nothing started (no Ray, no MLflow store written)."""
import textwrap
from pathlib import Path

import pytest

from sweeps import cli
from sweeps.spec import CONFIG_DIR, load_spec, total_trials

GOOD = """
name: t
base:
  model: {preset: tiny}
  data: {name: digits}
  train: {epochs: 1}
space:
  model.depth: {grid: [0, 1]}
metric: val_acc
mode: max
seeds: [0, 1]
"""


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def write(tmp: Path, text: str, extra: str = "") -> str:
    p = tmp / "spec.yaml"
    p.write_text(textwrap.dedent(GOOD if text is None else text) + textwrap.dedent(extra))
    return str(p)


def run_cli(args, capsys):
    import ray
    code = cli.main(args)
    err = capsys.readouterr().err.strip()
    assert not ray.is_initialized(), "Ray was started for a bad spec"
    return code, err


def assert_one_line_error(workdir, capsys, spec_text, overrides=(), must_contain=()):
    path = write(workdir, spec_text)
    code, err = run_cli(["run", path, *overrides], capsys)
    assert code == 2, err
    assert len(err.splitlines()) == 1, err
    assert err.startswith("capsweep: error: ")
    for s in must_contain:
        assert s in err, err
    assert not (workdir / "mlflow.db").exists()
    assert not (workdir / "ray_results").exists()
    return err


def test_good_spec_counts_trials(workdir, capsys):
    spec = load_spec(write(workdir, GOOD))
    # depth 0/1 x 2 seeds, + one cnn control per depth and seed; depth 0 is swept: no reference
    assert total_trials(spec) == 4 + 4
    assert spec.base["model"]["preset"] == "tiny"
    assert load_spec(write(workdir, GOOD), ["controls=false"]).controls is False
    assert total_trials(load_spec(write(workdir, GOOD), ["controls=false"])) == 4
    deep = GOOD.replace("grid: [0, 1]", "grid: [2, 3]")
    assert total_trials(load_spec(write(workdir, deep))) == 4 + 2 + 6      # + a depth-0 reference per seed; cnn at 0, 2, 3
    assert cli.main(["validate", write(workdir, deep)]) == 0
    assert "ok (12 trials (4 candidates, 2 references, 6 controls), search grid)" in capsys.readouterr().out


BOOL = "expected true or false"


@pytest.mark.parametrize("text, must_contain", [
    (GOOD + "references: 2\n", ["references: 2", BOOL]),
    (GOOD + "references: maybe\n", ["references", BOOL]),
    (GOOD + "controls: [true]\n", ["controls", BOOL]),
    (GOOD + "controls: 1.0\n", ["controls", BOOL]),
    (GOOD.replace("model.depth: {grid: [0, 1]}", "model.depth: {int: [0, 20]}") + "search: {algorithm: random}\n",
     ["controls: model.depth takes 21 values", "controls: false"]),
])
def test_references_and_controls_take_a_bool_and_few_depths(workdir, capsys, text, must_contain):
    assert_one_line_error(workdir, capsys, text, must_contain=must_contain)


def test_shipped_specs_all_validate(capsys):
    names = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    assert {"smoke", "depth", "routing", "capsdim", "datasize", "hunt"} <= set(names)
    assert cli.main(["validate", *names]) == 0


def test_unknown_top_level_key(workdir, capsys):
    assert_one_line_error(workdir, capsys, GOOD + "num_sample: 3\n", must_contain=["num_sample", "unknown"])


def test_unknown_run_config_key(workdir, capsys):
    assert_one_line_error(workdir, capsys, GOOD.replace("epochs: 1", "epoch: 1"),
                          must_contain=["train.epoch", "unknown key"])


def test_wrong_type(workdir, capsys):
    assert_one_line_error(workdir, capsys, GOOD + "num_samples: many\n", must_contain=["num_samples"])


def test_wrong_type_in_base(workdir, capsys):
    assert_one_line_error(workdir, capsys, GOOD.replace("epochs: 1", "epochs: two"),
                          must_contain=["train.epochs", "integer"])


def test_out_of_range_value_in_space(workdir, capsys):
    assert_one_line_error(workdir, capsys, GOOD.replace("grid: [0, 1]", "grid: [0, -1]"),
                          must_contain=["space.model.depth", "-1"])


def test_iterations_below_one(workdir, capsys):
    assert_one_line_error(workdir, capsys, GOOD, overrides=["base.model.iterations=0"],
                          must_contain=["model.iterations"])


def test_empty_space_list(workdir, capsys):
    assert_one_line_error(workdir, capsys, GOOD.replace("grid: [0, 1]", "grid: []"),
                          must_contain=["space.model.depth", "non-empty"])


def test_impossible_range(workdir, capsys):
    text = GOOD.replace("model.depth: {grid: [0, 1]}", "train.lr: {loguniform: [0.1, 0.01]}") \
        + "search: {algorithm: random}\n"
    assert_one_line_error(workdir, capsys, text, must_contain=["train.lr", "empty range"])


def test_unknown_space_key(workdir, capsys):
    assert_one_line_error(workdir, capsys, GOOD.replace("model.depth", "model.depht"),
                          must_contain=["space.model.depht", "unknown key"])


def test_unknown_space_kind(workdir, capsys):
    assert_one_line_error(workdir, capsys, GOOD.replace("grid: [0, 1]", "range: [0, 1]"),
                          must_contain=["range", "grid"])


def test_range_with_grid_search(workdir, capsys):
    text = GOOD.replace("model.depth: {grid: [0, 1]}", "train.lr: {uniform: [0.001, 0.01]}")
    assert_one_line_error(workdir, capsys, text, must_contain=["space.train.lr", "random or optuna"])


def test_metric_not_reported(workdir, capsys):
    assert_one_line_error(workdir, capsys, GOOD.replace("metric: val_acc", "metric: val_accuracy"),
                          must_contain=["metric", "val_accuracy", "not reported"])


def test_layer_metric_beyond_depth(workdir, capsys):
    # depth is at most 1 -> capsule layers l0..l2; l3 is never reported
    assert_one_line_error(workdir, capsys, GOOD.replace("metric: val_acc", "metric: grad_norm/l3"),
                          must_contain=["grad_norm/l3"])


def test_bad_mode(workdir, capsys):
    assert_one_line_error(workdir, capsys, GOOD.replace("mode: max", "mode: maximise"), must_contain=["mode"])


def test_several_objectives_need_optuna(workdir, capsys):
    text = GOOD.replace("metric: val_acc", "metric: [val_acc, grad_ratio]").replace("mode: max", "mode: [max, max]")
    assert_one_line_error(workdir, capsys, text, must_contain=["optuna"])


def test_unknown_routing(workdir, capsys):
    assert_one_line_error(workdir, capsys, GOOD, overrides=["base.model.routing=magic"],
                          must_contain=["model.routing", "dynamic"])


def test_unknown_dataset(workdir, capsys):
    assert_one_line_error(workdir, capsys, GOOD.replace("name: digits", "name: imagenet"),
                          must_contain=["data.name", "imagenet"])


def test_bad_seeds(workdir, capsys):
    assert_one_line_error(workdir, capsys, GOOD.replace("seeds: [0, 1]", "seeds: []"), must_contain=["seeds"])


def test_name_cannot_escape_storage(workdir, capsys):
    assert_one_line_error(workdir, capsys, GOOD.replace("name: t", "name: ../../etc"), must_contain=["name"])


def test_fractional_gpu_above_one(workdir, capsys):
    assert_one_line_error(workdir, capsys, GOOD + "resources: {gpu: 1.5}\n", must_contain=["resources.gpu"])


def test_override_not_key_value(workdir, capsys):
    assert_one_line_error(workdir, capsys, GOOD, overrides=["oops"], must_contain=["key=value"])


def test_missing_spec_file(workdir, capsys):
    code, err = run_cli(["run", "no_such_spec"], capsys)
    assert code == 2 and "no_such_spec" in err and len(err.splitlines()) == 1


def test_yaml_that_is_not_yaml(workdir, capsys):
    assert_one_line_error(workdir, capsys, "name: [unclosed\n", must_contain=["YAML"])


def test_unsafe_yaml_tags_are_refused(workdir, capsys):
    # no arbitrary object construction: a python tag is a YAML error, never executed
    marker = workdir / "pwned"
    text = GOOD + f"extra: !!python/object/apply:os.system ['touch {marker}']\n"
    assert_one_line_error(workdir, capsys, text)
    assert not marker.exists()


def test_train_command_bad_values(workdir, capsys):
    for override, field in [("model.depth=-1", "model.depth"), ("model.iterations=0", "model.iterations"),
                            ("model.routing=foo", "model.routing"), ("data.name=foo", "data.name"),
                            ("model.nope=1", "model.nope")]:
        code, err = run_cli(["train", "model.preset=tiny", override], capsys)
        assert code == 2, (override, err)
        assert field in err and len(err.splitlines()) == 1, err


def test_train_kernel_does_not_fit_input(workdir, capsys):
    code, err = run_cli(["train", "model.preset=tiny", "data.name=digits", "model.conv_kernel=9"], capsys)
    assert code == 2 and len(err.splitlines()) == 1 and "model." in err, err


def test_sweep_whose_network_does_not_fit_the_input(workdir, capsys):
    # digits are 8x8: a 9x9 primary kernel leaves no position; caught before Ray, naming the field
    text = GOOD.replace("model.depth: {grid: [0, 1]}", "model.primary_kernel: {grid: [3, 9]}")
    assert_one_line_error(workdir, capsys, text, must_contain=["model.", "digits", "primary_kernel=9"])
