"""The training loop: `fit(config, report)` trains one configuration and reports once per epoch.

It knows nothing of Ray or MLflow: a sweep's trainable passes a `report` callable that forwards the
metrics to Ray Tune, `capsweep train` passes one that prints them. One clear path, nanoGPT style:
build data -> build model (-> `init: data` scales it on the first training batch) -> for each epoch:
train steps (grad norms recorded) -> evaluate (and on the transformed test split, when
`data.test_transform` asks) -> probes on the fixed batch D (docs/PROBES.md) -> best so far -> report.

Stopping and the best epoch (docs/PROBES.md, "Stopping and the best epoch"; names in
capsmodels.contract). The verdict scores a trial at its best-validation epoch, so that a deep network
that converges slowly is not judged on a budget's last epoch. Every epoch reports `best_epoch` (the
epoch of the highest val_acc so far, the earliest on a tie); an epoch that improves it also reports
`best/<name>` for each of its numeric metrics except bookkeeping, and every epoch carries the test
split's per-image correctness at the best epoch (`test_correct`, contract.encode_correct of its
numpy.packbits) and
`test_n`. `train.patience` P > 0 ends the run after P epochs without a better val_acc
(`stop_reason: patience`, status finished), `train.epochs` is the cap (`stop_reason: epochs`), a
non-finite loss ends it as diverged. At the end the model holds the best epoch's weights (as Keras'
`restore_best_weights`), so what a caller saves or logs is that epoch's network.

Learning rate: `train.warmup_epochs` E > 0 ramps it linearly per step, lr * k / W at step k = 1..W
with W = ceil(E * steps per epoch) (the rest of the epoch where it ends runs at lr), then
`train.lr_decay` decays it from lr once after each epoch that ran a step past the warmup: epoch e runs
at lr * lr_decay ** max(0, e - floor(W / steps)). With E = 0 this is the plain per-epoch decay
lr * lr_decay ** e (torch's ExponentialLR, as before).

Determinism: the model is initialised under `torch.manual_seed(seed)`, and every random choice of
the loop (shuffling, augmentation) draws from one dedicated `torch.Generator` seeded from the same
seed, whose state is part of the checkpoint, as is the best-so-far (its weights, val_acc, epoch and
the patience count). Probes run under `fork_rng`, so two runs with the same seed on the CPU repeat
exactly, with or without resumes.
"""
from __future__ import annotations

import math
import resource
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np
import torch

from capsmodels import config as cfgmod
from capsmodels import fast, init, losses, networks, parts, probes, transforms
from capsmodels.augment import shift_augment
from capsmodels.contract import (BEST_EPOCH, BEST_EXCLUDED, DIVERGED, ENDED, FINISHED, REPORT_STOP_REASON,
                                 REPORT_TEST_CORRECT, RUNNING, STOP_DIVERGED, STOP_EPOCHS, STOP_PATIENCE, TEST_N,
                                 best_metric, encode_correct)
from capsmodels.datasets import RawData, load_raw
from capsmodels.splits import Splits, make_splits

Report = Callable[[dict], Any]          # report(metrics) once per epoch
Checkpoint = Callable[[dict], Any]      # checkpoint(state) once per epoch, before the report


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise cfgmod.ConfigError("train.device: 'cuda' was asked for but no CUDA device is visible; use auto or cpu")
    return torch.device(name)


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process: CUDA allocator high-water mark, else the CPU RSS high-water mark."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss   # KiB on Linux, bytes on macOS
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


def evaluate(model: torch.nn.Module, ds: torch.utils.data.TensorDataset, device: torch.device,
             recon_weight: float, batch: int = 512) -> tuple[float, float]:
    """(mean loss, accuracy) over a whole split, in eval mode."""
    loss, correct = evaluate_each(model, ds, device, recon_weight, batch)
    return loss, float(correct.sum()) / max(len(correct), 1)


@torch.no_grad()
def evaluate_each(model: torch.nn.Module, ds: torch.utils.data.TensorDataset, device: torch.device,
                  recon_weight: float, batch: int = 512) -> tuple[float, torch.Tensor]:
    """(mean loss, correct (N,) bool on the CPU, in the split's order) over a whole split, in eval mode:
    the per-image correctness the analysis pairs across trials on the same test images."""
    was_training = model.training
    model.eval()
    x_all, y_all = ds.tensors
    total_loss, correct = 0.0, []
    for start in range(0, len(y_all), batch):
        x = x_all[start:start + batch].to(device, non_blocking=True)
        y = y_all[start:start + batch].to(device, non_blocking=True)
        out = model(x)
        loss, _ = losses.total_loss(out, x, y, recon_weight)
        total_loss += float(loss) * len(y)
        correct.append((out.scores.argmax(-1) == y).cpu())
    model.train(was_training)
    n = max(len(y_all), 1)
    return total_loss / n, torch.cat(correct) if correct else torch.zeros(0, dtype=torch.bool)


