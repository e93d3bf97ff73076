"""Trials per device-hour of a `small` CapsNet: today's training loop, each throughput lever, all of them.

    python benchmarks/gpu_throughput.py [--device cuda|cpu] [--quick] [--json PATH]

Issue 22: a 30-epoch `small` trial on Fashion-MNIST leaves an H200 almost idle, bound by kernel launches.
The model is `small` at depth 3 with dynamic routing (--depth), as benchmarks/results/gpu_families_h200_d3.json.
The rows (docs/PROBES.md, "Throughput"):
  baseline        today's loop as it was: a host read of every loss (`if not torch.isfinite(loss)`),
                  each batch copied from pageable memory, fp32, eager, one model per process
  aa_noise        the baseline against itself: the speedup a row shows by chance on this machine now
  no_host_wait    lever 1: the loop as capsmodels.train runs it now (loss sum on the device, read per
                  check window; batches through pinned memory on CUDA)
  data_on_device  lever 2 (CUDA): the training split on the device, shuffled there (benchmark path only)
  tf32            lever 3 (CUDA): TF32 matmuls and convolutions (benchmark path only)
  bf16            lever 3 (CUDA): bf16 autocast of forward and loss (benchmark path only)
  compile         lever 4: train.compile (default on CPU, reduce-overhead on CUDA), capsmodels.fast
  seed_batch      lever 6: S seeds as one batched model, capsmodels.seeds.stacked_step
  all             every lever that applies on the device, together
  trials_per_gpu  lever 5 (CUDA, not --quick): k = 1, 2, 4, 8 processes each running `all` at once
Each row is timed against its own baseline in the same process, step for step alternately (warm-up steps
first), so background load falls on both alike; the median step gives images/s, and the machine's load
average is recorded. On CUDA a step is timed by the wall clock (synchronised); on the CPU by the process's
CPU time with one thread (--threads 1, the default there): a machine whose cores other processes share
changes wall-clock times by 2x from step to step (the aa_noise row shows it) but hardly the work a
step costs; wall-clock rates are recorded beside. Trials/hour is for a 30-epoch trial on 54,000 training images (Fashion-MNIST less
the 10% validation split) plus each epoch's evaluation (16,000 images forward, measured once, eager: the
same for every row) and the row's compilation (once per trial). Drift: after the timed steps the row's
model and its baseline (same start, same batches) are compared on held-out images (accuracy) and on the
probes of a fixed batch (the largest relative difference of act_grad, act_mean, grad_ratio, tree_score,
routing_dynamics, squash_gain): it is the rounding of the row's kernels carried through a few steps.
Writes benchmarks/results/gpu_throughput_<device>.json with `device` (the name torch reports),
`baseline.trials_per_hour`, `best.trials_per_hour` and every row.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from capsmodels import fast, losses, networks, probes  # noqa: E402
from capsmodels.config import from_dict  # noqa: E402
from capsmodels.seeds import StackedGradTracker, stacked_step  # noqa: E402
from capsmodels.train import evaluate, to_device  # noqa: E402

EPOCHS, TRAIN_IMAGES, EVAL_IMAGES = 30, 54_000, 16_000      # a 30-epoch Fashion-MNIST trial
PROBE_KEYS = ("act_grad/", "act_mean/", "grad_ratio", "tree_score/", "routing_dynamics/", "squash_gain/")
RESULTS = Path(__file__).resolve().parent / "results"


# ----------------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------------

def load_images(n_train: int, n_test: int) -> tuple[dict, str]:
    """Fashion-MNIST from its official files when they are on this machine (no download), else random
    28x28 images with random labels (the throughput is the same; the accuracies then mean nothing)."""
    try:
        from capsmodels.datasets import load_raw
        raw = load_raw("fashion_mnist", None, False, 0)
        def conv(x):
            return torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2).float().div_(255.0).contiguous()
        return {"x": conv(raw.x_train[:n_train]), "y": torch.from_numpy(raw.y_train[:n_train].copy()),
                "x_test": conv(raw.x_test[:n_test]), "y_test": torch.from_numpy(raw.y_test[:n_test].copy())}, \
            "fashion_mnist"
    except Exception:  # noqa: BLE001 - no local copy: synthetic stand-in
        g = torch.Generator().manual_seed(0)
        return {"x": torch.rand(n_train, 1, 28, 28, generator=g), "y": torch.randint(0, 10, (n_train,), generator=g),
                "x_test": torch.rand(n_test, 1, 28, 28, generator=g),
                "y_test": torch.randint(0, 10, (n_test,), generator=g)}, "synthetic"


# ----------------------------------------------------------------------------------------------------
# the variants: one object per row that runs one training step at a time
# ----------------------------------------------------------------------------------------------------

def build_models(cfg, seeds: list[int], device: torch.device) -> list[torch.nn.Module]:
    out = []
    for s in seeds:
        torch.manual_seed(s)
        out.append(networks.build(cfg.model, (1, 28, 28), 10).to(device))
    return out


class Trainer:
    """One row's training: `step()` trains on the next batch; `models()` gives the trained model(s)."""

    def __init__(self, row: str, cfg, data: dict, device: torch.device, seeds: int, batch: int):
        self.row, self.device, self.batch = row, device, batch
        levers = LEVERS[row] if row in LEVERS else LEVERS["all_" + device.type]
        self.levers = levers
        self.recon_w = cfg.model.recon_weight
        self.n_seeds = seeds if "seed_batch" in levers else 1
        self.nets = build_models(cfg, list(range(self.n_seeds)), device)
        self.x, self.y = data["x"], data["y"]
        gen_dev = device if "data_on_device" in levers else torch.device("cpu")
        if "data_on_device" in levers:
            self.x, self.y = self.x.to(device), self.y.to(device)
        # seed s shuffles with its own generator, as fit does: seed 0 sees the batches its baseline sees
        self.gens = [torch.Generator(device=gen_dev).manual_seed(s) for s in range(self.n_seeds)]
        self.perms, self.pos = [None] * self.n_seeds, 0
        mode = "none"
        if "compile" in levers:
            mode = "reduce-overhead" if device.type == "cuda" else "default"
        self.mode = mode
        if self.n_seeds > 1:
            self.params, self.buffers, self.fn = stacked_step(self.nets, self.recon_w, mode)
            weights = list(self.params.values())
            names = {id(p): k for k, p in self.nets[0].named_parameters()}
            self.tracker = StackedGradTracker([self.params[names[id(w)]] for w in self.nets[0].layer_weights()], 10)
            self.alive = torch.ones(self.n_seeds, dtype=torch.bool, device=device)
        else:
            self.fn = fast.training_step(self.nets[0], self.recon_w, mode)
            weights = list(self.nets[0].parameters())
            self.tracker = probes.GradTracker(self.nets[0].layer_weights(), 10)
        self.opt = torch.optim.Adam(weights, lr=1e-3)
        self.wall: list = []                       # wall-clock seconds of every step (timed)
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.correct = torch.zeros((), dtype=torch.int64, device=device)

    @property
    def images_per_step(self) -> int:
        return self.batch * self.n_seeds

    def _indices(self) -> torch.Tensor:
        """The next batch's indices, seed after seed (S*B of them when batched)."""
        n = len(self.y)
        if self.perms[0] is None or self.pos + self.batch > n:
            self.perms = [torch.randperm(n, generator=g, device=g.device) for g in self.gens]
            self.pos = 0
        idx = torch.cat([p[self.pos:self.pos + self.batch] for p in self.perms])
        self.pos += self.batch
        return idx

    def _precision(self):
        if self.device.type == "cuda":
            tf32 = "tf32" in self.levers
            torch.backends.cuda.matmul.allow_tf32 = tf32
            torch.backends.cudnn.allow_tf32 = tf32
        if "bf16" in self.levers:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return torch.autocast(self.device.type, enabled=False)

    def step(self) -> None:
        idx = self._indices()
        x, y = self.x[idx], self.y[idx]
        if "data_on_device" not in self.levers:
            if "no_host_wait" in self.levers:
                x, y = to_device(x, self.device), to_device(y, self.device)
            else:
                x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        with self._precision():
            if self.n_seeds > 1:
                x, y = x.view(self.n_seeds, self.batch, *x.shape[1:]), y.view(self.n_seeds, self.batch)
                loss, scores = self.fn(self.params, self.buffers, x, y)
            else:
                loss, scores = self.fn(x, y)
        if "no_host_wait" not in self.levers and not torch.isfinite(loss).all():     # today's host read
            raise FloatingPointError("non-finite loss")
        self.opt.zero_grad(set_to_none=True)
        loss.float().sum().backward()
        if self.n_seeds > 1:
            self.alive &= torch.isfinite(loss)
            self.tracker.record(self.alive)
        else:
            self.tracker.record()
        self.opt.step()
        self.loss_sum += loss.detach().double().sum() * self.batch
        self.correct += (scores.argmax(-1) == y).sum()

    def models(self) -> list[torch.nn.Module]:
        """The trained model(s): seed 0 first (the one its baseline is compared with)."""
        if self.n_seeds > 1:
            with torch.no_grad():
                for i, m in enumerate(self.nets):
                    m.load_state_dict({**{k: v[i] for k, v in self.params.items()},
                                       **{k: v[i] for k, v in self.buffers.items()}})
        return self.nets


