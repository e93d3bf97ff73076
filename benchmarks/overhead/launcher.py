"""Runs each measured child as a user would (a fresh process), in order, and collects its figures.

Order: the plain loop; per concurrency c the sweep, then (c > 1) the loop on c plain processes; the
reuse_actors sweep; with --bracket the loop again. Wall time is taken from outside the child; CPU time
exactly for loops (RUSAGE_CHILDREN), sampled over the whole process tree for sweeps (sampler.py).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.overhead.collect import trial_results
from benchmarks.overhead.report import run_label
from benchmarks.overhead.sampler import TreeSampler
from benchmarks.overhead.state_save import state_save_cost
from benchmarks.overhead.trials import base_config, calibrate, sweep_spec

ROOT = Path(__file__).resolve().parents[2]
ENTRY = ROOT / "benchmarks" / "sweep_overhead.py"     # each child runs the entry script again


def launch(args: list[str], cwd: Path, log: Path, sample: bool) -> dict:
    """Run this script as a child; wall time as a user sees it, CPU time, the child's own JSON."""
    out = cwd / "child.json"
    env = dict(os.environ)
    for k in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "CAPSWEEP_INJECT_FAILURE"):
        env.pop(k, None)
    env.update({"PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0", "MPLBACKEND": "Agg"})
    cmd = [sys.executable, str(ENTRY), *args, "--_out", str(out)]
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    load0 = os.getloadavg()[0]
    t_launch = time.time()
    with open(log, "w") as logf:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=logf, stderr=subprocess.STDOUT)
        sampler = TreeSampler(proc.pid) if sample else None
        if sampler:
            sampler.start()
        rc = proc.wait()
    t_end = time.time()
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_ru = (ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime)
    tree = sampler.stop() if sampler else None
    if rc != 0 or not out.exists():
        tail = log.read_text(errors="replace").splitlines()[-25:]
        raise SystemExit(f"sweep_overhead: child {' '.join(args[:2])} failed (exit {rc}); log {log}:\n"
                         + "\n".join(tail))
    child = json.loads(out.read_text())
    exit_marks = out.with_name("exit.json")
    if exit_marks.exists():
        child["exit"] = json.loads(exit_marks.read_text())
    return {"wall": t_end - t_launch, "t_launch": t_launch, "t_end": t_end, "rc": rc, "child": child,
            "cpu": tree["total"] if tree else cpu_ru, "cpu_groups": tree["groups"] if tree else None,
            "load": tree["load"] if tree else statistics.mean([load0, os.getloadavg()[0]]),
            "log": str(log)}


def measure(args: argparse.Namespace, workdir: Path) -> dict:
    n = args.trials
    seeds = list(range(n))
    print(f"machine: {os.cpu_count()} CPUs, load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}; "
          f"work folder {workdir}", flush=True)
    cal = calibrate(args.dataset, args.trial_seconds, args.epochs, 600 if args.quick else 1500)
    base = base_config(args.dataset, cal["epochs"], cal["train_size"])
    print(f"calibration ({cal['calibration_s']:.1f} s): {cal['dataset']} tiny, epoch = "
          f"{cal['eval_s_per_epoch']:.2f} s eval + {cal['train_s_per_image'] * 1000:.2f} ms/image -> "
          f"{cal['epochs']} epochs x {cal['train_images']} images, about {cal['expected_trial_s']:.0f} s per trial",
          flush=True)
    (workdir / "base.json").write_text(json.dumps(base))
    res: dict = {"trials": n, "calibration": cal, "base": base, "runs": {},
                 "state_save": state_save_cost(base), "cpus": os.cpu_count()}

    def loop_run(c: int) -> dict:
        folder = workdir / f"loop{c}"
        folder.mkdir(parents=True, exist_ok=True)
        child = ["--_child", "loop"] if c == 1 else ["--_child", "pool", "--_workers", str(c)]
        return launch(child + ["--_base", str(workdir / "base.json"), "--_seeds", ",".join(map(str, seeds))],
                      folder, folder / "log.txt", sample=False)

    def sweep_run(kind: str, c: int) -> dict:
        folder = workdir / f"{kind}{c}"
        folder.mkdir(parents=True, exist_ok=True)
        spec = sweep_spec(f"overhead-{kind}{c}", base, seeds, c, folder, reuse_actors=kind == "reuse")
        (folder / "spec.yaml").write_text(json.dumps(spec, indent=1))   # JSON is YAML
        r = launch(["--_child", "sweep", "--_spec", str(folder / "spec.yaml"), "--_num-cpus", str(c)],
                   folder, folder / "log.txt", sample=True)
        r["trials"], r["spans"] = trial_results(folder / "ray_results", spec["mlflow"]["tracking_uri"],
                                                spec["mlflow"]["experiment"])
        return r

    order = [("loop", 1)]
    for c in args.concurrency:
        order.append(("sweep", c))
        if c > 1 and not args.no_pool:
            order.append(("loop", c))
    if args.reuse_actors:
        order.append(("reuse", 1))
    if args.bracket:
        order.append(("loop", 1))
    for kind, c in order:
        print(f"running {run_label(kind, c)} ({n} trials) ...", flush=True)
        r = loop_run(c) if kind == "loop" else sweep_run(kind, c)
        r.update(kind=kind, c=c)
        key = f"{kind}{c}"
        if key in res["runs"]:                # --bracket: the loop again, at the end
            res["loop_first"] = res["runs"][key]
            r = merge_loops(res["loop_first"], r)
        res["runs"][key] = r
        print(f"  {r['wall']:.1f} s wall, {r['cpu']:.1f} CPU-s, load {r['load']:.1f}", flush=True)
    return res


def merge_loops(first: dict, last: dict) -> dict:
    """--bracket: the baseline is the mean of the loop run first and the loop run last, so a load
    that rose or fell during the benchmark does not favour the sweeps run in between."""
    out = dict(last)
    for k in ("wall", "cpu", "load"):
        out[k] = (first[k] + last[k]) / 2
    ch = dict(last["child"])
    for k in ("fits", "fit_cpu"):
        ch[k] = [(a + b) / 2 for a, b in zip(first["child"][k], last["child"][k])]
    ch["epochs"] = first["child"]["epochs"] + last["child"]["epochs"]     # more samples of the same
    out["child"] = ch
    out["bracket"] = {"first_wall": first["wall"], "last_wall": last["wall"], "first_load": first["load"],
                      "last_load": last["load"]}
    return out
