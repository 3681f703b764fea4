"""Stop requests that reach a job's process as signals, turned into a flag the job checks between steps.

SIGTERM (the worker is shutting down) and Celery's soft time limit (SIGUSR1) both mean: finish the
current step, write a checkpoint, give the job back. Only the time limit counts as an attempt.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass

from billiard.pool import SIG_SOFT_TIMEOUT


@dataclass(frozen=True)
class StopRequest:
    reason: str
    counts_as_attempt: bool


_requested: list[StopRequest] = []


def request_stop(reason: str, counts_as_attempt: bool) -> None:
    if not _requested:
        _requested.append(StopRequest(reason, counts_as_attempt))


def stop_requested() -> StopRequest | None:
    return _requested[0] if _requested else None


def install_stop_handlers(soft_limit_seconds: int) -> None:
    """Replace the default handlers, which would kill the job mid-step or raise at an arbitrary line."""
    signal.signal(signal.SIGTERM, lambda *_: request_stop("worker shutting down (SIGTERM)", False))
    signal.signal(SIG_SOFT_TIMEOUT,
                  lambda *_: request_stop(f"soft time limit of {soft_limit_seconds} s reached", True))