def prepare(cfg: cfgmod.RunConfig, data: Optional[RawData] = None
            ) -> tuple[Splits, torch.nn.Module, torch.device]:
    """Everything that can fail on bad input, before any training: data, shape check, model."""
    device = resolve_device(cfg.train.device)
    raw = data if data is not None else load_raw(
        cfg.data.name, cfg.data.root, cfg.data.download, cfg.data.sign_samples)
    splits = make_splits(raw, cfg.data, cfg.train.seed)
    torch.manual_seed(cfg.train.seed)
    model = networks.build(cfg, splits.in_shape, splits.num_classes).to(device)
    if cfg.model.init == "data" and cfg.model.arch == "capsnet":     # the CNN keeps its own init
        x0, _ = fixed_batch(splits.train, init.IMAGES, cfg.train.seed)
        init.data_init(model, x0.to(device), cfg.model.init_target, chunk=cfg.train.batch_size)
    return splits, model, device


def fixed_batch(ds: torch.utils.data.TensorDataset, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n images (x (n, C, H, W), y (n,)) of `ds` drawn without replacement by a generator of its own
    seeded with `seed`: the same every epoch and resume, and drawing it moves no other RNG.

    Not the first n: splits keep the raw order, and some raw files are sorted by class (mnist5k's
    first 256 validation images are all 0s and 1s), so a prefix would not be a sample.
    """
    idx = fixed_index(len(ds), n, seed)
    x, y = ds.tensors
    return x[idx], y[idx]


def fixed_index(total: int, n: int, seed: int) -> torch.Tensor:
    """The indices `fixed_batch` draws: n of range(total), by a generator of their own seeded with `seed`."""
    return torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:n]


def eval_truth(splits: Splits, cfg: cfgmod.RunConfig) -> Optional[probes.Truth]:
    """The parse tree of the probe batch D (the `parts` dataset only, else None): the role under each
    primary capsule of D's images (capsmodels.parts.capsule_roles), their wholes and the hierarchy."""
    if splits.roles is None:
        return None
    t = cfg.train
    idx = fixed_index(len(splits.val), t.eval_batch, t.seed)
    field, stride = parts.receptive_field(cfg.model)
    role = parts.capsule_roles(splits.roles["val"][idx], field, stride, cfg.model.primary_channels)
    return probes.Truth(role, splits.val.tensors[1][idx], torch.from_numpy(parts.part_type_table()))


def transformed_test(splits: Splits, cfg: cfgmod.RunConfig) -> Optional[torch.utils.data.TensorDataset]:
    """The test split under `data.test_transform` (capsmodels.transforms), or None for `none`."""
    if cfg.data.test_transform == "none":
        return None
    x, y = splits.test.tensors
    return torch.utils.data.TensorDataset(transforms.transform_test(x, cfg.data), y)


def fit(config: cfgmod.RunConfig | dict, report: Optional[Report] = None, *,
        data: Optional[RawData] = None, state: Optional[dict] = None,
        checkpoint: Optional[Checkpoint] = None,
        prepared: Optional[tuple[Splits, torch.nn.Module, torch.device]] = None) -> dict:
    """Train one configuration; call `report(metrics)` once per epoch; return the last metrics.

    config: a RunConfig as `config.from_dict`/`config.load` (or a sweep's trial, sweeps/schema.py) built
    and validated it, taken as it is: a config is validated once, where it is read; or a nested dict,
    which is built and validated here. data: the raw dataset when the caller has
    it already (a sweep shares one copy per node through Ray's object store). state: a checkpoint
    from an earlier `checkpoint` to continue from. checkpoint: called after each epoch, BEFORE that
    epoch's `report`, with a snapshot dict (model, optimizer, scheduler, generator, epoch, metrics), so
    a caller can persist it first (a crash between the two repeats the report, never loses the state).
    prepared: what `prepare(config, data)` returned, when the caller ran it already to check its input.

    A non-finite loss ends the run with `status: diverged` in the last report instead of raising.
    """
    cfg = config if isinstance(config, cfgmod.RunConfig) else cfgmod.from_dict(config)
    t = cfg.train
    if t.threads > 0:
        torch.set_num_threads(t.threads)
    splits, model, device = prepared or prepare(cfg, data)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    opt = torch.optim.Adam(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=t.lr_decay)
    gen = torch.Generator().manual_seed(t.seed)
    best = Best()
    start_epoch = 0
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        gen.set_state(state["generator"])
        best = Best.from_state(state)
        start_epoch = int(state["epoch"]) + 1

    x_train, y_train = splits.train.tensors
    ev = EvalSet.of(cfg, splits, device)
    tracker = probes.GradTracker(model.layer_weights(), t.grad_window)
    n = len(y_train)
    steps = math.ceil(n / t.batch_size)
    if t.max_steps_per_epoch:
        steps = min(steps, t.max_steps_per_epoch)
    warm = warmup_steps(t.warmup_epochs, steps)
    recon_w = cfg.model.recon_weight if cfg.model.decoder else 0.0
    metrics: dict = {}
    if state is not None and state.get("metrics") and (
            start_epoch >= t.epochs or state["metrics"].get("status") in ENDED):
        # resumed from the final checkpoint (the caller lost the last report): say it again
        metrics = dict(state["metrics"])
        _end_epoch(report, checkpoint, metrics, lambda: state)
        best.restore(model)
        return metrics

    step_fn = fast.training_step(model, recon_w, t.compile)
    window = t.check_every or steps
    for epoch in range(start_epoch, t.epochs):
        model.train()
        tracker.reset()
        perm = torch.randperm(n, generator=gen)
        base_lrs = [g["lr"] for g in opt.param_groups]      # this epoch's lr after the decay
        t0 = time.perf_counter()
        # running sums stay on the device: reading them every step would wait for the GPU each time
        sums = Sums.zeros(device)
        bar = _progress(steps, epoch, t) if t.progress else None

        def run(first: int, last: int, careful: bool) -> bool:
            """Steps first..last-1; True when `careful` (a host check of every loss, before its
            update: today's rule) stops at a non-finite loss, whose step then changes nothing."""
            for step in range(first, last):
                if epoch * steps < warm:                    # an epoch the warmup reaches into
                    for g, lr in zip(opt.param_groups, base_lrs):
                        g["lr"] = lr * min(1.0, (epoch * steps + step + 1) / warm)
                idx = perm[step * t.batch_size:(step + 1) * t.batch_size]
                x, y = x_train[idx], y_train[idx]
                if cfg.data.augment:
                    x = shift_augment(x, 2, generator=gen)
                x, y = to_device(x, device), to_device(y, device)
                loss, scores = step_fn(x, y)
                if careful and not torch.isfinite(loss):
                    return True
                opt.zero_grad(set_to_none=True)
                loss.backward()
                tracker.record()
                opt.step()
                sums.add(loss, scores, y)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{float(sums.loss) / sums.seen:.4f}", acc=f"{int(sums.correct) / sums.seen:.3f}")
            return False

        diverged = False
        for first in range(0, steps, window):
            # No host wait per step: the loss sum (float64, on the device) turns non-finite with the
            # first non-finite loss, and one read per window of `train.check_every` steps (default:
            # the epoch) sees it. Then the window is rewound to its start and replayed with the
            # per-step check, so a diverged run stops, reports and checkpoints exactly as if every
            # step had been checked (bit for bit on the CPU).
            last = min(first + window, steps)
            snap = Snapshot.take(model, opt, gen, tracker, sums, device)
            run(first, last, careful=False)
            if not torch.isfinite(sums.loss):
                sums = snap.restore(model, opt, gen, tracker, device)
                if bar is not None:
                    bar.n = first
                diverged = run(first, last, careful=True)
                if diverged:
                    break
        if bar is not None:
            bar.close()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        train_time = time.perf_counter() - t0
        for g, lr in zip(opt.param_groups, base_lrs):      # a warmup epoch ends at the epoch's lr
            g["lr"] = lr
        if not diverged and (epoch + 1) * steps > warm:     # an epoch with a step past the warmup decays
            sched.step()

        seen = sums.seen
        metrics = {"epoch": epoch,
                   "train_loss": float(sums.loss) / seen if seen else float("nan"),
                   "train_acc": int(sums.correct) / seen if seen else float("nan")}
        metrics.update(tracker.summary())
        close_epoch(metrics, epoch, model, ev, best, diverged, seen, train_time)
        _end_epoch(report, checkpoint, metrics, lambda: _state(model, opt, sched, gen, epoch, metrics, best))
        if metrics["status"] != RUNNING:
            break
    best.restore(model)
    return metrics


@dataclass
class EvalSet:
    """What an epoch is evaluated on: the splits, the probe batch D (on the device) with its parse tree
    (`parts`), the transformed test split, and the settings the figures depend on."""
    splits: Splits
    device: torch.device
    recon_weight: float
    x_eval: torch.Tensor
    y_eval: torch.Tensor
    truth: Optional[probes.Truth]
    test_tf: Optional[torch.utils.data.TensorDataset]
    train: cfgmod.TrainConfig

    @classmethod
    def of(cls, cfg: cfgmod.RunConfig, splits: Splits, device: torch.device) -> "EvalSet":
        t = cfg.train
        x_eval, y_eval = (v.to(device) for v in fixed_batch(splits.val, t.eval_batch, t.seed))
        recon_w = cfg.model.recon_weight if cfg.model.decoder else 0.0
        return cls(splits, device, recon_w, x_eval, y_eval, eval_truth(splits, cfg), transformed_test(splits, cfg), t)


def close_epoch(metrics: dict, epoch: int, model: torch.nn.Module, ev: EvalSet, best: "Best", diverged: bool,
                seen: int, train_time: float) -> None:
    """An epoch's report after its training steps, in place: `metrics` holds the training figures; this
    adds the evaluation (val, test, transformed test), the probes on D, throughput and memory, the
    best-so-far and the status. A diverged epoch (its training, or a non-finite val/test loss) is not
    evaluated further. One function for `fit` and the seed-batched `capsmodels.seeds.fit_seeds`, so a
    seed's report is built the same way in both."""
    device, recon_w, t = ev.device, ev.recon_weight, ev.train
    test_correct = None
    if not diverged:
        metrics["val_loss"], metrics["val_acc"] = evaluate(model, ev.splits.val, device, recon_w)
        metrics["test_loss"], test_correct = evaluate_each(model, ev.splits.test, device, recon_w)
        metrics["test_acc"] = float(test_correct.sum()) / max(len(test_correct), 1)
        if ev.test_tf is not None:
            metrics["test_acc_transformed"] = evaluate(model, ev.test_tf, device, recon_w)[1]
        diverged = not all(math.isfinite(metrics[k]) for k in ("val_loss", "test_loss"))
    if not diverged:
        metrics.update(probes.evaluation_probes(model, ev.x_eval, ev.y_eval, t.dead_tau, recon_w, ev.truth))
    metrics["images_per_s"] = seen / train_time if train_time > 0 else 0.0
    metrics["peak_mem_mb"] = peak_memory_mb(device)
    metrics["time_s"] = train_time
    metrics[TEST_N] = len(ev.splits.test)
    if not diverged:
        best.update(epoch, metrics, model, test_correct)
    best.annotate(metrics)
    metrics["status"], reason = _end_status(diverged, best, epoch, t)
    if reason:
        metrics[REPORT_STOP_REASON] = reason


def warmup_steps(warmup_epochs: float, steps: int) -> int:
    """W: the number of warmup steps, ceil(warmup_epochs * steps per epoch); 0 for no warmup."""
    return math.ceil(warmup_epochs * steps) if warmup_epochs > 0 else 0


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A batch to the training device. For CUDA it is first copied to pinned (page-locked) host memory,
    so that the non-blocking copy really is asynchronous (from pageable memory the copy waits); torch's
    caching host allocator keeps the pinned block until the copy has read it."""
    if device.type == "cuda" and not t.is_pinned():
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


@dataclass
class Sums:
    """One epoch's running sums: images seen (host int), the loss sum (float64) and the correct count
    on the device, so that adding a step to them reads nothing back."""
    seen: int
    loss: torch.Tensor
    correct: torch.Tensor

    @classmethod
    def zeros(cls, device: torch.device) -> "Sums":
        return cls(0, torch.zeros((), dtype=torch.float64, device=device),
                   torch.zeros((), dtype=torch.int64, device=device))

    def add(self, loss: torch.Tensor, scores: torch.Tensor, y: torch.Tensor) -> None:
        self.seen += len(y)
        self.loss += loss.detach().double() * len(y)
        self.correct += (scores.argmax(-1) == y).sum()

    def clone(self) -> "Sums":
        return Sums(self.seen, self.loss.clone(), self.correct.clone())


@dataclass
class Snapshot:
    """The training state at the start of a check window (train.check_every): what a window is rewound
    to when its loss sum turns out non-finite. Copies on the device: no host wait to take it."""
    model: dict
    optimizer: dict
    generator: torch.Tensor
    rng: torch.Tensor
    cuda_rng: Optional[torch.Tensor]
    grads: list
    sums: Sums

    @classmethod
    def take(cls, model, opt, gen, tracker, sums: Sums, device: torch.device) -> "Snapshot":
        import copy
        return cls({k: v.detach().clone() for k, v in model.state_dict().items()},
                   copy.deepcopy(opt.state_dict()), gen.get_state(), torch.get_rng_state(),
                   torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                   tracker.steps(), sums.clone())

    def restore(self, model, opt, gen, tracker, device: torch.device) -> Sums:
        """Everything back as it was at `take`; returns the window's starting sums."""
        model.load_state_dict(self.model)
        opt.load_state_dict(self.optimizer)
        gen.set_state(self.generator)
        torch.set_rng_state(self.rng)
        if self.cuda_rng is not None:
            torch.cuda.set_rng_state(self.cuda_rng, device)
        tracker.restore(self.grads)
        return self.sums.clone()


def _end_status(diverged: bool, best: "Best", epoch: int, t: cfgmod.TrainConfig) -> tuple[str, Optional[str]]:
    """(status, stop reason or None while the run goes on). Patience wins over the cap when both end
    the run at one epoch: the run did converge by the rule."""
    if diverged:
        return DIVERGED, STOP_DIVERGED
    if t.patience and best.wait >= t.patience:
        return FINISHED, STOP_PATIENCE
    if epoch == t.epochs - 1:
        return FINISHED, STOP_EPOCHS
    return RUNNING, None


@dataclass
class Best:
    """The best-validation epoch so far: what `train.patience` counts from, what the report's best/
    figures and `test_correct` describe, and the weights the run ends with. Part of the checkpoint, so
    a resumed run stops and logs exactly as an uninterrupted one."""
    val_acc: float = -math.inf
    epoch: int = -1                   # -1: no evaluated epoch yet (the first diverged)
    wait: int = 0                     # evaluated epochs since the best one
    test_correct: Optional[str] = None    # contract.encode_correct of the best epoch's test split
    weights: Optional[dict] = None    # a copy of the best epoch's state_dict

    def update(self, epoch: int, metrics: dict, model: torch.nn.Module, test_correct: torch.Tensor) -> None:
        """An evaluated epoch: a strictly higher val_acc makes it the best (its weights copied, its
        numeric metrics, bookkeeping aside, reported again as best/<name>); else one more to wait."""
        if not metrics["val_acc"] > self.val_acc:
            self.wait += 1
            return
        self.val_acc, self.epoch, self.wait = metrics["val_acc"], epoch, 0
        self.weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
        flags = test_correct.numpy().astype(np.uint8)
        self.test_correct = encode_correct(np.packbits(flags).tobytes(), len(flags))
        metrics.update({best_metric(k): float(v) for k, v in list(metrics.items())
                        if k not in BEST_EXCLUDED and isinstance(v, (int, float)) and not isinstance(v, bool)})

    def annotate(self, metrics: dict) -> None:
        """What every epoch's report says of the best so far (nothing before the first evaluated one)."""
        if self.epoch >= 0:
            metrics[BEST_EPOCH] = self.epoch
            metrics[REPORT_TEST_CORRECT] = self.test_correct

    def restore(self, model: torch.nn.Module) -> None:
        if self.weights is not None:
            model.load_state_dict(self.weights)

    def state(self) -> dict:
        return {"val_acc": self.val_acc, "epoch": self.epoch, "wait": self.wait,
                "test_correct": self.test_correct}

    @classmethod
    def from_state(cls, state: dict) -> "Best":
        """The best-so-far of a checkpoint; a checkpoint from before patience existed has none (its
        resumed run then counts from its next epoch)."""
        b = state.get("best") or {}
        return cls(b.get("val_acc", -math.inf), b.get("epoch", -1), b.get("wait", 0), b.get("test_correct"),
                   state.get("best_model"))


def _end_epoch(report: Optional[Report], checkpoint: Optional[Checkpoint], metrics: dict,
               snapshot: Callable[[], dict]) -> None:
    """The checkpoint first (the snapshot is only taken when someone keeps it), then the report."""
    if checkpoint is not None:
        checkpoint(snapshot())
    if report is not None:
        report(metrics)


def _state(model, opt, sched, gen, epoch: int, metrics: dict, best: Best) -> dict:
    """A snapshot (deep copy: state_dict() shares the live tensors that the next epoch changes).
    `best_model` is the best-val epoch's weights: what a trial stopped by ASHA logs (sweeps/models.py)."""
    import copy
    return copy.deepcopy({"model": model.state_dict(), "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(), "generator": gen.get_state(), "epoch": epoch,
            "metrics": dict(metrics), "best": best.state(), "best_model": best.weights})


def _progress(steps: int, epoch: int, t: cfgmod.TrainConfig):
    from tqdm.auto import tqdm
    return tqdm(total=steps, desc=f"epoch {epoch + 1}/{t.epochs}", unit="step", leave=True,
                file=sys.stderr, dynamic_ncols=True)
