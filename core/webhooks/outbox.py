"""The announcement of a job's end: a delivery row added in the transaction that moves the job to its final
state (an outbox). It exists if and only if the job ended, whatever process ended it (a worker, the reaper, a
cancel in the API); senders in the worker processes deliver it (core.webhooks.delivery).
"""

from __future__ import annotations

from sqlalchemy.orm import Session

from core.db.models import Job, WebhookDelivery, new_id, utcnow
from core.db.repository import job_artifacts
from core.views import ArtifactOut, JobOut
from core.webhooks import repository


def announce_end(session: Session, job: Job) -> WebhookDelivery | None:
    """Queue the delivery of a job's end to its own webhook URL, else to its tenant's default, if any."""
    hook = repository.tenant_webhook(session, job.tenant)
    url = job.webhook_url or (hook.url if hook is not None else None)
    if url is None or hook is None:
        return None
    delivery_id = new_id("whd")
    artifacts = job_artifacts(session, job.tenant, job.id)
    payload = {
        "id": delivery_id, "type": f"job.{job.status}", "created_at": utcnow().isoformat(),
        "job": {**JobOut.from_row(job).model_dump(mode="json"),
                "artifacts": [ArtifactOut.from_row(row).model_dump(mode="json") for row in artifacts]},
    }
    delivery = WebhookDelivery(id=delivery_id, tenant=job.tenant, job_id=job.id, url=url, event=payload["type"],
                               payload=payload, next_attempt_at=utcnow())
    repository.add(session, delivery)
    return delivery
