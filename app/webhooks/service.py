"""A tenant's webhook settings, the check of a job's own webhook URL.

A job's end is announced by core.webhooks.outbox, in the transaction that ends it.
"""

from __future__ import annotations

import secrets

from sqlalchemy.orm import Session

from core.db.models import TenantWebhook
from core.errors import Invalid
from core.settings import Settings
from core.webhooks import repository
from core.webhooks.targets import check_target

SECRET_PREFIX = "whsec_"


def get_webhook(session: Session, tenant: str) -> TenantWebhook | None:
    return repository.tenant_webhook(session, tenant)


def set_default_url(session: Session, tenant: str, url: str | None,
                    settings: Settings) -> tuple[TenantWebhook, str | None]:
    """Set (or clear, with None) the tenant's default URL. Returns the row and the secret if it was just made."""
    if url is not None:
        check_target(url, settings)
    row, new_secret = _webhook_row(session, tenant)
    row.url = url
    return row, new_secret


def rotate_secret(session: Session, tenant: str) -> tuple[TenantWebhook, str]:
    """A new signing secret (the old one stops working at once)."""
    row, new_secret = _webhook_row(session, tenant)
    if new_secret is None:
        new_secret = row.secret = _new_secret()
    return row, new_secret


def _webhook_row(session: Session, tenant: str) -> tuple[TenantWebhook, str | None]:
    row = repository.tenant_webhook(session, tenant)
    if row is not None:
        return row, None
    row = TenantWebhook(tenant=tenant, secret=_new_secret())
    repository.add(session, row)
    return row, row.secret


def _new_secret() -> str:
    return f"{SECRET_PREFIX}{secrets.token_urlsafe(32)}"


def check_job_webhook(session: Session, tenant: str, url: str, settings: Settings) -> None:
    """A job's own webhook_url, at submission: a target we may call, and a secret to sign with."""
    check_target(url, settings)
    if repository.tenant_webhook(session, tenant) is None:
        raise Invalid("webhook_url: deliveries are signed with your tenant's secret, and there is none yet; create it "
                      "with PUT /v1/webhook (its url may be null) and keep the secret it returns")
