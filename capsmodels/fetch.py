"""Checksum-verified downloads and safe archive extraction for `capsmodels.store`.

A download streams into a temporary file in the destination folder, hashes it on the way, and is
renamed into place only when the checksum matches, so a half-written or tampered file never sits
under the real name (two Ray workers downloading the same file at once just both rename a good
copy). Failures raise `FetchError` with a short reason; `capsmodels.store` words the user message.
"""
from __future__ import annotations

import hashlib
import os
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
import zlib
from pathlib import Path

from capsmodels.errors import CapsweepError

TIMEOUT_S = 30.0        # per socket operation, not for the whole file
CHUNK = 1 << 20


class FetchError(CapsweepError):
    """A download or extraction that failed; `str(e)` is a short reason for the user message."""


class ChecksumError(FetchError):
    """The bytes arrived but their hash is not the published one (tampered or corrupt)."""


def file_hash(path: Path, algo: str = "md5") -> str:
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def _algo(checksum: str) -> str:
    """md5 (32 hex digits) or sha256 (64): the published checksums come in both kinds."""
    return {32: "md5", 64: "sha256"}.get(len(checksum), "md5")


def download(url: str, dest: Path, checksum: str | None, timeout: float = TIMEOUT_S,
             quiet: bool = False) -> Path:
    """Fetch `url` to `dest` (atomic), verifying an MD5 or SHA256 `checksum` when given."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    algo = _algo(checksum) if checksum else "md5"
    h = hashlib.new(algo)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        try:
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as resp:
                total = int(resp.headers.get("Content-Length") or 0)
                done, last = 0, 0.0
                while True:
                    chunk = resp.read(CHUNK)
                    if not chunk:
                        break
                    out.write(chunk)
                    h.update(chunk)
                    done += len(chunk)
                    now = time.monotonic()
                    if not quiet and now - last > 1.0:
                        _progress(dest.name, done, total)
                        last = now
                if total and done != total:
                    raise FetchError(f"connection closed after {done} of {total} bytes of {url}")
        except urllib.error.HTTPError as e:
            raise FetchError(f"HTTP {e.code} {e.reason} for {url}") from None
        except urllib.error.URLError as e:
            raise FetchError(f"{e.reason} for {url}") from None
        except (OSError, ValueError) as e:  # timeouts, resets, bad URLs
            raise FetchError(f"{type(e).__name__}: {e} for {url}") from None
        if not quiet:
            _progress(dest.name, done, total, end=True)
        if checksum and h.hexdigest() != checksum.lower():
            raise ChecksumError(f"{dest.name} from {url} has {algo} {h.hexdigest()}, expected {checksum}")
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            tmp.unlink()
    return dest


def _progress(name: str, done: int, total: int, end: bool = False) -> None:
    pct = f" {100 * done / total:5.1f}%" if total else ""
    sys.stderr.write(f"\rcapsweep: downloading {name}: {done / 2**20:7.1f} MiB{pct}" + ("\n" if end else ""))
    sys.stderr.flush()


def extract_tar(archive: Path, into: Path) -> None:
    """Extract a .tar.gz refusing absolute paths, '..', links and devices (tar slip)."""
    into = Path(into)
    into.mkdir(parents=True, exist_ok=True)
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = tar.getmembers()
            base = into.resolve()
            for m in members:
                target = (base / m.name).resolve()
                if not (m.isfile() or m.isdir()) or os.path.isabs(m.name) or \
                        (target != base and base not in target.parents):
                    raise FetchError(f"{archive.name} contains an unsafe member {m.name!r}")
            if hasattr(tarfile, "data_filter"):
                tar.extractall(into, members=members, filter="data")
            else:  # Python < 3.11.4: members were checked above
                tar.extractall(into, members=members)
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        raise FetchError(f"{archive.name} is not a readable tar.gz archive ({e})") from None
