"""capsmodels.estimate's training memory beside what a real training step reaches.

    python benchmarks/memory_estimate.py [--device cpu|cuda] [--batch 256]

For each configuration (presets x depths x routing families) one training step (forward, margin and
reconstruction loss, backward, Adam) runs in a fresh subprocess, and prints:
  estimate   `estimate(cfg).train_bytes`, the closed form `budget.max_memory_gb` checks;
  kept       16 bytes per parameter + every storage autograd saves for the backward (exact, the
             figure tests/capsmodels/test_estimate.py holds the estimate to);
  peak       CUDA: torch.cuda.max_memory_allocated over the step (the allocator's exact high-water);
             CPU: the growth of the process's peak resident memory over the process before the
             model was built (depends on the CPU: oneDNN's convolution workspaces differ by machine).
Ratios are peak/estimate: a budget of max_memory_gb is safe when they are near or under 1.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

STEP = r"""
import json, resource, sys, torch
sys.path.insert(0, sys.argv[3])
from capsmodels import config as C, estimate, networks
sections, device = json.loads(sys.argv[1]), sys.argv[2]
torch.manual_seed(0)
cfg = C.from_dict(sections)
shape = estimate.input_shape(cfg)
x = torch.rand(cfg.train.batch_size, *shape, device=device)
y = torch.randint(0, 10, (cfg.train.batch_size,), device=device)
if device == "cuda":
    torch.cuda.synchronize(); base = torch.cuda.memory_allocated()
else:
    base = int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize()
model = networks.build(cfg, shape, 10).to(device)
params = {p.untyped_storage().data_ptr() for p in model.parameters()}
saved = {}
def pack(t):
    st = t.untyped_storage()
    if st.data_ptr() not in params:
        saved[st.data_ptr()] = st.nbytes()
    return t
opt = torch.optim.Adam(model.parameters())
with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
    out = model(x, y)
    loss = out.scores.sum() + (out.recon.sum() if out.recon is not None else 0)
loss.backward()
opt.step()
if device == "cuda":
    torch.cuda.synchronize(); peak = torch.cuda.max_memory_allocated() - base
else:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
kept = 16 * networks.count_parameters(model) + sum(saved.values())
print(json.dumps({"estimate": estimate.estimate(cfg).train_bytes, "kept": kept, "peak": peak}))
"""

CASES = [("tiny", 0, "dynamic"), ("tiny", 3, "dynamic"), ("small", 2, "dynamic"), ("small", 2, "em"),
         ("small", 2, "attention"), ("small", 2, "self"), ("small", 2, "efficient"),
         ("sabour", 0, "dynamic"), ("sabour", 1, "dynamic"), ("cnn", 2, "dynamic")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--json", help="also write the rows to this file")
    args = ap.parse_args()
    rows = []
    print(f"{'configuration':<28} {'estimate MB':>12} {'kept MB':>10} {'peak MB':>10} "
          f"{'kept/est':>9} {'peak/est':>9}", flush=True)
    for preset, depth, routing in CASES:
        sections = {"model": {"preset": preset, "depth": depth, "routing": routing},
                    "train": {"batch_size": args.batch}}
        out = subprocess.run([sys.executable, "-c", STEP, json.dumps(sections), args.device, str(ROOT)],
                             capture_output=True, text=True, timeout=600)
        name = f"{preset} d{depth} {routing}"
        if out.returncode:
            print(f"{name:<28} failed: {out.stderr.strip().splitlines()[-1]}", flush=True)
            continue
        got = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append({"config": name, "batch": args.batch, "device": args.device, **got})
        e = got["estimate"]
        print(f"{name:<28} {e / 1e6:>12.1f} {got['kept'] / 1e6:>10.1f} {got['peak'] / 1e6:>10.1f} "
              f"{got['kept'] / e:>9.2f} {got['peak'] / e:>9.2f}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
