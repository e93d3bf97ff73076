"""capsweep at scale, on the parts a cluster uses: a multi-node Ray cluster, MLflow on PostgreSQL.

    python benchmarks/scale.py [--n 100 1000] [--full] [--quick] [--backends postgres sqlite]
        [--workers 3] [--worker-cpus 1] [--epochs 10] [--steps 3] [--dataset sign] [--loop-sample 3]
        [--workdir DIR] [--json FILE]

Prints figures; it is not a timed test. What it starts (and always tears down, by pid and temp dir,
never with a global `ray stop`):
- a Ray head (no CPUs, no GPUs: the driver's node) and --workers worker nodes on loopback, each a
  `ray start --block` of its own temp dir and ports (the way tests/cluster/test_cluster.py starts its
  two-node cluster, with its port/process helpers), each worker declaring fake GPUs `--num-gpus 2`
  and --worker-cpus CPUs, so a trial's `resources.gpu: 0.25` is packed fractionally (train.device cpu:
  a trial given a fake GPU trains on the CPU);
- for the `postgres` backend, Debian's PostgreSQL (tests/helpers/pg.py, as tests/conftest.py starts it,
  with cluster.yaml's max_connections) and an `mlflow server` on it (postgresql+psycopg, as cluster.yaml's
  head runs it); for `sqlite`, no server: the driver writes to the embedded default, a sqlite file.

Per N and backend, a `capsweep run` (sweeps.cli.main, in a child process, --address of the cluster) of N
cheap trials (tiny preset, --steps steps per epoch, --epochs epochs, references/controls off, one seed
per trial), and the figures:
- trials/hour, against a plain loop of the same trials (`capsmodels.train.fit` of --loop-sample of them,
  scaled to N) on the same CPU budget;
- capsweep's own overhead per trial and per epoch result: the CPU seconds of the whole cluster (driver,
  every Ray process and trial worker, sampled from /proc) less the loop's CPU for the same trials;
- the driver's CPU (its process, all threads) as a share of one core;
- MLflow write latency p50/p99 (put -> delivered, each record of sweeps/write_queue.WriteQueue, timed by
  wrapping its `apply` in the driver child) and the queue depth after each put (mean, max);
- Tune's experiment-state snapshot time (TuneController.save_to_dir, timed in the driver child; the
  period is TUNE_GLOBAL_CHECKPOINT_S, "auto" unless set);
- disk used under storage_path; `capsweep report` wall time and peak RSS (os.wait4) on the result.
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
BIN = Path(sys.executable).parent
NODE_PORTS = 50                      # ports per Ray node in the block


def trial_base(dataset: str, epochs: int, steps: int) -> dict:
    return {"model": {"preset": "tiny"}, "data": {"name": dataset},
            "train": {"epochs": epochs, "threads": 1, "device": "cpu", "max_steps_per_epoch": steps}}


def scale_spec(name: str, base: dict, n: int, folder: Path, uri: str) -> dict:
    """N trials: one grid point, one seed each; 0.5 CPU + 0.25 (fake) GPU per trial."""
    return {"name": name, "base": base, "space": {}, "search": {"algorithm": "grid"},
            "metric": "val_acc", "mode": "max", "seeds": list(range(n)),
            "resources": {"cpu": 0.5, "gpu": 0.25}, "references": False, "controls": False,
            "storage_path": str(folder / "ray_results"),
            "mlflow": {"tracking_uri": uri, "experiment": "capsweep"}}


def pct(xs: list[float], q: float) -> float:
    return float(sorted(xs)[min(len(xs) - 1, int(q * len(xs)))]) if xs else float("nan")


# ---------------------------------------------------------------- the cluster's parts

class Parts:
    """Everything this benchmark starts, stopped in reverse on close() (by process group and temp dir)."""

    def __init__(self, work: Path):
        from tests.helpers.sweep import env_for_subprocess
        self.work = work
        self.tmp = Path(f"/tmp/cssc{os.getpid()}")      # short: Ray's unix sockets live under it
        self.tmp.mkdir(exist_ok=True)
        token = self.tmp / "auth_token"           # Ray's token auth, as cluster.yaml (and tests/cluster/test_cluster.py)
        token.write_text(secrets.token_hex(32))
        token.chmod(0o600)
        self.env = env_for_subprocess(PATH=f"{BIN}:{os.environ.get('PATH', '')}", RAY_USAGE_STATS_ENABLED="0",
                                      PYTHONPATH=str(ROOT), MPLBACKEND="Agg", RAY_AUTH_MODE="token",
                                      RAY_AUTH_TOKEN_PATH=str(token))
        for k in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_JOB_ADDRESS", "MLFLOW_TRACKING_URI"):
            self.env.pop(k, None)
        self.groups: list[int] = []
        self.nodes: list[subprocess.Popen] = []
        self.pg = None
        self.mlflow = None

    def node_args(self, name: str, base: int) -> list[str]:
        return [f"--temp-dir={self.tmp}/{name}", "--object-store-memory=80000000",
                f"--node-manager-port={base}", f"--object-manager-port={base + 1}",
                f"--dashboard-agent-listen-port={base + 2}", f"--dashboard-agent-grpc-port={base + 3}",
                f"--metrics-export-port={base + 4}", f"--runtime-env-agent-port={base + 5}",
                f"--min-worker-port={base + 10}", f"--max-worker-port={base + NODE_PORTS - 1}",
                "--disable-usage-stats", "--block"]

    def start_ray(self, workers: int, worker_cpus: int) -> str:
        from tests.helpers.sweep import wait_for
        from tests.cluster.test_cluster import _listening, _popen, _port_block
        b = _port_block(10 + NODE_PORTS * (workers + 1))
        gcs = b
        head = _popen([str(BIN / "ray"), "start", "--head", f"--port={gcs}", "--include-dashboard=false",
                       f"--ray-client-server-port={b + 1}", "--num-cpus=0", "--num-gpus=0",
                       *self.node_args("head", b + 10)], self.env, self.work / "head.log")
        self.groups.append(head.pid)
        self.nodes.append(head)
        wait_for(lambda: head.poll() is None and _listening(gcs), 120, what="the Ray head's GCS")
        for i in range(workers):
            w = _popen([str(BIN / "ray"), "start", f"--address=127.0.0.1:{gcs}",
                        f"--num-cpus={worker_cpus}", "--num-gpus=2",
                        *self.node_args(f"w{i}", b + 10 + NODE_PORTS * (i + 1))], self.env, self.work / f"w{i}.log")
            self.groups.append(w.pid)
            self.nodes.append(w)
        for i, p in enumerate(self.nodes):
            assert p.poll() is None, (self.work / ("head.log" if i == 0 else f"w{i - 1}.log")).read_text()[-2000:]
        return f"127.0.0.1:{gcs}"

    def start_postgres_mlflow(self) -> str:
        """PostgreSQL as the tests start it, a database of this OS user, and `mlflow server` on it."""
        import getpass
        from tests.helpers import pg
        from tests.helpers.cluster import load_cluster, pg_max_connections
        from tests.helpers.sweep import wait_for
        from tests.cluster.test_cluster import _listening, _popen, _port_block
        why = pg_helpers.ensure_debian_packages({"initdb": "postgresql", "psql": "postgresql-client"})
        if why:
            raise SystemExit(f"scale: {why}")
        self.pg = pg_helpers.start_postgres(pg_max_connections(load_cluster()))
        user = getpass.getuser()
        self.pg.sql(f'CREATE ROLE "{user}" LOGIN')
        self.pg.sql(f'CREATE DATABASE mlflow OWNER "{user}"')
        port = _port_block(1)
        uri = f"postgresql+psycopg:///mlflow?host={self.pg.socket_dir}"
        self.mlflow = _popen([str(BIN / "mlflow"), "server", "--backend-store-uri", uri, "--host", "127.0.0.1",
                              "--port", str(port), "--workers", "2", "--serve-artifacts",
                              "--artifacts-destination", str(self.work / "artifacts")],
                             self.env, self.work / "mlflow.log")
        self.groups.append(self.mlflow.pid)
        wait_for(lambda: self.mlflow.poll() is None and _listening(port), 180, what="the MLflow server")
        return f"http://127.0.0.1:{port}"

    def close(self) -> None:
        from tests.cluster.test_cluster import _pids_under, _signal_all
        _signal_all(self.groups, str(self.tmp), signal.SIGTERM)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and (_pids_under(str(self.tmp)) or any(
                p.poll() is None for p in self.nodes)):
            time.sleep(0.5)
        _signal_all(self.groups, str(self.tmp), signal.SIGKILL)
        if self.pg is not None:
            self.pg.stop()
        shutil.rmtree(self.tmp, ignore_errors=True)


# ---------------------------------------------------------------- the driver child

def driver_child(a: argparse.Namespace) -> int:
    """`capsweep run SPEC --address A --yes` in this process, its write queue and snapshots timed."""
    import ray
    from ray.tune.execution.tune_controller import TuneController

    from sweeps import write_queue
    from sweeps.cli import main as capsweep

    ray.init(address=a._address, log_to_driver=False)       # wait for every node before the sweep
    t0 = time.monotonic()
    while sum(n["Alive"] for n in ray.nodes()) < a._nodes and time.monotonic() - t0 < 180:
        time.sleep(1)
    nodes = sum(n["Alive"] for n in ray.nodes())
    ray.shutdown()
    if nodes < a._nodes:                             # a worker that timed out joining a loaded head
        print(f"scale: {nodes} of {a._nodes} Ray nodes alive after 180 s; see the node logs", flush=True)
        return 1
    put_at: dict[int, float] = {}
    lat: list[float] = []
    depth: list[int] = []
    snaps: list[float] = []
    orig_init, orig_put, orig_save = write_queue.WriteQueue.__init__, write_queue.WriteQueue.put, \
        TuneController.save_to_dir

    def init(self, apply, *args, **kw):
        def timed(rec):
            apply(rec)
            t = put_at.pop(id(rec), None)
            if t is not None:
                lat.append(time.perf_counter() - t)
        orig_init(self, timed, *args, **kw)

    def put(self, rec):                              # depth: the queue with this record, before delivery
        put_at[id(rec)] = time.perf_counter()
        depth.append(len(self) + 1)
        orig_put(self, rec)

    def save(self, *args, **kw):
        t = time.perf_counter()
        try:
            return orig_save(self, *args, **kw)
        finally:
            snaps.append(time.perf_counter() - t)

    write_queue.WriteQueue.__init__, write_queue.WriteQueue.put, TuneController.save_to_dir = init, put, save
    cpu0, w0 = time.process_time(), time.perf_counter()
    rc = capsweep(["run", a._spec, "--address", a._address, "--yes", "--verbose", "0"])
    out = {"rc": rc, "nodes": nodes, "wall": time.perf_counter() - w0, "cpu": time.process_time() - cpu0,
           "lat": lat, "depth": depth, "snapshots": snaps,
           "tune_global_checkpoint_s": os.environ.get("TUNE_GLOBAL_CHECKPOINT_S", "auto")}
    Path(a._out).write_text(json.dumps(out))
    return rc


# ---------------------------------------------------------------- measuring

def loop_sample(base: dict, k: int) -> dict:
    """k of the trials with `capsmodels.train.fit`, one after another: seconds and CPU per trial."""
    from capsmodels import train
    walls, cpus = [], []
    for seed in range(k):
        cfg = json.loads(json.dumps(base))
        cfg["train"]["seed"] = seed
        c, w = time.process_time(), time.perf_counter()
        train.fit(cfg, lambda m: None)
        walls.append(time.perf_counter() - w)
        cpus.append(time.process_time() - c)
    return {"wall": statistics.mean(walls), "cpu": statistics.mean(cpus), "walls": walls}


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def run_report(name: str, uri: str, out: Path, env: dict) -> dict:
    """`capsweep report` on the sweep: wall time and the child's peak RSS (its own rusage, os.wait4)."""
    argv = [sys.executable, "-m", "sweeps.cli", "report", "--sweep", name, "--tracking-uri", uri,
            "--out", str(out), "--no-log-artifacts"]
    t = time.perf_counter()
    with open(out.with_suffix(".log"), "wb") as log:
        proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=out.parent)
        _, status, ru = os.wait4(proc.pid, 0)
    return {"wall": time.perf_counter() - t, "peak_rss_mb": ru.ru_maxrss / 1024,
            "rc": os.waitstatus_to_exitcode(status)}


