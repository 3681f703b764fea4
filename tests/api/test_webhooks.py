"""Webhook settings (/v1/webhook), per-job webhook URLs, the target allow-list, the signature scheme, and
the sender's claims and deadline against a real (loopback) receiver. Deliveries by real worker processes are
tested end to end in tests/e2e/test_webhooks_e2e.py."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import update

from core.db.models import Job, JobEvent, TenantWebhook, WebhookDelivery, utcnow
from core.db.session import session_scope
from core.settings import Settings
from core.webhooks import delivery as sender
from core.webhooks import repository
from core.webhooks.signing import signature, signed_headers, verify
from core.webhooks.targets import RefusedTarget, check_target
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
    "https://[64:ff9b::a00:1]/hooks",  # NAT64 well-known prefix, to 10.0.0.1
    "https://[2002:a00:1::]/hooks",  # 6to4, relayed to 10.0.0.1
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


# IPv6 addresses that carry an IPv4 one, and the IPv4 address a connection to them would end up at.
EMBEDDING = [
    ("::ffff:10.0.0.1", "10.0.0.1"),  # IPv4-mapped
    ("::a00:1", "10.0.0.1"),  # IPv4-compatible (deprecated)
    ("::7f00:1", "127.0.0.1"),
    ("64:ff9b::a00:1", "10.0.0.1"),  # NAT64, well-known prefix 64:ff9b::/96
    ("64:ff9b::a9fe:a9fe", "169.254.169.254"),  # NAT64 to the cloud metadata service
    ("64:ff9b:1::a00:1", "10.0.0.1"),  # NAT64, local-use prefix 64:ff9b:1::/48
    ("64:ff9b:1:2:3:4:c0a8:a", "192.168.0.10"),
    ("2002:a00:1::", "10.0.0.1"),  # 6to4
    ("2002:7f00:1:1::1", "127.0.0.1"),
    ("2001:0:808:808::f5ff:f5fe", "10.0.10.1"),  # Teredo: public server 8.8.8.8, client 10.0.10.1 (obfuscated)
    ("2001:0:a00:1::f7f7:f7f7", "10.0.0.1"),  # Teredo: the server's address private
]


def test_refusals_of_host_names_do_not_say_what_they_resolve_to(client: TestClient,
                                                                 auth_headers: dict[str, str]) -> None:
    """A name's internal address (localhost's here) would map the service's network for the caller."""
    refused = client.put("/v1/webhook", headers=auth_headers, json={"url": "https://localhost/hooks"})
    assert refused.status_code == 422
    detail = refused.json()["detail"]
    assert "'localhost' resolves to a private, loopback" in detail
    assert "127.0.0.1" not in detail and "::1" not in detail
    unresolved = client.put("/v1/webhook", headers=auth_headers, json={"url": "https://no-such-host.invalid/hooks"})
    assert unresolved.json()["detail"].endswith("webhook host 'no-such-host.invalid' does not resolve")


@pytest.mark.parametrize(("address", "reaches"), EMBEDDING)
def test_ipv6_addresses_embedding_internal_ipv4_are_refused(app_env: AppEnv, address: str, reaches: str) -> None:
    with pytest.raises(RefusedTarget) as refused:
        check_target(f"https://[{address}]/hooks", app_env.settings)
    assert f"(which reaches {reaches})" in refused.value.message


@pytest.mark.parametrize("address", ["64:ff9b::5db8:d70e", "2002:5db8:d70e::1"])  # both reach 93.184.215.14
def test_ipv6_addresses_embedding_a_public_ipv4_pass(app_env: AppEnv, address: str) -> None:
    assert [str(a) for a in check_target(f"https://[{address}]/hooks", app_env.settings)] == [address]


def test_embedded_addresses_in_the_allowed_networks_pass(app_env: AppEnv) -> None:
    loopback = app_env.settings.model_copy(update={"webhook_allowed_networks": "127.0.0.0/8"})
    for address in ("::ffff:127.0.0.1", "64:ff9b::7f00:1", "2002:7f00:1::"):
        assert check_target(f"https://[{address}]/hooks", loopback)
    with pytest.raises(RefusedTarget, match=r"reaches 10\.0\.0\.1"):
        check_target("https://[64:ff9b::a00:1]/hooks", loopback)


@pytest.mark.parametrize("timestamp", ["\u00b2", "\u00b9\u00b2\u00b3", "\uff11\uff10\uff10\uff10\uff10\uff10\uff10",
                                       "\u0661\u0660\u0660\u0660\u0660\u0660\u0660", "1" * 5000, "-1000000",
                                       "+1000000", " 1000000", "1000000.0", ""])
