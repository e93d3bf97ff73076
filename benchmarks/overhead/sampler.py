"""CPU seconds of a process tree and the load average, sampled from /proc (Linux)."""
from __future__ import annotations

import os
import statistics
import threading
from collections import defaultdict
from typing import Optional


class TreeSampler(threading.Thread):
    """CPU seconds of a process and all its descendants, sampled from /proc (Linux).

    Ray's worker processes are not reaped by the driver's ancestors, so RUSAGE_CHILDREN misses them;
    sampling sees every process of the tree while it lives (minus its last < interval seconds).
    Also samples the 1-minute load average.
    """

    def __init__(self, root_pid: int, interval: float = 0.2):
        super().__init__(daemon=True)
        self.root, self.interval = root_pid, interval
        self.tick = os.sysconf("SC_CLK_TCK")
        self.known: set[tuple[int, int]] = set()          # (pid, starttime) of descendants
        self.cpu: dict[tuple[int, int], float] = {}
        self.label: dict[tuple[int, int], str] = {}
        self.loads: list[float] = []
        self._stop_evt = threading.Event()

    def _scan(self) -> None:
        procs = {}
        for d in os.listdir("/proc"):
            if not d.isdigit():
                continue
            try:
                with open(f"/proc/{d}/stat") as f:
                    rest = f.read().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            # proc(5) field k (1-based) is rest[k - 3]: ppid 4, utime 14, stime 15, starttime 22
            procs[int(d)] = (int(rest[1]), int(rest[19]), (int(rest[11]) + int(rest[12])) / self.tick)
        pids = {key[0] for key in self.known}
        changed = True
        while changed:                       # descendants: processes whose parent is in the tree
            changed = False
            for pid, (ppid, start, _) in procs.items():
                if pid not in pids and (pid == self.root or ppid in pids):
                    pids.add(pid)
                    self.known.add((pid, start))
                    changed = True
        for pid, (ppid, start, cpu) in procs.items():
            key = (pid, start)
            if key in self.known:
                self.cpu[key] = max(cpu, self.cpu.get(key, 0.0))
                self.label[key] = self._classify(pid, self.label.get(key))

    RAY_PARTS = (("gcs_server", "ray gcs"), ("raylet/raylet", "ray raylet"),
                 ("dashboard/dashboard.py", "ray dashboard"), ("ray::DashboardAgent", "ray dashboard agent"),
                 ("dashboard/agent.py", "ray dashboard agent"), ("ray::RuntimeEnvAgent", "ray runtime-env agent"),
                 ("runtime_env/agent", "ray runtime-env agent"), ("log_monitor.py", "ray log monitor"),
                 ("autoscaler/_private/monitor.py", "ray autoscaler monitor"))

    def _classify(self, pid: int, old: Optional[str]) -> str:
        """Sticky labels: a worker that ran a trial stays a trial worker; an exiting process (zombie,
        empty cmdline) keeps the label it had."""
        if pid == self.root:
            return "driver"
        if old in ("trial workers", "driver") or (old or "").startswith("ray "):
            return old
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            cmd = ""
        if not cmd.strip():
            return old or "other"
        for needle, label in self.RAY_PARTS:
            if needle in cmd:
                return label
        if cmd.startswith("ray::IDLE") or "default_worker.py" in cmd:
            return "idle workers"             # prestarted; "trial workers" once one runs a trial
        if cmd.startswith("ray::"):
            return "trial workers"
        return old or "other"

    def run(self) -> None:
        while not self._stop_evt.is_set():
            self._scan()
            self.loads.append(os.getloadavg()[0])
            self._stop_evt.wait(self.interval)

    def stop(self) -> dict:
        self._stop_evt.set()
        self.join()
        groups: dict[str, float] = defaultdict(float)
        for key, cpu in self.cpu.items():
            groups[self.label.get(key, "other")] += cpu
        return {"total": sum(groups.values()), "groups": dict(groups),
                "load": statistics.mean(self.loads) if self.loads else os.getloadavg()[0]}