def measure_one(parts: Parts, address: str, n: int, backend: str, uri: str, base: dict, nodes: int) -> dict:
    from benchmarks.overhead.sampler import TreeSampler
    folder = parts.work / f"{backend}-n{n}"
    folder.mkdir(parents=True, exist_ok=True)
    name = f"scale-{backend}-n{n}"
    spec = scale_spec(name, base, n, folder, uri)
    (folder / "spec.yaml").write_text(json.dumps(spec, indent=1))
    out = folder / "driver.json"
    argv = [sys.executable, str(Path(__file__).resolve()), "--_child", "--_spec", str(folder / "spec.yaml"),
            "--_address", address, "--_out", str(out), "--_nodes", str(nodes)]
    samplers = [TreeSampler(p.pid, interval=1.0) for p in parts.nodes]
    for s in samplers:
        s.start()
    t = time.perf_counter()
    with open(folder / "driver.log", "wb") as log:
        proc = subprocess.Popen(argv, env=parts.env, stdout=log, stderr=subprocess.STDOUT, cwd=folder)
        driver = TreeSampler(proc.pid, interval=1.0)
        driver.start()
        rc = proc.wait()
    wall = time.perf_counter() - t
    trees = [s.stop() for s in [driver, *samplers]]
    if rc != 0 or not out.exists():
        tail = (folder / "driver.log").read_text(errors="replace").splitlines()[-30:]
        raise SystemExit(f"scale: the sweep {name} failed (exit {rc}):\n" + "\n".join(tail))
    d = json.loads(out.read_text())
    report = run_report(name, uri, folder / "report", parts.env)
    return {"n": n, "backend": backend, "wall": wall, "driver": d, "cluster_cpu": sum(x["total"] for x in trees),
            "load": statistics.mean(x["load"] for x in trees), "disk_mb": du(folder / "ray_results") / 2**20,
            "sqlite_mb": du(folder / "mlflow.db") / 2**20 if backend == "sqlite" else None, "report": report}


