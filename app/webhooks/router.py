"""/v1/webhook: the tenant's default webhook URL and its signing secret."""

from __future__ import annotations

from fastapi import APIRouter

from app.deps import CurrentPrincipal, DbSession, SettingsDep
from app.routing import BoundedBodyRoute
from app.schemas import error_responses
from app.webhooks import service
from app.webhooks.schemas import WebhookIn, WebhookOut

router = APIRouter(prefix="/webhook", tags=["webhooks"], route_class=BoundedBodyRoute)


@router.get("", response_model=WebhookOut, summary="Get the webhook settings", responses=error_responses())
def get_webhook(principal: CurrentPrincipal, session: DbSession) -> WebhookOut:
    """The default URL and whether a signing secret exists (the secret itself is never shown again)."""
    return WebhookOut.from_row(service.get_webhook(session, principal.tenant))


@router.put("", response_model=WebhookOut, summary="Set the default webhook URL", responses=error_responses())
def put_webhook(body: WebhookIn, principal: CurrentPrincipal, session: DbSession, settings: SettingsDep) -> WebhookOut:
    """Every job of this tenant without a `webhook_url` of its own announces its end there (null: nowhere).

    Each delivery is a POST of JSON (`{"id", "type": "job.succeeded" | "job.failed" | "job.canceled", "job"}`)
    signed with the tenant's secret: `X-Condenser-Signature: sha256=HMAC-SHA256(secret, "<timestamp>.<body>")`
    with `X-Condenser-Timestamp`. The first call creates the secret and returns it, once. A URL must be https
    and resolve to public addresses only (422 otherwise). Failed deliveries (no answer, or not 2xx) are
    retried with exponential backoff; each attempt appears in the job's events."""
    row, new_secret = service.set_default_url(session, principal.tenant, body.url, settings)
    return WebhookOut.from_row(row, new_secret)


@router.post("/secret", response_model=WebhookOut, summary="Rotate the signing secret", responses=error_responses())
def rotate_secret(principal: CurrentPrincipal, session: DbSession) -> WebhookOut:
    """A new secret, returned once; deliveries from now on are signed with it."""
    row, secret = service.rotate_secret(session, principal.tenant)
    return WebhookOut.from_row(row, secret)
