"""Ray Tune's own state is pickled: `--resume` restores it from the driver's private copy, never from
the shared folder as it finds it.

`Tuner.restore` unpickles `tuner.pkl`, the cloudpickle blobs inside `experiment_state-*.json` and the
searcher's and variant generator's state files of the experiment folder (Ray's docs: "Never restore
from a path that other parties can write to"). A sweep's `storage_path` is often a shared folder or a
bucket that trials on other nodes write to. So the driver keeps a copy of exactly those files in a
folder only its user can open (`~/.cache/capsweep/tune-state/<hash of the experiment path>/`, mode
700), refreshed after every Tune step that changed them (Tune writes them in the driver, synchronously,
before the step's callbacks run), and `--resume` writes that copy back over the experiment folder's
state files, removing any other state file there (a planted "newer" experiment_state), before Tune
reads them. The copy is at most one step older than what Tune last wrote; Tune resumes from it as it
would from a snapshot a moment older (each trial says its last epoch again from its own state file,
which is loaded weights-only: sweeps/storage.py).

No copy on this machine (a sweep started elsewhere or by an earlier capsweep): `--resume` is refused
in one line unless `--trust`. With `--trust` the folder is used as it is.

One more pickle: Tune writes a failed trial's exception to `<trial>/error.pkl` and unpickles it when
`fit` returns; the logger clears its name on the trial (`forget_pickled_error`), so Tune reads the
plain-text `error.txt` instead.
"""
from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from typing import Optional

from capsmodels.errors import CapsweepError
from sweeps import storage

TUNER_FILE = "tuner.pkl"
_PREFIXES = (TUNER_FILE, "experiment_state-", "searcher-state-", "basic-variant-state-", "callback-states-")


class UntrustedState(CapsweepError, RuntimeError):
    """Ray Tune state that capsweep cannot vouch for. One line."""


def is_state_file(name: str) -> bool:
    """A file of the experiment folder's top level that Tune (or a searcher) unpickles on restore."""
    return name.startswith(_PREFIXES) or ".pkl" in name


def private_dir(exp_dir: str) -> Path:
    root = Path(os.environ.get(storage.CACHE_ENV) or Path.home() / ".cache" / "capsweep")
    return root / "tune-state" / hashlib.sha256(exp_dir.encode()).hexdigest()[:20]


class TuneStateGuard:
    """The private copy of one experiment folder's Tune state (see the module docstring)."""

    def __init__(self, exp_dir: str):
        self.exp_dir = exp_dir
        self.root = private_dir(exp_dir)
        self._seen: Optional[list] = None       # (name, size, mtime) of the staging files last copied
        self.staging: Optional[str] = None      # Tune's driver staging folder, once a step named it
        self._warned = False

    # ---- the copy -------------------------------------------------------------------------------------
    def _current(self) -> Optional[Path]:
        """The last whole copy (a crash between the two renames of _write leaves it as `old`)."""
        for name in ("current", "old"):
            if (self.root / name).is_dir():
                return self.root / name
        return None

    def files(self) -> dict[str, bytes]:
        cur = self._current()
        return {p.name: p.read_bytes() for p in sorted(cur.iterdir()) if p.is_file()} if cur else {}

    def _write(self, files: dict[str, bytes]) -> None:
        """Replace the copy as a whole: a new folder, then two renames."""
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.root, 0o700)
        new = self.root / f"new-{os.getpid()}"
        shutil.rmtree(new, ignore_errors=True)
        new.mkdir(mode=0o700)
        for name, data in files.items():
            (new / name).write_bytes(data)
        cur, old = self.root / "current", self.root / "old"
        if cur.is_dir():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(cur, old)
        os.replace(new, cur)
        shutil.rmtree(old, ignore_errors=True)

    def reset(self) -> None:
        """A new sweep in this folder: no copy of an earlier one may be restored into it."""
        shutil.rmtree(self.root, ignore_errors=True)
        self._seen = None

    def capture_tuner(self) -> None:
        """tuner.pkl as Tune just wrote it (Tuner() or Tuner.restore, in this process)."""
        data = storage.read_bytes(storage.join(self.exp_dir, TUNER_FILE))
        if data is not None:
            self._write({**self.files(), TUNER_FILE: data})

    def update(self, staging: Optional[str]) -> None:
        """After a Tune step: copy the state files Tune keeps in its driver staging folder when they
        changed (a stat of a few files per step otherwise)."""
        staging = staging or self.staging
        if not staging or not os.path.isdir(staging):
            return
        self.staging = staging
        try:
            self._update(staging)
        except OSError as e:     # a full home disk must not stop the sweep; --resume then uses an older copy
            if not self._warned:
                self._warned = True
                print(f"capsweep: warning: cannot keep the private copy of Ray Tune's state in {self.root} "
                      f"({e.strerror or e}); --resume may need --trust", flush=True)

    def _update(self, staging: str) -> None:
        seen = []
        for name in sorted(os.listdir(staging)):
            path = os.path.join(staging, name)
            if is_state_file(name) and not name.startswith("tmp") and os.path.isfile(path):
                st = os.stat(path)
                seen.append((name, st.st_size, st.st_mtime_ns))
        if not seen or seen == self._seen:
            return
        files = {name: Path(staging, name).read_bytes() for name, _, _ in seen}
        tuner = self.files().get(TUNER_FILE)
        if tuner is not None:
            files[TUNER_FILE] = tuner
        self._write(files)
        self._seen = seen

    # ---- --resume ---------------------------------------------------------------------------------------
    def restore(self, trust: bool = False) -> int:
        """Put the copy back over the experiment folder's state files (before Tuner.restore). Returns
        how many files differed. UntrustedState when there is no copy and not `trust`."""
        files = self.files()
        if TUNER_FILE not in files:
            if trust:
                return 0
            raise UntrustedState(
                f"--resume: Ray Tune's state in {self.exp_dir} was not saved by capsweep on this machine (a sweep "
                "started elsewhere or by an earlier capsweep), and restoring it unpickles it, which runs any code "
                "someone who can write there put in; pass --trust if only you can write to it")
        if trust:
            return 0
        changed = 0
        for name in storage.listdir(self.exp_dir):
            path = storage.join(self.exp_dir, name)
            if is_state_file(name) and name not in files and storage.is_file(path):
                storage.remove(path)
                changed += 1
        for name, data in files.items():
            path = storage.join(self.exp_dir, name)
            if storage.read_bytes(path) != data:
                storage.write_bytes(path, data)
                changed += 1
        return changed


def forget_pickled_error(trial) -> None:
    """Tune unpickles `<trial>/error.pkl` (written when the trial failed) when `fit` returns and on
    restore; without its name it reads the text error file. Ray 2.60's Trial.run_metadata field."""
    meta = getattr(trial, "run_metadata", None)
    if meta is not None and getattr(meta, "pickled_error_filename", None):
        meta.pickled_error_filename = None


def staging_dir(trials) -> Optional[str]:
    """Tune's driver staging folder of the experiment (where it writes its state each step)."""
    for trial in trials or ():
        st = getattr(trial, "storage", None)
        if st is not None:
            try:
                return st.experiment_driver_staging_path
            except Exception:  # noqa: BLE001 - a storage context without it: nothing to copy
                return None
    return None
