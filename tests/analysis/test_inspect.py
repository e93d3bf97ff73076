"""`capsweep ls / status / compare / export`, `--version`, `--dry-run`, `validate` overrides, and exit 2
with one line for bad input in every subcommand.

The store is written through the runner's own RunWriter (tests/helpers/runs.py: the tags and params of
capsmodels/contract.py, the parent's `sweep.*` params as SweepParams), with hand-chosen numbers,
so each figure the commands print is checked against a value worked out here by hand.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math

import pytest
from mlflow.tracking import MlflowClient

from capsmodels.contract import (INTERRUPTED, ROLE_KEY, RUNNING, SweepParams)
from sweeps.write_queue import ParentInterrupt
from tests.helpers.runs import SweepWriter, make_store
from sweeps import cli
from sweeps import best as sweep_best

SPACE = "model.depth,train.lr"
# sweep alpha (one objective, val_acc max; 7 trials planned): (trial, depth, lr, seed, role, status, val_acc)
ALPHA = [("t1", 1, 0.01, 0, "candidate", "finished", 0.8),
         ("t2", 1, 0.01, 1, "candidate", "finished", 0.6),    # config (1, 0.01): mean 0.7
         ("t3", 2, 0.01, 0, "candidate", "finished", 0.9),
         ("t4", 2, 0.01, 1, "candidate", "failed", 0.1),      # failed: not in the mean -> (2, 0.01): 0.9
         ("t5", 0, 0.01, 0, "reference", "finished", 0.95),   # a reference is never "best"
         ("t6", 3, 0.01, 0, "candidate", "running", 0.97)]    # running: best so far, not best
# sweep beta (two objectives, both max): (trial, depth, lr, val_acc, grad_ratio)
BETA = [("b1", 1, 0.01, 0.9, 1.0),       # A: on the front
        ("b2", 2, 0.01, 0.8, 2.0),       # B: on the front
        ("b3", 3, 0.01, 0.7, 0.5),       # dominated by A
        ("b4", 4, 0.01, 0.9, 0.9)]       # dominated by A (equal accuracy, lower ratio)


def _verdict(escaped: str, instrument: str, acc: float, ratio: float, escapes: int) -> dict:
    conf = {"role": "candidate", "depth": 2, "label": "depth=2", "escaped": escapes > 0,
            "figures": {"test_acc": {"mean": acc}, "grad_ratio": {"mean": ratio}, "act_grad_min": {"mean": 1e-3},
                        "starved_worst": {"mean": 0.25}, "dead_worst": {"mean": 0.0}}}
    return {"escaped": escaped, "instrument": instrument, "escapes": [{}] * escapes, "configurations": [conf],
            "counts": {"trials": 4, "finished": 4, "failed": 0, "diverged": 0, "configurations": 4,
                       "candidates": 4, "controls": 0}}


def _parent(c: MlflowClient, eid: str, name: str, metric: str, mode: str, trials: int, status: str) -> SweepWriter:
    sweep = SweepWriter(c, eid, name, params=SweepParams(space=SPACE.split(","), metrics=metric.split(","),
                                                         modes=mode.split(","), trials=trials))
    if status == INTERRUPTED:
        sweep.writer.apply(ParentInterrupt())
    elif status != RUNNING:
        sweep.end(status)
    return sweep


def _trial(sweep: SweepWriter, tid, depth, lr, seed, role, status, metrics: dict) -> None:
    """Two epochs (0, 1) of the same metrics: the export's last epoch is 1."""
    sweep.trial(tid, {"model.depth": depth, "train.lr": lr, "train.seed": seed, ROLE_KEY: role}, [metrics] * 2,
                status=status, run_name=f"d{depth}-s{seed}-{tid}")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    folder = tmp_path_factory.mktemp("store")
    st = make_store(folder)
    uri, c, eid = st.uri, st.client, st.experiment_id
    alpha = _parent(c, eid, "alpha", "val_acc", "max", 7, "running")
    for tid, d, lr, seed, role, status, acc in ALPHA:
        _trial(alpha, tid, d, lr, seed, role, status, {"val_acc": acc})
    beta = _parent(c, eid, "beta", "val_acc,grad_ratio", "max,max", 4, "finished")
    for tid, d, lr, acc, ratio in BETA:
        _trial(beta, tid, d, lr, 0, "candidate", "finished", {"val_acc": acc, "grad_ratio": ratio})
    c.log_text(beta.parent_id, json.dumps(_verdict("no", "validated", 0.81, 0.02, 0)), "report/verdict.json")
    gamma = _parent(c, eid, "gamma", "val_acc", "max", 1, "interrupted")
    _trial(gamma, "g1", 2, 0.01, 0, "candidate", "interrupted", {"val_acc": 0.5})
    c.log_text(gamma.parent_id, json.dumps(_verdict("yes", "control failed", 0.9, 3.5, 2)), "report/verdict.json")
    return {"uri": uri, "folder": folder, "client": c,
            "parents": {"alpha": alpha.parent_id, "beta": beta.parent_id, "gamma": gamma.parent_id}}


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    code = cli.main(args)
    out, err = capsys.readouterr()
    return code, out, err


