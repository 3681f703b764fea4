"""How many CPUs this process may use, to size PyTorch's threads for the jobs a host runs at once."""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_CPU_QUOTA = Path("/sys/fs/cgroup/cpu.max")


def host_cpus() -> int:
    """CPUs this process may use: its affinity mask, capped by a cgroup (container) quota.

    PyTorch's default counts the machine's cores, which oversubscribes a container given a few of them.
    """
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        quota, period = CGROUP_CPU_QUOTA.read_text().split()
        if quota != "max":
            cpus = min(cpus, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass  # no cgroup v2 quota here
    return cpus