def figures(r: dict, loop: dict, epochs: int, slots: float) -> dict:
    n, d = r["n"], r["driver"]
    over_cpu = (r["cluster_cpu"] - n * loop["cpu"]) / n
    return {"N": n, "backend": r["backend"], "wall_s": r["wall"], "trials_per_h": n / r["wall"] * 3600,
            "loop_trials_per_h": 3600 / loop["wall"] * slots,
            "overhead_cpu_s_per_trial": over_cpu, "overhead_cpu_s_per_epoch": over_cpu / epochs,
            "driver_core_share": d["cpu"] / d["wall"], "write_p50_ms": pct(d["lat"], .5) * 1e3,
            "write_p99_ms": pct(d["lat"], .99) * 1e3, "writes": len(d["lat"]),
            "queue_mean": statistics.mean(d["depth"]) if d["depth"] else 0, "queue_max": max(d["depth"], default=0),
            "snapshots": len(d["snapshots"]), "snapshot_p50_ms": pct(d["snapshots"], .5) * 1e3,
            "snapshot_max_ms": max(d["snapshots"], default=float("nan")) * 1e3,
            "disk_mb": r["disk_mb"], "sqlite_mb": r["sqlite_mb"], "report_s": r["report"]["wall"],
            "report_peak_mb": r["report"]["peak_rss_mb"], "report_rc": r["report"]["rc"], "load": r["load"],
            "nodes": d["nodes"]}


