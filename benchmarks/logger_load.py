"""The sweep driver's MLflow writing path under the load of 64 GPUs: does a backlog build, and how much
of a core does it take?

    python benchmarks/logger_load.py [--minutes 10] [--trials 64] [--metrics 60] [--every 10]
        [--tracking-uri URI] [--workdir DIR]

What the driver's logger does per trial result, without Tune: `sweeps.write_queue.WriteQueue`
delivering records through `sweeps.run_writer.RunWriter` (the very classes `MlflowSweepLogger` uses),
fed at the rate of --trials concurrent trials each reporting --metrics metrics every --every seconds,
spread evenly over each period. One `Start` per trial, then `Metrics` records for --minutes. Figures:
write latency per result (put + delivery) p50/p99/max, the queue's depth after each put (its
backlog) and at the end, the process CPU time over wall time (the share of one core), and the load
average. Default store: a fresh sqlite file in --workdir (MLflow's default, as a user starts).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--trials", type=int, default=64)
    ap.add_argument("--metrics", type=int, default=60)
    ap.add_argument("--every", type=float, default=10.0, help="seconds between a trial's results")
    ap.add_argument("--tracking-uri", default=None)
    ap.add_argument("--workdir", default="/tmp/capsweep-logger-load")
    a = ap.parse_args(argv)
    import numpy as np
    from mlflow import MlflowClient
    from sweeps.run_writer import RunWriter, get_or_create_experiment, transient
    from sweeps.write_queue import Metrics, Start, WriteQueue

    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    uri = a.tracking_uri or f"sqlite:///{work / f'mlflow-{int(time.time())}.db'}"
    client = MlflowClient(uri)
    exp = get_or_create_experiment(client, "logger-load")
    parent = client.create_run(exp, run_name="load", tags={"capsweep.role": "parent"}).info.run_id
    writer = RunWriter(client, exp, parent, "load", "abc1234", uri)
    queue = WriteQueue(writer.apply, transient, work / "pending.jsonl", f"MLflow at {uri}")
    for t in range(a.trials):
        queue.put(Start(f"t{t:03d}", f"trial {t}", {"model.depth": t % 6, "train.seed": t % 3}, t % 3,
                        "model: {}\n"))
    print(f"{a.trials} trials x {a.metrics} metrics every {a.every:g} s for {a.minutes:g} min into {uri}",
          file=sys.stderr)
    gap = a.every / a.trials                    # one result every `gap` seconds, trials in turn
    n = int(a.minutes * 60 / gap)
    lat, depth = np.zeros(n), np.zeros(n, int)
    cpu0, t0 = time.process_time(), time.perf_counter()
    for i in range(n):
        due = t0 + i * gap
        wait = due - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        trial, step = i % a.trials, i // a.trials
        rec = Metrics(f"t{trial:03d}", step, {f"m{k:02d}/l{k % 5}": float(step + k) for k in range(a.metrics)},
                      int(time.time() * 1000))
        s = time.perf_counter()
        queue.put(rec)
        lat[i] = time.perf_counter() - s
        depth[i] = len(queue)
        if (i + 1) % (a.trials * 3) == 0:
            print(f"\r  {i + 1}/{n} results, queue {depth[i]}", end="", file=sys.stderr, flush=True)
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    late = time.perf_counter() - (t0 + (n - 1) * gap)
    print(file=sys.stderr)
    load = os.getloadavg()
    print(f"results: {n} ({n / wall:.2f}/s, {n * a.metrics / wall:.0f} metric values/s) in {wall:.0f} s")
    print(f"write latency per result: p50 {np.percentile(lat, 50) * 1e3:.1f} ms, p99 "
          f"{np.percentile(lat, 99) * 1e3:.1f} ms, max {lat.max() * 1e3:.0f} ms")
    print(f"queue depth after each put: max {depth.max()}, at the end {len(queue)}; finished "
          f"{late:.1f} s after the last result was due")
    print(f"driver CPU: {cpu:.1f} s over {wall:.0f} s = {cpu / wall:.2f} of one core")
    print(f"load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
