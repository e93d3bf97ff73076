"""`capsweep confirm` and the spec's explicit `points` it writes.

- points: validation (one line per mistake), their matched references and controls (sweeps/extras.py),
  the trials Ray Tune's own BasicVariantGenerator makes of them, and the counts `validate` prints;
- the logged params of a configuration read back as typed values (round trip through the runner's
  own param strings);
- `capsweep confirm` on an exploration written the way the runner writes one (runner.create_parent,
  the runner's trial params, synthetic healthy metrics, so the verdict's ranking is certain): bad input,
  --dry-run, the generated spec, then one real confirmation through the Tuner and MLflow;
- under -m slow: a real tiny exploration, then its real confirmation.
"""
from __future__ import annotations

import itertools
from collections import Counter
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from capsmodels import config as runcfg
from capsmodels.contract import (CANDIDATE, CONTROL, REFERENCE, ROLE_KEY, TAG_CONFIRMS, TAG_STATUS, TAG_SWEEP)
from sweeps import cli, confirm, extras, search
from analysis import inspect as si
from sweeps.run_writer import param_str
from sweeps.spec import SpecError, describe_trials, from_config, resolve_trial, trial_counts
from tests.helpers.sweep import capsweep_cmd, children, env_for_subprocess, parents, run
from tests.helpers.procs import free_port
from tests.helpers.runs import SweepWriter, make_store

# the tiny digits network of tests/helpers/sweep.py, started so that it learns in one epoch
# (init: data, lr 0.01): its depth-1 candidates are healthy, not dead
BASE = {"model": {"preset": "tiny", "conv_channels": [8], "conv_kernel": 3, "primary_channels": 4,
                  "primary_dim": 4, "primary_kernel": 3, "primary_stride": 2, "num_caps": 6, "caps_dim": 4,
                  "out_dim": 6, "decoder": False, "init": "data"},
        "data": {"name": "digits", "train_size": 300, "val_size": 100, "test_size": 200},
        "train": {"epochs": 1, "batch_size": 50, "eval_batch": 64, "threads": 1, "lr": 0.01}}


def spec_of(**fields):
    return from_config({"name": "p", "base": BASE, "seeds": [0, 1], **fields})


# ---- points in a spec ----------------------------------------------------------------------------
BAD_POINTS = [
    ({"points": [{"model.depth": 1}], "space": {"model.depth": {"grid": [1]}}}, "points: explicit configurations"),
    ({"points": [{"model.depth": 1}], "search": {"algorithm": "optuna"}}, "search.algorithm: grid"),
    ({"points": [5]}, "points[0]: 5 is not allowed"),
    ({"points": [{}]}, "points[0]: {} is not allowed"),
    ({"points": [{"model.depth": 1}, {"model.nope": 1}]}, "points[1].model.nope: unknown key"),
    ({"points": [{"model.depth": 1, "train.seed": 3}]}, "points[0].train.seed: seeds are set by the `seeds`"),
    ({"points": [{"model.depth": 1}, {"model.depth": -1}]}, "points[1]: gives an invalid trial: model.depth"),
    ({"points": [{"model.depth": 1}, {"model": {"depth": 1}}]}, "points[1]: the same configuration as points[0]"),
    # the base's own value spelt out is still the same configuration
    ({"points": [{"model.depth": 1, "model.preset": "tiny"}, {"model.depth": 1}]}, "points[1]: the same"),
    ({"points": [{"model.depth": 1}], "confirms": "../x"}, "confirms: '../x' is not a sweep name"),
]


@pytest.mark.parametrize("fields, words", BAD_POINTS, ids=[w for _, w in BAD_POINTS])
def test_bad_points_are_one_line_naming_the_point(fields, words):
    with pytest.raises(SpecError) as e:
        spec_of(**fields)
    assert words in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_validate_refuses_a_bad_point_with_exit_2(tmp_path, capsys):
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"name": "p", "base": BASE, "points": [{"model.depth": "deep"}]}))
    code = cli.main(["validate", str(path)])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "points[0]" in err, err


