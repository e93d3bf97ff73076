"""Warm trial workers (spec.reuse_actors, on by default): a trial on a reused worker computes exactly
what it computes in a fresh process.

A real `capsweep run` of two trials (seeds 0 and 1 of one configuration) with max_concurrent 1 on a
one-CPU local Ray: Tune runs them one after another, and the pid Tune records in every result shows
the second ran in the first one's process. Every metric of every epoch of each trial must then equal,
bit for bit, `capsmodels.train.fit` of the same config in this (fresh) process; only wall-clock,
throughput and process-memory figures may differ, since they measure the machine, not the model.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path

import pytest

from sweeps.spec import load_spec, resolve_trial
from tests.helpers.sweep import ROOT, capsweep_cmd, write_spec

# what measures the machine rather than the model (docs/PROBES.md: timing and memory figures)
MACHINE = ("time_s", "images_per_s", "peak_mem_mb")


def test_reused_worker_gives_the_same_metrics_as_a_fresh_process(tmp_path):
    storage = tmp_path / "ray"
    spec_path = write_spec(tmp_path / "warm.yaml", "warm", "model.depth: {grid: [1]}", seeds="[0, 1]",
                           epochs=2, tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", storage=str(storage),
                           extra="max_concurrent: 1\n")
    spec = load_spec(str(spec_path))
    assert spec.reuse_actors is True                       # the default
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MPLBACKEND": "Agg"}
    run = subprocess.run(capsweep_cmd("run", str(spec_path), "--num-cpus", "1", "--verbose", "0"),
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]

    by_seed = {}
    for f in storage.glob("warm/*/result.json"):
        lines = [json.loads(l) for l in f.read_text().splitlines() if l.strip()]
        seed = int(lines[0]["config"]["train.seed"])
        by_seed[seed] = lines
    assert sorted(by_seed) == [0, 1]
    pids = {seed: {r["pid"] for r in lines} for seed, lines in by_seed.items()}
    assert len(pids[0]) == len(pids[1]) == 1 and pids[0] == pids[1], \
        f"the second trial did not run on the first one's worker: pids {pids}"

    from capsmodels.train import fit
    for seed, lines in sorted(by_seed.items()):
        cfg = resolve_trial(spec.base, {"model.depth": 1, "train.seed": seed})
        fresh = []
        fit(cfg, lambda m: fresh.append(dict(m)))
        assert len(fresh) == len(lines) == cfg.train.epochs
        for epoch, (want, got) in enumerate(zip(fresh, lines)):
            keys = [k for k in want if isinstance(want[k], (int, float)) and not isinstance(want[k], bool)
                    and k not in MACHINE]
            assert len(keys) > 20, keys
            differ = {k: (want[k], got.get(k)) for k in keys
                      if not (got.get(k) == want[k] or (math.isnan(want[k]) and got.get(k) is not None
                                                         and math.isnan(got[k])))}
            assert not differ, f"seed {seed} epoch {epoch}: reused worker vs fresh process differ: {differ}"
