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
   max_concurrent=c, resources.cpu=1, a local Ray with num_cpus=c, and a fresh sqlite MLflow store and Ray
   storage folder in the work folder;
3. loop x c (each c > 1): the loop on a pool of c plain processes, the speed-up the machine allows at all;
4. --reuse-actors: sweep 1 again with Tune's `reuse_actors=True` patched in (a what-if for sweeps/runner.py);
5. --bracket: the loop again at the end; the baseline is the mean of both, which evens out a load drift.

The table gives wall time, per-trial time, overhead against the plain loop of the same concurrency,
trials/hour and the speed-up of c concurrent trials over one. Below it each sweep's wall time is taken
apart: outside Tuner.fit by wrapping the runner's own functions (spec, checks, data, MLflow setup, Ray
start, Tune set-up, Ray shutdown) and timing the interpreter's exit; inside Tuner.fit from each trial's
MLflow run (opened when Tune starts the trial, closed when it completes) and Ray's result.json (time
inside the trainable). The summary turns that into per-trial overhead (trial span + gap to the next,
less the loop's fit) and a fixed cost per sweep, which is what extrapolates to other N and S.
A trial's per-epoch state save (the state dict `fit` hands over, `sweeps.trainable.save_state`) is
also timed alone.

CPU time is reported beside wall time because on a shared machine wall time partly measures the other
tenants: loops are exact (RUSAGE_CHILDREN), sweeps are sampled from /proc over the whole process tree
(driver, each of Ray's system processes, trial workers) every 0.2 s, so each process's last fraction of
a second is missed. The 1-minute load average during each phase is printed: read the figures with it.
"""
from __future__ import annotations

import time

_T0 = time.time()          # first thing: a child process reports its own start-up from here

import argparse  # noqa: E402
import atexit  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import sqlite3  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
from collections import defaultdict  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Optional  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
atexit.register(lambda: _exit_marks_last())    # registered before any heavy import: runs last
sys.path.insert(0, str(ROOT))

DATASETS = ("mnist5k", "digits", "fashion_mnist", "mnist")
MIN_TRAIN = 200            # smallest training split the sizing will choose


# ---- configs ------------------------------------------------------------------------------------
def base_config(dataset: str, epochs: int, train_size: float) -> dict:
    """The run config of every trial (seed aside): the `tiny` preset as shipped, one torch thread."""
    return {"model": {"preset": "tiny"},
            "data": {"name": dataset, "train_size": train_size},
            "train": {"epochs": epochs, "threads": 1, "device": "cpu"}}


def calibrate(dataset: str, seconds: float, epochs: int, max_images: int = 1500) -> dict:
    """Size a trial to about `seconds`: time two epochs of `fit` on up to `max_images` images.

    The second (warm) epoch gives the cost model epoch(n) = a + b*n, with b*n the training loop
    (`time_s`, n training images) and a the evaluation + probes that follow it. Then the full split is
    used with as many epochs as fit in `seconds` (at least one); with --epochs E fixed, or when even one
    full epoch is too long, train_size shrinks instead. The result also carries the expected seconds.
    """
    from capsmodels import config as runcfg
    from capsmodels import data as datamod
    from capsmodels import train

    probe = runcfg.from_dict(base_config(dataset, 2, 1.0))
    raw = datamod.load_raw(dataset, None, True, probe.data.sign_samples)
    n_full = len(datamod.make_splits(raw, probe.data, 0).train)
    n_cal = min(n_full, max_images)
    cfg = base_config(dataset, 2, float(n_cal) if n_cal < n_full else 1.0)
    stamps: list[tuple[float, dict]] = []
    start = time.perf_counter()
    train.fit(cfg, lambda m: stamps.append((time.perf_counter(), m)), data=raw)
    second = stamps[1][0] - stamps[0][0]
    b = stamps[1][1]["time_s"] / n_cal
    a = max(second - stamps[1][1]["time_s"], 0.0)
    full_epoch = a + b * n_full
    if epochs <= 0:
        epochs = max(1, round(seconds / full_epoch))
    n = int(min(n_full, max(MIN_TRAIN, (seconds / epochs - a) / b)))
    expected = epochs * (a + b * n)
    return {"dataset": dataset, "epochs": epochs, "train_images": n, "full_train_images": n_full,
            "train_size": 1.0 if n >= n_full else float(n), "eval_s_per_epoch": a,
            "train_s_per_image": b, "expected_trial_s": expected, "calibration_s": time.perf_counter() - start,
            "calibration_epochs_s": [stamps[0][0] - start, second]}


def sweep_spec(name: str, base: dict, seeds: list[int], concurrency: int, folder: Path) -> dict:
    return {"name": name, "base": base, "space": {}, "search": {"algorithm": "grid"},
            "metric": "val_acc", "mode": "max", "seeds": seeds, "resources": {"cpu": 1},
            "max_concurrent": concurrency, "storage_path": str(folder / "ray_results"),
            "mlflow": {"tracking_uri": f"sqlite:///{folder / 'mlflow.db'}", "experiment": "capsweep"}}


def with_seed(base: dict, seed: int) -> dict:
    cfg = json.loads(json.dumps(base))
    cfg["train"]["seed"] = seed
    return cfg


# ---- children (each runs in its own process) ----------------------------------------------------
def _silent_report(metrics: dict) -> None:
    pass


def child_loop(base: dict, seeds: list[int], out: Path) -> None:
    """The plain-loop baseline: load the dataset once, fit each config in turn."""
    import torch  # noqa: F401  - counted as import time, as the sweep's imports are
    from capsmodels import config as runcfg
    from capsmodels import data as datamod
    from capsmodels.train import fit
    t_imports = time.time()
    cfg0 = runcfg.from_dict(base)
    raw = datamod.load_raw(cfg0.data.name, cfg0.data.root, cfg0.data.download, cfg0.data.sign_samples)
    t_data = time.time()
    fits, fit_cpu, epochs = [], [], []
    for seed in seeds:
        marks: list[tuple[float, float]] = []
        t, c = time.perf_counter(), time.process_time()
        fit(with_seed(base, seed), lambda m: marks.append((time.perf_counter(), m["time_s"])), data=raw)
        fits.append(time.perf_counter() - t)
        fit_cpu.append(time.process_time() - c)
        # per epoch [wall since the previous report (the first: since fit began), training-loop time]
        epochs.append([[m[0] - (marks[i - 1][0] if i else t), m[1]] for i, m in enumerate(marks)])
    out.write_text(json.dumps({"t0": _T0, "t_imports": t_imports, "t_data": t_data, "fits": fits,
                               "fit_cpu": fit_cpu, "epochs": epochs, "t_done": time.time()}))


_POOL_RAW: Any = None


def _pool_init(base: dict) -> None:
    global _POOL_RAW
    from capsmodels import config as runcfg
    from capsmodels import data as datamod
    cfg0 = runcfg.from_dict(base)
    _POOL_RAW = datamod.load_raw(cfg0.data.name, cfg0.data.root, cfg0.data.download, cfg0.data.sign_samples)


def _pool_fit(cfg: dict) -> float:
    from capsmodels.train import fit
    t = time.perf_counter()
    fit(cfg, _silent_report, data=_POOL_RAW)
    return time.perf_counter() - t


def child_pool(base: dict, seeds: list[int], workers: int, out: Path) -> None:
    """The same loop spread over `workers` plain processes (each loads the dataset once)."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor
    t_imports = time.time()
    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_pool_init,
                             initargs=(base,)) as pool:
        fits = list(pool.map(_pool_fit, [with_seed(base, s) for s in seeds]))
    out.write_text(json.dumps({"t0": _T0, "t_imports": t_imports, "fits": fits, "t_done": time.time()}))


def child_sweep(spec_path: Path, num_cpus: int, out: Path, reuse_actors: bool = False) -> int:
    """`capsweep run SPEC --num-cpus C` through the CLI's own main, with the runner's phases timed.

    reuse_actors: the what-if of a proposed change to sweeps/runner.py (TuneConfig(reuse_actors=True):
    one worker process runs trial after trial), patched in here only.
    """
    import ray
    from ray import tune
    from sweeps import cli, runner, spec, tracking
    import sweeps.trainable  # noqa: F401  - torch and the trainable, as the driver imports them anyway
    t_imports = time.time()
    timers: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    spans: dict[str, list] = {}                 # key -> [first start, last end] (epoch seconds)

    def wrap(owner: Any, attr: str, key: str) -> None:
        orig = getattr(owner, attr)

        def timed(*a, **k):
            t, start = time.perf_counter(), time.time()
            try:
                return orig(*a, **k)
            finally:
                timers[key] += time.perf_counter() - t
                counts[key] += 1
                spans.setdefault(key, [start, 0.0])[1] = time.time()
        setattr(owner, attr, timed)

    wrap(spec, "load_spec", "spec")
    wrap(runner, "preflight", "checks")
    wrap(runner, "load_datasets", "data")
    wrap(runner, "acquire_lock", "lock")
    wrap(tracking, "get_or_create_experiment", "mlflow_setup")
    wrap(runner, "create_parent", "mlflow_setup")
    wrap(runner, "init_ray", "ray_start")
    wrap(runner, "_tune", "tune_total")
    wrap(tune.Tuner, "fit", "tuner_fit")
    wrap(ray, "shutdown", "ray_shutdown")
    wrap(tracking.MlflowSweepLogger, "__init__", "logger_init")
    for hook in ("on_trial_start", "on_trial_result", "on_trial_complete", "on_step_end", "on_experiment_end"):
        wrap(tracking.MlflowSweepLogger, hook, "cb:" + hook)
    apply = tracking.MlflowSweepLogger._apply

    def timed_apply(self, rec):
        t = time.perf_counter()
        try:
            return apply(self, rec)
        finally:
            timers["mlflow:" + rec[0]] += time.perf_counter() - t
            counts["mlflow:" + rec[0]] += 1
    tracking.MlflowSweepLogger._apply = timed_apply
    if reuse_actors:
        import functools
        tune.TuneConfig = functools.partial(tune.TuneConfig, reuse_actors=True)

    t_main = time.time()
    rc = cli.main(["run", str(spec_path), "--num-cpus", str(num_cpus)])
    t_done = time.time()
    out.write_text(json.dumps({"t0": _T0, "t_imports": t_imports, "t_main": t_main, "t_done": t_done,
                               "rc": rc, "timers": timers, "counts": counts, "spans": spans}))
    _time_exit(out.with_name("exit.json"))
    return int(rc or 0)


def _time_exit(path: Path) -> None:
    """Time the interpreter's exit: non-daemon threads are joined, then atexit handlers run, last
    registered first. `first` (registered now, after ray/mlflow registered theirs) runs before them;
    `_exit_marks_last` (registered when this module loaded, before those imports) runs after them."""
    import atexit
    _EXIT["path"] = path

    def first() -> None:
        _EXIT["t_atexit_first"] = time.time()
    atexit.register(first)


_EXIT: dict = {}


def _exit_marks_last() -> None:
    if "path" in _EXIT:
        path = _EXIT.pop("path")
        _EXIT["t_atexit_last"] = time.time()
        path.write_text(json.dumps(_EXIT))


# ---- measuring a child from outside -------------------------------------------------------------
class TreeSampler(threading.Thread):
    """CPU seconds of a process and all its descendants, sampled from /proc (Linux).

    Ray's worker processes are not reaped by the driver's ancestors, so RUSAGE_CHILDREN misses them;
    sampling sees every process of the tree while it lives (minus its last < interval seconds).
    Also samples the 1-minute load average.
    """

    def __init__(self, root_pid: int, interval: float = 0.2):
        super().__init__(daemon=True)
        self.root, self.interval = root_pid, interval
        self.tick = os.sysconf("SC_CLK_TCK")
        self.known: set[tuple[int, int]] = set()          # (pid, starttime) of descendants
        self.cpu: dict[tuple[int, int], float] = {}
        self.label: dict[tuple[int, int], str] = {}
        self.loads: list[float] = []
        self._stop_evt = threading.Event()

    def _scan(self) -> None:
        procs = {}
        for d in os.listdir("/proc"):
            if not d.isdigit():
                continue
            try:
                with open(f"/proc/{d}/stat") as f:
                    rest = f.read().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            # proc(5) field k (1-based) is rest[k - 3]: ppid 4, utime 14, stime 15, starttime 22
            procs[int(d)] = (int(rest[1]), int(rest[19]), (int(rest[11]) + int(rest[12])) / self.tick)
        pids = {key[0] for key in self.known}
        changed = True
        while changed:                       # descendants: processes whose parent is in the tree
            changed = False
            for pid, (ppid, start, _) in procs.items():
                if pid not in pids and (pid == self.root or ppid in pids):
                    pids.add(pid)
                    self.known.add((pid, start))
                    changed = True
        for pid, (ppid, start, cpu) in procs.items():
            key = (pid, start)
            if key in self.known:
                self.cpu[key] = max(cpu, self.cpu.get(key, 0.0))
                self.label[key] = self._classify(pid, self.label.get(key))

    RAY_PARTS = (("gcs_server", "ray gcs"), ("raylet/raylet", "ray raylet"),
                 ("dashboard/dashboard.py", "ray dashboard"), ("ray::DashboardAgent", "ray dashboard agent"),
                 ("dashboard/agent.py", "ray dashboard agent"), ("ray::RuntimeEnvAgent", "ray runtime-env agent"),
                 ("runtime_env/agent", "ray runtime-env agent"), ("log_monitor.py", "ray log monitor"),
                 ("autoscaler/_private/monitor.py", "ray autoscaler monitor"))

    def _classify(self, pid: int, old: Optional[str]) -> str:
        """Sticky labels: a worker that ran a trial stays a trial worker; an exiting process (zombie,
        empty cmdline) keeps the label it had."""
        if pid == self.root:
            return "driver"
        if old in ("trial workers", "driver") or (old or "").startswith("ray "):
            return old
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            cmd = ""
        if not cmd.strip():
            return old or "other"
        for needle, label in self.RAY_PARTS:
            if needle in cmd:
                return label
        if cmd.startswith("ray::IDLE") or "default_worker.py" in cmd:
            return "idle workers"             # prestarted; "trial workers" once one runs a trial
        if cmd.startswith("ray::"):
            return "trial workers"
        return old or "other"

    def run(self) -> None:
        while not self._stop_evt.is_set():
            self._scan()
            self.loads.append(os.getloadavg()[0])
            self._stop_evt.wait(self.interval)

    def stop(self) -> dict:
        self._stop_evt.set()
        self.join()
        groups: dict[str, float] = defaultdict(float)
        for key, cpu in self.cpu.items():
            groups[self.label.get(key, "other")] += cpu
        return {"total": sum(groups.values()), "groups": dict(groups),
                "load": statistics.mean(self.loads) if self.loads else os.getloadavg()[0]}


def launch(args: list[str], cwd: Path, log: Path, sample: bool) -> dict:
    """Run this script as a child; wall time as a user sees it, CPU time, the child's own JSON."""
    out = cwd / "child.json"
    env = dict(os.environ)
    for k in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "CAPSWEEP_INJECT_FAILURE"):
        env.pop(k, None)
    env.update({"PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0", "MPLBACKEND": "Agg"})
    cmd = [sys.executable, str(Path(__file__).resolve()), *args, "--_out", str(out)]
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


