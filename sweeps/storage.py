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
    """torch.save through write_bytes (torch is imported by the caller's process anyway)."""
    import torch
    buf = io.BytesIO()
    torch.save(obj, buf)
    write_bytes(path, buf.getvalue())


def load_torch(path: str):
    """torch.load of a file written by save_torch, or None when it does not exist."""
    import torch
    data = read_bytes(path)
    if data is None:
        return None
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)


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
