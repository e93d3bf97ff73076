"""Sweep spec validation: one test per kind of mistake, each a one-line error and exit code 2,
with nothing started (no Ray, no MLflow store written)."""
import textwrap
from pathlib import Path

import pytest

from sweeps import cli
from sweeps.spec import CONFIG_DIR, describe_trials, judged_counts, load_spec, total_trials, trial_counts

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
    assert "ok (12 trials (4 candidates, 4 references, 4 controls), search grid)" in capsys.readouterr().out


def test_trials_are_counted_in_the_role_the_verdict_judges_them(workdir):
    """Every depth-0 network is a reference and every deeper cnn a control (analysis/verdict.py judges
    by arch and depth), though a space trial's trial.role says the space added it, and the runner's
    depth-0 cnn is added as a control."""
    spec = load_spec(write(workdir, GOOD))                     # depth 0/1 x 2 seeds + cnn at 0 and 1
    assert trial_counts(spec) == {"candidate": 4, "reference": 0, "control": 4}
    assert judged_counts(spec) == {"candidate": 2, "reference": 4, "control": 2}
    assert describe_trials(spec) == "8 trials (2 candidates, 4 references, 2 controls)"
    crossed = GOOD.replace("grid: [0, 1]}", "grid: [0, 1, 2]}\n  model.arch: {grid: [capsnet, cnn]}")
    # 3 depths x 2 archs x 2 seeds, all in the space (nothing added): capsnet 1 and 2 candidates, both
    # archs at depth 0 references, cnn 1 and 2 controls
    assert judged_counts(load_spec(write(workdir, crossed))) == {"candidate": 4, "reference": 4, "control": 4}
    sampled = GOOD.replace("{grid: [0, 1]}", "{choice: [0, 1]}") + "search: {algorithm: random}\nnum_samples: 3\n"
    # which depth each of the 3 x 2 samples draws is not known in advance: all candidates until drawn
    n = judged_counts(load_spec(write(workdir, sampled)))
    assert n["candidate"] == 6 and sum(n.values()) == total_trials(load_spec(write(workdir, sampled)))
    points = GOOD.replace("space:\n  model.depth: {grid: [0, 1]}\n",
                          "space: {}\npoints:\n- {model.depth: 0}\n- {model.depth: 2}\n")
    spec = load_spec(write(workdir, points))
    n = judged_counts(spec)
    # capsnet 0 (its own twin) and cnn 0 references; capsnet 2 a candidate, cnn 2 its control
    assert n == {"candidate": 2, "reference": 4, "control": 2} and sum(n.values()) == total_trials(spec)


BOOL = "expected true or false"
DEPTH = "model.depth: {grid: [0, 1]}"


def _with(old: str, new: str, extra: str = "") -> str:
    return GOOD.replace(old, new) + extra


# One spec mistake per row: (id, spec text, CLI overrides, what the one-line error must name).
BAD_SPECS = [
    ("references-int", GOOD + "references: 2\n", [], ["references: 2", BOOL]),
    ("references-word", GOOD + "references: maybe\n", [], ["references", BOOL]),
    ("controls-list", GOOD + "controls: [true]\n", [], ["controls", BOOL]),
    ("controls-float", GOOD + "controls: 1.0\n", [], ["controls", BOOL]),
    ("controls-too-many-depths", _with(DEPTH, "model.depth: {int: [0, 20]}", "search: {algorithm: random}\n"), [],
     ["controls: model.depth takes 21 values", "controls: false"]),
    ("unknown-top-level-key", GOOD + "num_sample: 3\n", [], ["num_sample", "unknown"]),
    ("unknown-run-config-key", _with("epochs: 1", "epoch: 1"), [], ["train.epoch", "unknown key"]),
    ("wrong-type", GOOD + "num_samples: many\n", [], ["num_samples"]),
    ("wrong-type-in-base", _with("epochs: 1", "epochs: two"), [], ["train.epochs", "integer"]),
    ("out-of-range-in-space", _with("grid: [0, 1]", "grid: [0, -1]"), [], ["space.model.depth", "-1"]),
    ("iterations-below-one", GOOD, ["base.model.iterations=0"], ["model.iterations"]),
    ("empty-space-list", _with("grid: [0, 1]", "grid: []"), [], ["space.model.depth", "non-empty"]),
    ("impossible-range", _with(DEPTH, "train.lr: {loguniform: [0.1, 0.01]}", "search: {algorithm: random}\n"), [],
     ["train.lr", "empty range"]),
    ("unknown-space-key", _with("model.depth", "model.depht"), [], ["space.model.depht", "unknown key"]),
    ("unknown-space-kind", _with("grid: [0, 1]", "range: [0, 1]"), [], ["range", "grid"]),
    ("range-with-grid-search", _with(DEPTH, "train.lr: {uniform: [0.001, 0.01]}"), [],
     ["space.train.lr", "random or optuna"]),
    ("metric-not-reported", _with("metric: val_acc", "metric: val_accuracy"), [],
     ["metric", "val_accuracy", "not reported"]),
    # depth is at most 1 -> capsule layers l0..l2; l3 is never reported
    ("layer-metric-beyond-depth", _with("metric: val_acc", "metric: grad_norm/l3"), [], ["grad_norm/l3"]),
    ("bad-mode", _with("mode: max", "mode: maximise"), [], ["mode"]),
    ("several-objectives-need-optuna",
     _with("metric: val_acc", "metric: [val_acc, grad_ratio]").replace("mode: max", "mode: [max, max]"), [],
     ["optuna"]),
    ("unknown-routing", GOOD, ["base.model.routing=magic"], ["model.routing", "dynamic"]),
    ("unknown-dataset", _with("name: digits", "name: imagenet"), [], ["data.name", "imagenet"]),
    ("bad-seeds", _with("seeds: [0, 1]", "seeds: []"), [], ["seeds"]),
    ("name-escapes-storage", _with("name: t", "name: ../../etc"), [], ["name"]),
    ("fractional-gpu-above-one", GOOD + "resources: {gpu: 1.5}\n", [], ["resources.gpu"]),
    ("override-not-key-value", GOOD, ["oops"], ["key=value"]),
    ("not-yaml", "name: [unclosed\n", [], ["YAML"]),
    # issue 18: an empty file would run a default sweep; a blank value read as YAML null
    ("empty-file", "", [], ["is empty"]),
    ("comment-only-file", "# nothing yet\n", [], ["is empty"]),
    ("blank-experiment", GOOD, ["mlflow.experiment= "], ["mlflow.experiment: empty"]),
    ("blank-name", GOOD, ["name="], ["name: empty"]),
    # digits are 8x8: a 9x9 primary kernel leaves no position; caught before Ray, naming the field
    ("network-does-not-fit-input", _with(DEPTH, "model.primary_kernel: {grid: [3, 9]}"), [],
     ["space.model.primary_kernel: value 9", "digits"]),
]


