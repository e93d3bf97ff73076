"""Seed batching (issue 22, lever 6): the seeds of one configuration trained together, as one batched model.

`fit_seeds(config, seeds, report)` trains `config` once per seed, as `capsmodels.train.fit` would with
`train.seed` set to each, but every training step runs all seeds at once: their weights are stacked
(torch.func.stack_module_state) and one forward and backward over the stack (torch.func.vmap over
functional_call) replaces S small ones. A GPU that one small CapsNet leaves idle (kernel launches, not
FLOPs, bound its step) then does S steps' work per launch. Each seed stays its own run:
- its own model start (initialised under its seed; `init: data` fitted on its own batch), its own splits
  (drawn with its seed), its own shuffling and augmentation generator;
- its own Adam: Adam is elementwise, so one Adam over the stacked weights is S Adams (same lr schedule:
  warmup and decay depend on the configuration only);
- its own report every epoch, built by the same `capsmodels.train.close_epoch` as `fit` (evaluation,
  probes, best epoch, patience, status) on a model holding that seed's slice of the weights;
- its own divergence: a device mask stops counting a seed's steps at its first non-finite loss (its
  figures are those of the steps before, as `fit` reports them); its slice then trains on unseen, as
  does a seed that patience has stopped, and neither is reported again.
The numbers are those of `fit` to float32 rounding, not bit for bit: the batched kernels sum in
another order (tests/capsmodels/test_throughput.py states the tolerances and checks them).

Not here (what the sweep integration still needs, docs/PROBES.md "Throughput"): checkpoints and resume
of a batched fit, and a Ray Tune trainable that reports several trials from one process (today each
trial is one process and one `fit`).
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import replace
from typing import Any, Callable, Optional, Sequence

import torch
from torch.func import functional_call, stack_module_state, vmap

from capsmodels import config as cfgmod
from capsmodels import losses
from capsmodels.augment import shift_augment
from capsmodels.contract import RUNNING, layer_metric
from capsmodels.datasets import RawData, load_raw
from capsmodels.train import Best, EvalSet, close_epoch, prepare, to_device, warmup_steps

SeedReport = Callable[[int, dict], Any]      # report(i, metrics): seed seeds[i]'s metrics of one epoch


def seed_configs(cfg: cfgmod.RunConfig, seeds: Sequence[int]) -> list[cfgmod.RunConfig]:
    """The configuration once per seed (train.seed replaced), as each seed's `fit` would get it."""
    return [replace(cfg, train=replace(cfg.train, seed=int(s))) for s in seeds]