# ---- ls ------------------------------------------------------------------------------------------
def test_ls_lists_state_counts_and_verdict(store, capsys):
    code, out, err = run_cli(["ls", "--tracking-uri", store["uri"]], capsys)
    assert code == 0, err
    rows = {line.split()[0]: line for line in out.splitlines()[1:]}
    assert set(rows) == {"alpha", "beta", "gamma"}
    assert rows["alpha"].split()[1:4] == ["capsweep", "running", "6/7"]
    assert "4 finished, 1 failed, 1 running" in rows["alpha"] and rows["alpha"].rstrip().endswith("-")
    assert rows["beta"].split()[2:4] == ["finished", "4/4"] and "escaped: no (validated)" in rows["beta"]
    assert rows["gamma"].split()[2] == "interrupted" and "escaped: yes (control failed)" in rows["gamma"]


# ---- status --------------------------------------------------------------------------------------
def test_status_counts_and_best_so_far(store, capsys):
    code, out, err = run_cli(["status", "alpha", "--tracking-uri", store["uri"]], capsys)
    assert code == 0, err
    lines = out.splitlines()
    # ended = 4 finished + 1 failed of 7 planned; 6 runs exist, so 1 not started
    assert lines[0] == "sweep 'alpha' (experiment 'capsweep'): running, 5/7 trials ended"
    assert lines[1] == "  trials: 4 finished, 1 failed, 1 running, 1 not started"
    # the best candidate so far is the running t6 (0.97); the reference's 0.95 does not count. It is named
    # by its run name, as the MLflow UI lists it; Tune's trial id last
    assert lines[2] == ("  best so far: val_acc=0.97 (run d3-s0-t6, running, seed 0; model.depth=3, train.lr=0.01; "
                        "Tune trial t6)")


# ---- export --------------------------------------------------------------------------------------
def test_export_csv_is_the_trial_table(store, tmp_path, capsys):
    path = tmp_path / "alpha.csv"
    code, out, err = run_cli(["export", "alpha", "--csv", str(path), "--tracking-uri", store["uri"]], capsys)
    assert code == 0 and "6 trials of sweep 'alpha'" in err
    rows = list(csv.DictReader(path.open()))
    assert [r["trial_id"] for r in rows] == [t[0] for t in ALPHA]
    for r, (tid, d, lr, seed, role, status, acc) in zip(rows, ALPHA):
        assert (int(r["model.depth"]), float(r["train.lr"]), int(r["seed"]), r["role"], r["status"]) == \
            (d, lr, seed, role, status)
        assert float(r["val_acc"]) == acc and float(r["epoch"]) == 1.0
    code, out, _ = run_cli(["export", "beta", "--tracking-uri", store["uri"]], capsys)     # stdout
    table = list(csv.DictReader(io.StringIO(out)))
    assert code == 0 and sorted(float(r["grad_ratio"]) for r in table) == sorted(t[4] for t in BETA)


