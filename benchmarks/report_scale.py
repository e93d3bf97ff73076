"""`capsweep report` at 300 / 1,000 / 10,000 trials: time and peak memory on a synthetic store.

    python benchmarks/report_scale.py [--trials 300 1000 10000] [--epochs 10] [--workdir DIR]
        [--tracking-uri URI] [--profile]

Builds (once per size; kept in --workdir and reused) an MLflow store holding one sweep of N
capsweep-shaped trials: the flattened config of a real trial as params (`capsmodels.config.flatten`
of a resolved `tiny` config, plus `trial.role`), every probe of docs/PROBES.md per layer for
--epochs epochs (about 60-90 metrics per epoch, as a real trial logs), the capsweep tags, configurations
of depth 0-5 x routing iterations 1-5 x a learning rate per block of 30, 3 seeds each, and cnn
controls at each depth. Into a sqlite store the first trial is written with MLflow's `log_batch`
and the rest are copied from it in SQL batches (--api-writes: every trial through the API, about
1 s per trial on this machine).
Then `capsweep report` runs on it in a fresh process (the CLI's own `main`, the report's plots and
files included, not logged back: --no-log-artifacts), timed, with its peak resident memory from
`getrusage`, the wall time of its steps (read: load_sweep; verdict: annotate + compute_verdict;
plots: make_plots; files: the rest of write_report) and the load average before and after. --profile prints the 25 most expensive functions of that report (cProfile).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

EXPERIMENT = "capsweep"


def trial_params(i: int) -> tuple[dict, dict]:
    """(params, structure) of trial i: config c = i // 3 (seed i % 3); every 6th block a cnn control."""
    from capsmodels import config as cfgmod
    c, seed = divmod(i, 3)
    depth, iterations, block = c % 6, 1 + (c // 6) % 5, c // 30
    arch = "cnn" if block % 7 == 6 else "capsnet"
    lr = round(1e-3 * (1 + 0.01 * block), 6)
    cfg = cfgmod.from_dict({"model": {"preset": "tiny", "depth": depth, "iterations": iterations, "arch": arch},
                            "data": {"name": "mnist5k"}, "train": {"lr": lr, "seed": seed, "epochs": 10}})
    params = {k: str(v) for k, v in cfgmod.flatten(cfgmod.to_dict(cfg)).items()}
    params["trial.role"] = "control" if arch == "cnn" else "candidate"
    return params, {"depth": depth, "seed": seed, "arch": arch, "c": c}


def epoch_metrics(depth: int, seed: int, c: int, epoch: int, epochs: int, arch: str) -> dict:
    """Every metric a trial logs at one epoch, ramping to its final value; deterministic in (c, seed)."""
    last = depth + 1
    frac = (epoch + 1) / epochs
    health = ((c * 7919 + seed * 104729) % 1000) / 1000          # 0..1, a spread of behaviours
    acc = (0.6 + 0.35 * health) * (0.6 + 0.4 * frac)
    m = {"train_loss": 1 - acc, "train_acc": acc + 0.01, "val_loss": 1 - acc, "val_acc": acc,
         "test_loss": 1 - acc, "test_acc": acc - 0.005, "images_per_s": 900.0 + seed,
         "peak_mem_mb": 120.0, "time_s": 5.0 + 0.1 * epoch, "epoch": float(epoch)}
    ratio = 1.0 if depth == 0 else 10 ** (-3 + 3 * health)
    for l in range(last + 1):
        g = 0.05 * (1 + 0.05 * seed) * (1 / ratio) ** (max(l - 1, 0) / max(last - 1, 1))
        hidden = 1 <= l <= depth
        m[f"grad_norm/l{l}"] = g
        m[f"grad_rms/l{l}"] = g / 100
        m[f"act_grad/l{l}"] = g
        m[f"dead_frac/l{l}"] = (1 - health) * 0.5 if hidden else 0.0
        m[f"starved_frac/l{l}"] = (1 - health) * 0.4 if hidden else 0.0
        m[f"frozen_frac/l{l}"] = (1 - health) * 0.3 if hidden else 0.0
        m[f"act_mean/l{l}"] = 0.3
        if arch == "capsnet":
            m[f"squash_gain/l{l}"] = 0.4
            if l >= 1:
                m[f"tree_score/l{l}"] = 0.3
                m[f"tree_score_null/l{l}"] = 0.1
                m[f"routing_dynamics/l{l}"] = 0.02
                m[f"routing_dynamics_null/l{l}"] = 0.005
    m["grad_ratio"] = ratio
    for name in ("dead_frac", "starved_frac", "frozen_frac"):
        m[f"{name}_max"] = max((m[f"{name}/l{l}"] for l in range(1, depth + 1)), default=0.0)
    return m


def build_store(uri: str, sweep: str, n: int, epochs: int, progress: bool = True) -> float:
    """Write sweep `sweep` of n trials into the store at `uri`; returns seconds taken."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param, RunTag
    t0 = time.perf_counter()
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(EXPERIMENT)
    exp_id = exp.experiment_id if exp else client.create_experiment(EXPERIMENT)
    parent = client.create_run(exp_id, run_name=sweep,
                               tags={"capsweep.role": "parent", "capsweep.sweep": sweep}).info.run_id
    now = int(time.time() * 1000)
    for i in range(n):
        params, s = trial_params(i)
        tags = {"mlflow.parentRunId": parent, "capsweep.role": "trial", "capsweep.sweep": sweep,
                "capsweep.trial_id": f"{sweep}_{i:05d}", "capsweep.seed": str(s["seed"]),
                "capsweep.status": "finished", "capsweep.git_commit": "abc1234"}
        rid = client.create_run(exp_id, run_name=tags["capsweep.trial_id"], start_time=now).info.run_id
        metrics = [Metric(k, float(v), now + e, e) for e in range(epochs)
                   for k, v in epoch_metrics(s["depth"], s["seed"], s["c"], e, epochs, s["arch"]).items()]
        plist = [Param(k, v) for k, v in params.items()]
        tlist = [RunTag(k, v) for k, v in tags.items()]
        for start in range(0, max(len(metrics), len(plist)), 1000):      # MLflow's batch limits
            client.log_batch(rid, metrics=metrics[start:start + 1000], params=plist[start:start + 100]
                             if start == 0 else [], tags=tlist if start == 0 else [])
        client.set_terminated(rid, "FINISHED", end_time=now + 1000)
        if progress and (i + 1) % 100 == 0:
            print(f"\r  {sweep}: {i + 1}/{n} trials written", end="", file=sys.stderr, flush=True)
    client.set_terminated(parent, "FINISHED")
    if progress:
        print(file=sys.stderr)
    return time.perf_counter() - t0


def build_store_sql(uri: str, sweep: str, n: int, epochs: int, progress: bool = True) -> float:
    """The same sweep as `build_store`, for a sqlite store, 100x faster: trial 0 is written through
    MLflow's API (so every column of MLflow's schema gets MLflow's own values), then trials 1..n-1 are
    rows copied from it with their own ids, params, tags and metrics in executemany batches."""
    import sqlite3
    import uuid
    t0 = time.perf_counter()
    build_store(uri, sweep, 1, epochs, progress=False)
    db = sqlite3.connect(uri[len("sqlite:///"):])
    db.execute("PRAGMA synchronous = OFF")      # a benchmark store: rebuilt, never recovered
    tmpl_id, = db.execute("SELECT r.run_uuid FROM runs r JOIN tags t ON t.run_uuid = r.run_uuid "
                          "WHERE t.key = 'capsweep.trial_id' AND t.value = ?", (f"{sweep}_00000",)).fetchone()
    cols = [c[1] for c in db.execute("PRAGMA table_info(runs)")]
    tmpl = dict(zip(cols, db.execute("SELECT * FROM runs WHERE run_uuid = ?", (tmpl_id,)).fetchone()))
    parent = db.execute("SELECT value FROM tags WHERE run_uuid = ? AND key = 'mlflow.parentRunId'",
                        (tmpl_id,)).fetchone()[0]
    now = int(tmpl["start_time"])
    runs, tags, params, metrics, latest = [], [], [], [], []

    def flush():
        db.executemany(f"INSERT INTO runs ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})", runs)
        db.executemany("INSERT INTO tags (key, value, run_uuid) VALUES (?, ?, ?)", tags)
        db.executemany("INSERT INTO params (key, value, run_uuid) VALUES (?, ?, ?)", params)
        db.executemany("INSERT INTO metrics (key, value, timestamp, run_uuid, step, is_nan) "
                       "VALUES (?, ?, ?, ?, ?, 0)", metrics)
        db.executemany("INSERT INTO latest_metrics (key, value, timestamp, step, is_nan, run_uuid) "
                       "VALUES (?, ?, ?, ?, 0, ?)", latest)
        db.commit()
        for rows in (runs, tags, params, metrics, latest):
            rows.clear()

    for i in range(1, n):
        rid = uuid.uuid4().hex
        name = f"{sweep}_{i:05d}"
        p, s = trial_params(i)
        row = dict(tmpl, run_uuid=rid, name=name,
                   artifact_uri=str(tmpl["artifact_uri"]).replace(tmpl_id, rid))
        runs.append(tuple(row[c] for c in cols))
        t = {"mlflow.parentRunId": parent, "mlflow.runName": name, "capsweep.role": "trial",
             "capsweep.sweep": sweep, "capsweep.trial_id": name, "capsweep.seed": str(s["seed"]),
             "capsweep.status": "finished", "capsweep.git_commit": "abc1234"}
        tags += [(k, v, rid) for k, v in t.items()]
        params += [(k, v, rid) for k, v in p.items()]
        for e in range(epochs):
            m = epoch_metrics(s["depth"], s["seed"], s["c"], e, epochs, s["arch"])
            metrics += [(k, float(v), now + e, rid, e) for k, v in m.items()]
        latest += [(k, float(v), now + epochs - 1, epochs - 1, rid) for k, v in m.items()]
        if i % 500 == 0:
            flush()
            if progress:
                print(f"\r  {sweep}: {i}/{n} trials written", end="", file=sys.stderr, flush=True)
    flush()
    db.close()
    if progress:
        print(file=sys.stderr)
    return time.perf_counter() - t0


REPORT = """
import cProfile, functools, importlib, json, pstats, resource, sys, time, io
from sweeps import cli
argv = json.loads(sys.argv[1]); profile = sys.argv[2] == "1"
phases = {}
def timed(mod, name, phase):      # wall time of one step of the report, summed over its calls
    m = importlib.import_module(mod); f = getattr(m, name)
    @functools.wraps(f)
    def w(*a, **k):
        t = time.perf_counter()
        try:
            return f(*a, **k)
        finally:
            phases[phase] = phases.get(phase, 0.0) + time.perf_counter() - t
    setattr(m, name, w)
timed("analysis.load", "load_sweep", "read")
timed("analysis.verdict", "annotate", "verdict")
timed("analysis.verdict", "compute_verdict", "verdict")
timed("analysis.plots", "make_plots", "plots")
timed("analysis.report", "write_report", "files")
t0 = time.perf_counter()
if profile:
    pr = cProfile.Profile(); pr.enable()
rc = cli.main(argv)
if profile:
    pr.disable(); s = io.StringIO(); pstats.Stats(pr, stream=s).sort_stats("cumulative").print_stats(25)
    print(s.getvalue(), file=sys.stderr)
phases["files"] = phases.get("files", 0.0) - phases.get("plots", 0.0)     # write_report less its plots
print(json.dumps({"rc": rc, "seconds": time.perf_counter() - t0, "phases": phases,
                  "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "plot_worker_peak_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
                  "plot_workers": importlib.import_module("analysis.plots").plot_workers()}))
"""


def run_report(uri: str, sweep: str, out: Path, profile: bool = False) -> dict:
    argv = ["report", "--experiment", EXPERIMENT, "--tracking-uri", uri, "--sweep", sweep,
            "--out", str(out), "--no-log-artifacts"]
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", REPORT, json.dumps(argv), "1" if profile else "0"],
                       cwd=ROOT, capture_output=True, text=True, env={**os.environ, "MPLBACKEND": "Agg"})
    wall = time.perf_counter() - t0
    if profile:
        print(p.stderr[-6000:], file=sys.stderr)
    lines = [l for l in p.stdout.splitlines() if l.startswith("{")]
    if p.returncode != 0 or not lines:
        raise SystemExit(f"report failed ({p.returncode}): {p.stderr[-2000:]}")
    got = json.loads(lines[-1])
    got["wall_with_start"] = wall
    got["load"] = (load_before, os.getloadavg()[0])
    got["escaped"] = next((l for l in p.stdout.splitlines() if l.startswith("escaped:")), "")[:60]
    return got


def _phases(r: dict) -> str:
    p = r.get("phases", {})
    return " / ".join(f"{p.get(k, 0.0):.0f}" for k in ("read", "verdict", "plots", "files")) + " s"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, nargs="+", default=[300, 1000, 10000])
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--workdir", default="/tmp/capsweep-report-scale")
    ap.add_argument("--tracking-uri", default=None, help="default: sqlite:///WORKDIR/scale<N>_e<E>.db")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--api-writes", action="store_true",
                    help="write every trial through MLflow's API (slow: about 1 s per trial here)")
    a = ap.parse_args(argv)
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    built = json.loads((work / "built.json").read_text()) if (work / "built.json").exists() else {}
    rows = []
    for n in a.trials:
        sweep = f"scale{n}_e{a.epochs}"
        uri = a.tracking_uri or f"sqlite:///{work / sweep}.db"       # one store per size
        if sweep not in built:
            print(f"building {sweep} ...", file=sys.stderr)
            build = build_store_sql if uri.startswith("sqlite:///") and not a.api_writes else build_store
            built[sweep] = build(uri, sweep, n, a.epochs)
            (work / "built.json").write_text(json.dumps(built))
        r = run_report(uri, sweep, work / "reports" / sweep, a.profile)
        rows.append((n, built[sweep], r))
        print(f"{n} trials: report {r['seconds']:.1f} s in-process ({r['wall_with_start']:.1f} s with "
              f"interpreter start; {_phases(r)}), peak RSS {r['peak_mb']:.0f} MB (+ {r['plot_workers']} "
              f"plot worker(s), largest {r['plot_worker_peak_mb']:.0f} MB), load average "
              f"{r['load'][0]:.1f} before / {r['load'][1]:.1f} after; {r['escaped']}", flush=True)
    load = os.getloadavg()
    print(f"\nload average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}; stores in {work}; {a.epochs} epochs per trial")
    print("| trials | whole report | read / verdict / plots / files | peak RSS (plot workers) | load (1 min) |")
    print("|---|---|---|---|---|")
    for n, b, r in rows:
        print(f"| {n:,} | {r['wall_with_start']:.0f} s | {_phases(r)} | {r['peak_mb'] / 1024:.2f} GiB ("
              f"{r['plot_workers']} x at most {r['plot_worker_peak_mb'] / 1024:.2f}) | "
              f"{r['load'][0]:.0f}-{r['load'][1]:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