# Six points; what sweeps/extras.py adds for them, worked out by hand:
POINTS = [{"model.depth": 2, "model.iterations": 1, "model.num_caps": 4},
          {"model.depth": 1, "model.iterations": 1},     # the same depth-0 twin as the first: added once
          {"model.depth": 1, "model.routing": "uniform"},
          {"model.depth": 0, "model.iterations": 2},     # a depth-0 CapsNet: its own reference
          {"model.depth": 3, "model.iterations": 2},     # its twin is the point above: not added again
          {"model.arch": "cnn", "model.depth": 1}]       # a cnn point: the depth-1 control itself
REFERENCES = [{"model.iterations": 1, "model.depth": 0, "model.arch": "capsnet"},
              {"model.routing": "uniform", "model.depth": 0, "model.arch": "capsnet"}]
CONTROLS = [{"model.arch": "cnn", "model.depth": d} for d in (0, 2, 3)]


def test_references_and_controls_of_points():
    spec = spec_of(points=POINTS)
    assert extras.reference_points(spec) == REFERENCES
    assert extras.control_points(spec) == CONTROLS
    assert trial_counts(spec) == {CANDIDATE: 12, REFERENCE: 4, CONTROL: 6}
    # judged by arch and depth: the depth-0 point and the depth-0 cnn are references, the cnn point a control
    assert describe_trials(spec) == "22 trials (8 candidates, 8 references, 6 controls)"
    assert extras.reference_points(spec_of(points=POINTS, references=False)) == []
    assert extras.control_points(spec_of(points=POINTS, controls=False)) == []


def test_tune_makes_exactly_the_points_and_extras_once_per_seed(tmp_path):
    """Ray Tune's own BasicVariantGenerator, fed what search.build gives it, makes each (point, seed)
    and each added (reference/control, seed) once, and nothing from the space."""
    from ray.tune.experiment import Experiment
    spec = spec_of(points=POINTS, seeds=[4, 7])
    space, alg, scheduler, num_samples = search.build(spec)
    assert scheduler is None
    alg.add_configurations([Experiment("t", run=lambda config: None, config=space, num_samples=num_samples,
                                       storage_path=str(tmp_path))])
    made = []
    while (trial := alg.next_trial()) is not None:
        made.append(trial.config)
    assert alg.is_finished() and len(made) == num_samples == 22

    def config_of(params: dict) -> tuple:
        return repr(sorted(runcfg.flatten(runcfg.to_dict(resolve_trial(spec.base, params))).items()))
    got = Counter((config_of(c), c[ROLE_KEY]) for c in made)
    want = Counter((config_of({**p, "train.seed": s}), role)
                   for role, pts in ((CANDIDATE, POINTS), (REFERENCE, REFERENCES), (CONTROL, CONTROLS))
                   for p in pts for s in (4, 7))
    assert got == want
    assert all(set(c) >= set(space) for c in made)        # each trial fixes every key: nothing sampled


