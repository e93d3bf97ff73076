"""What the sweep framework costs: N short trials as a capsweep sweep against the same trials in a loop.

    python benchmarks/sweep_overhead.py [--trials 4] [--trial-seconds 60] [--concurrency 1 2]
        [--epochs 0] [--dataset mnist5k] [--workdir DIR] [--reuse-actors] [--bracket] [--quick]
    python benchmarks/sweep_overhead.py --from-json DIR/results.json     # print an earlier report

Every trial is the same `tiny`-preset CapsNet (threads=1) on one dataset, differing only in its seed.
A short calibration run of `capsmodels.train.fit` sizes it (epochs, then train_size) so that one trial
takes about --trial-seconds on this machine. Then, each as a fresh subprocess, so that interpreter start
and imports count on both sides as a user would see them:

1. loop: the N configs one after another with `capsmodels.train.fit` (dataset loaded once);
2. sweep c: the same N trials as a real `capsweep run` (the CLI's own `main`, in its own process) with
   max_concurrent=c, resources.cpu=1, references and controls off (the same N trials, nothing added),
   a local Ray with num_cpus=c, and a fresh sqlite MLflow store and Ray storage folder in the work folder;
3. loop x c (each c > 1): the loop on a pool of c plain processes, the speed-up the machine allows at all;
4. --reuse-actors: sweep 1 again with `reuse_actors: true` in its spec (one warm worker runs trial
   after trial);
5. --bracket: the loop again at the end; the baseline is the mean of both, which evens out a load drift.

The table gives wall time, per-trial time, overhead against the plain loop of the same concurrency,
trials/hour and the speed-up of c concurrent trials over one. Below it each sweep's wall time is taken
apart: outside Tuner.fit by wrapping the runner's own functions (spec, checks, data, MLflow setup, Ray
start, Tune set-up, Ray shutdown) and timing the interpreter's exit; inside Tuner.fit from each trial's
MLflow run, read through MlflowClient (opened when Tune starts the trial, closed when it completes;
the per-epoch `time_s` history), and Ray's result.json (time inside the trainable). The summary turns
that into per-trial overhead (trial span + gap to the next, less the loop's fit) and a fixed cost per
sweep, which is what extrapolates to other N and S. A trial's per-epoch state save (the state `fit`
hands its `checkpoint` callback, written by `sweeps.trainable.save_state`) is also timed alone.

CPU time is reported beside wall time because on a shared machine wall time partly measures the other
tenants: loops are exact (RUSAGE_CHILDREN), sweeps are sampled from /proc over the whole process tree
(driver, each of Ray's system processes, trial workers) every 0.2 s, so each process's last fraction of
a second is missed. The 1-minute load average during each phase is printed: read the figures with it.

The parts live in benchmarks/overhead/ (one job each; see its __init__); this file is the command line.
"""
from __future__ import annotations

import time

_T0 = time.time()          # first thing: a child process reports its own start-up from here

import argparse  # noqa: E402
import atexit  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Optional  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.overhead import children, launcher, report, trials  # noqa: E402  (light: no torch, ray, mlflow)

atexit.register(children.exit_marks_last)    # registered before any heavy import: runs last


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=4, help="trials N (seeds 0..N-1 of one config)")
    p.add_argument("--trial-seconds", type=float, default=60.0, help="target length of one trial (s)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 2], help="concurrent trials to measure")
    p.add_argument("--epochs", type=int, default=0,
                   help="epochs per trial (0: as many full-split epochs as fit in --trial-seconds)")
    p.add_argument("--dataset", default="mnist5k", choices=trials.DATASETS)
    p.add_argument("--workdir", default=None, help="where stores, logs and results go (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the temp work folder")
    p.add_argument("--no-pool", action="store_true", help="skip the plain multi-process loop baselines")
    p.add_argument("--bracket", action="store_true",
                   help="run the plain loop again at the end; the baseline is the mean of both runs")
    p.add_argument("--reuse-actors", action="store_true",
                   help="also run the 1-concurrent sweep with reuse_actors: true in its spec")
    p.add_argument("--quick", action="store_true",
                   help="a smoke of this script: 2 trials of about 6 s, no multi-process loop")
    p.add_argument("--json", default=None, help="also write all measurements to this JSON file")
    p.add_argument("--from-json", default=None, help="print the report of an earlier run's JSON, run nothing")
    for hidden in ("--_child", "--_out", "--_base", "--_seeds", "--_spec"):
        p.add_argument(hidden, default=None, help=argparse.SUPPRESS)
    p.add_argument("--_workers", type=int, default=2, help=argparse.SUPPRESS)
    p.add_argument("--_num-cpus", dest="_num_cpus", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.trials, args.trial_seconds, args.no_pool = 2, 6.0, True
        args.epochs = args.epochs or 2        # the per-epoch breakdown needs a second epoch
    if args.trials < 1 or args.trial_seconds <= 0 or any(c < 1 for c in args.concurrency):
        p.error("--trials and --concurrency must be >= 1 and --trial-seconds > 0")
    args.concurrency = sorted(set(args.concurrency) | {1})
    return args


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    if args.from_json:
        try:
            res = json.loads(Path(args.from_json).read_text())
        except (OSError, ValueError) as e:
            print(f"sweep_overhead: --from-json {args.from_json}: cannot be read ({e})", file=sys.stderr)
            return 2
        print(report.report(res))
        return 0
    if args._child:
        out = Path(args._out)
        if args._child == "sweep":
            return children.child_sweep(Path(args._spec), args._num_cpus, out, _T0)
        base = json.loads(Path(args._base).read_text())
        seeds = [int(s) for s in args._seeds.split(",")]
        if args._child == "loop":
            children.child_loop(base, seeds, out, _T0)
        else:
            children.child_pool(base, seeds, args._workers, out, _T0)
        return 0
    temp = args.workdir is None
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="capsweep-overhead-")).resolve()
    if not temp and workdir.exists() and any(workdir.iterdir()):
        print(f"sweep_overhead: --workdir {workdir} is not empty; give a new or empty folder", file=sys.stderr)
        return 2
    workdir.mkdir(parents=True, exist_ok=True)
    from capsmodels.config import ConfigError
    from capsmodels.store import DataError
    try:
        try:
            res = launcher.measure(args, workdir)
        except (ConfigError, DataError) as e:
            print(f"sweep_overhead: {e}", file=sys.stderr)
            return 2
        res["load_after"] = os.getloadavg()
        paths = [Path(args.json)] if args.json else []
        if not temp or args.keep:
            paths.append(workdir / "results.json")
        for path in paths:                   # first: a report can be printed again from it (--from-json)
            path.write_text(json.dumps(res, indent=1, default=str))
        print(report.report(res))
        if paths:
            print("\nall measurements: " + ", ".join(map(str, paths)))
    finally:
        if temp and not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
