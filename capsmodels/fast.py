"""The training step's forward as the loop runs it: eager, or captured by torch.compile (`train.compile`).

`training_step(model, recon_weight, mode)` returns step(x, y) -> (loss, scores): the forward of
`model`, the training loss (capsmodels.losses.total_loss) and the class scores detached, for the loop to
backpropagate the loss and count the correct scores. The loop, the optimiser and the probes are the
same whatever the mode; only how this forward (and the backward autograd derives from it) runs differs.

Modes (train.compile, docs/PROBES.md "Throughput"):
  none             eager PyTorch: the reference, bit for bit what capsmodels always ran.
  default          torch.compile (TorchDynamo + Inductor): forward and backward become fused kernels.
                   The hand-written dynamic-routing backward (capsmodels.routing.dynamic) is traced
                   into the graph like any other op, so the whole step is one graph (fullgraph=True: a
                   graph break would be an error, not a silent slow path).
  reduce-overhead  the same, plus CUDA graphs on a GPU: a step is replayed as one launch, which is
                   what a small model bound by kernel launches needs. On a CPU it is the same as default.
Compiled numbers equal eager ones to float32 rounding (fused kernels sum in another order), not bit for
bit; tests/capsmodels/test_throughput.py bounds the difference. The first step of each batch shape compiles
(tens of seconds to minutes on a small CPU; the last, shorter batch of an epoch is a second shape).
"""
from __future__ import annotations

from typing import Callable

import torch

from capsmodels import losses
from capsmodels.config import COMPILES as COMPILE_MODES   # train.compile: none, default, reduce-overhead

Step = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def training_step(model: torch.nn.Module, recon_weight: float, mode: str = "none") -> Step:
    """step(x, y) -> (loss with its graph, scores (B, K) detached) for `model` under train.compile `mode`."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"train.compile: {mode!r} is not allowed; choose one of {', '.join(COMPILE_MODES)}")

    def step(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = model(x, y)
        loss, _ = losses.total_loss(out, x, y, recon_weight)
        return loss, out.scores.detach()

    if mode == "none":
        return step
    compiled = torch.compile(step, mode=mode, fullgraph=True)
    if mode != "reduce-overhead":
        return compiled

    def graphed(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # CUDA graph trees reuse the output buffers of one replay in the next: mark each call a new
        # step (the loop reads what it needs of the outputs, into its sums, before the next call)
        torch.compiler.cudagraph_mark_step_begin()
        return compiled(x, y)
    return graphed
