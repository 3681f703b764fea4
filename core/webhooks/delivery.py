"""Sending webhook deliveries: claim each due one just before its attempt, POST it signed, record the attempt,
back off.

Runs in a thread of every worker's main process (worker.webhooks), not as Celery tasks: a worker runs one
task per GPU, and an announcement must not wait behind hours of training. Rows in the database, not
broker messages, carry the retries, so they survive restarts; each attempt is a `webhook` event in the
job's history.

At most once at a time: a sender claims a delivery (one conditional UPDATE) only when it is about to attempt
it, holding it for `claim_hold`, well beyond the hard deadline of one attempt (`webhook_timeout_seconds`,
covering the name lookup, the connection, TLS, the request and the answer's status and headers, however
slowly a receiver trickles them). So no other sender can take a delivery while its attempt may still be in
flight, and an attempt recorded after its hold ran out (another sender's claim since) is dropped.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import httpx
from sqlalchemy import update

from core import lifecycle
from core.db.models import Job, WebhookDelivery, utcnow
from core.db.session import session_scope
from core.settings import Settings, get_settings
from core.webhooks import repository
from core.webhooks.signing import DELIVERY_HEADER, EVENT_HEADER, signed_headers
from core.webhooks.targets import RefusedTarget, check_target

log = logging.getLogger(__name__)
BATCH = 20
USER_AGENT = "condenser-webhooks/1"
# Added to twice the attempt deadline: room for the database work around an attempt and for clock skew.
HOLD_MARGIN_SECONDS = 30.0


@dataclass(frozen=True)
class Attempt:
    delivered: bool
    status_code: int | None = None
    error: str | None = None


@dataclass(frozen=True)
class _Claimed:
    delivery_id: str
    attempt: int  # the delivery's `attempts` after our claim: a later claim by anyone changes it
    url: str
    event: str
    payload: dict[str, Any]
    secret: str | None


def claim_hold(settings: Settings) -> timedelta:
    """How long a claim keeps other senders off a delivery: comfortably longer than an attempt can last."""
    return timedelta(seconds=2 * settings.webhook_timeout_seconds + HOLD_MARGIN_SECONDS)


def deliver_due(settings: Settings | None = None) -> int:
    """Attempt the deliveries that are due now (up to BATCH), one after another; returns how many were attempted.

    Each is claimed just before its attempt, not all at once: twenty slow targets take far longer than one
    hold, and a delivery claimed early would be claimable again, by another sender, before its turn came."""
    settings = settings or get_settings()
    with session_scope() as session:
        due = repository.due_deliveries(session, utcnow(), BATCH)
    attempted = 0
    for delivery_id in due:
        claimed = _claim(delivery_id, settings)
        if claimed is None:  # another sender took it meanwhile, or it is no longer due
            continue
        _deliver(claimed, settings)
        attempted += 1
    return attempted


def _claim(delivery_id: str, settings: Settings) -> _Claimed | None:
    with session_scope() as session:
        if not repository.claim(session, delivery_id, utcnow(), claim_hold(settings)):
            return None
        delivery = session.get(WebhookDelivery, delivery_id, populate_existing=True)
        hook = repository.tenant_webhook(session, delivery.tenant)
        return _Claimed(delivery_id, delivery.attempts, delivery.url, delivery.event, delivery.payload,
                        hook.secret if hook is not None else None)


def _deliver(claimed: _Claimed, settings: Settings) -> None:
    if claimed.secret is None:
        attempt = Attempt(False, error="the tenant has no signing secret")
    else:
        attempt = post(claimed.url, claimed.secret, claimed.delivery_id, claimed.event, claimed.payload, settings)
    with session_scope() as session:
        record_attempt(session, claimed.delivery_id, attempt, settings, claimed_attempt=claimed.attempt)


def post(url: str, secret: str, delivery_id: str, event: str, payload: dict[str, Any], settings: Settings) -> Attempt:
    """One signed POST, to an address checked just now (never following redirects, never through a proxy), over
    within `webhook_timeout_seconds` in all: past that nothing more is sent and the attempt has failed."""
    limit = settings.webhook_timeout_seconds
    deadline = time.monotonic() + limit
    try:
        addresses = check_target(url, settings)
    except RefusedTarget as refused:
        return Attempt(False, error=refused.message)
    remaining = deadline - time.monotonic()
    if remaining <= 0:  # the name lookup alone took the whole attempt: send nothing now
        return Attempt(False, error=f"timed out: resolving the host took longer than {limit:g} s")
    body = json.dumps(payload, separators=(",", ":")).encode()
    target = httpx.URL(url)
    headers = {"Content-Type": "application/json", "User-Agent": USER_AGENT, EVENT_HEADER: event,
               DELIVERY_HEADER: delivery_id, "Host": target.netloc.decode("ascii"), **signed_headers(secret, body)}
    # Connect to the checked address; TLS still verifies the certificate against the URL's host name.
    extensions = {"sni_hostname": target.host} if target.scheme == "https" else {}
    try:
        status_code = asyncio.run(_send(target.copy_with(host=str(addresses[0])), body, headers, extensions,
                                        remaining))
    except TimeoutError:
        return Attempt(False, error=f"timed out: no complete answer within {limit:g} s")
    except httpx.HTTPError as exc:
        return Attempt(False, error=f"{type(exc).__name__}: {exc}")
    if 200 <= status_code < 300:
        return Attempt(True, status_code)
    return Attempt(False, status_code, f"HTTP {status_code}")


async def _send(target: httpx.URL, body: bytes, headers: dict[str, str], extensions: dict[str, Any],
                seconds: float) -> int:
    """The answer's status code, or TimeoutError once `seconds` have passed in all.

    httpx's own timeouts bound each phase (and each read) separately, so a receiver trickling its answer a
    byte at a time would outlast any of them; cancelling the whole exchange bounds it, and closes the
    connection. The body of the answer is never read: only its status counts."""
    async with (
        asyncio.timeout(seconds),
        httpx.AsyncClient(timeout=seconds, follow_redirects=False, trust_env=False) as http,
        http.stream("POST", target, content=body, headers=headers, extensions=extensions) as answer,
    ):
        return answer.status_code


def backoff_seconds(attempts: int, settings: Settings) -> float:
    return min(settings.webhook_backoff_seconds * 2 ** (attempts - 1), settings.webhook_backoff_max_seconds)


def record_attempt(session: Any, delivery_id: str, attempt: Attempt, settings: Settings,
                   claimed_attempt: int | None = None) -> None:
    """Record an attempt's outcome. With `claimed_attempt` (the delivery's `attempts` right after the claim), only
    while that claim still holds: if the hold ran out and another sender claimed the delivery since, its own
    attempt decides, and this late result is dropped (it must not reschedule a delivery another sender holds)."""
    if claimed_attempt is not None:
        # A conditional UPDATE first: it both checks the claim and locks the row until this transaction ends.
        still_ours = session.execute(
            update(WebhookDelivery)
            .where(WebhookDelivery.id == delivery_id, WebhookDelivery.state == "pending",
                   WebhookDelivery.attempts == claimed_attempt)
            .values(last_status_code=attempt.status_code, last_error=attempt.error)
            .execution_options(synchronize_session=False)
        ).rowcount == 1
        if not still_ours:
            log.warning("webhook delivery %s: attempt %s outlived its claim (%s); its outcome is not recorded",
                        delivery_id, claimed_attempt, attempt.error or f"HTTP {attempt.status_code}")
            return
    delivery = session.get(WebhookDelivery, delivery_id, populate_existing=True)
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