LEVERS = {
    "baseline": set(),
    "aa_noise": set(),
    "no_host_wait": {"no_host_wait"},
    "data_on_device": {"data_on_device"},
    "tf32": {"tf32"},
    "bf16": {"bf16"},
    "compile": {"compile"},
    "seed_batch": {"seed_batch"},
    "all_cpu": {"no_host_wait", "compile", "seed_batch"},
    "all_cuda": {"no_host_wait", "data_on_device", "tf32", "bf16", "compile", "seed_batch"},
}
CPU_ROWS = ["aa_noise", "no_host_wait", "compile", "seed_batch", "all"]
CUDA_ROWS = ["aa_noise", "no_host_wait", "data_on_device", "tf32", "bf16", "compile", "seed_batch", "all"]


# ----------------------------------------------------------------------------------------------------
# measuring
# ----------------------------------------------------------------------------------------------------

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(trainer: Trainer) -> float:
    """One step's seconds: wall-clock on CUDA; on the CPU the process's CPU time, which other processes
    competing for the cores barely change (with --threads 1 it is the work of one dedicated core)."""
    sync(trainer.device)
    clock = time.perf_counter if trainer.device.type == "cuda" else time.process_time
    t0, w0 = clock(), time.perf_counter()
    trainer.step()
    sync(trainer.device)
    trainer.wall.append(time.perf_counter() - w0)
    return clock() - t0


