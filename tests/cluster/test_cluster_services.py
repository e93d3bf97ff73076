"""cluster.yaml's setup commands that must survive being run again and again (issue 21, items 2 and 4),
taken from Ray's own launcher run (tests/helpers/launcher.py) and run for real on this machine, wrapped
as Ray's command runner wraps them:

- apt: `capsweep-apt-get` (written by a setup command every node runs) retries `apt-get update` while
  another process holds apt's lists lock, is bounded, and fails at once on any other error. The lock is
  a real fcntl lock on a real apt lists folder; apt-get runs against a folder of its own here (its
  Dir::State::Lists, Dir::Cache and an empty source list, so nothing is downloaded and this machine's
  apt is not touched), and the wait between tries is a pipe the test opens, so the lock is released
  exactly between the first and the second try;
- the head's services: every `ray up` after an edit of a synced file runs the head setup again
  (tests/cluster/test_cluster_launcher.py shows it), so PostgreSQL, NFS and the MLflow server must be restarted
  only when what they read changed. This container runs no systemd, so `systemctl` and `exportfs` are
  stand-ins that record each call and answer `is-active` from what was started; everything else runs
  as written: PostgreSQL is the tests' real server (its data folder's settings file is what ALTER SYSTEM
  rewrites), the files are written and compared for real, /etc and /shared are temp folders here, and
  `~/venv/bin/pip` is this environment's pip.
"""
from __future__ import annotations

import errno
import getpass
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import click
import pytest

from tests.helpers import pg as pg_helpers
from tests.helpers.cluster import LocalSSH, launcher_steps, load_cluster, local_shell_env, run_like_ray

WRAPPER = "/usr/local/bin/capsweep-apt-get"


@pytest.fixture(scope="module")
def cfg() -> dict:
    return load_cluster()


@pytest.fixture
def as_root(cluster_extra):
    """The commands use sudo (and sudo -u postgres); as root they run as written. (The cluster extra:
    Ray's AWS launcher code, which records the commands, imports boto3.)"""
    if not pg_helpers.is_root():
        pytest.skip("the node's commands run with sudo; run the tests as root (as CI does)")
    reason = pg_helpers.ensure_debian_packages({"sudo": "sudo", "apt-get": "apt"})
    if reason:
        pytest.skip(reason)


def _step(cfg: dict, node_type: str, needle: str):
    (step,) = [s for s in launcher_steps(cfg, node_type) if s.stage == "setup" and needle in s.command]
    return step


def _run(command: str, ssh: LocalSSH, kwargs: dict) -> str:
    try:
        run_like_ray(command, ssh, **kwargs)
    except click.ClickException:
        pytest.fail(f"failed as Ray runs it:\n{command}\n{ssh.calls[-1][3]}")
    return ssh.calls[-1][3]


