"""Pipeline queries; every one is filtered by tenant."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.pagination import PageRequest
from app.repository import TenantRepository
from core.db.models import Job, Model, Pipeline

pipelines = TenantRepository(Pipeline, noun="pipeline", id_prefix="pip")


def page(session: Session, tenant: str, status: str | None,
         request: PageRequest) -> tuple[list[Pipeline], str | None]:
    if status is None:
        return pipelines.page(session, tenant, request)
    return pipelines.page(session, tenant, request, Pipeline.status == status)


def stage_outputs(session: Session, jobs: list[Job]) -> dict[str, Model]:
    """The model each of `jobs` registered, by job id (one query)."""
    if not jobs:
        return {}
    rows = session.scalars(select(Model).where(Model.source_job_id.in_([job.id for job in jobs])))
    return {row.source_job_id: row for row in rows if row.source_job_id is not None}