COLS = [("N", "{:d}"), ("backend", "{}"), ("wall_s", "{:.0f}"), ("trials_per_h", "{:.0f}"),
        ("loop_trials_per_h", "{:.0f}"), ("overhead_cpu_s_per_trial", "{:.1f}"), ("overhead_cpu_s_per_epoch", "{:.2f}"),
        ("driver_core_share", "{:.2f}"), ("write_p50_ms", "{:.1f}"), ("write_p99_ms", "{:.1f}"), ("queue_max", "{:d}"),
        ("snapshots", "{:d}"), ("snapshot_p50_ms", "{:.0f}"), ("snapshot_max_ms", "{:.0f}"), ("disk_mb", "{:.1f}"),
        ("report_s", "{:.1f}"), ("report_peak_mb", "{:.0f}"), ("load", "{:.1f}")]


def print_table(rows: list[dict]) -> None:
    print("| " + " | ".join(c for c, _ in COLS) + " |")
    print("|" + "---|" * len(COLS))
    for r in rows:
        print("| " + " | ".join(f.format(r[c]) for c, f in COLS) + " |", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--n", type=int, nargs="+", default=[100, 1000], help="trial counts (default 100 1000)")
    ap.add_argument("--full", action="store_true", help="also N=10,000")
    ap.add_argument("--quick", action="store_true", help="a tiny run: N=6, 2 epochs, 2 steps, loop sample 1")
    ap.add_argument("--backends", nargs="+", default=["postgres", "sqlite"], choices=["postgres", "sqlite"])
    ap.add_argument("--workers", type=int, default=3, help="Ray worker nodes (each --num-gpus 2)")
    ap.add_argument("--worker-cpus", type=int, default=1, help="CPUs each worker node declares")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--steps", type=int, default=3, help="train.max_steps_per_epoch")
    ap.add_argument("--dataset", default="sign", choices=["sign", "digits"])
    ap.add_argument("--loop-sample", type=int, default=3, help="trials of the plain loop (scaled to N)")
    ap.add_argument("--workdir", default=None, help="default: a new folder under /tmp")
    ap.add_argument("--json", default=None, help="also write the figures here")
    for hidden in ("--_spec", "--_address", "--_out"):
        ap.add_argument(hidden, help=argparse.SUPPRESS)
    ap.add_argument("--_nodes", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--_child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a._child:
        return driver_child(a)
    if a.workers < 3 or a.worker_cpus < 1 or a.epochs < 1 or a.steps < 1 or a.loop_sample < 1 or min(a.n) < 1:
        ap.error("--workers must be >= 3; --worker-cpus, --epochs, --steps, --loop-sample and --n >= 1")
    if a.quick:
        a.n, a.epochs, a.steps, a.loop_sample = [6], 2, 2, 1
    ns = sorted(set(a.n + ([10_000] if a.full else [])))
    work = Path(a.workdir or f"/tmp/capsweep-scale-{int(time.time())}")
    work.mkdir(parents=True, exist_ok=True)
    base = trial_base(a.dataset, a.epochs, a.steps)
    print(f"machine: {os.cpu_count()} CPUs, load {' '.join(f'{x:.2f}' for x in os.getloadavg())}; work {work}",
          flush=True)
    loop = loop_sample(base, a.loop_sample)
    # the cluster's trial slots by CPU (0.5 per trial): the loop on as many cores as the sweep may use
    slots = min(a.workers * a.worker_cpus, os.cpu_count() or 1)
    print(f"plain loop: {loop['wall']:.2f} s, {loop['cpu']:.2f} CPU-s per trial ({a.loop_sample} trials; "
          f"{a.epochs} epochs x {a.steps} steps of {a.dataset}); scaled to {slots} cores", flush=True)
    parts = Parts(work)
    rows = []
    try:
        address = parts.start_ray(a.workers, a.worker_cpus)
        print(f"ray: head + {a.workers} workers at {address} ({a.worker_cpus} CPU, 2 fake GPUs each)", flush=True)
        uris = {}
        if "postgres" in a.backends:
            uris["postgres"] = parts.start_postgres_mlflow()
            print(f"mlflow server on PostgreSQL: {uris['postgres']}", flush=True)
        for n in ns:
            for backend in a.backends:
                uri = uris.get(backend) or f"sqlite:///{work / f'sqlite-n{n}' / 'mlflow.db'}"
                print(f"running N={n} on {backend} ...", flush=True)
                r = measure_one(parts, address, n, backend, uri, base, a.workers + 1)
                rows.append(figures(r, loop, a.epochs, slots))
                print_table(rows[-1:])
    finally:
        parts.close()
    print("\nall runs:")
    print_table(rows)
    print(f"(loop: {loop['wall']:.2f} s/trial x {slots} cores; overhead = cluster CPU-s less the loop's, "
          f"per trial and per epoch result; load = mean 1-min load average while it ran)")
    if a.json:
        Path(a.json).write_text(json.dumps({"loop": loop, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
