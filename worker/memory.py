"""A memory limit for each job's process, and the job error that says when a job went past it.

RLIMIT_DATA bounds the private writable memory (heap, tensors, thread stacks) that the process may map: past it an
allocation fails (MemoryError, or PyTorch's "can't allocate memory") in that job alone, instead of the kernel's
OOM killer taking the worker, or the host, down. Unlike RLIMIT_AS it leaves out mapped libraries and address space
reserved without write access (CUDA reserves much), which no job can be blamed for.
"""

from __future__ import annotations

import os
import resource
from pathlib import Path

GIB = 1 << 30
CGROUP_MEMORY_MAX = Path("/sys/fs/cgroup/memory.max")
# How PyTorch's CPU allocator words a failed allocation (it raises RuntimeError, not MemoryError).
TORCH_ALLOCATION_FAILED = "can't allocate memory"


def host_memory_bytes() -> int:
    """The host's physical memory, capped by a cgroup (container) limit."""
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        limit = CGROUP_MEMORY_MAX.read_text().strip()
        if limit != "max":
            memory = min(memory, int(limit))
    except (OSError, ValueError):
        pass  # no cgroup v2 limit here
    return memory


def limit_job_memory(limit_gib: float, jobs_at_once: int) -> int:
    """Limit this (job) process to `limit_gib`, or (0) its share of the host. Returns the limit in bytes."""
    limit = int(limit_gib * GIB) if limit_gib else host_memory_bytes() // max(1, jobs_at_once)
    resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
    return limit


def is_out_of_memory(error: BaseException) -> bool:
    """Whether an allocation failing is what ended the job (in `error` or what caused it)."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, MemoryError) or TORCH_ALLOCATION_FAILED in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def out_of_memory_message() -> str:
    limit, _ = resource.getrlimit(resource.RLIMIT_DATA)
    amount = f"more than {limit / GIB:.1f} GiB" if limit != resource.RLIM_INFINITY else "more"
    return (f"the job needed {amount} of memory, this worker's limit per job; use a smaller student, batch size or "
            "image size (or ask the operator for a larger CONDENSER_JOB_MEMORY_LIMIT_GIB)")
