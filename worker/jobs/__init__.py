"""One module per job kind: turn a job's spec into engine calls and output files.

Each kind's function takes (ctx, guard, checkpoints) and returns a JobOutcome; the runner owns
the lifecycle around it, so every kind gets claims, leases, retries and cancel for free.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from worker.runner import Checkpoints, JobContext, JobGuard, JobOutcome

JobFunction = Callable[["JobContext", "JobGuard", "Checkpoints"], "JobOutcome"]


def job_function(kind: str) -> JobFunction:
    from worker.jobs.distill import run_distill
    from worker.jobs.prune import run_prune
    from worker.jobs.quantize import run_quantize

    kinds: dict[str, JobFunction] = {"distill": run_distill, "prune": run_prune, "quantize": run_quantize}
    return kinds[kind]
