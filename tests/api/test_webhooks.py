"""Webhook settings (/v1/webhook), per-job webhook URLs, the target allow-list and the signature scheme.
Deliveries to a real receiver are tested end to end in tests/e2e/test_webhooks_e2e.py."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
from fastapi.testclient import TestClient

from app.config import Settings
from app.db.models import Job, WebhookDelivery
from app.db.session import session_scope
from app.webhooks.signing import signature, signed_headers, verify
from app.webhooks.targets import RefusedTarget, check_target
from tests.conftest import AppEnv

PUBLIC = "https://93.184.215.14/hooks"  # an address literal: no DNS needed to judge it
REFUSED = [
    "http://93.184.215.14/hooks",  # plain http, not allowed by default
    "ftp://93.184.215.14/hooks",
    "https://127.0.0.1/hooks",
    "https://localhost/hooks",
    "https://10.1.2.3/hooks",
    "https://192.168.0.10/hooks",
    "https://169.254.169.254/latest/meta-data",  # cloud metadata: link-local
    "https://[::1]/hooks",
    "https://[::ffff:10.0.0.1]/hooks",  # IPv4-mapped IPv6
    "https://[fe80::1]/hooks",
    "https://224.0.0.1/hooks",  # multicast
    "https://0.0.0.0/hooks",
    "https://240.0.0.1/hooks",  # reserved
    "https://100.64.0.1/hooks",  # carrier-grade NAT
    "https://user:pass@93.184.215.14/hooks",
    "https://no-such-host.invalid/hooks",
    "https:///hooks",
    "https://93.184.215.14:99999/hooks",
]


def job_body(teacher_id: str, **extra: object) -> dict[str, object]:
    return {"teacher": teacher_id, "dataset": "digits", "student": {"arch": "small_cnn"}, **extra}


def test_the_first_put_creates_a_secret_shown_once(client: TestClient, auth_headers: dict[str, str]) -> None:
    assert client.get("/v1/webhook", headers=auth_headers).json() == {
        "url": None, "has_secret": False, "secret": None, "updated_at": None}
    first = client.put("/v1/webhook", headers=auth_headers, json={"url": PUBLIC})
    assert first.status_code == 200, first.text
    secret = first.json()["secret"]
    assert secret.startswith("whsec_") and first.json()["url"] == PUBLIC
    again = client.put("/v1/webhook", headers=auth_headers, json={"url": None}).json()
    assert again["secret"] is None and again["url"] is None and again["has_secret"]
    shown = client.get("/v1/webhook", headers=auth_headers).json()
    assert shown["secret"] is None and shown["has_secret"]
    rotated = client.post("/v1/webhook/secret", headers=auth_headers).json()["secret"]
    assert rotated.startswith("whsec_") and rotated != secret


def test_webhook_settings_are_per_tenant(client: TestClient, auth_headers: dict[str, str],
                                         other_auth_headers: dict[str, str]) -> None:
    client.put("/v1/webhook", headers=auth_headers, json={"url": PUBLIC})
    assert client.get("/v1/webhook", headers=other_auth_headers).json()["url"] is None
    assert client.get("/v1/webhook").status_code == 401


@pytest.mark.parametrize("url", REFUSED)
def test_internal_and_malformed_targets_are_refused(client: TestClient, auth_headers: dict[str, str],
                                                    insert_model: Callable[..., str], tenant: str, url: str) -> None:
    response = client.put("/v1/webhook", headers=auth_headers, json={"url": url})
    assert response.status_code == 422, response.text
    assert "webhook" in response.json()["detail"]
    client.put("/v1/webhook", headers=auth_headers, json={"url": None})  # a secret, so only the URL is at fault
    submitted = client.post("/v1/jobs", headers=auth_headers, json=job_body(insert_model(tenant), webhook_url=url))
    assert submitted.status_code == 422, submitted.text


def test_a_job_webhook_needs_a_signing_secret(client: TestClient, auth_headers: dict[str, str],
                                              insert_model: Callable[..., str], tenant: str) -> None:
    body = job_body(insert_model(tenant), webhook_url=PUBLIC)
    refused = client.post("/v1/jobs", headers=auth_headers, json=body)
    assert refused.status_code == 422 and "PUT /v1/webhook" in refused.json()["detail"]
    client.put("/v1/webhook", headers=auth_headers, json={"url": None})
    accepted = client.post("/v1/jobs", headers=auth_headers, json=body)
    assert accepted.status_code == 201, accepted.text
    job = accepted.json()
    assert job["webhook_url"] == PUBLIC and "webhook_url" not in job["spec"]


def test_a_job_end_queues_one_delivery_with_the_job(client: TestClient, auth_headers: dict[str, str],
                                                   insert_model: Callable[..., str], tenant: str) -> None:
    client.put("/v1/webhook", headers=auth_headers, json={"url": PUBLIC})
    job_id = client.post("/v1/jobs", headers=auth_headers, json=job_body(insert_model(tenant))).json()["id"]
    with session_scope() as session:
        assert session.query(WebhookDelivery).filter_by(job_id=job_id).count() == 0  # nothing until it ends
    assert client.post(f"/v1/jobs/{job_id}/cancel", headers=auth_headers).status_code == 202
    with session_scope() as session:
        (delivery,) = session.query(WebhookDelivery).filter_by(job_id=job_id).all()
        assert (delivery.url, delivery.event, delivery.state) == (PUBLIC, "job.canceled", "pending")
        assert delivery.payload["job"]["id"] == job_id and delivery.payload["job"]["status"] == "canceled"
        assert session.get(Job, job_id).status == "canceled"


def test_allowed_networks_and_http_are_opt_in(app_env: AppEnv) -> None:
    local = "http://127.0.0.1:8080/hook"
    with pytest.raises(RefusedTarget, match="https"):
        check_target(local, app_env.settings)
    permissive = Settings(webhook_allow_http=True, webhook_allowed_networks="127.0.0.0/8")
    assert [str(address) for address in check_target(local, permissive)] == ["127.0.0.1"]
    with pytest.raises(RefusedTarget, match="private"):
        check_target("http://10.0.0.1/hook", permissive)


def test_signatures_verify_and_expire() -> None:
    body = b'{"id":"whd_1"}'
    headers = signed_headers("whsec_abc", body, now=1_000_000)
    timestamp, sent = headers["X-Condenser-Timestamp"], headers["X-Condenser-Signature"]
    assert sent == signature("whsec_abc", "1000000", body) and sent.startswith("sha256=")
    assert verify("whsec_abc", timestamp, sent, body, now=1_000_100)
    assert not verify("whsec_other", timestamp, sent, body, now=1_000_100)
    assert not verify("whsec_abc", timestamp, sent, body + b" ", now=1_000_100)
    assert not verify("whsec_abc", timestamp, sent, body, now=1_000_000 + 3600)  # a replay, an hour later
    assert verify("whsec_abc", *signed_headers("whsec_abc", body).values(), body, now=time.time())