def peak_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10      # process high-water, KiB -> MiB


def drift(row_model: torch.nn.Module, base_model: torch.nn.Module, data: dict, device: torch.device,
          recon_w: float, eval_batch: int) -> dict:
    """Accuracy of both models on the held-out images and the probes' largest relative difference."""
    ds = torch.utils.data.TensorDataset(data["x_test"], data["y_test"])
    acc = [evaluate(m, ds, device, recon_w)[1] for m in (row_model, base_model)]
    xe, ye = data["x_test"][:eval_batch].to(device), data["y_test"][:eval_batch].to(device)
    pr = [probes.evaluation_probes(m, xe, ye, 0.01, recon_w) for m in (row_model, base_model)]
    rel = [abs(pr[0][k] - v) / abs(v) for k, v in pr[1].items()
           if k.startswith(PROBE_KEYS) and k in pr[0] and v != 0 and math.isfinite(v)]
    return {"acc": acc[0], "acc_baseline": acc[1], "acc_drift": acc[0] - acc[1],
            "probe_drift_max_rel": max(rel) if rel else 0.0, "probes_compared": len(rel)}


def eval_seconds_per_epoch(cfg, data: dict, device: torch.device) -> float:
    """One epoch's evaluation (EVAL_IMAGES forward, eager, batch 512), from a timed pass over the test
    images: the same for every row (levers speed up training steps only)."""
    model = build_models(cfg, [0], device)[0]
    ds = torch.utils.data.TensorDataset(data["x_test"], data["y_test"])
    evaluate(model, ds, device, cfg.model.recon_weight)                     # warm-up
    clock = time.perf_counter if device.type == "cuda" else time.process_time   # as `timed`
    sync(device)
    t0 = clock()
    evaluate(model, ds, device, cfg.model.recon_weight)
    sync(device)
    return (clock() - t0) * EVAL_IMAGES / len(ds)


def trials_per_hour(images_per_s: float, eval_s: float, compile_s: float) -> float:
    """A 30-epoch trial: its training images at this rate, each epoch's evaluation, one compilation."""
    trial_s = EPOCHS * TRAIN_IMAGES / images_per_s + EPOCHS * eval_s + compile_s
    return 3600.0 / trial_s