def fit_seeds(config: cfgmod.RunConfig | dict, seeds: Sequence[int], report: Optional[SeedReport] = None, *,
              data: Optional[RawData] = None, prepared: Optional[list] = None) -> list[dict]:
    """Train `config` once per seed in `seeds`, all in one batched model; call report(i, metrics) once
    per epoch for every seed still running; return each seed's last metrics (in `seeds` order).

    data: the raw dataset, when the caller has it. prepared: `capsmodels.train.prepare` of each seed's
    config (seed_configs), when the caller ran it already; at the end each of those models holds its
    seed's best-val epoch's weights, as `fit` leaves its model.
    """
    cfg = config if isinstance(config, cfgmod.RunConfig) else cfgmod.from_dict(config)   # validated once, where read
    if len(seeds) < 1 or len(set(seeds)) != len(seeds):
        raise cfgmod.ConfigError(f"seeds: {list(seeds)!r} is not allowed; give one or more distinct seeds")
    t = cfg.train
    if t.threads > 0:
        torch.set_num_threads(t.threads)
    cfgs = seed_configs(cfg, seeds)
    if prepared is None:
        raw = data if data is not None else load_raw(cfg.data.name, cfg.data.root, cfg.data.download,
                                                     cfg.data.sign_samples)
        prepared = [prepare(c, raw) for c in cfgs]
    splits = [p[0] for p in prepared]
    models = [p[1] for p in prepared]
    device = prepared[0][2]
    S = len(seeds)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    params, buffers, step_fn = stacked_step(models, cfg.model.recon_weight if cfg.model.decoder else 0.0,
                                            t.compile)
    opt = torch.optim.Adam(list(params.values()), lr=t.lr, weight_decay=t.weight_decay)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=t.lr_decay)
    gens = [torch.Generator().manual_seed(c.train.seed) for c in cfgs]
    evs = [EvalSet.of(c, sp, device) for c, sp in zip(cfgs, splits)]
    bests = [Best() for _ in seeds]
    weight_names = _layer_weight_names(models[0])
    tracker = StackedGradTracker([params[n] for n in weight_names], t.grad_window)

    n = len(splits[0].train)
    if any(len(sp.train) != n for sp in splits):
        raise ValueError("the seeds' training splits differ in size; seed batching needs one size")
    steps = math.ceil(n / t.batch_size)
    if t.max_steps_per_epoch:
        steps = min(steps, t.max_steps_per_epoch)
    warm = warmup_steps(t.warmup_epochs, steps)
    running = list(range(S))                            # seeds still reported
    last: list[dict] = [{} for _ in seeds]
    for epoch in range(t.epochs):
        perms = [torch.randperm(n, generator=g) for g in gens]
        base_lrs = [g["lr"] for g in opt.param_groups]
        t0 = time.perf_counter()
        alive = torch.ones(S, dtype=torch.bool, device=device)      # no non-finite loss yet this epoch
        seen = torch.zeros(S, dtype=torch.int64, device=device)
        loss_sum = torch.zeros(S, dtype=torch.float64, device=device)
        correct = torch.zeros(S, dtype=torch.int64, device=device)
        tracker.reset()
        for step in range(steps):
            if epoch * steps < warm:
                for g, lr in zip(opt.param_groups, base_lrs):
                    g["lr"] = lr * min(1.0, (epoch * steps + step + 1) / warm)
            xs, ys = [], []
            for sp, perm, gen in zip(splits, perms, gens):
                idx = perm[step * t.batch_size:(step + 1) * t.batch_size]
                x, y = sp.train.tensors[0][idx], sp.train.tensors[1][idx]
                if cfg.data.augment:
                    x = shift_augment(x, 2, generator=gen)
                xs.append(x), ys.append(y)
            x, y = to_device(torch.stack(xs), device), to_device(torch.stack(ys), device)
            loss, scores = step_fn(params, buffers, x, y)               # (S,), (S, B, K)
            alive &= torch.isfinite(loss)                               # a seed's first non-finite loss ends it
            opt.zero_grad(set_to_none=True)
            loss.sum().backward()                                       # seed s's loss reaches only its slice
            tracker.record(alive)
            opt.step()
            B = y.shape[1]
            seen += alive * B
            loss_sum += torch.where(alive, loss.detach().double() * B, 0.0)
            correct += torch.where(alive, (scores.argmax(-1) == y).sum(1), 0)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        train_time = time.perf_counter() - t0
        for g, lr in zip(opt.param_groups, base_lrs):
            g["lr"] = lr
        if (epoch + 1) * steps > warm:
            sched.step()

        alive_h, seen_h = alive.tolist(), seen.tolist()                # the epoch's one read of the masks
        loss_h, correct_h = loss_sum.tolist(), correct.tolist()
        grads = tracker.summaries()
        for i in list(running):
            _load_slice(models[i], params, buffers, i)
            s = seen_h[i]
            metrics = {"epoch": epoch, "train_loss": loss_h[i] / s if s else float("nan"),
                       "train_acc": correct_h[i] / s if s else float("nan")}
            metrics.update(grads[i])
            close_epoch(metrics, epoch, models[i], evs[i], bests[i], not alive_h[i], s, train_time)
            last[i] = metrics
            if report is not None:
                report(i, metrics)
            if metrics["status"] != RUNNING:
                running.remove(i)
        if not running:
            break
    for model, best in zip(models, bests):
        best.restore(model)
    return last


