"""Artifact queries; every one is filtered by tenant."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.db.models import Artifact


def get(session: Session, tenant: str, artifact_id: str) -> Artifact | None:
    return session.scalar(select(Artifact).where(Artifact.tenant == tenant, Artifact.id == artifact_id))


def for_job(session: Session, tenant: str, job_id: str) -> list[Artifact]:
    statement = select(Artifact).where(Artifact.tenant == tenant, Artifact.job_id == job_id)
    return list(session.scalars(statement.order_by(Artifact.created_at, Artifact.kind)))
