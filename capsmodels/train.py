"""The training loop: `fit(config, report)` trains one configuration and reports once per epoch.

It knows nothing of Ray or MLflow: a sweep's trainable passes a `report` callable that forwards the
metrics to Ray Tune, `capsweep train` passes one that prints them. One clear path, nanoGPT style:
build data -> build model (-> `init: data` scales it on the first training batch) -> for each epoch:
train steps (grad norms recorded) -> evaluate (and on the transformed test split, when
`data.test_transform` asks) -> probes on the fixed batch D (docs/PROBES.md) -> report.

Determinism: the model is initialised under `torch.manual_seed(seed)`, and every random choice of
the loop (shuffling, augmentation) draws from one dedicated `torch.Generator` seeded from the same
seed, whose state is part of the checkpoint. Probes run under `fork_rng`, so two runs with the same
seed on the CPU repeat exactly, with or without resumes.
"""
from __future__ import annotations

import math
import resource
import sys
import time
from typing import Any, Callable, Optional

import torch

from capsmodels import config as cfgmod
from capsmodels import init, losses, networks, parts, probes, transforms
from capsmodels.augment import shift_augment
from capsmodels.contract import DIVERGED, FINISHED, RUNNING
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


@torch.no_grad()
def evaluate(model: torch.nn.Module, ds: torch.utils.data.TensorDataset, device: torch.device,
             recon_weight: float, batch: int = 512) -> tuple[float, float]:
    """(mean loss, accuracy) over a whole split, in eval mode."""
    was_training = model.training
    model.eval()
    x_all, y_all = ds.tensors
    total_loss, correct = 0.0, 0
    for start in range(0, len(y_all), batch):
        x = x_all[start:start + batch].to(device, non_blocking=True)
        y = y_all[start:start + batch].to(device, non_blocking=True)
        out = model(x)
        loss, _ = losses.total_loss(out, x, y, recon_weight)
        total_loss += float(loss) * len(y)
        correct += int((out.scores.argmax(-1) == y).sum())
    model.train(was_training)
    n = max(len(y_all), 1)
    return total_loss / n, correct / n


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

    config: a RunConfig or a nested dict (validated here). data: the raw dataset when the caller has
    it already (a sweep shares one copy per node through Ray's object store). state: a checkpoint
    from an earlier `checkpoint` to continue from. checkpoint: called after each epoch, BEFORE that
    epoch's `report`, with a snapshot dict (model, optimizer, scheduler, generator, epoch, metrics), so
    a caller can persist it first (a crash between the two repeats the report, never loses the state).
    prepared: what `prepare(config, data)` returned, when the caller ran it already to check its input.

    A non-finite loss ends the run with `status: diverged` in the last report instead of raising.
    """
    cfg = config if isinstance(config, cfgmod.RunConfig) else cfgmod.from_dict(config)
    cfgmod.validate(cfg)
    t = cfg.train
    if t.threads > 0:
        torch.set_num_threads(t.threads)
    splits, model, device = prepared or prepare(cfg, data)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    opt = torch.optim.Adam(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=t.lr_decay)
    gen = torch.Generator().manual_seed(t.seed)
    start_epoch = 0
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        gen.set_state(state["generator"])
        start_epoch = int(state["epoch"]) + 1

    x_train, y_train = splits.train.tensors
    x_eval, y_eval = (v.to(device) for v in fixed_batch(splits.val, t.eval_batch, t.seed))
    truth = eval_truth(splits, cfg)
    test_tf = transformed_test(splits, cfg)
    tracker = probes.GradTracker(model.layer_weights(), t.grad_window)
    n = len(y_train)
    steps = math.ceil(n / t.batch_size)
    if t.max_steps_per_epoch:
        steps = min(steps, t.max_steps_per_epoch)
    recon_w = cfg.model.recon_weight if cfg.model.decoder else 0.0
    metrics: dict = {}
    if state is not None and start_epoch >= t.epochs and state.get("metrics"):
        # resumed from the final checkpoint (the caller lost the last report): say it again
        metrics = dict(state["metrics"])
        _end_epoch(report, checkpoint, metrics, lambda: state)
        return metrics

    for epoch in range(start_epoch, t.epochs):
        model.train()
        tracker.reset()
        perm = torch.randperm(n, generator=gen)
        t0 = time.perf_counter()
        # running sums stay on the device: reading them every step would wait for the GPU each time
        seen, diverged = 0, False
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        correct = torch.zeros((), dtype=torch.int64, device=device)
        bar = _progress(steps, epoch, t) if t.progress else None
        for step in range(steps):
            idx = perm[step * t.batch_size:(step + 1) * t.batch_size]
            x, y = x_train[idx], y_train[idx]
            if cfg.data.augment:
                x = shift_augment(x, 2, generator=gen)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            out = model(x, y)
            loss, _ = losses.total_loss(out, x, y, recon_w)
            if not torch.isfinite(loss):
                diverged = True
                break
            opt.zero_grad(set_to_none=True)
            loss.backward()
            tracker.record()
            opt.step()
            seen += len(y)
            loss_sum += loss.detach().double() * len(y)
            correct += (out.scores.detach().argmax(-1) == y).sum()
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{float(loss_sum) / seen:.4f}", acc=f"{int(correct) / seen:.3f}")
        if bar is not None:
            bar.close()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        train_time = time.perf_counter() - t0
        if not diverged:
            sched.step()

        metrics = {"epoch": epoch,
                   "train_loss": float(loss_sum) / seen if seen else float("nan"),
                   "train_acc": int(correct) / seen if seen else float("nan")}
        metrics.update(tracker.summary())
        if not diverged:
            metrics["val_loss"], metrics["val_acc"] = evaluate(model, splits.val, device, recon_w)
            metrics["test_loss"], metrics["test_acc"] = evaluate(model, splits.test, device, recon_w)
            if test_tf is not None:
                metrics["test_acc_transformed"] = evaluate(model, test_tf, device, recon_w)[1]
            diverged = not all(math.isfinite(metrics[k]) for k in ("val_loss", "test_loss"))
        if not diverged:
            metrics.update(probes.evaluation_probes(model, x_eval, y_eval, t.dead_tau, recon_w, truth))
        metrics["images_per_s"] = seen / train_time if train_time > 0 else 0.0
        metrics["peak_mem_mb"] = peak_memory_mb(device)
        metrics["time_s"] = train_time
        metrics["status"] = DIVERGED if diverged else (FINISHED if epoch == t.epochs - 1 else RUNNING)
        _end_epoch(report, checkpoint, metrics, lambda: _state(model, opt, sched, gen, epoch, metrics))
        if diverged:
            break
    return metrics


def _end_epoch(report: Optional[Report], checkpoint: Optional[Checkpoint], metrics: dict,
               snapshot: Callable[[], dict]) -> None:
    """The checkpoint first (the snapshot is only taken when someone keeps it), then the report."""
    if checkpoint is not None:
        checkpoint(snapshot())
    if report is not None:
        report(metrics)


def _state(model, opt, sched, gen, epoch: int, metrics: dict) -> dict:
    """A snapshot (deep copy: state_dict() shares the live tensors that the next epoch changes)."""
    import copy
    return copy.deepcopy({"model": model.state_dict(), "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(), "generator": gen.get_state(), "epoch": epoch,
            "metrics": dict(metrics)})


def _progress(steps: int, epoch: int, t: cfgmod.TrainConfig):
    from tqdm.auto import tqdm
    return tqdm(total=steps, desc=f"epoch {epoch + 1}/{t.epochs}", unit="step", leave=True,
                file=sys.stderr, dynamic_ncols=True)
