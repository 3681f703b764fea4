"""Job queries; every one is filtered by tenant (events are reached through their job)."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.db.models import Job, JobEvent
from app.pagination import PageRequest, fetch_page


def add(session: Session, job: Job) -> None:
    session.add(job)
    # The job's events reference it; write the row first.
    session.flush()


def get(session: Session, tenant: str, job_id: str) -> Job | None:
    return session.scalar(select(Job).where(Job.tenant == tenant, Job.id == job_id))


def page(session: Session, tenant: str, status: str | None, request: PageRequest) -> tuple[list[Job], str | None]:
    statement = select(Job).where(Job.tenant == tenant)
    if status is not None:
        statement = statement.where(Job.status == status)
    return fetch_page(session, statement, Job, request)


def latest_events(session: Session, job_id: str, limit: int) -> list[JobEvent]:
    newest = session.scalars(
        select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id.desc()).limit(limit)
    )
    return list(reversed(list(newest)))


def events_after(session: Session, job_id: str, after_id: int, limit: int) -> list[JobEvent]:
    """The job's events with ids above after_id, oldest first (ids only grow, so this resumes a stream)."""
    return list(session.scalars(
        select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.id > after_id).order_by(JobEvent.id).limit(limit)
    ))
