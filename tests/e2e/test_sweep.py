"""A real Ray Tune sweep end to end on a tiny config, checked through MLflow's own API, then the report.
The sweep's space names depth 1 only: the runner adds the depth-0 references and the cnn controls.

Also: resume after the driver is SIGKILLed mid-sweep (every trial exactly once, finished trials not
rerun, nothing left RUNNING, the same parent run), a second sweep of the same name refused, and a
trial that raises retried then marked failed while the sweep completes.
"""
from __future__ import annotations

import json
import re
import signal

import numpy as np
import pytest
import yaml
from mlflow.tracking import MlflowClient

from capsmodels.contract import correct_from_tags, decode_correct

from tests.helpers.sweep import (background_sweep, capsweep_cmd, children, env_for_subprocess, parents, run, wait_for,
                                 write_spec)



# (trial.role, model.arch, model.depth) of the finished sweep's trials, each once per seed
ROLES = [("candidate", "capsnet", "1"), ("control", "cnn", "0"), ("control", "cnn", "1"), ("reference", "capsnet", "0")]


@pytest.fixture(scope="module")
def finished_sweep(tmp_path_factory):
    """One real sweep (depth 1 x 2 seeds x 2 epochs, + a depth-0 reference and cnn controls at depth 0
    (their own reference) and 1 per seed), run as a user runs it, reused by the checks."""
    work = tmp_path_factory.mktemp("sweep")
    spec = write_spec(work / "tiny.yaml", "tiny", "model.depth: {grid: [1]}", extras=True)
    # patience 1 with the cap at 2 epochs: a trial whose val_acc does not improve at epoch 1 ends there by
    # patience (as it would by the cap: the same histories), through Tune like one that reached the cap
    proc = run(capsweep_cmd("run", str(spec), "base.train.patience=1", "--num-cpus", "2"), work,
               env_for_subprocess())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{work}/mlflow.db")
    return work, client, proc


def test_sweep_logs_one_child_run_per_trial(finished_sweep):
    work, client, proc = finished_sweep
    assert "capsweep report tiny" in proc.stdout
    # Ray's notice that a local Ray has token authentication on (its default, kept) is not shown
    assert "Token authentication" not in proc.stdout + proc.stderr
    assert "8 trials (2 candidates, 4 references, 2 controls)" in proc.stdout
    (parent,) = parents(client)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["capsweep.sweep"] == "tiny"
    assert parent.data.metrics["trials_finished"] == 8
    assert (parent.data.params["sweep.candidates"], parent.data.params["sweep.references"],
            parent.data.params["sweep.controls"]) == ("2", "2", "4")
    kids = children(client)
    assert len(kids) == 8
    combos = sorted((r.data.params["trial.role"], r.data.params["model.arch"], r.data.params["model.depth"],
                     r.data.params["train.seed"]) for r in kids)
    assert combos == [(*role, seed) for role in ROLES for seed in ("0", "1")]
    for r in kids:
        assert r.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert r.info.status == "FINISHED"
        assert r.data.tags["capsweep.status"] == "finished"
        assert r.data.tags["capsweep.seed"] == r.data.params["train.seed"]
        assert r.data.tags["capsweep.trial_id"]
        assert r.data.params["data.name"] == "digits"
        assert r.data.params["model.routing"] == "dynamic"


def test_run_prints_an_overall_line_as_each_trial_ends(finished_sweep):
    """Beside Ray Tune's table: `k/8 trials ended` once per trial, in order, with the time spent and,
    until the last, an estimate of what is left (capsmodels/progress.py sweep_line)."""
    work, client, proc = finished_sweep
    lines = [l for l in proc.stdout.splitlines() if re.match(r"capsweep: \d+/8 trials ended", l)]
    assert [int(re.match(r"capsweep: (\d+)/8", l).group(1)) for l in lines] == list(range(1, 9)), lines
    assert all(" elapsed" in l for l in lines)
    assert all(", about " in l and l.endswith(" left") for l in lines[:-1])
    assert lines[-1].startswith("capsweep: 8/8 trials ended (8 finished), 0 running; ")


