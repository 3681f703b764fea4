"""Dataset queries; every one is filtered by tenant."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.db.models import Dataset
from app.pagination import PageRequest, fetch_page


def add(session: Session, dataset: Dataset) -> None:
    session.add(dataset)
    # Flush now: defaults (created_at) are filled in for the response, constraint errors surface here.
    session.flush()


def get(session: Session, tenant: str, dataset_id: str) -> Dataset | None:
    return session.scalar(select(Dataset).where(Dataset.tenant == tenant, Dataset.id == dataset_id))


def page(session: Session, tenant: str, request: PageRequest) -> tuple[list[Dataset], str | None]:
    return fetch_page(session, select(Dataset).where(Dataset.tenant == tenant), Dataset, request)
