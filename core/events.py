"""A job's history: every transition, epoch and verdict is an event row (and a log line)."""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy.orm import Session

from core.db.models import Job, JobEvent

log = logging.getLogger("core.lifecycle")  # the name operators have always filtered job events by


def record_event(session: Session, job: Job, kind: str, actor: str, message: str,
                 data: dict[str, Any] | None = None, attempt: int | None = None) -> JobEvent:
    """`attempt`: the attempt that did what the event tells, when it is not the job's current one (an epoch of
    an earlier attempt recorded late)."""
    event = JobEvent(job_id=job.id, kind=kind, status=job.status, attempt=job.attempt if attempt is None else attempt,
                     actor=actor, message=message, data=data or {})
    session.add(event)
    # Each event is a log line too, carrying the job id, for those who follow jobs in their logs.
    log.info("%s (%s): %s", kind, job.status, message, extra={"job_id": job.id})
    return event