def trial_results(storage: Path) -> list[dict]:
    """Per trial, from Ray's result.json: time inside the trainable, epochs, worker pid."""
    out = []
    for path in sorted(storage.glob("*/*/result.json")):
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if not rows:
            continue
        out.append({"trial": rows[-1].get("trial_id"), "trainable_s": rows[-1]["time_total_s"],
                    "epochs": len(rows), "pid": rows[-1].get("pid"),
                    # per epoch [wall between reports as Tune measured it, the trainable's training loop]
                    "per_epoch": [[r["time_this_iter_s"], r.get("time_s", 0.0)] for r in rows]})
    return out


def mlflow_trial_spans(db: Path) -> list[tuple[float, float]]:
    """(start, end) in seconds of each trial's MLflow run: when the driver opened and closed it."""
    if not db.exists():
        return []
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        rows = con.execute("SELECT r.start_time, r.end_time FROM runs r JOIN tags t ON t.run_uuid = r.run_uuid "
                           "WHERE t.key = 'capsweep.role' AND t.value = 'trial' ORDER BY r.start_time").fetchall()
    finally:
        con.close()
    return [(s / 1000, e / 1000) for s, e in rows if s and e]


# ---- the benchmark ------------------------------------------------------------------------------
def state_save_cost(base: dict, reps: int = 3) -> dict:
    """What one epoch's state save costs in a trial, outside Tune: the state dict `fit` hands to the
    trainable (model, Adam moments, scheduler, RNG), written by the trainable's own `save_state`."""
    import torch
    from sweeps.trainable import save_state
    from capsmodels import config as runcfg
    from capsmodels import data as datamod
    from capsmodels import networks
    from capsmodels.train import _state

    cfg = runcfg.from_dict(base)
    splits = datamod.load(cfg.data, 0)
    torch.manual_seed(0)
    model = networks.build(cfg.model, splits.in_shape, splits.num_classes)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for p in model.parameters():          # Adam moments exist after a first step
        p.grad = torch.zeros_like(p)
    opt.step()
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=1.0)
    gen = torch.Generator().manual_seed(0)
    saves, size = [], 0
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "trial_state" / "trial.pt"
        for _ in range(reps):
            state = _state(model, opt, sched, gen, 0, {"val_acc": 0.0})
            t = time.perf_counter()
            save_state(path, state)
            saves.append(time.perf_counter() - t)
            size = path.stat().st_size
    return {"mb": size / 2**20, "params": networks.count_parameters(model), "save_s": statistics.median(saves)}


