"""Webhook queries: a tenant's settings and the delivery outbox."""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from core.db.models import TenantWebhook, WebhookDelivery


def tenant_webhook(session: Session, tenant: str) -> TenantWebhook | None:
    return session.get(TenantWebhook, tenant)


def add(session: Session, row: TenantWebhook | WebhookDelivery) -> None:
    session.add(row)


def due_deliveries(session: Session, now: datetime, limit: int) -> list[str]:
    due = (WebhookDelivery.state == "pending") & (WebhookDelivery.next_attempt_at <= now)
    query = select(WebhookDelivery.id).where(due).order_by(WebhookDelivery.next_attempt_at).limit(limit)
    return list(session.scalars(query))


def claim(session: Session, delivery_id: str, now: datetime, hold: timedelta) -> bool:
    """Take a due delivery for one attempt: push its next attempt past `hold`, so that no other sender takes it
    meanwhile and, if this one dies, it is tried again after that."""
    result = session.execute(
        update(WebhookDelivery)
        .where(WebhookDelivery.id == delivery_id, WebhookDelivery.state == "pending",
               WebhookDelivery.next_attempt_at <= now)
        .values(next_attempt_at=now + hold, attempts=WebhookDelivery.attempts + 1)
        .execution_options(synchronize_session=False)
    )
    return result.rowcount == 1
