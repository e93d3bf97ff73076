"""A real PostgreSQL server for the tests, and the Debian packages the cluster tests need.

The server is Debian's `postgresql` (installed by `ensure_debian_packages` when missing and the tests
run as root, as on CI), started with `initdb` + `pg_ctl` into a temp folder: local unix-socket
connections only (listen_addresses=''), peer authentication, as on the cluster's head. initdb refuses to
run as root, so as root the server runs as the OS user `postgres` (created by the package).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

_apt_updated = False


def is_root() -> bool:
    return os.geteuid() == 0


def ensure_debian_packages(needs: dict[str, str]) -> Optional[str]:
    """needs: command -> Debian package providing it. Installs the missing ones with apt-get (root only).
    Returns None when every command is there, else why not (for pytest.skip)."""
    global _apt_updated
    missing = {cmd: pkg for cmd, pkg in needs.items() if not _have(cmd)}
    if not missing:
        return None
    pkgs = sorted(set(missing.values()))
    if not is_root() or not shutil.which("apt-get"):
        return f"needs {', '.join(sorted(missing))}: apt-get install {' '.join(pkgs)} (the tests install it when run as root)"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    if not _apt_updated:
        subprocess.run(["apt-get", "update", "-q"], env=env, check=True, capture_output=True, timeout=600)
        _apt_updated = True
    proc = subprocess.run(["apt-get", "install", "-yq", "--no-install-recommends", *pkgs], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"apt-get install {' '.join(pkgs)} failed: {proc.stderr[-2000:]}"
    still = [cmd for cmd in missing if not _have(cmd)]
    assert not still, f"installed {pkgs} but {still} still missing"
    return None


def _have(cmd: str) -> bool:
    return shutil.which(cmd) is not None or (cmd == "initdb" and pg_bindir() is not None)


def pg_bindir() -> Optional[Path]:
    """Debian keeps the server binaries in /usr/lib/postgresql/<version>/bin (not on PATH)."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]))
    if found:
        return found[-1].parent
    which = shutil.which("initdb")
    return Path(which).resolve().parent if which else None


@dataclass
class Postgres:
    bindir: Path
    root: Path            # data folder and the unix socket's folder live here
    owner: list[str]      # prefix that runs a command as the server's OS user ([] when that is us)

    @property
    def socket_dir(self) -> str:
        return str(self.root)

    @property
    def data(self) -> Path:
        return self.root / "data"

    def as_owner(self, argv: list[str], **kw) -> subprocess.CompletedProcess:
        return subprocess.run([*self.owner, *argv], capture_output=True, text=True, timeout=120, **kw)

    def sql(self, query: str, db: str = "postgres", superuser: bool = True) -> str:
        """One query's rows (psql -tA), as the server's superuser or as this OS user (peer)."""
        argv = ["psql", "-h", self.socket_dir, "-d", db, "-v", "ON_ERROR_STOP=1", "-tAc", query]
        proc = self.as_owner(argv) if superuser else subprocess.run(argv, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.strip()

    def stop(self) -> None:
        self.as_owner([str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop"])
        shutil.rmtree(self.root, ignore_errors=True)


def start_postgres(max_connections: int) -> Postgres:
    """initdb + pg_ctl start in a fresh folder under /tmp (the server's OS user must reach it, and a
    unix socket path must stay short). fsync off: a test database, thrown away afterwards."""
    bindir = pg_bindir()
    assert bindir is not None
    root = Path(tempfile.mkdtemp(prefix="capsweep-pg-", dir="/tmp"))
    owner: list[str] = []
    if is_root():
        shutil.chown(root, user="postgres")
        owner = ["runuser", "-u", "postgres", "--"]
    pg = Postgres(bindir, root, owner)
    proc = pg.as_owner([str(bindir / "initdb"), "-D", str(pg.data), "-A", "peer", "-E", "UTF8", "--no-sync"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    opts = (f"-k {root} -c listen_addresses='' -c max_connections={max_connections} -c fsync=off "
            "-c full_page_writes=off -c synchronous_commit=off")
    proc = pg.as_owner([str(bindir / "pg_ctl"), "-D", str(pg.data), "-o", opts, "-l", str(root / "server.log"),
                        "-w", "-t", "120", "start"])
    if proc.returncode:
        log = (root / "server.log").read_text() if (root / "server.log").exists() else ""
        shutil.rmtree(root, ignore_errors=True)
        raise AssertionError(f"pg_ctl start failed: {proc.stdout}{proc.stderr}{log[-2000:]}")
    return pg