def run_label(kind: str, c: int) -> str:
    return {"loop": "plain loop" if c == 1 else f"plain loop, {c} processes",
            "sweep": f"capsweep run, {c} concurrent",
            "reuse": f"capsweep run, {c} conc., reuse_actors"}[kind]


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
        spec = sweep_spec(f"overhead-{kind}{c}", base, seeds, c, folder)
        (folder / "spec.yaml").write_text(json.dumps(spec, indent=1))   # JSON is YAML
        extra = ["--_reuse-actors"] if kind == "reuse" else []
        r = launch(["--_child", "sweep", "--_spec", str(folder / "spec.yaml"), "--_num-cpus", str(c), *extra],
                   folder, folder / "log.txt", sample=True)
        r["trials"] = trial_results(folder / "ray_results")
        r["spans"] = mlflow_trial_spans(folder / "mlflow.db")
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


def _pct(x: float, ref: float) -> str:
    return f"{100 * (x / ref - 1):+.1f}%" if ref else "n/a"


def report(res: dict) -> str:
    n, cal, runs = res["trials"], res["calibration"], res["runs"]
    loop = runs["loop1"]
    fits, fit_cpu = loop["child"]["fits"], loop["child"]["fit_cpu"]
    lines = [f"\ntrials: {n} x {cal['dataset']} tiny, {cal['epochs']} epochs x {cal['train_images']} images, "
             f"threads=1; plain-loop fit per trial {statistics.mean(fits):.1f} s wall "
             f"(min {min(fits):.1f}, max {max(fits):.1f}; target {cal['expected_trial_s']:.0f} s), "
             f"{statistics.mean(fit_cpu):.1f} CPU-s",
             f"machine: {res['cpus']} CPUs; every wall time is as loaded as the machine was (load column)\n"]
    hdr = (f"{'mode':34s} {'trials':>6s} {'wall s':>8s} {'per trial':>9s} {'overhead':>9s} {'trials/h':>8s} "
           f"{'speed-up':>8s} {'CPU s':>7s} {'CPU ovh':>8s} {'load':>5s}")
    lines += [hdr, "-" * len(hdr)]
    order = sorted(runs, key=lambda k: (runs[k]["c"], ("loop", "sweep", "reuse").index(runs[k]["kind"])))
    for key in order:
        r = runs[key]
        kind, c = r["kind"], r["c"]
        ref, one = runs.get(f"loop{c}"), runs.get(f"{kind}1")
        ovh = _pct(r["wall"], ref["wall"]) if ref and kind != "loop" else "-"
        cpu_ovh = _pct(r["cpu"], loop["cpu"]) if kind != "loop" else "-"
        speed = f"{one['wall'] / r['wall']:.2f}x" if one and c > 1 else "-"
        lines.append(f"{run_label(kind, c):34s} {n:6d} {r['wall']:8.1f} {r['wall'] / n:9.1f} {ovh:>9s} "
                     f"{3600 * n / r['wall']:8.0f} {speed:>8s} {r['cpu']:7.1f} {cpu_ovh:>8s} {r['load']:5.1f}")
    lines.append("overhead: wall time against the plain loop with as many processes; CPU s: CPU seconds of the "
                 "whole process tree (sweeps: sampled); CPU ovh: against the 1-process loop's; speed-up: against "
                 "the same mode with one trial at a time")
    if "bracket" in loop:
        b = loop["bracket"]
        lines.append(f"plain loop: mean of the run first ({b['first_wall']:.1f} s, load {b['first_load']:.1f}) and "
                     f"last ({b['last_wall']:.1f} s, load {b['last_load']:.1f}): {_pct(b['last_wall'], b['first_wall'])} "
                     "apart, which is how far the machine's load moved the figures")
    lp = loop["child"]
    loop_fixed = loop["wall"] - sum(fits)
    lines.append(f"\nplain loop outside fit: {loop_fixed:.1f} s (start-up + imports {lp['t_imports'] - loop['t_launch']:.1f} s, "
                 f"data {lp['t_data'] - lp['t_imports']:.1f} s, exit {loop['t_end'] - lp['t_done']:.1f} s)")
    ck = res["state_save"]
    lines.append(f"state save per epoch, measured outside Tune: {ck['mb']:.1f} MB ({ck['params']:,} parameters + Adam "
                 f"moments), {ck['save_s'] * 1000:.0f} ms "
                 f"-> {cal['epochs'] * ck['save_s']:.1f} s per trial of {cal['epochs']} epochs")
    for key in order:
        if runs[key]["kind"] != "loop":
            runs[key]["loop_epochs"] = lp.get("epochs")
            lines += sweep_breakdown(runs[key], n, fits, fit_cpu)
    lines += summary(res)
    return "\n".join(lines)