def test_malformed_timestamps_do_not_verify(timestamp: str) -> None:
    """Unicode digits ("²": isdigit() but not int(); fullwidth ones: int() reads them), too many digits for
    int(), signs, spaces: False, never an exception."""
    body = b'{"id":"whd_1"}'
    assert verify("whsec_abc", timestamp, signature("whsec_abc", timestamp, body), body, now=1_000_000) is False


def test_malformed_signature_headers_do_not_verify() -> None:
    body = b"{}"
    for header in ("sha256=\u00e9", "\udcff", "\ud800", "", "sha256="):
        assert verify("whsec_abc", "1000000", header, body, now=1_000_000) is False


# --- sending: one attempt at a time per delivery, each within a hard deadline -------------------------


class Receiver:
    """A loopback HTTP receiver: `answer(handler)` answers each POST (after the body has been read)."""

    def __init__(self, answer: Callable[[BaseHTTPRequestHandler], None]) -> None:
        self.received: list[str] = []  # X-Condenser-Delivery of each POST, in arrival order
        self.in_flight: Counter[str] = Counter()
        self.overlapping: list[str] = []  # deliveries POSTed again while a POST of them was still unanswered
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers["Content-Length"]))
                delivery_id = self.headers["X-Condenser-Delivery"]
                with receiver.lock:
                    receiver.received.append(delivery_id)
                    if receiver.in_flight[delivery_id]:
                        receiver.overlapping.append(delivery_id)
                    receiver.in_flight[delivery_id] += 1
                try:
                    answer(self)
                except OSError:  # the sender gave up and closed the connection
                    pass
                finally:
                    with receiver.lock:
                        receiver.in_flight[delivery_id] -= 1

            def log_message(self, *_: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}{path}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receivers() -> Iterator[Callable[[Callable[[BaseHTTPRequestHandler], None]], Receiver]]:
    started: list[Receiver] = []

    def start(answer: Callable[[BaseHTTPRequestHandler], None]) -> Receiver:
        started.append(Receiver(answer))
        return started[-1]

    yield start
    for receiver in started:
        receiver.close()


def slowly_ok(seconds: float) -> Callable[[BaseHTTPRequestHandler], None]:
    def answer(handler: BaseHTTPRequestHandler) -> None:
        time.sleep(seconds)
        handler.send_response(200)
        handler.send_header("Content-Length", "0")
        handler.end_headers()

    return answer


def sending_settings(app_env: AppEnv, timeout: float) -> Settings:
    """Loopback allowed (the receiver), a short attempt deadline."""
    return app_env.settings.model_copy(update={"webhook_allow_http": True, "webhook_allowed_networks": "127.0.0.0/8",
                                               "webhook_timeout_seconds": timeout})


def queue_deliveries(client: TestClient, auth_headers: dict[str, str], insert_model: Callable[..., str],
                     tenant: str, url: str, count: int) -> list[str]:
    """`count` jobs of the tenant ended (canceled), each announced to `url`: the ids of their deliveries. Pending
    deliveries of other tests in this module's database are put off for a day, so that only these are due."""
    assert client.put("/v1/webhook", headers=auth_headers, json={"url": None}).status_code == 200
    with session_scope() as session:  # the API refuses a loopback URL; the senders here allow it
        session.get(TenantWebhook, tenant).url = url
    teacher = insert_model(tenant)
    for _ in range(count):
        job_id = client.post("/v1/jobs", headers=auth_headers, json=job_body(teacher)).json()["id"]
        assert client.post(f"/v1/jobs/{job_id}/cancel", headers=auth_headers).status_code == 202
    with session_scope() as session:
        session.execute(update(WebhookDelivery)
                        .where(WebhookDelivery.state == "pending", WebhookDelivery.tenant != tenant)
                        .values(next_attempt_at=utcnow() + timedelta(days=1)))
        ids = [d.id for d in session.query(WebhookDelivery).filter_by(tenant=tenant)]
    assert len(ids) == count
    return ids