def test_tiny_probes_also_go_to_mlflow_as_log10_companions(finished_sweep):
    """act_grad (1e-14 in a starved network) charts as "0 0 0" on MLflow's linear axes: every epoch also
    logs log10_act_grad/l{l}, log10_grad_norm/l{l}, log10_grad_rms/l{l} and log10_grad_ratio, equal to
    the log10 of the raw value logged at that epoch (contract LOG10_*)."""
    import math
    work, client, _ = finished_sweep
    run = next(r for r in children(client) if r.data.params["model.depth"] == "1"
               and r.data.params["model.arch"] == "capsnet")
    names = set(run.data.metrics)
    for base in ("act_grad", "grad_norm", "grad_rms"):
        for layer in range(3):                          # depth 1: primaries, one hidden layer, class layer
            assert f"log10_{base}/l{layer}" in names, (base, layer)
    assert "log10_grad_ratio" in names
    for name in ("act_grad/l1", "grad_norm/l0", "grad_ratio"):
        raw = {m.step: m.value for m in client.get_metric_history(run.info.run_id, name)}
        logged = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "log10_" + name)}
        assert sorted(logged) == sorted(k for k, v in raw.items() if v > 0) and logged
        for step, v in logged.items():
            assert abs(v - math.log10(raw[step])) < 1e-12, (name, step)


def test_models_logged_and_trial_state_removed(finished_sweep):
    """Without --keep-state a trial's weights and per-epoch state go once its model is in MLflow."""
    work, client, _ = finished_sweep
    kids = children(client)
    for r in kids:
        (model,) = client.search_logged_models([r.info.experiment_id],
                                               filter_string=f"source_run_id = '{r.info.run_id}'")
        assert r.data.tags["capsweep.model_id"] == model.model_id
    exp_dir = work / "ray_results" / "tiny"
    assert not list((exp_dir / "trial_state").glob("*.pt"))
    assert sorted(p.name for p in (exp_dir / "trial_models").iterdir()) == \
        sorted(r.data.tags["capsweep.trial_id"] for r in kids)
    assert not list((exp_dir / "trial_models").glob("*/model.pt"))
    assert len({r.info.run_name for r in kids}) == 8


def test_metric_histories_have_one_point_per_epoch(finished_sweep):
    work, client, _ = finished_sweep
    for r in children(client):
        depth = int(r.data.params["model.depth"])
        names = ["val_acc", "test_acc", "train_loss", "grad_ratio", "images_per_s"]
        names += [f"{m}/l{l}" for m in ("grad_norm", "grad_rms", "act_grad", "dead_frac") for l in range(depth + 2)]
        for name in names:
            hist = client.get_metric_history(r.info.run_id, name)
            assert sorted(m.step for m in hist) == [0, 1], (name, [m.step for m in hist])
        # routing probes are absent (n/a) in an epoch where a layer is dead, and the cnn has no routing
        for l in range(1, depth + 2):
            for name in (f"tree_score/l{l}", f"routing_dynamics/l{l}"):
                steps = [m.step for m in client.get_metric_history(r.info.run_id, name)]
                assert sorted(steps) == sorted(set(steps)) and set(steps) <= {0, 1}, (name, steps)
                assert not steps or r.data.params["model.arch"] == "capsnet", name
        assert 0.0 <= r.data.metrics["val_acc"] <= 1.0