def sweep_timeline(r: dict, loop_fit: float) -> dict:
    """The sweep's wall time as fixed costs + per-trial costs, from the child's timers, the MLflow run
    of each trial (opened when Tune starts the trial, closed when it completes) and Ray's result.json.

    With one trial at a time: wall = outside Tuner.fit + (fit start -> first trial running)
    + N x trial + (N - 1) x gap + (last trial done -> fit end); a trial's own overhead is its MLflow
    span less the plain loop's fit, and the gap is what starting the next trial costs."""
    ch, tm = r["child"], r["child"]["timers"]
    fit_start, fit_end = ch.get("spans", {}).get("tuner_fit", [0.0, 0.0])
    spans = r.get("spans") or []
    t = {"tuner_fit": tm.get("tuner_fit", 0.0), "outside_fit": r["wall"] - tm.get("tuner_fit", 0.0)}
    if spans and fit_start:
        t["fit_to_first_trial"] = spans[0][0] - fit_start
        t["last_trial_to_fit_end"] = fit_end - max(e for _, e in spans)
        t["span"] = statistics.mean(e - s for s, e in spans)
        t["gap"] = statistics.mean(spans[i + 1][0] - spans[i][1] for i in range(len(spans) - 1)) \
            if len(spans) > 1 else 0.0
        t["per_trial"] = t["span"] + t["gap"] - loop_fit
        t["fixed"] = t["outside_fit"] + t["fit_to_first_trial"] + t["last_trial_to_fit_end"] - t["gap"]
    return t