def test_two_senders_never_send_one_delivery_twice(client: TestClient, auth_headers: dict[str, str],
                                                   insert_model: Callable[..., str], tenant: str, app_env: AppEnv,
                                                   receivers: Callable[..., Receiver],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Two senders (as in two worker processes) work through ten deliveries to a receiver that takes 0.4 s to
    answer each: 4 s in all, longer than one claim's hold (shortened here to 2.5 s). Claiming the whole batch
    up front would let the second sender take the last ones again once the hold ran out; claiming each just
    before its attempt, no delivery is ever taken by both, and each is POSTed once."""
    monkeypatch.setattr(sender, "HOLD_MARGIN_SECONDS", 0.5)
    settings = sending_settings(app_env, timeout=1.0)
    assert sender.claim_hold(settings) == timedelta(seconds=2.5)
    receiver = receivers(slowly_ok(0.4))
    ids = queue_deliveries(client, auth_headers, insert_model, tenant, receiver.url("/slow"), 10)

    def pending() -> int:
        with session_scope() as session:
            return session.query(WebhookDelivery).filter_by(tenant=tenant, state="pending").count()

    attempted: dict[str, int] = {}
    failures: list[BaseException] = []

    def run(name: str) -> None:
        try:
            deadline = time.monotonic() + 30
            while pending() and time.monotonic() < deadline:
                attempted[name] = attempted.get(name, 0) + sender.deliver_due(settings)
                time.sleep(0.02)
        except BaseException as exc:  # reported by the test's thread
            failures.append(exc)

    threads = [threading.Thread(target=run, args=(name,)) for name in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not failures, failures
    assert sorted(receiver.received) == sorted(ids), Counter(receiver.received).most_common(3)
    assert receiver.overlapping == []
    assert sum(attempted.values()) == 10 and min(attempted.values(), default=0) > 0, attempted  # both sent
    with session_scope() as session:
        rows = session.query(WebhookDelivery).filter_by(tenant=tenant).all()
        assert {(row.state, row.attempts) for row in rows} == {("delivered", 1)}
        events = session.query(JobEvent).filter(JobEvent.job_id.in_([row.job_id for row in rows]),
                                                JobEvent.kind == "webhook").all()
        assert sorted(event.data["attempt"] for event in events) == [1] * 10


def test_an_attempt_has_a_hard_deadline_however_slowly_the_answer_trickles(
        app_env: AppEnv, receivers: Callable[..., Receiver]) -> None:
    """A receiver sending its status line and then a header line every 0.2 s for 4 s never trips a timeout of
    httpx's (each bounds one read); the attempt is still given up after its 1 s in all."""

    def trickle(handler: BaseHTTPRequestHandler) -> None:
        handler.wfile.write(b"HTTP/1.1 200 OK\r\n")
        for number in range(20):
            handler.wfile.write(f"X-Trickle-{number}: x\r\n".encode())
            handler.wfile.flush()
            time.sleep(0.2)
        handler.wfile.write(b"Content-Length: 0\r\n\r\n")

    receiver = receivers(trickle)
    started = time.monotonic()
    attempt = sender.post(receiver.url("/trickle"), "whsec_x", "whd_trickle", "job.succeeded", {"id": "whd_trickle"},
                          sending_settings(app_env, timeout=1.0))
    elapsed = time.monotonic() - started
    assert not attempt.delivered and "timed out" in (attempt.error or ""), attempt
    assert 0.9 < elapsed < 2.5, elapsed
    assert receiver.received == ["whd_trickle"]


def test_a_late_attempt_does_not_overwrite_a_newer_claim(client: TestClient, auth_headers: dict[str, str],
                                                         insert_model: Callable[..., str], tenant: str,
                                                         app_env: AppEnv) -> None:
    """An attempt recorded after its hold ran out and another sender claimed the delivery is dropped: the other
    sender's claim (and attempt) stands."""
    settings = sending_settings(app_env, timeout=1.0)
    (delivery_id,) = queue_deliveries(client, auth_headers, insert_model, tenant, "http://127.0.0.1:9/none", 1)
    with session_scope() as session:
        assert repository.claim(session, delivery_id, utcnow(), timedelta(seconds=-1))  # a hold already over
    with session_scope() as session:
        assert repository.claim(session, delivery_id, utcnow(), timedelta(hours=1))  # the second sender's
    with session_scope() as session:
        sender.record_attempt(session, delivery_id, sender.Attempt(False, error="late"), settings, claimed_attempt=1)
    with session_scope() as session:
        row = session.get(WebhookDelivery, delivery_id)
        assert (row.state, row.attempts, row.last_error) == ("pending", 2, None)
        assert row.next_attempt_at.replace(tzinfo=None) > utcnow().replace(tzinfo=None) + timedelta(minutes=59)
        assert session.query(JobEvent).filter_by(job_id=row.job_id, kind="webhook").count() == 0
    with session_scope() as session:
        sender.record_attempt(session, delivery_id, sender.Attempt(True, 204), settings, claimed_attempt=2)
    with session_scope() as session:
        assert session.get(WebhookDelivery, delivery_id).state == "delivered"