# ---- compare -------------------------------------------------------------------------------------
def test_compare_two_logged_verdicts_side_by_side(store, capsys):
    code, out, err = run_cli(["compare", "beta", "gamma", "--tracking-uri", store["uri"]], capsys)
    assert code == 0, err
    cells = {line[:line.index("  ")].strip(): line.split()[-2:] for line in out.splitlines()[1:]}
    assert out.splitlines()[1].split()[-4:] == ["logged", "report", "logged", "report"]
    assert cells["escaped"] == ["no", "yes"]
    assert cells["escaping configurations"] == ["0", "2"]
    assert cells["depth 2 best test_acc"] == ["0.81", "0.9"]
    assert cells["depth 2 best grad_ratio"] == ["0.02", "3.5"]


def test_compare_computes_a_missing_verdict_and_says_why_it_cannot(store, capsys):
    # alpha has no report: the analysis package is asked, and its refusal (no probes logged) is one line
    code, out, err = run_cli(["compare", "alpha", "beta", "--tracking-uri", store["uri"]], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith("capsweep: error: sweep 'alpha': ") and "probes" in err


# ---- best configurations on the parent run ---------------------------------------------------------
def test_pareto_mask_against_a_brute_force_reference():
    import numpy as np
    rng = np.random.default_rng(0)
    for _ in range(50):
        v = rng.integers(0, 4, size=(12, 3)).astype(float)       # ties on purpose
        modes = ["max", "min", "max"]
        s = v * np.array([1, -1, 1])
        brute = [not any((s[j] >= s[i]).all() and (s[j] > s[i]).any() for j in range(len(s))) for i in range(len(s))]
        assert sweep_best.pareto_mask(v.tolist(), modes) == brute
    assert sweep_best.pareto_mask([[1.0, math.nan], [0.0, 0.0]], ["max", "max"]) == [False, True]


def test_log_best_single_objective(store):
    c, pid = store["client"], store["parents"]["alpha"]
    best = sweep_best.log_best(c, pid, ["model.depth", "train.lr"], ["val_acc"], ["max"])
    # finished candidates only: (1, 0.01) mean 0.7; (2, 0.01) 0.9 (its failed seed left out)
    assert [(b["params"], b["values"]) for b in best] == [({"model.depth": "2", "train.lr": "0.01"}, {"val_acc": 0.9})]
    run = c.get_run(pid)
    assert run.data.tags["capsweep.best.model.depth"] == "2" and run.data.metrics["best.val_acc"] == 0.9
    doc = _artifact_json(c, pid, "best.json")
    assert doc["kind"] == "best" and doc["best"][0]["run_ids"] and doc["best"][0]["seeds"] == ["0"]


def test_log_best_pareto_set(store):
    c, pid = store["client"], store["parents"]["beta"]
    best = sweep_best.log_best(c, pid, ["model.depth", "train.lr"], ["val_acc", "grad_ratio"], ["max", "max"])
    assert [b["params"]["model.depth"] for b in best] == ["1", "2"]           # A then B, by val_acc
    doc = _artifact_json(c, pid, "best.json")
    assert doc["kind"] == "pareto" and [b["values"] for b in doc["best"]] == \
        [{"val_acc": 0.9, "grad_ratio": 1.0}, {"val_acc": 0.8, "grad_ratio": 2.0}]
    assert c.get_run(pid).data.tags["capsweep.best.count"] == "2"


def _artifact_json(client, run_id: str, path: str) -> dict:
    import tempfile
    from pathlib import Path
    with tempfile.TemporaryDirectory() as tmp:
        return json.loads(Path(client.download_artifacts(run_id, path, tmp)).read_text())


# ---- --version, --dry-run, validate overrides, help ----------------------------------------------
def test_version(capsys):
    from importlib.metadata import version
    code, out, _ = run_cli(["--version"], capsys)
    assert code == 0 and out.strip() == f"capsweep {version('capsweep')}"


@pytest.mark.parametrize("command", ["run", "submit"])
def test_dry_run_prints_the_resolved_spec_and_count_and_starts_nothing(command, tmp_path, monkeypatch, capsys):
    import yaml
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli([command, "smoke", "seeds=[0,1,2]", "--dry-run"], capsys)
    assert code == 0, err
    spec = yaml.safe_load(out)
    assert spec["seeds"] == [0, 1, 2] and spec["name"] == "smoke"
    grid = math.prod(len(v["grid"]) for v in spec["space"].values())
    depths = sorted(set(spec["space"]["model.depth"]["grid"]))
    # the grid x seeds and one cnn per swept depth and seed (README, "Run a sweep"), counted as the verdict
    # judges them: a depth-0 network (CapsNet or cnn) is a reference, a deeper cnn a control
    deep = sum(d > 0 for d in depths)
    n_cand = grid * 3 * deep // len(depths)
    n_ref, n_ctrl = grid * 3 - n_cand + 3, deep * 3
    assert out.splitlines()[-1].startswith(f"# {n_cand + n_ref + n_ctrl} trials ({n_cand} candidates, {n_ref} "
                                           f"references, {n_ctrl} controls)")
    assert list(tmp_path.iterdir()) == []          # no store, no Ray state


def test_validate_takes_overrides_like_run(capsys):
    code, out, err = run_cli(["validate", "smoke", "seeds=[0]", "--set", "controls=false"], capsys)
    assert code == 0, err
    assert out.splitlines()[0] == "smoke: ok (4 trials (2 candidates, 2 references, 0 controls), search grid)"


def test_every_flag_has_help():
    parser = cli.build_parser()
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    missing = [f"{name} {a.dest}" for name, p in [("capsweep", parser), *subs.choices.items()]
               for a in p._actions if not a.help and not isinstance(a, argparse._SubParsersAction)]
    assert missing == []
    from analysis.cli import build_parser as report_parser
    assert all(a.help for a in report_parser()._actions)


# ---- one convention: the sweep positional (or --sweep), store options before the subcommand too ------
def test_the_sweep_is_positional_or_sweep_and_store_options_go_before_the_subcommand(store, capsys):
    uri = store["uri"]
    forms = [["status", "alpha", "--tracking-uri", uri],
             ["status", "--sweep", "alpha", "--tracking-uri", uri],
             ["--tracking-uri", uri, "status", "alpha"],
             [f"--tracking-uri={uri}", "--experiment", "capsweep", "status", "--sweep", "alpha"],
             ["--tracking-uri", "sqlite:///elsewhere.db", "status", "alpha", "--tracking-uri", uri]]   # after wins
    outs = [run_cli(f, capsys) for f in forms]
    assert all(code == 0 for code, _, _ in outs), outs
    assert len({out for _, out, _ in outs}) == 1 and outs[0][1].startswith("sweep 'alpha'")
    ls = [run_cli(f, capsys) for f in (["ls", "--tracking-uri", uri], ["--tracking-uri", uri, "ls"])]
    assert ls[0] == ls[1] and ls[0][0] == 0 and "alpha" in ls[0][1]
    assert run_cli(["export", "--sweep", "beta", "--tracking-uri", uri], capsys) == \
        run_cli(["--tracking-uri", uri, "export", "beta"], capsys)
    # `confirm --sweep S key=value`: the override stays an override
    args = cli.build_parser().parse_args(["confirm", "--sweep", "beta", "base.train.epochs=2"])
    cli._resolve_sweep(cli.build_parser(), args)
    assert args.sweep == "beta" and args.overrides == ["base.train.epochs=2"]
    # report takes the sweep positionally, through the global options too
    code, out, err = run_cli(["--tracking-uri", uri, "report", "nosuch"], capsys)
    assert code == 2 and "sweep 'nosuch' not found" in err


@pytest.mark.parametrize("command", ["run", "submit", "validate"])
def test_store_options_before_a_spec_command_set_the_specs_mlflow_section(command, tmp_path, monkeypatch, capsys):
    """run/submit/validate take the store from the spec: the options before them become its
    mlflow.tracking_uri / mlflow.experiment, and an explicit override still wins."""
    import yaml
    monkeypatch.chdir(tmp_path)
    if command == "validate":
        code, out, err = run_cli(["--tracking-uri", "sqlite:///nope/x.db", "validate", "smoke",
                                  "mlflow.tracking_uri=ftp://x"], capsys)
        assert code == 2 and "mlflow.tracking_uri" in err and "ftp://x" in err     # the user's own override won
        code, out, err = run_cli(["--experiment", "mine", "validate", "smoke"], capsys)
        assert code == 0 and out.startswith("smoke: ok"), err
        return
    code, out, err = run_cli(["--tracking-uri", "sqlite:///other.db", "--experiment", "mine", command, "smoke",
                              "--dry-run"], capsys)
    assert code == 0, err
    spec = yaml.safe_load(out)
    assert spec["mlflow"] == {**spec["mlflow"], "tracking_uri": "sqlite:///other.db", "experiment": "mine"}
    code, out, err = run_cli(["--experiment", "mine", command, "smoke", "mlflow.experiment=theirs", "--dry-run"], capsys)
    assert code == 0 and yaml.safe_load(out)["mlflow"]["experiment"] == "theirs"
    assert list(tmp_path.iterdir()) == []


# ---- bad input: exit 2, one line naming the field ----------------------------------------------------
BAD = [
    (["bogus"], "invalid choice"),
    (["train", "model.depth=-1"], "model.depth"),
    (["run", "nosuchspec"], "spec"),
    (["run", "smoke", "notkeyvalue"], "override"),
    (["run", "smoke", "num_samples=0", "--dry-run"], "num_samples"),
    (["run", "smoke", "storage_path=ftp://host/x"], "storage_path"),
    (["run", "smoke", "--verbose", "9"], "--verbose"),
    (["validate", "smoke", "num_samples=0"], "num_samples"),
    (["validate"], "SPEC_OR_OVERRIDE"),
    (["submit", "smoke", "seeds=[]"], "seeds"),
    (["ui", "--port", "abc"], "--port"),
    (["ui", "--port", "0", "--tracking-uri", "sqlite:////nonexistent-folder/m.db"], "nonexistent-folder"),
    (["ls", "--tracking-uri", "sqlite:///{tmp}/absent.db"], "--tracking-uri"),
    (["ls", "--experiment", "nope", "--tracking-uri", "{uri}"], "--experiment"),
    (["status"], "name the sweep"),
    (["status", "alpha", "--sweep", "beta", "--tracking-uri", "{uri}"], "named twice"),
    (["report", "alpha", "--sweep", "beta"], "named twice"),
    (["--tracking-uri"], "--tracking-uri"),
    (["status", "nosuch", "--tracking-uri", "{uri}"], "sweep"),
    (["compare", "beta"], "b"),
    (["compare", "beta", "beta", "--tracking-uri", "{uri}"], "compare"),
    (["compare", "beta", "nosuch", "--tracking-uri", "{uri}"], "sweep"),
    (["export", "nosuch", "--tracking-uri", "{uri}"], "sweep"),
    (["export", "alpha", "--csv", "/nonexistent-folder/x.csv", "--tracking-uri", "{uri}"], "--csv"),
    (["report", "--alpha", "2"], "--alpha"),
    (["report", "--experiment", "nope", "--tracking-uri", "{uri}"], "experiment"),
    (["report", "--tracking-uri", "sqlite:///{tmp}/absent.db"], "does not exist"),
]


@pytest.mark.parametrize("args, field", BAD, ids=[" ".join(a[:2]) for a, _ in BAD])
def test_bad_input_is_one_line_and_exit_2(store, tmp_path, monkeypatch, capsys, args, field):
    monkeypatch.chdir(tmp_path)
    args = [a.format(uri=store["uri"], tmp=tmp_path) for a in args]
    code, out, err = run_cli(args, capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, (code, err)
    assert len(lines) == 1 and field in lines[0] and "error" in lines[0], err
    assert "Traceback" not in err
