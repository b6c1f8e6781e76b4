"""The CPUs this process may use: the one count the readers, the warm starts and the CPU share size by."""

from __future__ import annotations

import math
import os

CPU_MAX = "/sys/fs/cgroup/cpu.max"  # cgroup v2's quota: "<quota> <period>" or "max <period>"


def usable_cpus(cpu_max: str = CPU_MAX) -> int:
    """CPUs this process may run on: its affinity mask (else the machine's count), cut to the
    cgroup's CPU quota where one is set (a container limited to 2 CPUs of 64 sees 64 in its mask)."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        with open(cpu_max) as f:
            quota, period = f.read().split()[:2]
        if quota != "max":
            n = min(n, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass  # (no cgroup v2 quota readable: the mask stands)
    return max(n, 1)


def too_many_threads(threads: int | None) -> str | None:
    """Why a compute process's `threads` are more than this process may use (they would spin
    against each other), or None: run-pipeline's -t, the Python API's and the benches' check."""
    cores = usable_cpus()
    return None if threads is None or threads <= cores else f"this machine has {cores} cores; give at most {cores}"