def test_best_epoch_its_figures_stop_reason_and_test_correctness(finished_sweep):
    """The contract the analysis reads (capsmodels.contract): best_epoch every epoch, best/<name> at the
    improving epochs (so its latest value is the best-val epoch's), why the trial stopped, and the
    test split's per-image correctness at the best epoch, whose mean is that epoch's test_acc."""
    work, client, _ = finished_sweep
    for r in children(client):
        rid, m, tags = r.info.run_id, r.data.metrics, r.data.tags
        hist = {name: {x.step: x.value for x in client.get_metric_history(rid, name)}
                for name in ("val_acc", "test_acc", "best_epoch", "best/test_acc", "best/val_acc", "best/act_grad/l1")}
        best = 1 if hist["val_acc"][1] > hist["val_acc"][0] else 0
        assert hist["best_epoch"] == {0: 0, 1: best}
        assert sorted(hist["best/test_acc"]) == sorted(hist["best/act_grad/l1"]) == ([0, 1] if best else [0])
        assert m["best/test_acc"] == hist["test_acc"][best] and m["best/val_acc"] == hist["val_acc"][best]
        # patience wins over the cap when both end the run at one epoch (capsmodels.train)
        assert tags["capsweep.stop_reason"] == ("epochs" if best == 1 else "patience")
        assert tags["capsweep.status"] == "finished"
        n, packed = decode_correct(correct_from_tags(tags))
        bits = np.unpackbits(np.frombuffer(packed, np.uint8), count=n)
        assert len(bits) == m["test_n"] == 200
        assert bits.mean() == pytest.approx(m["best/test_acc"], abs=1e-12)


@pytest.mark.slow     # 77 s; the default run ends trials by patience in `finished_sweep`, and checks
# ASHA's stop reason and a stopped trial's best weights on the writer (tests/sweeps/test_models.py)
def test_patience_and_asha_in_a_real_sweep(tmp_path):
    """One trial at a time, in grid order, with ASHA (rungs at epochs 1 and 2) and patience 1, cap 4:
    - lr 1e-30 moves no weight enough to change a prediction: its val_acc is the same every epoch, so
      patience ends it after epoch 1 (ASHA has nothing to compare it with yet): finished, `patience`;
    - lr 0.003 learns (0.23 after epoch 0); it ends by patience or the cap, as the reference rule says of its val_acc;
    - lr 1e-29 is the first trial again, below the rung's median (the other two), so ASHA stops it
      after epoch 0: stopped, `scheduler`, its model its state's best (the only) epoch.
    The order and the values are fixed (seeded, one trial at a time), so the outcome is too."""
    from tests.helpers.training import reference_stop
    spec = write_spec(tmp_path / "pat.yaml", "pat", "train.lr: {grid: [1.0e-30, 0.003, 1.0e-29]}", seeds="[0]",
                      epochs=4, extra="scheduler: {name: asha, grace_period: 1}\nmax_concurrent: 1\n")
    proc = run(capsweep_cmd("run", str(spec), "base.train.patience=1", "--num-cpus", "1"), tmp_path,
               env_for_subprocess())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = {float(r.data.params["train.lr"]): r for r in children(client, sweep="pat")}
    val = {lr: [x.value for x in sorted(client.get_metric_history(r.info.run_id, "val_acc"), key=lambda x: x.step)]
           for lr, r in runs.items()}
    frozen, learner, late = runs[1e-30], runs[0.003], runs[1e-29]
    assert val[0.003][0] > val[1e-30][0], "precondition: the learner beats the frozen net after epoch 0"
    assert val[1e-30] == [val[1e-30][0]] * 2
    assert (frozen.data.tags["capsweep.status"], frozen.data.tags["capsweep.stop_reason"]) == ("finished", "patience")
    last, best, reason = reference_stop(val[0.003] + [-1.0] * 4, 1, 4)
    assert len(val[0.003]) == last + 1 and learner.data.metrics["best_epoch"] == best
    assert (learner.data.tags["capsweep.status"], learner.data.tags["capsweep.stop_reason"]) == ("finished", reason)
    assert val[1e-29] == val[1e-30][:1]
    assert (late.data.tags["capsweep.status"], late.data.tags["capsweep.stop_reason"]) == ("stopped", "scheduler")
    for r in runs.values():
        assert r.info.status == "FINISHED"
        assert len(client.search_logged_models([r.info.experiment_id],
                                                filter_string=f"source_run_id = '{r.info.run_id}'")) == 1
        assert correct_from_tags(r.data.tags)
    (parent,) = parents(client)
    assert (parent.data.metrics["trials_finished"], parent.data.metrics["trials_stopped"]) == (2, 1)


