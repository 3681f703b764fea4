"""Queries that the API and the job lifecycle share; every one is filtered by tenant (but the blob collector's,
which looks at every tenant's rows)."""

from __future__ import annotations

from sqlalchemy import select, union
from sqlalchemy.orm import Session

from core.db.models import Artifact, Dataset, Model


def job_artifacts(session: Session, tenant: str, job_id: str) -> list[Artifact]:
    """A job's artifacts in the order the API lists them."""
    statement = select(Artifact).where(Artifact.tenant == tenant, Artifact.job_id == job_id)
    return list(session.scalars(statement.order_by(Artifact.created_at, Artifact.kind)))


def named_blobs(session: Session, sha256s: list[str]) -> set[str]:
    """Those of `sha256s` that some row names: every column that holds a blob's content address."""
    named: set[str] = set()
    for start in range(0, len(sha256s), 500):  # bounded IN lists
        chunk = sha256s[start:start + 500]
        statement = union(*(select(column).where(column.in_(chunk)) for column in (
            Model.sha256, Dataset.sha256, Dataset.canonical_sha256, Artifact.sha256)))
        named.update(session.scalars(statement))
    return named
