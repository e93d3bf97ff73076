"""sweeps/budget.py and its CLI: sizes of every probe value against the bounds, the sweep's cost, --yes.

Refusals are one line with exit 2 before any Ray or MLflow work (checked in a fresh process: ray is
never imported, no store or Ray folder is written); the cost is recomputed here from its stated model.
"""
from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest

from capsmodels import estimate as est
from sweeps import budget
from sweeps.spec import SpecError, load_spec, resolve_trial, total_trials

ROOT = Path(__file__).resolve().parents[2]


def _cli(args: list[str], cwd: Path) -> tuple[int, str, str, bool]:
    """Run `capsweep ARGS` in a fresh interpreter; (exit code, stdout, stderr, ray imported)."""
    code = ("import sys; from sweeps import cli; rc = cli.main(sys.argv[1:]); "
            "print('RAY-IMPORTED' if 'ray' in sys.modules else 'NO-RAY', file=sys.stderr); sys.exit(rc)")
    p = subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, capture_output=True, text=True,
                       timeout=300, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin",
                                         "HOME": str(cwd), "MPLBACKEND": "Agg"})
    err = [l for l in p.stderr.splitlines() if l not in ("RAY-IMPORTED", "NO-RAY")]
    return p.returncode, p.stdout, "\n".join(err), "RAY-IMPORTED" in p.stderr


def test_validate_a_billion_samples_prints_the_estimate_and_warns(tmp_path):
    rc, out, err, ray = _cli(["validate", "smoke", "--set", "num_samples=1000000000"], tmp_path)
    assert rc == 0, err
    assert "8000000004 trials" in out
    line = [l for l in out.splitlines() if "estimate:" in l]
    assert len(line) == 1 and "8,000,000,004 trials" in line[0] and "CPU core-hours" in line[0]
    assert "over the budget" in line[0] and "budget.max_trials 2,000" in line[0] and "--yes" in line[0]
    assert not ray


def test_a_depth_of_100000_in_the_space_is_refused_naming_the_field(tmp_path):
    rc, out, err, ray = _cli(["validate", "smoke", "--set", "space.model.depth={grid: [0, 100000]}"], tmp_path)
    assert rc == 2
    assert len(err.splitlines()) == 1
    assert err.startswith("capsweep: error: smoke: space.model.depth: value 100000 gives an estimated ")
    assert "the bound is" in err and not ray


def test_sizes_together_are_checked_when_each_alone_fits():
    """num_caps 100000 alone fits at the base's depth 0 (no hidden layer); with depth 1 it does not."""
    with pytest.raises(SpecError, match=r"^space: .*model\.depth=1.*model\.num_caps=100000 together gives"):
        load_spec("smoke", ["space.model.num_caps={grid: [8, 100000]}"])


def test_the_parameter_bound_and_bad_budget_values():
    with pytest.raises(SpecError, match=r"^base gives an estimated [\d,]+ parameters; the bound is 1,000 "):
        load_spec("smoke", ["budget.max_params=1000"])
    with pytest.raises(SpecError, match=r"^budget: "):
        load_spec("smoke", ["budget.max_hours=0"])


def test_gpu_trials_are_bounded_by_their_share_of_the_gpu():
    spec = load_spec("smoke", ["resources.gpu=0.25"])
    total, _ = budget.local_gpu_memory()
    assert budget.memory_bound(spec)[0] == int(0.25 * total)
    assert budget.memory_bound(load_spec("smoke", ["budget.max_memory_gb=3"]))[0] == 3 * 10**9


def test_cost_follows_its_stated_model():
    """smoke: 12 trials (8 candidates, 4 controls) of 2 epochs; 2,000 training images at batch 64
    (32 steps, 2,048 images), 500 validation + 500 test images; 1 CPU per trial."""
    spec = load_spec("smoke")
    c = budget.cost(spec)
    hours = []
    for depth in (0, 1):
        for iterations in (1, 3):
            cfg = resolve_trial(spec.base, {"model.depth": depth, "model.iterations": iterations})
            flops = est.estimate(cfg).flops_per_image
            per_epoch = (3 * 2048 + 1000) * flops / budget.CPU_FLOPS_PER_CORE + budget.EPOCH_FIXED_S
            hours.append(2 * per_epoch / 3600)
    assert c.exact and c.trials == total_trials(spec) == 12 and c.unit == "CPU core-hours"
    assert math.isclose(c.hours, 12 * sum(hours) / 4, rel_tol=1e-12)
    assert budget.confirmation(spec, c) is None


def test_shipped_specs_are_within_the_default_budget():
    for name in ("smoke", "depth", "routing", "capsdim", "datasize", "hunt"):
        assert budget.confirmation(load_spec(name)) is None, name


def test_run_over_the_budget_needs_yes_and_starts_nothing_without_it(tmp_path):
    args = ["run", "smoke", "budget.max_trials=5", f"storage_path={tmp_path / 'ray'}"]
    rc, out, err, ray = _cli(args, tmp_path)
    assert rc == 2
    assert err.splitlines() == [
        "capsweep: error: estimate: 12 trials, " + err.split("estimate: 12 trials, ")[1].split(":")[0]
        + ": over budget.max_trials 5; pass --yes to start it anyway"]
    assert not ray and not (tmp_path / "ray").exists() and not (tmp_path / "mlflow.db").exists()
    rc, out, err, ray = _cli(args + ["--dry-run", "--yes"], tmp_path)
    assert rc == 0, err
    assert "estimate: 12 trials" in out and "--yes given" in out
    assert not ray and not (tmp_path / "mlflow.db").exists()


def test_submit_over_the_budget_needs_yes_and_passes_bounds_that_admit_it(tmp_path):
    rc, _, err, _ = _cli(["submit", "smoke", "budget.max_trials=5", "--dry-run"], tmp_path)
    assert rc == 2 and "pass --yes" in err
    spec = load_spec("smoke", ["budget.max_trials=5"])
    admitted = budget.admitting(spec)
    assert admitted[0] == "budget.max_trials=12"
    assert budget.confirmation(load_spec("smoke", ["budget.max_trials=5", *admitted])) is None
    assert budget.admitting(load_spec("smoke")) == []
