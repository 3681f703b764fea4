"""Queries that the API and the job lifecycle share; every one is filtered by tenant (but the blob collector's,
which looks at every tenant's rows)."""

from __future__ import annotations

from sqlalchemy import ColumnElement, select, true, union
from sqlalchemy.orm import Session

from core.db.models import Artifact, Dataset, Model


def job_artifacts(session: Session, tenant: str, job_id: str) -> list[Artifact]:
    """A job's artifacts in the order the API lists them."""
    statement = select(Artifact).where(Artifact.tenant == tenant, Artifact.job_id == job_id)
    return list(session.scalars(statement.order_by(Artifact.created_at, Artifact.kind)))


# Every column that holds a blob's content address, and which of its rows still need the blob: a deleted model or
# dataset keeps its row (for lineage and job history) but not its file. A job's result model names the file of one
# of its job's artifacts, which keeps it while the artifact exists.
_BLOB_REFERENCES: tuple[tuple[ColumnElement[str], ColumnElement[bool]], ...] = (
    (Model.sha256, Model.deleted_at.is_(None)),
    (Dataset.sha256, Dataset.deleted_at.is_(None)),
    (Dataset.canonical_sha256, Dataset.deleted_at.is_(None)),
    (Artifact.sha256, true()),
)


def named_blobs(session: Session, sha256s: list[str]) -> set[str]:
    """Those of `sha256s` that some live row names."""
    named: set[str] = set()
    for start in range(0, len(sha256s), 500):  # bounded IN lists
        chunk = sha256s[start:start + 500]
        statement = union(*(select(column).where(column.in_(chunk), live)
                            for column, live in _BLOB_REFERENCES))
        named.update(session.scalars(statement))
    return named