def test_artifacts_spec_and_resolved_config(finished_sweep):
    work, client, _ = finished_sweep
    (parent,) = parents(client)
    spec_text = open(client.download_artifacts(parent.info.run_id, "spec.yaml")).read()
    assert yaml.safe_load(spec_text)["name"] == "tiny"
    for r in children(client):
        cfg = yaml.safe_load(open(client.download_artifacts(r.info.run_id, "config.yaml")).read())
        assert cfg["model"]["depth"] == int(r.data.params["model.depth"])
        assert cfg["model"]["arch"] == r.data.params["model.arch"]
        assert "trial" not in cfg                   # the role is a param, not part of the run config
        assert cfg["train"]["seed"] == int(r.data.params["train.seed"])
        assert cfg["model"]["conv_kernel"] == 3


def test_report_on_the_real_sweep(finished_sweep):
    from analysis.cli import main as report_main
    work, client, _ = finished_sweep
    out = work / "report"
    code = report_main(["--experiment", "capsweep", "--tracking-uri", f"sqlite:///{work}/mlflow.db",
                        "--sweep", "tiny", "--out", str(out)])
    assert code == 0
    verdict = json.loads((out / "verdict.json").read_text())
    assert verdict["escaped"] in ("yes", "no", "undecided")
    assert verdict["outcome"] in ("yes", "no", "undecided", "inconclusive", "to confirm")
    # the real path of the protocol: every trial scored at its best-val epoch (no "last epoch" note), and
    # the accuracy tests pair the two sides image by image from the logged correctness tags
    assert not any("scored at their last epoch" in n for n in verdict["notes"]), verdict["notes"]
    tests = [ch["test"] for c in verdict["configurations"] for ch in c["checks"]
             if ch["name"] == "accuracy" and "test" in ch]
    assert tests and all(t.get("test_set", "").startswith("paired over") for t in tests), tests
    assert verdict["family"]["candidates"] == 1 and verdict["confirm"]["seeds_used"] == [0, 1]
    assert (out / "report.html").stat().st_size > 1000
    (parent,) = parents(client)
    names = [a.path for a in client.list_artifacts(parent.info.run_id, "report")]
    assert any(n.endswith("verdict.json") for n in names)


def test_same_name_is_refused(finished_sweep):
    work, client, _ = finished_sweep
    proc = run(capsweep_cmd("run", str(work / "tiny.yaml")), work, env_for_subprocess(), timeout=120)
    assert proc.returncode == 2
    assert "already exists" in proc.stderr and "--resume" in proc.stderr
    assert len(children(client)) == 8 and len(parents(client)) == 1