# ---- apt's lists lock ---------------------------------------------------------------------------------
class AptFolder:
    """An apt state of its own: lists (with their lock), cache, an empty source list."""

    def __init__(self, root: Path):
        self.lists, self.cache, self.parts = root / "lists", root / "cache", root / "sources.list.d"
        for d in (self.lists / "partial", self.cache / "archives" / "partial", self.parts):
            d.mkdir(parents=True)
        self.sources = root / "sources.list"
        self.sources.write_text("")
        self.options = (f"-o Dir::State::Lists={self.lists} -o Dir::Cache={self.cache} "
                        f"-o Dir::Etc::SourceList={self.sources} -o Dir::Etc::SourceParts={self.parts}")

    def hold_lock(self) -> subprocess.Popen:
        """Another process holding apt's lists lock (apt takes it with fcntl, as lockf does), until its
        stdin closes."""
        holder = subprocess.Popen([sys.executable, "-c", (
            "import fcntl, sys\n"
            f"f = open({str(self.lists / 'lock')!r}, 'w')\n"
            "fcntl.lockf(f, fcntl.LOCK_EX)\n"
            "print('held', flush=True)\n"
            "sys.stdin.read()\n")], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert holder.stdout.readline().strip() == "held"
        return holder


@pytest.fixture
def apt(cfg, tmp_path, as_root):
    """The wrapper, written by the nodes' own setup command (to a temp bin folder instead of
    /usr/local/bin), then pointed at an apt folder of its own."""
    folder = AptFolder(tmp_path / "apt")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    wrapper = bin_dir / "capsweep-apt-get"
    step = _step(cfg, "gpu_1x_a10g", f"tee {WRAPPER}")
    assert step.command.count(WRAPPER) == 2
    ssh = LocalSSH(execute=True, env=local_shell_env(tmp_path / "home"))
    _run(step.command.replace(WRAPPER, str(wrapper)), ssh, step.kwargs)
    assert os.access(wrapper, os.X_OK)
    text = wrapper.read_text()
    assert text.count("apt-get -o DPkg::Lock::Timeout=600") == 1 and text.count("sleep 10") == 1
    wrapper.write_text(text.replace("apt-get -o DPkg::Lock::Timeout=600", f"apt-get {folder.options} -o DPkg::Lock::Timeout=600"))
    return folder, wrapper, ssh


def test_apt_get_update_fails_at_once_while_the_lists_lock_is_held(apt):
    """The failure the wrapper exists for: apt's DPkg::Lock::Timeout does not cover the lists lock."""
    folder, _, _ = apt
    holder = folder.hold_lock()
    try:
        plain = subprocess.run(["apt-get", *folder.options.split(), "-o", "DPkg::Lock::Timeout=600", "update", "-q"],
                               capture_output=True, text=True, env=dict(os.environ, LC_ALL="C"), timeout=60)
    finally:
        holder.stdin.close()
        holder.wait()
    assert plain.returncode == 100 and "Could not get lock" in plain.stderr, plain.stderr


def test_update_waits_for_the_lists_lock_then_succeeds(cfg, apt, tmp_path):
    folder, wrapper, ssh = apt
    pause = tmp_path / "pause"
    os.mkfifo(pause)
    wrapper.write_text(wrapper.read_text().replace("sleep 10", f"cat {pause} > /dev/null"))
    update = _step(cfg, "gpu_1x_a10g", "capsweep-apt-get update")        # the nodes' own line, as Ray sends it
    assert update.command.endswith("sudo capsweep-apt-get update -q")
    holder = folder.hold_lock()
    result = {}

    def go():
        try:
            result["out"] = _run(update.command.replace("capsweep-apt-get", str(wrapper)), ssh, update.kwargs)
        except BaseException as e:          # noqa: BLE001 - reported below, in the test's thread
            result["error"] = e

    run = threading.Thread(target=go)
    run.start()
    try:
        # the pipe opens for writing once the wrapper waits on it, i.e. after a try failed on the lock
        while True:
            try:
                fd = os.open(pause, os.O_WRONLY | os.O_NONBLOCK)
                break
            except OSError as e:
                if e.errno != errno.ENXIO or not run.is_alive():
                    raise AssertionError(f"the wrapper never waited: {result}") from e
                time.sleep(0.05)
        holder.stdin.close()
        holder.wait()                       # the lock is free ...
        os.close(fd)                        # ... before the wait ends and apt-get tries again
    finally:
        if holder.poll() is None:
            holder.kill()
        run.join(timeout=120)
    assert "error" not in result, result["error"]
    out = result["out"]
    assert out.count("capsweep: apt's lock is held by another process; apt-get update again in 10 s") == 1, out
    assert "(1/60)" in out and "Reading package lists" in out and "failed" not in out


def test_update_gives_up_after_its_tries_and_at_once_on_other_errors(apt):
    folder, wrapper, _ = apt
    text = wrapper.read_text()
    assert "seq 60" in text
    wrapper.write_text(text.replace("seq 60", "seq 3").replace("sleep 10", "true"))
    holder = folder.hold_lock()
    try:
        held = subprocess.run([str(wrapper), "update", "-q"], capture_output=True, text=True, timeout=60)
    finally:
        holder.stdin.close()
        holder.wait()
    assert held.returncode == 1 and held.stderr.count("apt-get update again in 10 s") == 3, held.stderr
    assert held.stderr.rstrip().endswith("capsweep: apt-get update -q failed")
    folder.sources.write_text("deb\n")
    broken = subprocess.run([str(wrapper), "update", "-q"], capture_output=True, text=True, timeout=60)
    assert broken.returncode == 1 and "again in 10 s" not in broken.stderr, broken.stderr
    assert "Malformed" in broken.stderr and broken.stderr.rstrip().endswith("capsweep: apt-get update -q failed")


# ---- the head's services ------------------------------------------------------------------------------
class Systemd:
    """`systemctl` and `exportfs` stand-ins on PATH: each call is logged; `is-active` answers from what
    was started or restarted (or marked running with `running`)."""

    def __init__(self, root: Path):
        self.bin, self.log, self.active = root / "bin", root / "systemctl.log", root / "active"
        self.bin.mkdir(parents=True)
        self.log.touch()
        self.active.touch()
        (self.bin / "systemctl").write_text(f"""#!/bin/bash
echo "$*" >> {self.log}
case "$1" in
  is-active) grep -qx "${{@: -1}}" {self.active} ;;
  start|restart) echo "${{@: -1}}" >> {self.active} ;;
esac
""")
        (self.bin / "exportfs").write_text(f'#!/bin/bash\necho "exportfs $*" >> {self.log}\n')
        for f in ("systemctl", "exportfs"):
            (self.bin / f).chmod(0o755)

    def calls(self) -> list[str]:
        lines = self.log.read_text().splitlines()
        self.log.write_text("")
        return lines

    def running(self, *units: str) -> None:
        self.active.write_text("".join(f"{u}\n" for u in units))

    def env(self, home: Path) -> dict:
        """The node user's environment, the stand-ins first on PATH (in ~/.bashrc, which Ray's wrapper
        sources after the login shell has set PATH)."""
        env = local_shell_env(home)
        (home / ".bashrc").write_text(f'export PATH="{self.bin}:$PATH"\n')
        return env


def _on_this_machine(command: str) -> str:
    """sudo keeps its own PATH: the stand-ins are called without it (the tests run as root)."""
    return command.replace("sudo systemctl", "systemctl").replace("sudo exportfs", "exportfs")


def test_postgres_is_restarted_only_when_its_settings_change(cfg, postgres, tmp_path, as_root):
    step = _step(cfg, "head", "ALTER SYSTEM")
    systemd = Systemd(tmp_path)
    command = _on_this_machine(step.command).replace("/var/run/postgresql", postgres.socket_dir)
    ssh = LocalSSH(execute=True, env=systemd.env(tmp_path / "home"))
    try:
        _run(command, ssh, step.kwargs)                       # whatever the server's file held before
        systemd.calls()
        out = _run(command, ssh, step.kwargs)                 # `ray up` again: nothing changed
        assert systemd.calls() == ["start postgresql"] and "PostgreSQL's settings are unchanged: left running" in out
        postgres.sql("ALTER SYSTEM SET max_connections = 99")  # the file no longer holds the head's value
        _run(command, ssh, step.kwargs)
        assert systemd.calls() == ["start postgresql", "restart postgresql"]
        auto = postgres.as_owner(["cat", str(postgres.data / "postgresql.auto.conf")]).stdout
        assert "max_connections = '100'" in auto and "listen_addresses = 'localhost'" in auto
    finally:
        postgres.sql("ALTER SYSTEM RESET ALL")                 # the session's server, as it was


def test_nfs_is_restarted_only_when_its_export_or_threads_change(cfg, tmp_path, as_root):
    step = _step(cfg, "head", "capsweep.exports")
    systemd = Systemd(tmp_path)
    etc, shared = tmp_path / "etc", tmp_path / "shared"
    command = _on_this_machine(step.command).replace("/etc/", f"{etc}/")
    command = re.sub(r"(?<![\w:'])/shared\b(?=[ /])", str(shared), command).replace("ubuntu:ubuntu", getpass.getuser())
    assert "'/shared 10.0.0.0/8(" in command, "the export line itself names the remote /shared"
    ssh = LocalSSH(execute=True, env=systemd.env(tmp_path / "home"))
    _run(command, ssh, step.kwargs)
    assert systemd.calls() == ["enable -q nfs-kernel-server", "restart nfs-kernel-server", "exportfs -ra"]
    exports = etc / "exports.d" / "capsweep.exports"
    assert exports.read_text().startswith("/shared 10.0.0.0/8(rw,sync,no_subtree_check) ")
    assert (etc / "nfs.conf.d" / "capsweep.conf").read_text() == "[nfsd]\nthreads=32\n"
    assert (shared / "ray_results").is_dir()
    out = _run(command, ssh, step.kwargs)                     # `ray up` again: nothing changed
    assert systemd.calls() == ["enable -q nfs-kernel-server", "is-active -q nfs-kernel-server", "exportfs -ra"]
    assert "the NFS server's settings are unchanged: left running" in out
    exports.write_text("/shared 10.0.0.0/8(ro)\n")           # changed behind its back: rewritten, restarted
    _run(command, ssh, step.kwargs)
    assert "restart nfs-kernel-server" in systemd.calls() and "(rw,sync" in exports.read_text()
    systemd.running()                                          # not running (e.g. it failed): started again
    _run(command, ssh, step.kwargs)
    assert "restart nfs-kernel-server" in systemd.calls()


def test_mlflow_is_restarted_only_when_its_unit_or_packages_change(cfg, tmp_path, as_root):
    setup = _step(cfg, "head", "/etc/systemd/system/mlflow.service")
    (start,) = [s for s in launcher_steps(cfg, "head") if s.stage == "start" and "capsweep-mlflow-stamp" in s.command]
    systemd = Systemd(tmp_path)
    units = tmp_path / "systemd"
    units.mkdir()
    pip = Path(sys.executable).parent / "pip"

    def here(command: str) -> str:
        return _on_this_machine(command).replace("/etc/systemd/system/", f"{units}/").replace("~/venv/bin/pip", str(pip))

    ssh = LocalSSH(execute=True, env=systemd.env(tmp_path / "home"))
    _run(here(setup.command), ssh, setup.kwargs)
    assert systemd.calls() == ["daemon-reload", "enable -q mlflow"]
    assert "ExecStart=/home/ubuntu/venv/bin/mlflow server" in (units / "mlflow.service").read_text()
    _run(here(start.command), ssh, start.kwargs)               # first start: restarted (not running yet)
    assert systemd.calls() == ["is-active -q mlflow", "restart mlflow"]
    _run(here(setup.command), ssh, setup.kwargs)               # `ray up` again, nothing changed
    out = _run(here(start.command), ssh, start.kwargs)
    assert systemd.calls() == ["enable -q mlflow", "is-active -q mlflow"]
    assert "the MLflow server's unit and packages are unchanged: left running" in out
    changed = setup.command.replace("--workers 2", "--workers 3")   # a new unit (e.g. cluster.yaml edited)
    _run(here(changed), ssh, setup.kwargs)
    _run(here(start.command), ssh, start.kwargs)
    assert systemd.calls() == ["daemon-reload", "enable -q mlflow", "is-active -q mlflow", "restart mlflow"]
    stamp = tmp_path / "home" / ".capsweep-mlflow-stamp"
    stamp.write_text("packages installed since\n")             # what the venv held at the last start differs
    _run(here(start.command), ssh, start.kwargs)
    assert systemd.calls() == ["is-active -q mlflow", "restart mlflow"]