def epoch_stats(runs: list[list[list[float]]]) -> dict:
    """From per-run lists of [epoch wall, training-loop time]: the training loop per epoch and the
    rest of each epoch (evaluation, probes and, in a sweep, the report + state save), over
    the second epoch on; and how much longer the first epoch is (set-up, and a cold process)."""
    later = [e for run in runs for e in run[1:]]
    if not later:
        return {}
    firsts = [run[0][0] - statistics.mean(e[0] for e in run[1:]) for run in runs if len(run) > 1]
    return {"train": statistics.mean(e[1] for e in later), "rest": statistics.mean(e[0] - e[1] for e in later),
            "first_extra": statistics.mean(firsts)}


def sweep_breakdown(r: dict, n: int, loop_fits: list[float], loop_cpu: list[float]) -> list[str]:
    c = r["c"]
    ch, tm, cnt = r["child"], r["child"]["timers"], r["child"]["counts"]
    startup = ch["t_imports"] - r["t_launch"]
    tuner_fit = tm.get("tuner_fit", 0.0)
    ex = ch.get("exit", {})
    fixed = {"start-up + imports (python, torch, ray, mlflow)": startup,
             "spec load + validation": tm.get("spec", 0.0),
             "checks (preflight)": tm.get("checks", 0.0),
             "dataset load in the driver": tm.get("data", 0.0),
             "MLflow setup (new sqlite store, experiment, parent run)": tm.get("mlflow_setup", 0.0),
             "Ray start (ray.init)": tm.get("ray_start", 0.0),
             "Tune set-up before fit (logger, searcher, Tuner)":
                 tm.get("tune_total", 0.0) - tuner_fit - tm.get("ray_shutdown", 0.0),
             "Ray shutdown": tm.get("ray_shutdown", 0.0)}
    if ex.get("t_atexit_last"):
        fixed["exit: joining non-daemon threads"] = ex["t_atexit_first"] - ch["t_done"]
        fixed["exit: atexit handlers (ray, mlflow, ...)"] = ex["t_atexit_last"] - ex["t_atexit_first"]
        fixed["exit: interpreter teardown"] = r["t_end"] - ex["t_atexit_last"]
    else:
        fixed["process exit"] = r["t_end"] - ch["t_done"]
    fixed["other (CLI output, lock, ...)"] = r["wall"] - tuner_fit - sum(fixed.values())
    out = [f"\n{run_label(r['kind'], c)}: wall {r['wall']:.1f} s = {r['wall'] - tuner_fit:.1f} s outside Tune "
           f"+ Tuner.fit {tuner_fit:.1f} s"]
    out += [f"  outside  {k:56s} {v:6.1f} s" for k, v in fixed.items()]
    loop_mean = statistics.mean(loop_fits)
    tl = sweep_timeline(r, loop_mean)
    if "span" in tl:
        out.append(f"  in fit   {'Tuner.fit start -> first trial running (first worker)':56s} {tl['fit_to_first_trial']:6.1f} s")
        out.append(f"  in fit   {'each trial, MLflow run open -> closed (mean)':56s} {tl['span']:6.1f} s"
                   f"   (plain loop fit {loop_mean:.1f} s)")
        if c == 1:
            out.append(f"  in fit   {'between trials: one run closed -> next opened (mean)':56s} {tl['gap']:6.1f} s")
        out.append(f"  in fit   {'last trial done -> Tuner.fit returns':56s} {tl['last_trial_to_fit_end']:6.1f} s")
    trials = r.get("trials", [])
    if trials:
        tr = [t["trainable_s"] for t in trials]
        epochs = statistics.mean(t["epochs"] for t in trials)
        in_trial = statistics.mean(tr) - loop_mean
        out.append(f"  trials on {len({t['pid'] for t in trials})} worker process(es) for {len(trials)} trials; "
                   f"inside the trainable {statistics.mean(tr):.1f} s per trial: {in_trial:+.1f} s against the loop's "
                   f"fit, {in_trial / max(epochs, 1):+.2f} s per epoch")
        sw = epoch_stats([t["per_epoch"] for t in trials if t.get("per_epoch")])
        lp = epoch_stats(r.get("loop_epochs") or [])
        if sw and lp:
            out[-1] += "; per epoch:"
            out.append(f"    training loop (2nd epoch on) {sw['train']:.2f} s against {lp['train']:.2f} s in the loop "
                       f"({_pct(sw['train'], lp['train'])}: the same compute; a difference is load or process environment)")
            out.append(f"    rest of an epoch (eval, probes; sweep: + report, state save) {sw['rest']:.2f} s against "
                       f"{lp['rest']:.2f} s: {sw['rest'] - lp['rest']:+.2f} s per epoch for report + state save")
            out.append(f"    first epoch longer than the later ones by {sw['first_extra']:.1f} s against "
                       f"{lp['first_extra']:.1f} s in the loop (set-up; a fresh worker process starts cold)")
    cbs = sum(v for k, v in tm.items() if k.startswith("cb:"))
    mlf = {k[len("mlflow:"):]: (v, cnt.get(k, 0)) for k, v in tm.items() if k.startswith("mlflow:")}
    out.append(f"  MLflow logging in the driver: {cbs:.1f} s in the logger's Tune callbacks, logger init "
               f"{tm.get('logger_init', 0.0):.1f} s; writes (s/count): "
               + ", ".join(f"{k} {v:.1f}/{m}" for k, (v, m) in sorted(mlf.items())))
    groups = r.get("cpu_groups") or {}
    if groups:
        out.append("  CPU seconds by process group: " + ", ".join(
            f"{k} {v:.1f}" for k, v in sorted(groups.items(), key=lambda kv: -kv[1])))
        if trials:
            worker = groups.get("trial workers", 0.0) / n
            out.append(f"  CPU per trial in its worker {worker:.1f} s against the loop's fit "
                       f"{statistics.mean(loop_cpu):.1f} s ({worker - statistics.mean(loop_cpu):+.1f} s: worker "
                       f"start + imports, report + state save)")
    return out


