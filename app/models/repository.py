"""Model queries; every one is filtered by tenant."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.db.models import Model
from app.pagination import PageRequest, fetch_page


def add(session: Session, model: Model) -> None:
    session.add(model)
    # Flush now: defaults (created_at) are filled in for the response, constraint errors surface here.
    session.flush()


def get(session: Session, tenant: str, model_id: str) -> Model | None:
    return session.scalar(select(Model).where(Model.tenant == tenant, Model.id == model_id))


def page(session: Session, tenant: str, request: PageRequest) -> tuple[list[Model], str | None]:
    return fetch_page(session, select(Model).where(Model.tenant == tenant), Model, request)