def measure_row(row: str, cfg, data: dict, device: torch.device, args) -> dict:
    """The row against a baseline of its own, alternating steps; drift after the timed steps."""
    base = Trainer("baseline", cfg, data, device, args.seeds, args.batch)
    other = Trainer(row, cfg, data, device, args.seeds, args.batch)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    timed(other)                                  # compiles, for a compiled row
    first = other.wall[0]
    timed(base)
    for _ in range(args.warmup - 1):
        timed(other), timed(base)
    t_other, t_base = [], []
    for i in range(args.steps):
        if i % 2:                                 # alternate which goes first
            t_base.append(timed(base)), t_other.append(timed(other))
        else:
            t_other.append(timed(other)), t_base.append(timed(base))
    mem = peak_mib(device)
    wall_med = statistics.median(other.wall[-args.steps:])
    compile_s = max(0.0, first - wall_med) if other.mode != "none" else 0.0
    ips = other.images_per_step / statistics.median(t_other)
    ips_base = base.images_per_step / statistics.median(t_base)
    d = drift(other.models()[0], base.models()[0], data, device, cfg.model.recon_weight, args.eval_batch)
    return {"row": row, "levers": sorted(other.levers), "seeds": other.n_seeds, "compile": other.mode,
            "images_per_s": ips, "baseline_images_per_s": ips_base, "speedup": ips / ips_base,
            "step_s_median": statistics.median(t_other), "step_s_min": min(t_other),
            "baseline_step_s_median": statistics.median(t_base), "compile_s": compile_s,
            "wall_images_per_s": other.images_per_step / wall_med,
            "wall_baseline_images_per_s": base.images_per_step / statistics.median(base.wall[-args.steps:]),
            "peak_mem_mib": mem, **d, "load_avg": os.getloadavg()[0]}


def trials_per_gpu(args, device: torch.device) -> list[dict]:
    """Lever 5: k processes at once, each timing the `all` row alone; their images/s summed."""
    out = []
    for k in args.trials_per_gpu:
        cmd = [sys.executable, __file__, "--device", device.type, "--worker", "--batch", str(args.batch),
               "--threads", str(args.threads), "--depth", str(args.depth),
               "--seeds", str(args.seeds), "--steps", str(args.steps), "--warmup", str(args.warmup)]
        procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) for _ in range(k)]
        results = [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in procs]
        agg = sum(r["images_per_s"] for r in results)
        out.append({"trials_per_gpu": k, "images_per_s": agg, "per_process": [r["images_per_s"] for r in results],
                    "mps": bool(os.environ.get("CUDA_MPS_PIPE_DIRECTORY")) or os.path.exists("/tmp/nvidia-mps")})
    return out