def summary(res: dict) -> list[str]:
    """The headline: per-trial overhead (what a long sweep pays) and fixed cost (once per sweep)."""
    runs, n = res["runs"], res["trials"]
    loop = runs["loop1"]
    fit_mean = statistics.mean(loop["child"]["fits"])
    loop_fixed = loop["wall"] - sum(loop["child"]["fits"])
    out = [f"\nsummary, one trial at a time (per-trial overhead: trial span + gap to the next, less the loop's "
           f"fit; fixed: the rest, less the loop's {loop_fixed:.1f} s outside fit):"]
    for key in ("sweep1", "reuse1"):
        r = runs.get(key)
        if not r:
            continue
        tl = sweep_timeline(r, fit_mean)
        if "per_trial" not in tl:
            continue
        per, fixed = tl["per_trial"], tl["fixed"] - loop_fixed
        out.append(f"  {run_label(r['kind'], 1)}: {per:+.1f} s per trial ({100 * per / fit_mean:+.1f}% of a "
                   f"{fit_mean:.0f} s trial) + {fixed:.1f} s once per sweep; these {n} trials "
                   f"{_pct(r['wall'], loop['wall'])}; 100 such trials about "
                   f"{100 * (per * 100 + fixed) / (fit_mean * 100 + loop_fixed):+.1f}%")
        sw = epoch_stats([t["per_epoch"] for t in r.get("trials", []) if t.get("per_epoch")])
        lp = epoch_stats(loop["child"].get("epochs") or [])
        if sw and lp:
            epochs = statistics.mean(len(t["per_epoch"]) for t in r["trials"])
            slow = epochs * (sw["train"] - lp["train"])
            out.append(f"    of which {slow:+.1f} s is the training loop itself (the same compute) running slower or "
                       f"faster than in the loop; the framework's own share is {per - slow:+.1f} s per trial "
                       f"({100 * (per - slow) / fit_mean:+.1f}%) and 100 trials about "
                       f"{100 * ((per - slow) * 100 + fixed) / (fit_mean * 100 + loop_fixed):+.1f}%")
    return out