def stacked_step(models: Sequence[torch.nn.Module], recon_weight: float, compile: str = "none"
                 ) -> tuple[dict, dict, Callable]:
    """The stack of `models` (one architecture, S sets of weights) and its batched training step.

    Returns (params, buffers, step): params[name] (S, ...) new leaf tensors for the optimiser, buffers
    (BatchNorm's statistics) stacked alike, and step(params, buffers, x (S, B, ...), y (S, B)) ->
    (loss (S,), scores (S, B, K) detached): each seed's forward and training loss on its own batch.
    Seed s's loss depends on its slice alone, so the gradient of loss.sum() is each seed's own.
    compile: train.compile, applied to the batched step as `capsmodels.fast` applies it to one model's.
    """
    params, buffers = stack_module_state(list(models))
    base = copy.deepcopy(models[0]).to("meta")          # the architecture, for functional_call

    def one(p: dict, b: dict, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = functional_call(base, (p, b), (x, y))
        loss, _ = losses.total_loss(out, x, y, recon_weight)
        return loss, out.scores.detach()

    step = vmap(one)
    if compile != "none":
        step = torch.compile(step, mode=compile, fullgraph=True)
    return params, buffers, step


def _layer_weight_names(model: torch.nn.Module) -> list[str]:
    """The names (in named_parameters) of model.layer_weights(), the tensors the grad probes read."""
    names = {id(p): name for name, p in model.named_parameters()}
    return [names[id(w)] for w in model.layer_weights()]


@torch.no_grad()
def _load_slice(model: torch.nn.Module, params: dict, buffers: dict, i: int) -> None:
    """Seed i's weights (and buffers) of the stack into its own model, for evaluation and the probes."""
    model.load_state_dict({**{k: v[i] for k, v in params.items()}, **{k: v[i] for k, v in buffers.items()}})


class StackedGradTracker:
    """`capsmodels.probes.GradTracker` for S stacked seeds: per seed and layer ||dL_s/dW_l,s||_F (float64)
    over that seed's last K counted steps of the epoch, kept on the device. A step counts for seed s
    while it is alive (no non-finite loss yet), so a diverged seed's figures are those of its steps
    before, as `fit` reports them."""

    def __init__(self, weights: Sequence[torch.Tensor], window: int):
        self.weights, self.window = list(weights), window
        S = self.weights[0].shape[0]
        dev = self.weights[0].device
        self.buf = torch.zeros(window, len(self.weights), S, dtype=torch.float64, device=dev)
        self.count = torch.zeros(S, dtype=torch.int64, device=dev)
        self.seeds = torch.arange(S, device=dev)

    def reset(self) -> None:
        self.buf.zero_()
        self.count.zero_()

    def record(self, alive: torch.Tensor) -> None:
        norms = torch.stack([torch.linalg.vector_norm(w.grad.detach().flatten(1), dim=1, dtype=torch.float64)
                             if w.grad is not None else
                             torch.zeros(w.shape[0], dtype=torch.float64, device=w.device)
                             for w in self.weights])                   # (L, S)
        pos = self.count % self.window                                  # each seed's ring position
        old = self.buf[pos, :, self.seeds]                              # (S, L)
        self.buf[pos, :, self.seeds] = torch.where(alive[:, None], norms.T, old)
        self.count += alive

    def summaries(self) -> list[dict[str, float]]:
        """Per seed: grad_norm/l{l} and grad_rms/l{l} as GradTracker.summary (empty with no step)."""
        counts = self.count.clamp(max=self.window).tolist()
        buf = self.buf.cpu()
        out = []
        for s, k in enumerate(counts):
            if k == 0:
                out.append({})
                continue
            mean = buf[:k, :, s].mean(0).tolist()
            d = {layer_metric("grad_norm", l): v for l, v in enumerate(mean)}
            d.update({layer_metric("grad_rms", l): v / math.sqrt(w[0].numel())
                      for l, (v, w) in enumerate(zip(mean, self.weights))})
            out.append(d)
        return out

