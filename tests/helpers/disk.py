"""Disks that refuse writes, for real: a small tmpfs that fills up, a read-only bind mount. Both need
mount(2) (root, or CAP_SYS_ADMIN in a container); without it the tests that use them skip, saying so."""
from __future__ import annotations

import contextlib
import subprocess
from pathlib import Path

import pytest


def _mount(*args: str) -> None:
    proc = subprocess.run(["mount", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"needs mount(2) (root or CAP_SYS_ADMIN): {proc.stderr.strip()[:120]}")


@contextlib.contextmanager
def small_disk(path: Path, size: str = "4m"):
    """`path` as a tmpfs of `size`; `fill(path)` then leaves it without a free byte."""
    path.mkdir(parents=True, exist_ok=True)
    _mount("-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path))
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def fill(folder: Path) -> Path:
    """Write zeros into `folder/filler` until the disk is full; remove the file to free it again."""
    filler = folder / "filler"
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
    return filler


@contextlib.contextmanager
def read_only(path: Path):
    """`path` (a folder) mounted read-only over itself."""
    path.mkdir(parents=True, exist_ok=True)
    _mount("--bind", str(path), str(path))
    try:
        proc = subprocess.run(["mount", "-o", "remount,bind,ro", str(path)], capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot remount read-only: {proc.stderr.strip()[:120]}")
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)
