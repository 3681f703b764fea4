"""Job queries; every one is filtered by tenant (events are reached through their job)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Row, select
from sqlalchemy.orm import Session

from app.pagination import PageRequest
from app.repository import TenantRepository
from core.db.models import Job, JobEvent

jobs = TenantRepository(Job, noun="job", id_prefix="job")


def page(session: Session, tenant: str, status: str | None, request: PageRequest) -> tuple[list[Job], str | None]:
    """The tenant's jobs, or only those in `status`."""
    if status is None:
        return jobs.page(session, tenant, request)
    return jobs.page(session, tenant, request, Job.status == status)


# Every column, read as plain rows: no ORM object per event (half the cost of a status read's events).
_EVENT_COLUMNS = [getattr(JobEvent, column.key) for column in JobEvent.__table__.columns]


def latest_events(session: Session, job_id: str, limit: int) -> list[Row[Any]]:
    """The job's newest events, oldest first, as rows with the attributes of a JobEvent."""
    newest = session.execute(
        select(*_EVENT_COLUMNS).where(JobEvent.job_id == job_id).order_by(JobEvent.id.desc()).limit(limit)
    )
    return list(reversed(newest.all()))


def events_after(session: Session, job_id: str, after_id: int, limit: int) -> list[JobEvent]:
    """The job's events with ids above after_id, oldest first (ids only grow, so this resumes a stream)."""
    return list(session.scalars(
        select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.id > after_id).order_by(JobEvent.id).limit(limit)
    ))
