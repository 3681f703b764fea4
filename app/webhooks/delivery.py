"""Sending webhook deliveries: claim the due ones, POST each signed, record every attempt, back off.

Runs in a thread of every worker's main process (worker.webhooks), not as Celery tasks: a worker runs one
task per GPU, and an announcement must not wait behind hours of training. Rows in the database, not
broker messages, carry the retries, so they survive restarts; each attempt is a `webhook` event in the
job's history.
"""

from __future__ import annotations

import json
import logging
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import httpx

from app.config import Settings, get_settings
from app.db.models import Job, WebhookDelivery, utcnow
from app.db.session import session_scope
from app.jobs import lifecycle
from app.webhooks import repository
from app.webhooks.signing import DELIVERY_HEADER, EVENT_HEADER, signed_headers
from app.webhooks.targets import RefusedTarget, check_target

log = logging.getLogger(__name__)
BATCH = 20
USER_AGENT = "condenser-webhooks/1"


@dataclass(frozen=True)
class Attempt:
    delivered: bool
    status_code: int | None = None
    error: str | None = None


def deliver_due(settings: Settings | None = None) -> int:
    """Attempt every delivery that is due now; returns how many were attempted."""
    settings = settings or get_settings()
    now = utcnow()
    # Longer than an attempt can take, so a live sender never sees its delivery claimed twice.
    hold = timedelta(seconds=2 * settings.webhook_timeout_seconds + 30)
    with session_scope() as session:
        claimed = [delivery_id for delivery_id in repository.due_deliveries(session, now, BATCH)
                   if repository.claim(session, delivery_id, now, hold)]
    for delivery_id in claimed:
        _deliver(delivery_id, settings)
    return len(claimed)


def _deliver(delivery_id: str, settings: Settings) -> None:
    with session_scope() as session:
        delivery = session.get(WebhookDelivery, delivery_id)
        hook = repository.tenant_webhook(session, delivery.tenant)
        url, event, payload = delivery.url, delivery.event, delivery.payload
        secret = hook.secret if hook is not None else None
    if secret is None:
        attempt = Attempt(False, error="the tenant has no signing secret")
    else:
        attempt = post(url, secret, delivery_id, event, payload, settings)
    with session_scope() as session:
        record_attempt(session, delivery_id, attempt, settings)


def post(url: str, secret: str, delivery_id: str, event: str, payload: dict[str, Any], settings: Settings) -> Attempt:
    """One signed POST, to an address checked just now (never following redirects, never through a proxy)."""
    try:
        addresses = check_target(url, settings)
    except RefusedTarget as refused:
        return Attempt(False, error=refused.message)
    body = json.dumps(payload, separators=(",", ":")).encode()
    target = httpx.URL(url)
    headers = {"Content-Type": "application/json", "User-Agent": USER_AGENT, EVENT_HEADER: event,
               DELIVERY_HEADER: delivery_id, "Host": target.netloc.decode("ascii"), **signed_headers(secret, body)}
    # Connect to the checked address; TLS still verifies the certificate against the URL's host name.
    extensions = {"sni_hostname": target.host} if target.scheme == "https" else {}
    try:
        with httpx.Client(timeout=settings.webhook_timeout_seconds, follow_redirects=False, trust_env=False) as http:
            response = http.post(target.copy_with(host=str(addresses[0])), content=body, headers=headers,
                                 extensions=extensions)
    except httpx.HTTPError as exc:
        return Attempt(False, error=f"{type(exc).__name__}: {exc}")
    if response.is_success:
        return Attempt(True, response.status_code)
    return Attempt(False, response.status_code, f"HTTP {response.status_code}")


def backoff_seconds(attempts: int, settings: Settings) -> float:
    return min(settings.webhook_backoff_seconds * 2 ** (attempts - 1), settings.webhook_backoff_max_seconds)


def record_attempt(session: Any, delivery_id: str, attempt: Attempt, settings: Settings) -> None:
    delivery = session.get(WebhookDelivery, delivery_id)
    now, number = utcnow(), delivery.attempts
    delivery.last_status_code, delivery.last_error = attempt.status_code, attempt.error
    if attempt.delivered:
        delivery.state, delivery.delivered_at = "delivered", now
        message = f"webhook delivered to {delivery.url} (HTTP {attempt.status_code}, attempt {number})"
    elif number >= settings.webhook_max_attempts:
        delivery.state = "failed"
        message = f"webhook to {delivery.url} failed after {number} attempts: {attempt.error}"
    else:
        delay = backoff_seconds(number, settings)
        delivery.next_attempt_at = now + timedelta(seconds=delay)
        message = f"webhook attempt {number} to {delivery.url} failed: {attempt.error}; retrying in {delay:g} s"
    log.info("job %s: %s", delivery.job_id, message, extra={"job_id": delivery.job_id})
    job = session.get(Job, delivery.job_id)
    lifecycle.record_event(session, job, "webhook", f"webhooks@{socket.gethostname()}", message, {
        "delivery": delivery.id, "event": delivery.event, "attempt": number, "state": delivery.state,
        "status_code": attempt.status_code, "error": attempt.error})
