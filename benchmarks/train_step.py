"""Throughput and peak memory of one full training step of a CapsNet, and its capsule share.

    python benchmarks/train_step.py [--preset sabour] [--batch 128] [--device auto|cpu|cuda] [--steps 5]

A step is forward, margin + reconstruction loss, backward and an Adam update, on synthetic 28x28x1
inputs (the data pipeline is not part of it). The same step is timed for the "floor": the network
with its capsule layers removed (stem conv + primary conv + one linear head, margin loss on sigmoid
scores). capsule share = 1 - floor_time / full_time is what the capsule part costs: the predictions
u_hat, routing, squashes, the decoder and all their backward passes. The share is also given from the
process CPU time of the steps: with --threads 1 that counts the work done and is barely affected by
other processes competing for the cores, so it is the figure to trust on a busy machine.

Timing is honest on a shared machine: warm-up steps first, then full and floor steps alternate so both
see the same background load; the median step is reported (min in brackets). Peak memory is measured
per variant in a fresh subprocess (CPU: ru_maxrss high-water of the process, which includes the
Python/torch baseline, also reported; CUDA: torch.cuda.max_memory_allocated).
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

from capsmodels.config import ConfigError, from_dict  # noqa: E402
from capsmodels.losses import margin_loss, total_loss  # noqa: E402
from capsmodels.networks import build, count_parameters, feature_sizes  # noqa: E402
from capsmodels.presets import PRESETS  # noqa: E402

IN_SHAPE, CLASSES = (1, 28, 28), 10


def make_step(variant: str, preset: str, batch: int, device: torch.device):
    """A closure running one training step of `variant` ("full" or "floor"), and the model."""
    torch.manual_seed(0)
    cfg = from_dict({"model": {"preset": preset}}).model
    caps = build(cfg, IN_SHAPE, CLASSES)
    if variant == "full":
        model = caps
    else:                                       # the same convolutions, then a linear head
        _, (ph, pw) = feature_sizes(cfg, IN_SHAPE)
        model = nn.Sequential(caps.stem, caps.primary.conv, nn.ReLU(), nn.Flatten(),
                              nn.Linear(cfg.primary_channels * cfg.primary_dim * ph * pw, CLASSES))
    model = model.to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.rand(batch, *IN_SHAPE, device=device)
    y = torch.randint(0, CLASSES, (batch,), device=device)

    def step():
        opt.zero_grad(set_to_none=True)
        if variant == "full":
            loss, _ = total_loss(model(x, y), x, y, cfg.recon_weight)
        else:
            loss = margin_loss(torch.sigmoid(model(x)), y)
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()

    return step, model


def memory_only(args, device) -> None:
    """Run in a subprocess: warm-up + a few steps of one variant, print its peak memory as JSON."""
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    step, _ = make_step(args.memory_only, args.preset, args.batch, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(2):
        step()
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # KiB on Linux
    print(json.dumps({"peak_mib": peak, "base_mib": base / 1024}))


def peak_memory(args, variant: str) -> dict:
    cmd = [sys.executable, __file__, "--memory-only", variant, "--preset", args.preset,
           "--batch", str(args.batch), "--device", args.device, "--threads", str(args.threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="sabour", help=f"model preset: {', '.join(PRESETS)}")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--steps", type=int, default=5, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch intra-op threads")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--memory-only", choices=("full", "floor"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.preset not in PRESETS:
        print(f"--preset: {args.preset!r} is not allowed; choose one of {', '.join(PRESETS)}", file=sys.stderr)
        return 2
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device: cuda is not available on this machine; use cpu or auto", file=sys.stderr)
        return 2
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    torch.set_num_threads(args.threads)
    if args.memory_only:
        memory_only(args, device)
        return 0

    # memory first: a child inherits the parent's RSS high-water at fork (ru_maxrss survives exec),
    # so the parent must still be small (torch imported, nothing built) when it starts them
    memory = {} if args.no_memory else {v: peak_memory(args, v) for v in ("full", "floor")}
    try:
        steps = {v: make_step(v, args.preset, args.batch, device) for v in ("full", "floor")}
    except ConfigError as e:
        print(e, file=sys.stderr)
        return 2
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"cpu, {torch.get_num_threads()} threads ({os.cpu_count()} cores)"
    print(f"preset {args.preset}, batch {args.batch}, {where}, torch {torch.__version__}, "
          f"load average {os.getloadavg()[0]:.1f} before timing")
    for v, (_, model) in steps.items():
        print(f"  {v:5s}: {count_parameters(model):,} parameters")
    for _ in range(args.warmup):
        for v in steps:
            steps[v][0]()
    times = {v: [] for v in steps}
    cpu = {v: [] for v in steps}
    for _ in range(args.steps):                 # alternate: both variants see the same load
        for v in steps:
            t0, c0 = time.perf_counter(), time.process_time()
            steps[v][0]()
            times[v].append(time.perf_counter() - t0)
            cpu[v].append(time.process_time() - c0)
    print(f"  load average {os.getloadavg()[0]:.1f} after timing (above the core count: others compete)")
    med = {v: statistics.median(t) for v, t in times.items()}
    for v, t in times.items():
        print(f"  {v:5s} step: {med[v] * 1e3:8.1f} ms median [{min(t) * 1e3:.1f} min]  "
              f"{args.batch / med[v]:7.1f} images/s")
    print(f"  capsule share of the step: {1 - med['floor'] / med['full']:.1%} "
          f"(min-based {1 - min(times['floor']) / min(times['full']):.1%}; from process CPU time "
          f"{1 - statistics.median(cpu['floor']) / statistics.median(cpu['full']):.1%})")
    for v, m in memory.items():
        what = "max_memory_allocated" if device.type == "cuda" else \
            f"RSS high-water, {m['base_mib']:.0f} MiB of it before the model"
        print(f"  {v:5s} peak memory: {m['peak_mib']:.0f} MiB ({what})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
