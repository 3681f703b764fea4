"""Queries that the API and the job lifecycle share; every one is filtered by tenant."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from core.db.models import Artifact


def job_artifacts(session: Session, tenant: str, job_id: str) -> list[Artifact]:
    """A job's artifacts in the order the API lists them."""
    statement = select(Artifact).where(Artifact.tenant == tenant, Artifact.job_id == job_id)
    return list(session.scalars(statement.order_by(Artifact.created_at, Artifact.kind)))
