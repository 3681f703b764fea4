"""Job queries; every one is filtered by tenant (events are reached through their job)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Row, select
from sqlalchemy.orm import Session

from app.pagination import PageRequest
from app.repository import TenantRepository
from core import lifecycle, pipelines
from core.db.models import Job, JobEvent, Pipeline

jobs = TenantRepository(Job, noun="job", id_prefix="job")


def page(session: Session, tenant: str, status: str | None, request: PageRequest) -> tuple[list[Job], str | None]:
    """The tenant's jobs, or only those in `status`."""
    if status is None:
        return jobs.page(session, tenant, request)
    return jobs.page(session, tenant, request, Job.status == status)


def unfinished(session: Session, tenant: str) -> list[Job]:
    """The tenant's jobs that have not ended (at most max_active_jobs_per_tenant), oldest first."""
    return list(session.scalars(select(Job).where(Job.tenant == tenant, Job.status.not_in(lifecycle.FINISHED))
                                .order_by(Job.created_at)))


def unfinished_pipelines(session: Session, tenant: str) -> list[Pipeline]:
    """The tenant's pipelines that have not ended (each has a job that has not, or is about to start one)."""
    return list(session.scalars(select(Pipeline).where(Pipeline.tenant == tenant,
                                                       Pipeline.status.not_in(pipelines.FINISHED))
                                .order_by(Pipeline.created_at)))


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
