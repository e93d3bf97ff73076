"""Where the datasets' files are, getting them, and the decoded-array cache (the "store").

Where files are looked for (`data_root`): an explicit `root`, then `$CAPSWEEP_DATA`, then
`~/.cache/capsweep`, then `/usr/share/datasets` (Debian's dataset-fashion-mnist installs
`/usr/share/datasets/fashion-mnist`). Each dataset is searched in its own subfolders of those (see
`SUBDIRS`; an explicit root is also searched directly). Missing files are downloaded (when
`download=True`) into the first writable one of root / $CAPSWEEP_DATA / ~/.cache/capsweep, from the
URLs in `SOURCES`, and verified against the published checksum before they are renamed into place
(`capsmodels.fetch`). One process per machine downloads a dataset; the others wait on a file lock.

Trust: downloaded files are only kept when their checksum matches. Files found on disk are taken
as the user placed them (Debian's Fashion-MNIST gz files, for instance, are recompressed and do not
match the upstream MD5s) but are still structurally checked when decoded (`capsmodels.formats`).

Decoding (`capsmodels.datasets`) costs seconds; `cached` keeps its arrays as .npz keyed on the
source files' paths, sizes and mtimes. Every problem reaches the user as a one-line `DataError`
naming the dataset and file.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from filelock import FileLock, Timeout as FileLockTimeout

from capsmodels.errors import CapsweepError
from capsmodels.fetch import ChecksumError, FetchError, download as fetch_url, extract_tar, file_hash


class DataError(CapsweepError):
    """A dataset that cannot be loaded. The message is one line: dataset, file/place, remedy."""


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
IDX_STEMS = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
             "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
NORB_STEMS = ("smallnorb-5x46789x9x18x6x2x96x96-training-dat.mat",
              "smallnorb-5x46789x9x18x6x2x96x96-training-cat.mat",
              "smallnorb-5x01235x9x18x6x2x96x96-testing-dat.mat",
              "smallnorb-5x01235x9x18x6x2x96x96-testing-cat.mat")
CIFAR_ARCHIVE = "cifar-10-python.tar.gz"
CIFAR_BATCHES = ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5",
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
    "cifar10": (Remote(CIFAR_ARCHIVE, ("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",),
                       "c58f30108f718f92721af3b95e74349a"),),
    "svhn": (Remote("train_32x32.mat", ("http://ufldl.stanford.edu/housenumbers/train_32x32.mat",),
                    "e26dedcc434d2e4c54c9b2d4a06d8373"),
             Remote("test_32x32.mat", ("http://ufldl.stanford.edu/housenumbers/test_32x32.mat",),
                    "eb5a983be6a315427106f1b164d9cef3")),
    "smallnorb": _mirrored((_NORB_URL,), {
        NORB_STEMS[0] + ".gz": "66054832f9accfe74a0f4c36a75bc0a2",
        NORB_STEMS[1] + ".gz": "23c8b86101fbf0904a000b43d3ed2fd9",
        NORB_STEMS[2] + ".gz": "e4ad715691ed5a3a5f138751a4ceb071",
        NORB_STEMS[3] + ".gz": "5aa791cd7e6016cf957ce9bdb93b8603"}),
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
    "mnist": tuple((s, s + ".gz") for s in IDX_STEMS),
    "fashion_mnist": tuple((s, s + ".gz") for s in IDX_STEMS),
    "cifar10": tuple((b,) for b in CIFAR_BATCHES),
    "svhn": (("train_32x32.mat",), ("test_32x32.mat",)),
    "smallnorb": tuple((s, s + ".gz") for s in NORB_STEMS),
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

LOCK_TIMEOUT_S = 3600.0  # how long to wait for another process downloading the same dataset
_CACHE_VERSION = "1"     # bump when a decoder (capsmodels.datasets) changes, to invalidate decoded caches


def fail(name: str, msg: str) -> DataError:
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


def files(name: str, root: str | None, download: bool) -> dict:
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
                _extract(name, dl_dir / CIFAR_ARCHIVE, dl_dir, remove=True)
    except FileLockTimeout:
        raise fail(name, f"waited {LOCK_TIMEOUT_S:.0f} s for another process downloading into {dl_dir} "
                         f"(lock {base / f'.{name}.download.lock'}); remove the lock file if none is running") from None
    except FetchError as e:
        bases = ", ".join(str(b) for b in data_root(root))
        where = dl_dir or (Path(root).expanduser() if root else Path.home() / ".cache" / "capsweep")
        howto = _HOWTO[name].format(url=_HOMEPAGE[name], dir=where)
        why = str(e) if str(e).startswith("download disabled") else f"download failed ({e})"
        raise fail(name, f"{missing} not found in {bases} (or their subfolders "
                         f"{', '.join(SUBDIRS[name])}); {why} — {howto}") from None
    after = dl_dir / "cifar-10-batches-py" if name == "cifar10" else dl_dir
    found, missing = _locate(name, [after])
    if not found:
        raise fail(name, f"{missing} missing in {after} after downloading; the download did not contain it")
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
        raise fail(name, f"checksum mismatch: {bad[0]}; the file was not kept (corrupt or tampered download)")
    raise FetchError("; ".join(str(r) for r in reasons))


def _cifar_from_archive(name: str, root: str | None, dl_dir: Path | None) -> dict | None:
    """Use a cifar-10-python.tar.gz the user placed (verified against the official MD5)."""
    for base in data_root(root):
        archive = base / "cifar10" / CIFAR_ARCHIVE
        for a in (archive, base / CIFAR_ARCHIVE):
            if a.is_file():
                if dl_dir is None:
                    raise FetchError(f"found {a} but no writable folder to extract it into")
                got = file_hash(a, "md5")
                if got != SOURCES["cifar10"][0].checksum:
                    raise fail(name, f"{a}: checksum mismatch (md5 {got}, expected "
                                     f"{SOURCES['cifar10'][0].checksum}); corrupt or not the official archive")
                _extract(name, a, dl_dir, remove=False)
                found, _ = _locate(name, [dl_dir / "cifar-10-batches-py"])
                return found
    return None


def _extract(name: str, archive: Path, into: Path, remove: bool) -> None:
    try:
        extract_tar(archive, into)
    except FetchError as e:
        raise fail(name, f"{archive}: {e}") from None
    if remove:
        archive.unlink(missing_ok=True)



# ---------------------------------------------------------------------------------------------
# Decoded-array cache: decoding gz/pickle/mat files costs seconds; np.load of the result is ~50 ms.
def cached(name: str, sources: list[Path], root: str | None, build: Callable[[], tuple]) -> tuple:
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