@pytest.mark.parametrize("text, overrides, must_contain", [row[1:] for row in BAD_SPECS],
                         ids=[row[0] for row in BAD_SPECS])
def test_bad_spec_is_one_line_and_exit_2(workdir, capsys, text, overrides, must_contain):
    assert_one_line_error(workdir, capsys, text, overrides=overrides, must_contain=must_contain)


def test_shipped_specs_all_validate(capsys):
    names = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    assert {"smoke", "depth", "routing", "capsdim", "datasize", "hunt"} <= set(names)
    assert cli.main(["validate", *names]) == 0


def test_missing_spec_file(workdir, capsys):
    code, err = run_cli(["run", "no_such_spec"], capsys)
    assert code == 2 and "no_such_spec" in err and len(err.splitlines()) == 1


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


def test_only_an_optuna_search_has_a_sampler(capsys):
    """A grid or random search samples no Optuna study: its sampler is none (it used to be the default,
    tpe, logged on the parent run and shown by --dry-run); an Optuna search without one gets tpe; a
    wrong name is refused whatever the algorithm."""
    import yaml
    from sweeps.spec import SpecError
    assert load_spec("smoke").search.sampler is None
    assert load_spec("smoke", ["search.sampler=tpe"]).search.sampler is None
    assert load_spec("smoke", ["search.algorithm=random"]).search.sampler is None
    assert load_spec("hunt").search.sampler == "nsga2"
    assert load_spec("smoke", ["search.algorithm=optuna"]).search.sampler == "tpe"
    with pytest.raises(SpecError, match="search.sampler: 'magic' is not allowed"):
        load_spec("smoke", ["search.sampler=magic"])
    assert cli.main(["run", "smoke", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert yaml.safe_load(out)["search"] == {"algorithm": "grid", "sampler": None, "seed": 0}
    assert "tpe" not in out


def test_metrics_to_mlflow_carry_log10_companions_of_the_tiny_probes():
    """sweeps/run_writer.py numeric_metrics, where every metric goes to MLflow: log10_<name> beside
    act_grad/grad_norm/grad_rms per layer and grad_ratio, nothing for a value <= 0 or NaN, nothing for
    other metrics or for the best-epoch copies."""
    import math
    from capsmodels.contract import LOG10_LAYER_METRICS, LOG10_SCALAR_METRICS, log10_name
    from sweeps.run_writer import numeric_metrics
    got = numeric_metrics({"act_grad/l1": 1e-14, "grad_norm/l0": 0.0, "grad_ratio": 2e-3, "best/act_grad/l1": 1e-14,
                           "test_acc": 0.5, "act_grad/l2": float("nan"), "act_grad_min": 1e-3, "grad_rms/l10": 3.0,
                           "epoch": 4, "training_iteration": 5})
    companions = {k: v for k, v in got.items() if k.startswith("log10_")}
    assert companions.keys() == {"log10_act_grad/l1", "log10_grad_ratio", "log10_grad_rms/l10"}
    assert companions["log10_act_grad/l1"] == pytest.approx(-14.0, abs=1e-12)
    assert companions["log10_grad_ratio"] == pytest.approx(math.log10(2e-3), abs=1e-12)
    assert companions["log10_grad_rms/l10"] == pytest.approx(math.log10(3.0), abs=1e-12)
    assert got["act_grad/l1"] == 1e-14 and "epoch" not in got
    assert set(LOG10_LAYER_METRICS) == {"act_grad", "grad_norm", "grad_rms"} and LOG10_SCALAR_METRICS == ("grad_ratio",)
    assert log10_name("act_grad/lx") is None and log10_name("grad_ratio/l1") is None
