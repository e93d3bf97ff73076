"""Where a sweep's state lives: a local folder, or any URI Ray Tune's `storage_path` takes.

Ray Tune resolves `storage_path` with `pyarrow.fs.FileSystem.from_uri` (ray/train/_internal/storage.py,
`get_fs_and_path`): `s3://`, `gs://` (`gcs://`), `hdfs://`, `viewfs://`, `abfs://` (`abfss://`) and
`file://` URIs, or a local path. capsweep's own files beside Tune's (each trial's last-epoch state,
`trial_state/<trial id>.pt`) go through the same layer, so they land wherever Tune's state does and
every node that sees the storage sees them. Paths here are strings: a URI keeps its scheme
(`s3://bucket/prefix/name`), a local path is absolute.

Files that need a real local file (the driver's lock, the MLflow write spool, Optuna's journal, whose
locking needs a POSIX file system) live in `local_dir(...)`: the storage folder itself when it is
local, else a folder under `~/.cache/capsweep/storage/` named after the URI.
"""
from __future__ import annotations

import io
import os
import re
from pathlib import Path
from typing import Optional

from capsmodels.errors import CapsweepError

URI_RE = re.compile(r"^([a-z][a-z0-9+.-]*)://")
# the schemes pyarrow.fs.FileSystem.from_uri resolves, and so Ray Tune's storage_path accepts
SCHEMES = ("file", "s3", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss")
CACHE_ENV = "CAPSWEEP_CACHE"            # default ~/.cache/capsweep


def scheme(path: str) -> Optional[str]:
    m = URI_RE.match(str(path))
    return m.group(1) if m else None


def is_uri(path: str) -> bool:
    return scheme(path) is not None


def join(base: str, *parts: str) -> str:
    """`base/part/...` for a URI or a local path (no normalisation of the URI's own slashes)."""
    if not is_uri(base):
        return str(Path(base, *parts))
    return "/".join([str(base).rstrip("/"), *(p.strip("/") for p in parts)])


def filesystem(path: str):
    """(pyarrow FileSystem, path inside it), resolved as Ray Tune resolves storage_path."""
    import pyarrow.fs
    if not is_uri(path):
        return pyarrow.fs.LocalFileSystem(), os.path.abspath(path)
    return pyarrow.fs.FileSystem.from_uri(str(path))


def _info(path: str):
    fs, p = filesystem(path)
    return fs, p, fs.get_file_info(p)


def exists(path: str) -> bool:
    import pyarrow.fs
    return _info(path)[2].type != pyarrow.fs.FileType.NotFound


def is_file(path: str) -> bool:
    import pyarrow.fs
    return _info(path)[2].type == pyarrow.fs.FileType.File


def listdir(path: str) -> list[str]:
    """Names directly inside the folder `path` ([] when it does not exist)."""
    import pyarrow.fs
    fs, p, info = _info(path)
    if info.type != pyarrow.fs.FileType.Directory:
        return []
    return sorted(i.base_name for i in fs.get_file_info(pyarrow.fs.FileSelector(p, recursive=False)))


def read_bytes(path: str) -> Optional[bytes]:
    """The file's bytes, or None when it does not exist."""
    fs, p = filesystem(path)
    try:
        with fs.open_input_stream(p) as f:
            return f.readall()
    except FileNotFoundError:
        return None


def write_bytes(path: str, data: bytes) -> None:
    """Replace the file at `path` whole: a reader never sees half of it. Locally a temporary file
    beside it renamed over it; on an object store one PUT, which is atomic there."""
    fs, p = filesystem(path)
    parent = p.rsplit("/", 1)[0] if "/" in p else ""
    if parent:
        fs.create_dir(parent, recursive=True)
    if is_uri(path) and scheme(path) != "file":
        with fs.open_output_stream(p) as f:
            f.write(data)
        return
    local = Path(p)
    tmp = local.with_name(f".{local.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, local)


def remove(path: str) -> bool:
    """Delete a file; False when there was none."""
    fs, p = filesystem(path)
    try:
        fs.delete_file(p)
        return True
    except FileNotFoundError:
        return False


def save_torch(path: str, obj) -> None:
    """torch.save through write_bytes (torch is imported by the caller's process anyway). `obj` must be
    made of tensors, numbers, strings and plain containers only: load_torch reads it back with
    weights_only=True, which refuses anything else."""
    import torch
    buf = io.BytesIO()
    torch.save(obj, buf)
    write_bytes(path, buf.getvalue())


class UnsafeFile(CapsweepError, ValueError):
    """A file that only a full unpickler can load (it names code to run): refused, one line, unless the
    caller trusts it. The message says which file and how to load it anyway (`--trust`)."""


TRUST_HINT = ("delete it, or pass --trust if you trust everyone who can write there "
              "(loading it can run any code)")


def load_torch(path: str, trust: bool = False):
    """torch.load of a file written by save_torch, or None when it does not exist.

    Loaded with `weights_only=True`: tensors, numbers, strings and containers are rebuilt, and a file
    that names any other function or class (a planted pickle payload: `__reduce__` -> os.system) is
    refused before anything of it runs, with UnsafeFile. `trust` (the user's `--trust`) loads such a
    file with the full unpickler."""
    import torch
    data = read_bytes(path)
    if data is None:
        return None
    if trust:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - UnpicklingError, RuntimeError, a zip that is not one: all refused
        raise UnsafeFile(f"{path}: not a plain weights file ({_why(e)}); refusing to unpickle it; "
                         + TRUST_HINT) from None


def unsafe_reason(path: str) -> Optional[str]:
    """Why `path` (a torch.save file) would be refused by load_torch, or None when it is plain weights
    or missing. Reads only the file's pickle part, statically (torch's own scan), so a preflight can
    check every trial's state in a moment and refuse in one line before anything starts."""
    import torch
    if is_uri(path) and scheme(path) != "file":
        data = read_bytes(path)
        source = io.BytesIO(data) if data is not None else None
    else:       # a local file: torch reads the zip's directory and its pickle, not the tensors
        source = filesystem(path)[1]
        source = source if os.path.isfile(source) else None
    if source is None:
        return None
    try:
        bad = torch.serialization.get_unsafe_globals_in_checkpoint(source)
    except Exception as e:  # noqa: BLE001 - not a torch zip file at all (a raw pickle, garbage)
        return _why(e)
    return f"it names {', '.join(sorted(bad)[:3])}" if bad else None


def _why(e: BaseException) -> str:
    """A short reason from an unpickling error: torch's own message runs to a dozen lines."""
    text = str(e)
    m = re.search(r"GLOBAL ([\w.]+)", text)
    if m:
        return f"it names {m.group(1)}"
    if "Weights only load failed" in text:
        return "it holds more than tensors and plain values"
    first = text.strip().splitlines()[0] if text.strip() else type(e).__name__
    return " ".join(first.split())[:160]


def local_dir(path: str) -> Path:
    """A local folder standing for `path`: itself when local (or file://), else a cache folder."""
    s = scheme(path)
    if s is None:
        return Path(path)
    if s == "file":
        return Path(filesystem(path)[1])
    root = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "capsweep") / "storage"
    rest = re.sub(r"[^A-Za-z0-9_.-]+", "_", URI_RE.sub("", str(path)).strip("/"))
    return root / s / rest
