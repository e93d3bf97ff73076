"""Seeded, class-stratified train/val/test splits of a dataset, as tensors ready for training.

`RawData` (what `capsmodels.datasets.load_raw` decodes) is defined here, below the loaders: the splits
read it and the loaders build it, so neither module imports the other's caller.

`make_splits(raw, cfg, seed)` -> `Splits`: train and val drawn from the official training split
(never overlapping), the official test split or a fixed stratified subset of it, all float32 NCHW
tensors in [0, 1]. Every draw is vectorised (no loop over images) and each class gets its share
within one image.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from torch.utils.data import TensorDataset

from capsmodels.config import DataConfig
from capsmodels.store import fail

FIXED_SEED = 0           # the seed of every fixed test split, independent of the run seed


@dataclass
class RawData:
    """The official train/test split as loaded from disk.

    x_*: uint8 (N, H, W, C) images; for the synthetic `sign` task float32 (N, 8, 8, 1) in [-1, 1].
    y_*: int64 (N,) class indices in [0, num_classes).
    """
    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    classes: list
    roles_train: Optional[np.ndarray] = None   # `parts` only: int8 (N, H, W) role per pixel, -1 background
    roles_test: Optional[np.ndarray] = None    # (capsmodels.parts: the true parse tree of each image)

    @property
    def in_shape(self) -> tuple[int, int, int]:
        """(C, H, W): the input a network for this dataset must fit."""
        _, h, w, c = self.x_train.shape
        return c, h, w


@dataclass
class Splits:
    """Tensors ready for a DataLoader: x float32 (N, C, H, W) in [0, 1], y int64 (N,)."""
    train: TensorDataset
    val: TensorDataset
    test: TensorDataset
    num_classes: int
    in_shape: tuple            # (C, H, W)
    name: str
    roles: Optional[dict] = None   # `parts` only: {"train"|"val"|"test": int8 (N, H, W) role maps},
                                   # aligned with the split's images (capsmodels.parts)


def quota(counts: np.ndarray, n: int) -> np.ndarray:
    """Per-class counts summing to n, each within 1 of n * share (largest remainder, ties by class)."""
    counts = np.asarray(counts, dtype=np.int64)
    exact = n * counts / max(int(counts.sum()), 1)
    q = np.floor(exact).astype(np.int64)
    order = np.lexsort((np.arange(len(q)), -(exact - q)))           # largest remainder first
    q[order[: n - int(q.sum())]] += 1
    return q


def _fit_quota(q: np.ndarray, cap: np.ndarray, prefer: np.ndarray) -> np.ndarray:
    """Clip q to the capacity per class, moving the excess to classes with room (by `prefer`)."""
    q = np.minimum(q, cap)
    excess = int(prefer.sum() - q.sum())    # prefer.sum() is the wanted total
    for c in np.argsort(-(prefer - np.floor(prefer)), kind="stable"):
        if excess <= 0:
            break
        add = min(excess, int(cap[c] - q[c]))
        q[c] += add
        excess -= add
    return q


def stratified(y: np.ndarray, per_class: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Sorted indices with per_class[c] random members of each class c (vectorised, no loop over items)."""
    perm = rng.permutation(len(y))
    order = perm[np.argsort(y[perm], kind="stable")]                # grouped by class, random within
    ys = y[order]
    starts = np.searchsorted(ys, np.arange(len(per_class)))
    rank = np.arange(len(ys)) - starts[ys]                          # position within its class
    return np.sort(order[rank < per_class[ys]])


def _count(value: float, total: int, fraction_max: float) -> int:
    """A count from a fraction (value <= fraction_max) of total, or the value itself as a count."""
    return int(round(value * total)) if value <= fraction_max else int(value)


def make_splits(raw: RawData, cfg: DataConfig, seed: int) -> Splits:
    """Seeded, class-stratified train/val from the training split, and the (fixed) test split.

    val: `val_size` (fraction of the training split, or a count) drawn first; train: all the rest
    when train_size == 1.0, else `train_size` (fraction of the training split, or a count) drawn
    from the rest, so train and val never overlap. Each class gets its share within one image.
    test: the official test split, or a stratified `test_size` subset drawn with FIXED_SEED so all
    runs of a sweep see the same test images whatever their seed.
    """
    name, y, k = raw.name, raw.y_train, raw.num_classes
    n_all = len(y)
    counts = np.bincount(y, minlength=k)
    n_val = _count(cfg.val_size, n_all, fraction_max=1.0 - 1e-12)
    full = float(cfg.train_size) == 1.0
    n_train = n_all - n_val if full else _count(cfg.train_size, n_all, fraction_max=1.0)
    if n_val < 1:
        raise fail(name, f"data.val_size: {cfg.val_size} gives no validation images out of {n_all}")
    if n_train < 1:
        raise fail(name, f"data.train_size: {cfg.train_size} gives no training images out of {n_all}")
    if n_train < k:
        # `train_size=2.0` meant as "twice" or "all" would otherwise train on 2 images without a word
        raise fail(name, f"data.train_size: {cfg.train_size:g} gives {n_train} training image(s) for {k} classes; "
                         f"a number above 1 is a count of images: give at least {k}, or a fraction in (0, 1]")
    if n_train + n_val > n_all:
        raise fail(name, f"data.train_size ({n_train} images) + data.val_size ({n_val} images) exceed "
                         f"the {n_all} images of the training split")
    rng = np.random.default_rng(seed)
    val_idx = stratified(y, quota(counts, n_val), rng)
    rest = np.setdiff1d(np.arange(n_all), val_idx)
    if full:
        train_idx = rest
    else:
        want = n_train * counts / n_all
        q = _fit_quota(quota(counts, n_train), counts - np.bincount(y[val_idx], minlength=k), want)
        train_idx = rest[stratified(y[rest], q, rng)]
    test_idx = np.arange(len(raw.y_test))
    if cfg.test_size is not None:
        n_test = _count(cfg.test_size, len(test_idx), fraction_max=1.0)
        if not 1 <= n_test <= len(test_idx):
            raise fail(name, f"data.test_size: {cfg.test_size} asks for {n_test} of the "
                             f"{len(test_idx)} test images")
        test_idx = stratified(raw.y_test, quota(np.bincount(raw.y_test, minlength=k), n_test),
                               np.random.default_rng(FIXED_SEED))
    train = TensorDataset(_images(raw.x_train[train_idx]), torch.from_numpy(y[train_idx]))
    val = TensorDataset(_images(raw.x_train[val_idx]), torch.from_numpy(y[val_idx]))
    test = TensorDataset(_images(raw.x_test[test_idx]), torch.from_numpy(raw.y_test[test_idx].copy()))
    roles = None
    if raw.roles_train is not None:
        roles = {"train": torch.from_numpy(raw.roles_train[train_idx]),
                 "val": torch.from_numpy(raw.roles_train[val_idx]),
                 "test": torch.from_numpy(raw.roles_test[test_idx])}
    return Splits(train, val, test, k, tuple(train.tensors[0].shape[1:]), name, roles)


def _images(x: np.ndarray) -> torch.Tensor:
    """NHWC uint8 (or float in [-1, 1] for `sign`) -> float32 (N, C, H, W) in [0, 1]."""
    t = torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2)
    t = t.float().div_(255.0) if x.dtype == np.uint8 else (t.float() + 1.0).mul_(0.5)
    return t.contiguous()
