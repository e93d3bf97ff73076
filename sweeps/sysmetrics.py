"""Per-epoch system figures of one trial, named as MLflow's system metrics (`system/...`).

Why measured in the trial and not by MLflow's `SystemMetricsMonitor`: that monitor samples the process
that holds the run, the sweep driver, while the training happens in Ray's worker processes, possibly on
other nodes. The trial measures itself once per epoch and the figures travel to MLflow through Tune
with the other metrics (one writer). Names and units follow MLflow's monitor (megabytes = 1e6 bytes):

  system/cpu_utilization_percentage          the node's CPUs, busy share over the epoch
  system/system_memory_usage_megabytes       the node's memory in use (total - available)
  system/system_memory_usage_percentage
  system/process_cpu_utilization_percentage  this trial's process over the epoch (100 = one core)
  system/process_memory_rss_megabytes        this trial's resident memory now
  system/gpu_{i}_memory_usage_megabytes      on CUDA: the trial's GPU, whole-device memory in use
  system/gpu_{i}_memory_usage_percentage
  system/gpu_{i}_utilization_percentage      on CUDA, with NVML (pynvml) installed

Linux reads /proc (no dependency); elsewhere psutil when it is installed; a figure that cannot be
measured is left out (absent, never 0).
"""
from __future__ import annotations

import os
import time
from typing import Optional

import torch

PREFIX = "system/"
MB = 1e6                     # MLflow's system metrics count megabytes as 1e6 bytes


def _proc_stat() -> Optional[tuple[float, float]]:
    """(busy, total) CPU ticks of the node since boot, from /proc/stat; None where there is none."""
    try:
        with open("/proc/stat") as f:
            fields = [float(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)      # idle + iowait
    total = sum(fields[:8])                                         # guest time is inside user time
    return total - idle, total


def _memory() -> Optional[tuple[float, float]]:
    """(used, total) bytes of the node's memory; None where neither /proc nor psutil tells."""
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: float(line.split()[1]) * 1024 for line in f}
        return info["MemTotal"] - info["MemAvailable"], info["MemTotal"]
    except (OSError, KeyError, ValueError, IndexError):
        pass
    try:
        import psutil
        vm = psutil.virtual_memory()
        return float(vm.total - vm.available), float(vm.total)
    except ImportError:
        return None


def _rss() -> Optional[float]:
    """This process's resident memory in bytes."""
    try:
        with open("/proc/self/statm") as f:
            return float(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        pass
    try:
        import psutil
        return float(psutil.Process().memory_info().rss)
    except ImportError:
        return None


def _process_cpu() -> float:
    t = os.times()
    return t.user + t.system


def describe_device(device: torch.device) -> tuple[str, str]:
    """(the device as used, e.g. 'cpu' or 'cuda:0'; its hardware name). `auto` never appears here."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{index}", torch.cuda.get_device_name(index)
    import platform
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
    except OSError:
        pass
    return str(device), name


class SystemSampler:
    """`sample()` once per epoch: the figures above, CPU shares averaged since the previous sample."""

    def __init__(self, device: torch.device):
        self.device = device
        self.gpu = (device.index if device.index is not None else torch.cuda.current_device()) \
            if device.type == "cuda" else None
        self._last = (time.monotonic(), _process_cpu(), _proc_stat())

    def sample(self) -> dict[str, float]:
        now, proc, stat = time.monotonic(), _process_cpu(), _proc_stat()
        t0, proc0, stat0 = self._last
        self._last = (now, proc, stat)
        out: dict[str, float] = {}
        if stat is not None and stat0 is not None and stat[1] > stat0[1]:
            out["cpu_utilization_percentage"] = 100.0 * (stat[0] - stat0[0]) / (stat[1] - stat0[1])
        if now > t0:
            out["process_cpu_utilization_percentage"] = 100.0 * (proc - proc0) / (now - t0)
        mem = _memory()
        if mem is not None:
            out["system_memory_usage_megabytes"] = mem[0] / MB
            out["system_memory_usage_percentage"] = 100.0 * mem[0] / mem[1]
        rss = _rss()
        if rss is not None:
            out["process_memory_rss_megabytes"] = rss / MB
        if self.gpu is not None:
            out.update(_gpu(self.gpu))
        return {PREFIX + k: v for k, v in out.items()}


def _gpu(index: int) -> dict[str, float]:
    """Whole-device memory from the CUDA driver (no NVML needed); utilisation needs NVML (pynvml)."""
    free, total = torch.cuda.mem_get_info(index)
    out = {f"gpu_{index}_memory_usage_megabytes": (total - free) / MB,
           f"gpu_{index}_memory_usage_percentage": 100.0 * (total - free) / total}
    try:
        out[f"gpu_{index}_utilization_percentage"] = float(torch.cuda.utilization(index))
    except Exception:  # noqa: BLE001 - pynvml missing or NVML refused: the figure is absent
        pass
    return out
