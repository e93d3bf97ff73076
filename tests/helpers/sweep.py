"""Shared helpers for the tests that run real sweeps (real Ray, real MLflow store)."""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from mlflow.tracking import MlflowClient

from sweeps.spec import from_config

ROOT = Path(__file__).resolve().parents[2]

# A CapsNet small enough for 8x8 digits: 8x8 -> conv 3x3 -> 6x6 -> primary 3x3/2 -> 2x2 x 4 caps
TINY_BASE = """
base:
  model: {preset: tiny, conv_channels: [8], conv_kernel: 3, primary_channels: 4, primary_dim: 4,
          primary_kernel: 3, primary_stride: 2, num_caps: 6, caps_dim: 4, out_dim: 6, decoder: false}
  data: {name: digits, train_size: 300, val_size: 100, test_size: 200}
  train: {epochs: %(epochs)d, batch_size: 50, eval_batch: 64, threads: 1}
"""


def write_spec(path: Path, name: str, space: str, seeds="[0, 1]", epochs: int = 2, extra: str = "",
               tracking_uri: str | None = None, storage: str | None = None, extras: bool = False) -> Path:
    """A tiny sweep spec. extras: let the runner add its references and controls (sweeps/extras.py);
    off by default, so that a test runs only the trials its space names."""
    text = f"name: {name}\n" + TINY_BASE % {"epochs": epochs} + textwrap.dedent(f"""
        space:
        {textwrap.indent(textwrap.dedent(space).strip(), '  ')}
        metric: val_acc
        mode: max
        seeds: {seeds}
        resources: {{cpu: 1}}
        references: {str(extras).lower()}
        controls: {str(extras).lower()}
        """)
    if tracking_uri:
        text += f"mlflow: {{tracking_uri: '{tracking_uri}', experiment: capsweep}}\n"
    if storage:
        text += f"storage_path: '{storage}'\n"
    text += textwrap.dedent(extra)
    path.write_text(text)
    return path


def capsweep_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "sweeps.cli", *args]


@contextlib.contextmanager
def background_sweep(*args: str, cwd: Path, env: dict, capture: bool = False):
    """`capsweep ARGS` running in the background, in a session of its own so that leaving the block
    SIGKILLs it together with the Ray processes it started, whatever the test did meanwhile.
    capture: stdout+stderr as text (for `communicate`), else discarded."""
    out = subprocess.PIPE if capture else subprocess.DEVNULL
    proc = subprocess.Popen(capsweep_cmd(*args), cwd=cwd, env=env, stdout=out,
                            stderr=subprocess.STDOUT if capture else subprocess.DEVNULL, text=capture,
                            start_new_session=True)
    try:
        yield proc
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def env_for_subprocess(**extra: str) -> dict:
    env = dict(os.environ)
    env.pop("MLFLOW_TRACKING_URI", None)     # a store only when a test names one (extra=...)
    env.update({"PYTHONPATH": str(ROOT), "MPLBACKEND": "Agg", "RAY_DEDUP_LOGS": "0",
                "RAY_USAGE_STATS_ENABLED": "0"})
    env.update(extra)
    return env


def children(client: MlflowClient, experiment: str = "capsweep", sweep: str | None = None):
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    flt = "tags.`capsweep.role` = 'trial'"
    if sweep:
        flt += f" and tags.`capsweep.sweep` = '{sweep}'"
    return client.search_runs([exp.experiment_id], flt, max_results=1000)


def parents(client: MlflowClient, experiment: str = "capsweep"):
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    return client.search_runs([exp.experiment_id], "tags.`capsweep.role` = 'parent'", max_results=100)


def wait_for(predicate, timeout: float, interval: float = 0.5, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def run(cmd: list[str], cwd: Path, env: dict, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@contextlib.contextmanager
def unanswered_address():
    """A port that takes connections and never speaks: `ray.init(address=...)` there waits (Ray keeps
    retrying its GCS connection), so a driver is certain to be between its parent run and Tune."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(64)
        yield f"127.0.0.1:{s.getsockname()[1]}"


SEARCH_BASE = {"model": {"preset": "tiny"}, "data": {"name": "digits"}, "train": {"epochs": 1}}


def optuna_spec(seeds, metric="val_acc", mode="max", sampler="tpe", added=False):
    return spec_of(space={"model.depth": {"int": [0, 3]}, "model.routing": {"choice": ["dynamic", "em"]},
                          "train.lr": {"loguniform": [1e-4, 1e-2]}},
                   search={"algorithm": "optuna", "sampler": sampler}, seeds=seeds, num_samples=4,
                   metric=metric, mode=mode, references=added, controls=added)


def spec_of(**kw):
    """A validated spec of the tiny digits base, with `kw` over its fields."""
    raw = {"name": "s", "base": SEARCH_BASE, "metric": "val_acc", "mode": "max", "seeds": [0]}
    raw.update(kw)
    return from_config(raw)