def test_driver_killed_then_resumed(tmp_path):
    """SIGKILL the driver mid-sweep; --resume finishes: each trial once (the added reference and
    control too), finished ones not rerun."""
    spec = write_spec(tmp_path / "res.yaml", "res", "model.depth: {grid: [1]}", seeds="[0]", epochs=4, extras=True)
    env = env_for_subprocess()
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    with background_sweep("run", str(spec), "--num-cpus", "1", cwd=tmp_path, env=env):
        # kill once one trial has finished and the next has logged an epoch: truly mid-sweep
        def mid_sweep():
            runs = children(client, sweep="res")
            done = [r for r in runs if r.info.status == "FINISHED"]
            running = [r for r in runs if r.info.status == "RUNNING" and "epoch" in r.data.metrics]
            return done and running
        # killed at once (leaving the block): Tune's saved experiment state may still show the
        # finished trial running
        wait_for(mid_sweep, timeout=300, what="one trial finished and one running")
    before = {r.data.tags["capsweep.trial_id"]: r for r in children(client, sweep="res")}
    finished_before = {t: r.info.end_time for t, r in before.items() if r.info.status == "FINISHED"}
    (parent_before,) = parents(client)
    marker = _plant_in_tune_state(tmp_path / "ray_results" / "res", tmp_path / "pwned")

    proc = run(capsweep_cmd("run", str(spec), "--num-cpus", "1", "--resume"), tmp_path, env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert not marker.exists()          # Tune resumed from the driver's own copy of its state
    after = children(client, sweep="res")
    assert len(after) == 4
    assert len({r.data.tags["capsweep.trial_id"] for r in after}) == 4
    assert sorted(r.data.params["trial.role"] for r in after) == ["candidate", "control", "control", "reference"]
    (parent_after,) = parents(client)
    assert parent_after.info.run_id == parent_before.info.run_id
    assert parent_after.info.status == "FINISHED"
    for r in after:
        assert r.info.status == "FINISHED", r.data.tags.get("capsweep.error", "")[-3000:]
        hist = client.get_metric_history(r.info.run_id, "val_acc")
        assert sorted(m.step for m in hist) == [0, 1, 2, 3]        # no epoch lost, none duplicated
        tid = r.data.tags["capsweep.trial_id"]
        if tid in finished_before:                                  # finished trials were not rerun
            assert r.info.end_time == finished_before[tid]


def _plant_in_tune_state(exp_dir, marker):
    """Replace every file Tune unpickles on restore (and each trial's params.pkl) with a payload that
    touches `marker`, and add a "newer" experiment state; tests/sweeps/test_security.py has the rest."""
    from tests.helpers.payloads import fallback_json, payload
    names = [p.name for p in exp_dir.iterdir() if p.is_file()]
    assert "tuner.pkl" in names and any(n.startswith("experiment_state-") for n in names), names
    for name in names:
        if name == "tuner.pkl" or name.endswith(".pkl"):
            (exp_dir / name).write_bytes(payload("pickle", marker))
        elif name.startswith(("experiment_state-", "basic-variant-state-")):
            (exp_dir / name).write_bytes(fallback_json(marker))
    (exp_dir / "experiment_state-9999-12-31_23-59-59.json").write_bytes(fallback_json(marker))
    for params in exp_dir.glob("*/params.pkl"):
        params.write_bytes(payload("pickle", marker))
    return marker


@pytest.mark.slow     # 58 s; the default run SIGKILLs a driver and resumes it
def test_ctrl_c_stops_cleanly_and_resumes(tmp_path):
    """Ctrl-C (SIGINT) mid-trial: exit 130, no run left RUNNING, the interrupted trial continues on --resume."""
    spec = write_spec(tmp_path / "cc.yaml", "cc", "model.depth: {grid: [0, 1]}", seeds="[0]", epochs=8)
    env = env_for_subprocess()
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    with background_sweep("run", str(spec), "--num-cpus", "1", cwd=tmp_path, env=env, capture=True) as proc:
        wait_for(lambda: any(r.info.status == "RUNNING" and "epoch" in r.data.metrics
                             for r in children(client, sweep="cc")), timeout=300, what="a trial mid-way")
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out[-2000:]
    assert "--resume" in out
    runs = children(client, sweep="cc")
    assert all(r.info.status != "RUNNING" for r in runs)
    assert any(r.data.tags["capsweep.status"] == "interrupted" and r.info.status == "KILLED" for r in runs)
    (parent,) = parents(client)
    assert parent.data.tags["capsweep.status"] == "interrupted"

    proc = run(capsweep_cmd("run", str(spec), "--num-cpus", "1", "--resume"), tmp_path, env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    runs = children(client, sweep="cc")
    assert len(runs) == 2
    for r in runs:
        assert r.info.status == "FINISHED" and r.data.tags["capsweep.status"] == "finished"
        steps = sorted(m.step for m in client.get_metric_history(r.info.run_id, "val_acc"))
        assert steps == list(range(8))
    (parent,) = parents(client)
    assert parent.info.status == "FINISHED"