def test_run_dry_run_counts_a_points_spec(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "p.yaml").write_text(yaml.safe_dump({"name": "p", "base": BASE, "points": POINTS, "seeds": [0, 1]}))
    assert cli.main(["run", "p.yaml", "--dry-run"]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("# 22 trials (8 candidates, 8 references, 6 controls)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.yaml"]


# ---- logged params back to typed values ----------------------------------------------------------
NOT_CONFIG = ("train.seed", "train.device", "train.threads", "train.progress", "data.root", "data.download")
CONFIGS = [{"model.depth": 2, "model.iterations": 1},
           {"train.lr": 1e-05, "model.bias": True, "model.conv_channels": [8, 16], "data.test_size": 0.5},
           {"model.preset": "small", "model.depth": 1, "model.caps_dim": 4, "model.squash": "tanh"}]


@pytest.mark.parametrize("params", CONFIGS)
def test_logged_params_read_back_as_the_same_configuration(params):
    cfg = resolve_trial(BASE, params)
    logged = {k: param_str(v) for k, v in runcfg.flatten(runcfg.to_dict(cfg)).items()
              if v is not None and k not in NOT_CONFIG}
    point = confirm.typed_point(BASE, logged, "c00")
    assert resolve_trial(BASE, point) == cfg
    assert set(point) <= set(logged) and len(point) < len(logged)      # the differences from the base


@pytest.mark.parametrize("logged, words", [({"model.depth": "two"}, "not a valid configuration"),
                                           ({"model.nope": "1"}, "unknown key"),
                                           ({"train.lr": "0.0010"}, "reads back as 0.001")])
def test_params_that_do_not_read_back_exactly_are_refused(logged, words):
    with pytest.raises(confirm.ConfirmError) as e:
        confirm.typed_point(BASE, logged, "c00")
    assert words in str(e.value), str(e.value)


# ---- an exploration in a store, written as the runner writes it ------------------------------------
# (depth, iterations) -> test accuracy of the candidate; the depth-0 references read 0.95, the cnns 0.97
EXPLORE_ACC = {(1, 1): 0.95, (1, 3): 0.955, (2, 1): 0.80, (2, 3): 0.80}
EXPLORE_SEEDS = [0, 1, 2]


def healthy_metrics(depth: int, acc: float, seed: int, salt: int) -> dict[str, float]:
    """A network that is not starved: the same act_grad on every layer, nothing dead or frozen; its
    accuracy moves by -0.004, 0 or +0.004 with the seed, in an order of its own (salt)."""
    acc += 0.004 * ((seed + salt) % 3 - 1)
    m = {"test_acc": acc, "val_acc": acc, "train_acc": acc, "grad_ratio": 1.0,
         "dead_frac_max": 0.0, "starved_frac_max": 0.0, "frozen_frac_max": 0.0}
    for l in range(depth + 2):
        m[f"act_grad/l{l}"] = m[f"grad_norm/l{l}"] = 0.05 * (1 + 0.01 * seed)
        for name in ("dead_frac", "starved_frac", "frozen_frac"):
            m[f"{name}/l{l}"] = 0.0
    return m


def write_exploration(client: MlflowClient, folder: Path, name: str, space: dict) -> str:
    """A finished sweep: runner.create_parent (params, spec.yaml), then each trial's run through the
    runner's RunWriter (tests/helpers/runs.py) with the runner's own params and two epochs of healthy
    metrics."""
    from sweeps.runner import _TrialParams
    spec = from_config({"name": name, "base": BASE, "space": space, "seeds": EXPLORE_SEEDS,
                        "storage_path": str(folder / "ray_results"),
                        "mlflow": {"tracking_uri": f"sqlite:///{folder}/mlflow.db", "experiment": "capsweep"}})
    exp = client.get_experiment_by_name("capsweep")
    exp_id = exp.experiment_id if exp else client.create_experiment("capsweep")
    sweep = SweepWriter(client, exp_id, name, spec=spec)
    keys = list(spec.space)
    grid = [dict(zip(keys, combo)) for combo in itertools.product(*(e["grid"] for e in spec.space.values()))]
    configs = [{**p, "train.seed": s, ROLE_KEY: CANDIDATE} for p in grid for s in spec.seeds]
    tp = _TrialParams(spec)
    for i, config in enumerate(configs + extras.extra_trials(spec)):
        params, seed = tp.params(config)
        cfg = resolve_trial(spec.base, config)
        acc = (0.97 if cfg.model.arch == "cnn" else 0.95 if cfg.model.depth == 0
               else EXPLORE_ACC[(cfg.model.depth, cfg.model.iterations)])
        final = healthy_metrics(cfg.model.depth, acc, seed, salt=cfg.model.depth + cfg.model.iterations)
        sweep.trial(f"{name}_{i:05d}", params, [{k: v * 0.9 for k, v in final.items()}, final], run_name=f"t{i}")
    sweep.end()
    return sweep.parent_id


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    folder = tmp_path_factory.mktemp("confirm")
    st = make_store(folder)
    uri, client = st.uri, st.client
    write_exploration(client, folder, "explo", {"model.depth": {"grid": [1, 2]}, "model.iterations": {"grid": [1, 3]}})
    write_exploration(client, folder, "shallow", {"model.iterations": {"grid": [1, 3]}})   # depth 0: no candidate
    SweepWriter(client, st.experiment_id, "nospec").end()       # a parent without a spec.yaml
    return {"folder": folder, "uri": uri, "client": client}


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    code = cli.main(args)
    out, err = capsys.readouterr()
    return code, out, err


BAD_CONFIRM = [(["nosuch"], "sweep: 'nosuch' not found"),
               (["explo", "--top", "0"], "--top: 0 is not allowed"),
               (["explo", "--seeds", "1"], "--seeds: 1 is not allowed"),
               (["shallow"], "no candidate configuration to confirm"),
               (["nospec"], "has no spec.yaml"),
               (["explo", "--name", "shallow"], "name: 'shallow' is taken"),
               (["explo", "--name", "a/b"], "--name: 'a/b' is not allowed"),
               (["explo", "seeds=[2,3]"], "seeds: [2] were used by sweep 'explo'"),
               (["explo", "scheduler.name=asha"], "scheduler.name: 'asha' is not allowed"),
               (["explo", "base.model.depth=-1"], "base.model.depth"),
               (["explo", "notkeyvalue"], "override")]


@pytest.mark.parametrize("args, words", BAD_CONFIRM, ids=[w for _, w in BAD_CONFIRM])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(store, tmp_path, monkeypatch, capsys, args, words):
    monkeypatch.chdir(tmp_path)
    before = len(store["client"].search_runs([store["client"].get_experiment_by_name("capsweep").experiment_id]))
    code, out, err = run_cli(["confirm", *args, "--tracking-uri", store["uri"]], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and words in lines[0], (code, err)
    assert list(tmp_path.iterdir()) == []
    assert len(store["client"].search_runs([store["client"].get_experiment_by_name("capsweep").experiment_id])) == before


def test_dry_run_prints_the_plan_and_the_spec_and_writes_nothing(store, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    sweeps_before = {p.data.tags[TAG_SWEEP] for p in parents(store["client"])}
    section = si.confirm_section(si.find_sweep(store["client"], "explo", "capsweep"), store["uri"])
    code, out, err = run_cli(["confirm", "explo", "--top", "5", "--seeds", "3", "base.train.epochs=2",
                              "--tracking-uri", store["uri"], "--dry-run"], capsys)
    assert code == 0, err
    lines = out.splitlines()
    ranked = section["ranked"]
    # the two depth-1 configurations are as good as their references; both depth-2 ones are worse by 0.15
    assert sorted(c["params"]["model.iterations"] for c in ranked) == ["1", "3"]
    assert all(c["params"]["model.depth"] == "1" for c in ranked)
    assert lines[0].startswith(f"capsweep: confirming 2 of 2 candidate configuration(s) of sweep 'explo'")
    assert "fresh seeds 3, 4, 5 (the exploration used 0, 1, 2)" in lines[0]
    assert [line.split()[0] for line in lines[1:3]] == [c["id"] for c in ranked]
    spec = yaml.safe_load("\n".join(lines[3:]))
    assert spec["name"] == "explo-confirm" and spec["confirms"] == "explo"
    assert spec["seeds"] == [3, 4, 5] and not set(spec["seeds"]) & set(section["seeds_used"])
    assert spec["scheduler"]["name"] == "none" and spec["search"]["algorithm"] == "grid" and spec["space"] == {}
    assert spec["references"] is True and spec["controls"] is True
    assert spec["base"]["train"]["epochs"] == 2                         # the override
    assert [resolve_trial(BASE, p) for p in spec["points"]] == \
        [resolve_trial(BASE, confirm.typed_point(BASE, c["params"], c["id"])) for c in ranked]
    # 2 points x 3 seeds; one shared depth-0 twin per iteration count and the depth-0 cnn; the cnn at depth 1
    assert lines[-2].startswith("# 18 trials (6 candidates, 9 references, 3 controls)")
    assert lines[-1] == "# --dry-run: nothing written or started; the spec would go to confirm/explo-confirm.yaml"
    assert list(tmp_path.iterdir()) == []
    assert {p.data.tags[TAG_SWEEP] for p in parents(store["client"])} == sweeps_before


def test_a_taken_name_moves_on_to_the_next(store, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "confirm").mkdir()
    (tmp_path / "confirm" / "explo-confirm.yaml").write_text("# someone's\n")
    code, out, err = run_cli(["confirm", "explo", "--top", "1", "--tracking-uri", store["uri"], "--dry-run"], capsys)
    assert code == 0, err
    assert "\nname: explo-confirm2\n" in out and "confirming 1 of 2" in out
    assert "\nseeds:\n- 3\n- 4\n- 5\n- 6\n- 7\n- 8\n- 9\n- 10\n" in out     # the verdict's default S, 8
    assert (tmp_path / "confirm" / "explo-confirm.yaml").read_text() == "# someone's\n"


def test_on_a_cluster_a_local_store_is_refused_before_anything_is_written(store, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(["confirm", "explo", "--top", "1", "--address", "http://127.0.0.1:8265",
                              "--tracking-uri", store["uri"]], capsys)
    assert code == 2 and err.count("\n") == 1 and "mlflow.tracking_uri" in err, err
    assert list(tmp_path.iterdir()) == []


def test_on_a_cluster_the_written_spec_is_submitted(store, tmp_path, monkeypatch, capsys):
    """`--address`: the spec file is written, then sent as `capsweep submit FILE` does (here to a port
    nobody listens on: the submission's own one-line refusal)."""
    port = free_port()
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(["confirm", "explo", "--top", "1", "--address", f"http://127.0.0.1:{port}",
                              "mlflow.tracking_uri=http://127.0.0.1:5000", f"storage_path={tmp_path}/shared",
                              "--tracking-uri", store["uri"]], capsys)
    assert code == 2 and f"--address: cannot submit to Ray at http://127.0.0.1:{port}" in err, err
    written = tmp_path / "confirm" / "explo-confirm.yaml"
    assert f"capsweep submit {written.relative_to(tmp_path)} --address http://127.0.0.1:{port}` runs it" in out
    assert yaml.safe_load(written.read_text())["mlflow"]["tracking_uri"] == "http://127.0.0.1:5000"


def check_confirmation(client: MlflowClient, exploration: str, name: str, seeds_used: set, point_params: dict):
    """The confirmation sweep `name` in the store: linked to its exploration, fresh seeds, the one
    point's candidate trials with its depth-0 twin and the cnn controls, all finished."""
    (parent,) = [p for p in parents(client) if p.data.tags[TAG_SWEEP] == name]
    assert parent.data.tags[TAG_CONFIRMS] == exploration and parent.data.params["sweep.confirms"] == exploration
    assert parent.data.params["sweep.scheduler"] == "none"
    kids = children(client, sweep=name)
    seeds = {r.data.params["train.seed"] for r in kids}
    assert len(seeds) == 2 and not seeds & {str(s) for s in seeds_used}
    depth = point_params["model.depth"]
    roles = Counter((r.data.params[ROLE_KEY], r.data.params["model.arch"], r.data.params["model.depth"]) for r in kids)
    assert roles == Counter({(CANDIDATE, "capsnet", depth): 2, (REFERENCE, "capsnet", "0"): 2,
                             (CONTROL, "cnn", "0"): 2, (CONTROL, "cnn", depth): 2})
    for r in kids:
        assert r.data.tags[TAG_STATUS] == "finished", r.data.tags
        if r.data.params[ROLE_KEY] == CANDIDATE:        # exactly the chosen configuration, every param
            assert {k: r.data.params.get(k) for k in point_params} == point_params
        if r.data.params[ROLE_KEY] == REFERENCE:        # its twin: the same but depth and hidden shape
            same = {k: v for k, v in point_params.items() if k not in extras.UNMATCHED}
            assert {k: r.data.params.get(k) for k in same} == same
    return parent


def test_confirm_runs_the_chosen_configuration_through_the_tuner(store, tmp_path):
    """One real confirmation (Ray Tune, MLflow) of the exploration written above: 1 candidate x 2 fresh
    seeds, its reference and controls; the spec file is written first and names the sweep."""
    folder = store["folder"]
    section = si.confirm_section(si.find_sweep(store["client"], "explo", "capsweep"), store["uri"])
    proc = run(capsweep_cmd("confirm", "explo", "--top", "1", "--seeds", "2", "--num-cpus", "2",
                            "--tracking-uri", store["uri"], "--verbose", "0"), tmp_path, env_for_subprocess())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "capsweep: sweep 'explo-confirm': 8 trials (2 candidates, 4 references, 2 controls)" in proc.stdout
    written = tmp_path / "confirm" / "explo-confirm.yaml"
    assert f"wrote {written.relative_to(tmp_path)}" in proc.stdout
    on_file = yaml.safe_load(written.read_text())
    assert on_file["name"] == "explo-confirm" and on_file["seeds"] == [3, 4]
    check_confirmation(MlflowClient(store["uri"]), "explo", "explo-confirm", set(section["seeds_used"]),
                       section["ranked"][0]["params"])
    assert (folder / "ray_results" / "explo-confirm").is_dir()
    # both verdicts show the link: the confirmation names its exploration, the exploration its confirmation
    from analysis.load import load_sweep
    from analysis.report import _link_text
    from analysis.verdict import compute_verdict
    conf = compute_verdict(load_sweep("capsweep", store["uri"], "explo-confirm", progress=False))
    explo = compute_verdict(load_sweep("capsweep", store["uri"], "explo", progress=False))
    assert conf.confirm["confirms"] == "explo" and conf.confirm["command"] is None
    assert "confirms the exploration 'explo'" in _link_text(conf)
    assert explo.confirmed_by == ["explo-confirm"] and "Confirmed by: explo-confirm" in _link_text(explo)


@pytest.mark.slow
def test_a_real_exploration_then_its_confirmation(tmp_path):
    """Both sweeps real: a tiny exploration (2 configurations x 2 seeds, 1 epoch), then
    `capsweep confirm --top 1 --seeds 2` on it."""
    spec = tmp_path / "explore.yaml"
    spec.write_text(yaml.safe_dump({"name": "tiny", "base": BASE, "seeds": [0, 1], "resources": {"cpu": 1},
                                    "space": {"model.depth": {"grid": [1]}, "model.iterations": {"grid": [1, 2]}},
                                    "references": False, "controls": False}))
    proc = run(capsweep_cmd("run", str(spec), "--num-cpus", "2", "--verbose", "0"), tmp_path, env_for_subprocess())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    section = si.confirm_section(si.find_sweep(client, "tiny", "capsweep"), uri)
    assert section["ranked"], "no candidate of the tiny exploration is worth confirming: nothing to test"
    proc = run(capsweep_cmd("confirm", "tiny", "--top", "1", "--seeds", "2", "--num-cpus", "2", "--verbose", "0"),
               tmp_path, env_for_subprocess())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    check_confirmation(client, "tiny", "tiny-confirm", {0, 1}, section["ranked"][0]["params"])
