"""Every routing family and remedy on one device: CPU parity, training-step throughput, peak memory,
and what a warm trial worker keeps on the GPU between trials.

    python benchmarks/gpu_families.py [--device cuda] [--preset small] [--depth 3] [--batch 128]
                                      [--steps 10] [--json results.json]

Why: the families and remedies are tested on CPU (tests/capsmodels/test_routing_families.py, test_remedies.py);
a GPU user needs to know that the same code gives the same numbers on CUDA and what each family costs
there, and the scale issue's warm workers need GPU memory released between trials.

Three parts, printed as tables (and written to --json):
1. parity: a depth-2 `tiny` net per family x remedy in float64 on CPU and on --device, same weights and
   input; the largest relative difference of class activations and of the loss gradient over all
   parameters (float64, so anything above ~1e-10 is a real difference, not rounding).
2. throughput: one full float32 training step (forward, margin + reconstruction loss, backward, Adam)
   of --preset at --depth on synthetic 28x28 inputs: median images/s over --steps after 3 warm-up
   steps, and the peak allocated memory (CUDA: torch.cuda.max_memory_allocated; CPU: not measured).
3. warm worker: `capsmodels.train.fit` twice in this one process on the `parts` dataset (generated,
   no download), as a reused Ray worker would run two trials, with what `sweeps/trainable.py`'s
   `release_memory` does between them (garbage collection, torch.cuda.empty_cache()): the metrics of the second fit against the first (same config and seed), and the
   allocated/reserved GPU memory before, between and after.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from capsmodels.config import from_dict  # noqa: E402
from capsmodels.losses import total_loss  # noqa: E402
from capsmodels.networks import build  # noqa: E402
from capsmodels.routing import routing_names  # noqa: E402

IN_SHAPE, CLASSES = (1, 28, 28), 10
REMEDIES = {"none": {}, "residual": {"residual": True}, "pose_norm": {"pose_norm": True},
            "residual+pose_norm": {"residual": True, "pose_norm": True}}


def _model_cfg(routing: str, remedy: str, preset: str, depth: int) -> dict:
    return {"preset": preset, "depth": depth, "routing": routing, **REMEDIES[remedy]}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def parity(routing: str, remedy: str, device: torch.device) -> dict:
    """Float64 forward + backward of one tiny depth-2 net on CPU and on `device`."""
    cfg = from_dict({"model": _model_cfg(routing, remedy, "tiny", 2)}).model
    torch.manual_seed(0)
    net = build(cfg, IN_SHAPE, CLASSES).double()
    x = torch.rand(8, *IN_SHAPE, dtype=torch.float64)
    y = torch.arange(8) % CLASSES
    out = {}
    for dev in (torch.device("cpu"), device):
        m = net.to(dev)
        m.zero_grad(set_to_none=True)
        res = m(x.to(dev), y.to(dev))
        loss, _ = total_loss(res, x.to(dev), y.to(dev), cfg.recon_weight)
        loss.backward()
        out[dev.type] = (res.scores.detach().cpu(),
                         [p.grad.detach().cpu().clone() for p in m.parameters() if p.grad is not None])
    (a0, g0), (a1, g1) = out["cpu"], out[device.type]
    rel = lambda u, v: float((u - v).abs().max() / u.abs().max().clamp_min(1e-300))  # noqa: E731
    return {"act_rel": rel(a0, a1), "grad_rel": max(rel(u, v) for u, v in zip(g0, g1))}


def throughput(routing: str, remedy: str, preset: str, depth: int, batch: int, steps: int,
               device: torch.device) -> dict:
    cfg = from_dict({"model": _model_cfg(routing, remedy, preset, depth)}).model
    torch.manual_seed(0)
    model = build(cfg, IN_SHAPE, CLASSES).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.rand(batch, *IN_SHAPE, device=device)
    y = torch.randint(0, CLASSES, (batch,), device=device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(3 + steps):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss, _ = total_loss(model(x, y), x, y, cfg.recon_weight)
        loss.backward()
        opt.step()
        _sync(device)
        if i >= 3:
            times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else float("nan")
    return {"images_per_s": batch / statistics.median(times), "peak_mib": peak,
            "finite": bool(torch.isfinite(loss).item())}


def warm_worker(device: torch.device) -> dict:
    """Two fits in one process, as two trials on one reused Ray worker."""
    from capsmodels import train
    raw = {"model": {"preset": "tiny", "depth": 1},
           "data": {"name": "parts", "train_size": 2000, "val_size": 200, "test_size": 500},
           "train": {"epochs": 1, "batch_size": 64, "device": device.type, "max_steps_per_epoch": 20,
                     "seed": 0}}
    mem = lambda: ((torch.cuda.memory_allocated() / 2**20, torch.cuda.memory_reserved() / 2**20)  # noqa: E731
                   if device.type == "cuda" else (float("nan"), float("nan")))
    before = mem()
    first = train.fit(from_dict(raw))
    after_first = mem()
    import gc
    gc.collect()                     # as sweeps/trainable.release_memory (this script runs without ray)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    between = mem()
    second = train.fit(from_dict(raw))
    keys = sorted(k for k in first if isinstance(first[k], float) and k in second and "per_s" not in k
                  and "mem" not in k and "time" not in k)
    diffs = {k: abs(first[k] - second[k]) for k in keys}
    worst = max(diffs, key=diffs.get) if diffs else None
    return {"metrics_compared": len(keys), "identical": sum(d == 0 for d in diffs.values()),
            "max_abs_diff": diffs.get(worst, 0.0), "worst_metric": worst,
            "test_acc": (first.get("test_acc"), second.get("test_acc")),
            "mib_alloc_reserved": {"before": before, "after_first_fit": after_first,
                                   "after_release": between, "after_second_fit": mem()}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    p.add_argument("--preset", default="small")
    p.add_argument("--depth", type=int, default=3)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--json", default=None, help="also write the figures here")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device: cuda is not available on this machine; use cpu", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"device {name}, torch {torch.__version__}; preset {args.preset} depth {args.depth} "
          f"batch {args.batch}, {args.steps} timed steps", flush=True)
    rows = []
    print(f"{'routing':10s} {'remedy':19s} {'act rel diff':>13s} {'grad rel diff':>13s} "
          f"{'images/s':>10s} {'peak MiB':>9s}", flush=True)
    for routing in routing_names():
        for remedy in REMEDIES:
            row = {"routing": routing, "remedy": remedy}
            if device.type != "cpu":
                row.update(parity(routing, remedy, device))
            row.update(throughput(routing, remedy, args.preset, args.depth, args.batch, args.steps, device))
            rows.append(row)
            print(f"{routing:10s} {remedy:19s} {row.get('act_rel', float('nan')):13.2e} "
                  f"{row.get('grad_rel', float('nan')):13.2e} {row['images_per_s']:10.0f} "
                  f"{row['peak_mib']:9.0f}" + ("" if row["finite"] else "  NON-FINITE LOSS"), flush=True)
    warm = warm_worker(device)
    print("warm worker (two fits in one process):", json.dumps(warm), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"device": name, "torch": torch.__version__, "args": vars(args),
                                               "rows": rows, "warm_worker": warm}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
