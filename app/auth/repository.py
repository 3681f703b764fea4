"""API key queries."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from core.db.models import ApiKey


def add(session: Session, key: ApiKey) -> None:
    session.add(key)


def by_prefix(session: Session, prefix: str) -> ApiKey | None:
    return session.scalar(select(ApiKey).where(ApiKey.prefix == prefix))


def for_tenant(session: Session, tenant: str) -> list[ApiKey]:
    return list(session.scalars(select(ApiKey).where(ApiKey.tenant == tenant).order_by(ApiKey.created_at)))