# ---- command line -------------------------------------------------------------------------------
def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=4, help="trials N (seeds 0..N-1 of one config)")
    p.add_argument("--trial-seconds", type=float, default=60.0, help="target length of one trial (s)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 2], help="concurrent trials to measure")
    p.add_argument("--epochs", type=int, default=0,
                   help="epochs per trial (0: as many full-split epochs as fit in --trial-seconds)")
    p.add_argument("--dataset", default="mnist5k", choices=DATASETS)
    p.add_argument("--workdir", default=None, help="where stores, logs and results go (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the temp work folder")
    p.add_argument("--no-pool", action="store_true", help="skip the plain multi-process loop baselines")
    p.add_argument("--bracket", action="store_true",
                   help="run the plain loop again at the end; the baseline is the mean of both runs")
    p.add_argument("--reuse-actors", action="store_true",
                   help="also run the 1-concurrent sweep with Tune's reuse_actors=True (patched in, a what-if)")
    p.add_argument("--quick", action="store_true",
                   help="a smoke of this script: 2 trials of about 6 s, no multi-process loop")
    p.add_argument("--json", default=None, help="also write all measurements to this JSON file")
    p.add_argument("--from-json", default=None, help="print the report of an earlier run's JSON, run nothing")
    for hidden in ("--_child", "--_out", "--_base", "--_seeds", "--_spec"):
        p.add_argument(hidden, default=None, help=argparse.SUPPRESS)
    p.add_argument("--_workers", type=int, default=2, help=argparse.SUPPRESS)
    p.add_argument("--_num-cpus", dest="_num_cpus", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--_reuse-actors", dest="_reuse_actors", action="store_true", help=argparse.SUPPRESS)
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
        print(report(res))
        return 0
    if args._child:
        out = Path(args._out)
        if args._child == "sweep":
            return child_sweep(Path(args._spec), args._num_cpus, out, args._reuse_actors)
        base = json.loads(Path(args._base).read_text())
        seeds = [int(s) for s in args._seeds.split(",")]
        if args._child == "loop":
            child_loop(base, seeds, out)
        else:
            child_pool(base, seeds, args._workers, out)
        return 0
    temp = args.workdir is None
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="capsweep-overhead-")).resolve()
    if not temp and workdir.exists() and any(workdir.iterdir()):
        print(f"sweep_overhead: --workdir {workdir} is not empty; give a new or empty folder", file=sys.stderr)
        return 2
    workdir.mkdir(parents=True, exist_ok=True)
    from capsmodels.config import ConfigError
    from capsmodels.data import DataError
    try:
        try:
            res = measure(args, workdir)
        except (ConfigError, DataError) as e:
            print(f"sweep_overhead: {e}", file=sys.stderr)
            return 2
        res["load_after"] = os.getloadavg()
        paths = [Path(args.json)] if args.json else []
        if not temp or args.keep:
            paths.append(workdir / "results.json")
        for path in paths:                   # first: a report can be printed again from it (--from-json)
            path.write_text(json.dumps(res, indent=1, default=str))
        print(report(res))
        if paths:
            print("\nall measurements: " + ", ".join(map(str, paths)))
    finally:
        if temp and not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
