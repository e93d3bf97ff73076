"""One home per name (capsmodels/contract.py): the per-layer metric names, the parent run's `sweep.*`
params (SweepParams), `train.seed`."""
from __future__ import annotations

from pathlib import Path

from capsmodels.contract import SEED_KEY, SweepParams, layer_metric, parse_layer_metric

ROOT = Path(__file__).resolve().parents[2]


def test_layer_metric_names_are_written_and_parsed_in_one_place():
    assert layer_metric("act_grad", 3) == "act_grad/l3"
    assert parse_layer_metric("act_grad/l3") == ("act_grad", 3)
    assert parse_layer_metric(layer_metric("tree_score_null", 12)) == ("tree_score_null", 12)
    for other in ("grad_ratio", "best/act_grad/l1", "log10_act_grad/l1x", "act_grad/l", "act_grad/l1\n", 3):
        assert parse_layer_metric(other) is None, other


def test_sweep_params_round_trip_in_the_runners_order():
    s = SweepParams(search="optuna", sampler="tpe", metrics=["val_acc", "act_grad_min"], modes=["max", "max"],
                    num_samples=8, seeds=[0, 1], scheduler="none", trials=24, space=["model.depth", "train.lr"],
                    counts={"candidate": 16, "reference": 4, "control": 4}, confirms="depth", select=["train.lr"])
    params = s.to_params()
    assert list(params) == ["sweep.search", "sweep.sampler", "sweep.metric", "sweep.mode", "sweep.num_samples",
                            "sweep.seeds", "sweep.scheduler", "sweep.trials", "sweep.space", "sweep.candidates",
                            "sweep.references", "sweep.controls", "sweep.confirms", "sweep.select"]
    assert params["sweep.metric"] == "val_acc,act_grad_min" and params["sweep.trials"] == "24"
    assert all(isinstance(v, str) for v in params.values())
    assert SweepParams.from_params({**params, "train.lr": "0.1"}) == s


def test_sweep_params_leave_out_what_a_sweep_does_not_set_and_read_old_parents_leniently():
    params = SweepParams(search="grid", metrics=["val_acc"], modes=["max"], num_samples=1, seeds=[0],
                         scheduler="none", trials=2, space=["model.depth"]).to_params()
    assert not {"sweep.sampler", "sweep.confirms", "sweep.select"} & set(params)
    old = SweepParams.from_params({"sweep.search": "random", "sweep.trials": "n/a"})
    assert old.search == "random" and old.trials is None and old.space == [] and old.counts == {}


def test_train_seed_is_spelled_once():
    """`train.seed` as a string lives in the contract only (docstrings and comments aside)."""
    import ast
    found = []
    for pkg in ("capsmodels", "sweeps", "analysis"):
        for f in (ROOT / pkg).rglob("*.py"):
            for node in ast.walk(ast.parse(f.read_text())):
                if isinstance(node, ast.Constant) and node.value == SEED_KEY:
                    found.append(str(f.relative_to(ROOT)))
    assert found == ["capsmodels/contract.py"]