def worker(args, device: torch.device) -> None:
    """One process of the trials-per-GPU measurement: the `all` row alone; prints one JSON line."""
    cfg = from_dict({"model": {"preset": "small", "depth": args.depth}})
    data, _ = load_images(max(4096, args.batch * args.seeds * 4), 1000)
    tr = Trainer("all", cfg, data, device, args.seeds, args.batch)
    for _ in range(args.warmup):
        timed(tr)
    t = [timed(tr) for _ in range(args.steps)]
    print(json.dumps({"images_per_s": tr.images_per_step / statistics.median(t)}))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="CI size: batch 64, 2 seeds, 3 timed steps per row")
    ap.add_argument("--batch", type=int, default=None, help="per model (default 128; --quick 64)")
    ap.add_argument("--depth", type=int, default=3, help="hidden capsule layers of `small` (3: the H200 figure's)")
    ap.add_argument("--seeds", type=int, default=None, help="seeds batched in seed_batch and all")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per row (and as many of its baseline)")
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--rows", default=None, help="comma-separated rows (default: those the device supports)")
    ap.add_argument("--trials-per-gpu", default="1,2,4,8", help="lever 5 (cuda, not --quick): processes at once")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (CPU default 1: CPU time then counts one core's work; 0 = torch's default)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device is visible; use --device cpu", file=sys.stderr)
        return 2
    cuda = device.type == "cuda"
    if args.threads is None:
        args.threads = 0 if cuda else 1
    if args.threads:
        torch.set_num_threads(args.threads)
    args.batch = args.batch or (64 if args.quick else 128)
    args.seeds = args.seeds or (2 if args.quick else 4)
    args.steps = args.steps or (5 if args.quick else (60 if cuda else 10))
    args.warmup = args.warmup or (2 if args.quick and not cuda else (10 if cuda else 2))
    args.eval_batch = 64 if args.quick else 256
    args.trials_per_gpu = [int(k) for k in args.trials_per_gpu.split(",") if k]
    if args.worker:
        worker(args, device)
        return 0
    rows = args.rows.split(",") if args.rows else (CUDA_ROWS if cuda else CPU_ROWS)
    cfg = from_dict({"model": {"preset": "small", "depth": args.depth}})
    need = args.batch * args.seeds * (args.warmup + args.steps + 2)
    data, source = load_images(max(need, 1024), 1000 if args.quick else 2000)
    t_start = time.perf_counter()
    eval_s = eval_seconds_per_epoch(cfg, data, device)
    results = []
    for row in rows:
        r = measure_row(row, cfg, data, device, args)
        r["trials_per_hour"] = trials_per_hour(r["images_per_s"], eval_s, r["compile_s"])
        r["baseline_trials_per_hour"] = trials_per_hour(r["baseline_images_per_s"], eval_s, 0.0)
        results.append(r)
        print(f"{row:15s} {r['images_per_s']:9.1f} img/s  x{r['speedup']:.2f} vs its baseline "
              f"({r['baseline_images_per_s']:.1f})  compile {r['compile_s']:.0f}s  load {r['load_avg']:.1f}",
              flush=True)
    base_ips = statistics.median(r["baseline_images_per_s"] for r in results)
    baseline = {"row": "baseline", "images_per_s": base_ips, "trials_per_hour": trials_per_hour(base_ips, eval_s, 0.0),
                "note": "median over the rows' own baselines"}
    # a row's trials/hour relative to the common baseline uses its speedup against its own baseline
    for r in results:
        r["trials_per_hour_vs_common_baseline"] = trials_per_hour(base_ips * r["speedup"], eval_s, r["compile_s"])
    best = max((r for r in results if r["row"] != "aa_noise"), key=lambda r: r["trials_per_hour_vs_common_baseline"])
    multi = trials_per_gpu(args, device) if cuda and not args.quick and args.trials_per_gpu else []
    out = {
        "device": torch.cuda.get_device_name(device) if cuda else cpu_name(),
        "device_type": device.type, "torch": torch.__version__, "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(), "data": source, "preset": "small", "depth": args.depth, "routing": "dynamic",
        "args": {k: v for k, v in vars(args).items() if k != "worker"},
        "timing": ("wall-clock seconds per step" if cuda else
                   f"process CPU seconds per step with {torch.get_num_threads()} thread(s): the rate of "
                   "dedicated cores, whatever else runs on them; wall_* fields give the wall-clock rate"),
        "trial": {"epochs": EPOCHS, "train_images": TRAIN_IMAGES, "eval_images_per_epoch": EVAL_IMAGES,
                  "eval_s_per_epoch": eval_s},
        "baseline": baseline,
        "best": {"row": best["row"], "trials_per_hour": best["trials_per_hour_vs_common_baseline"],
                 "speedup": best["speedup"]},
        "rows": results, "trials_per_gpu": multi,
        "load_avg_1_5_15": list(os.getloadavg()), "wall_s": time.perf_counter() - t_start,
    }
    print(table(out))
    path = Path(args.json) if args.json else RESULTS / f"gpu_throughput_{device.type}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {path}")
    return 0


def cpu_name() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), else what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def table(out: dict) -> str:
    lines = [f"device {out['device']} ({out['device_type']}), torch {out['torch']}, {out['threads']} threads, "
             f"data {out['data']}, load average {out['load_avg_1_5_15'][0]:.1f}",
             f"{'row':15s} {'img/s':>9s} {'speedup':>8s} {'trials/h':>9s} {'compile s':>9s} {'peak MiB':>9s} "
             f"{'acc drift':>9s} {'probe drift':>11s}",
             f"{'baseline':15s} {out['baseline']['images_per_s']:9.1f} {1.0:8.2f} "
             f"{out['baseline']['trials_per_hour']:9.3f}"]
    for r in out["rows"]:
        lines.append(f"{r['row']:15s} {r['images_per_s']:9.1f} {r['speedup']:8.2f} "
                     f"{r['trials_per_hour_vs_common_baseline']:9.3f} {r['compile_s']:9.1f} {r['peak_mem_mib']:9.0f} "
                     f"{r['acc_drift']:+9.4f} {r['probe_drift_max_rel']:11.2e}")
    for m in out["trials_per_gpu"]:
        lines.append(f"{m['trials_per_gpu']} trials/GPU: {m['images_per_s']:.0f} img/s aggregate")
    lines.append(f"best: {out['best']['row']} {out['best']['trials_per_hour']:.3f} trials/hour "
                 f"(baseline {out['baseline']['trials_per_hour']:.3f})")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
