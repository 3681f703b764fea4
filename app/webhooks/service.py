"""A tenant's webhook settings, the check of a job's own webhook URL, and the announcement of a job's end.

The announcement is a delivery row added in the transaction that moves the job to its final state (an
outbox): it exists if and only if the job ended, whatever process ended it (a worker, the reaper, a cancel
in the API). Senders in the worker processes deliver it (app.webhooks.delivery).
"""

from __future__ import annotations

import secrets

from sqlalchemy.orm import Session

from app.artifacts import repository as artifacts_repository
from app.artifacts.schemas import ArtifactOut
from app.config import Settings
from app.db.models import Job, TenantWebhook, WebhookDelivery, new_id, utcnow
from app.errors import Invalid
from app.jobs.schemas import JobOut
from app.webhooks import repository
from app.webhooks.targets import check_target

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


def announce_end(session: Session, job: Job) -> WebhookDelivery | None:
    """Queue the delivery of a job's end to its own webhook URL, else to its tenant's default, if any."""
    hook = repository.tenant_webhook(session, job.tenant)
    url = job.webhook_url or (hook.url if hook is not None else None)
    if url is None or hook is None:
        return None
    delivery_id = new_id("whd")
    artifacts = artifacts_repository.for_job(session, job.tenant, job.id)
    payload = {
        "id": delivery_id, "type": f"job.{job.status}", "created_at": utcnow().isoformat(),
        "job": {**JobOut.from_row(job).model_dump(mode="json"),
                "artifacts": [ArtifactOut.from_row(row).model_dump(mode="json") for row in artifacts]},
    }
    delivery = WebhookDelivery(id=delivery_id, tenant=job.tenant, job_id=job.id, url=url, event=payload["type"],
                               payload=payload, next_attempt_at=utcnow())
    repository.add(session, delivery)
    return delivery
