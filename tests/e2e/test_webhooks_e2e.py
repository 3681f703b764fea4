"""Webhooks end to end: a real HTTP receiver started here (loopback, allowed by the settings for this test),
real worker processes sending, PostgreSQL and Redis. The receiver checks every signature with the tenant's
secret and fails each URL's first attempt, so the retry with backoff is exercised too."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from core.settings import Settings
from core.webhooks.delivery import post
from core.webhooks.signing import verify
from tests.harness import Service
from tests.support import wait_for

pytestmark = pytest.mark.slow

WEBHOOK_ENV = {"CONDENSER_WEBHOOK_ALLOW_HTTP": "true", "CONDENSER_WEBHOOK_ALLOWED_NETWORKS": "127.0.0.0/8",
               "CONDENSER_WEBHOOK_BACKOFF_SECONDS": "0.3", "CONDENSER_WEBHOOK_POLL_SECONDS": "0.2"}


@dataclass(frozen=True)
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    answered: int


class Receiver:
    """Records every POST; answers 500 to the first one on each path and 200 afterwards."""

    def __init__(self) -> None:
        self.received: list[Received] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                status = 200 if any(r.path == self.path for r in receiver.received) else 500
                receiver.received.append(Received(self.path, dict(self.headers.items()), body, status))
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *_: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}{path}"

    def delivered(self, path: str) -> Received | None:
        return next((r for r in self.received if r.path == path and r.answered == 200), None)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    running = Receiver()
    yield running
    running.server.shutdown()


def test_job_ends_are_delivered_signed_and_retried(service_factory: Any, small_cnn_files: Any,
                                                   receiver: Receiver) -> None:
    service: Service = service_factory("distributed", **WEBHOOK_ENV)
    teacher_id = service.upload_teacher(small_cnn_files.safetensors, small_cnn_files.spec)
    hook = service.client.put("/v1/webhook", headers=service.headers, json={"url": receiver.url("/default")})
    assert hook.status_code == 200, hook.text
    secret = hook.json()["secret"]
    job = {"teacher": teacher_id, "dataset": "digits", "epochs": 2, "batch_size": 32, "lr": 0.01,
           "student": {"arch": "small_cnn", "kwargs": {"width": 8, "depth": 2}}}

    # Two jobs canceled before any worker runs (ended by the API), one that runs to success (ended by a worker).
    own_url = service.submit({**job, "webhook_url": receiver.url("/job-a")})
    default_url = service.submit(job)
    for job_id in (own_url, default_url):
        assert service.client.post(f"/v1/jobs/{job_id}/cancel", headers=service.headers).status_code == 202
    service.start_worker(OMP_NUM_THREADS="1")
    succeeded = service.submit({**job, "webhook_url": receiver.url("/job-c")})
    service.wait_status(succeeded, ("succeeded",), timeout=180)

    expected = {"/job-a": (own_url, "job.canceled"), "/default": (default_url, "job.canceled"),
                "/job-c": (succeeded, "job.succeeded")}
    wait_for(lambda: all(receiver.delivered(path) for path in expected), timeout=60, interval=0.2,
             what="every webhook delivered")
    for path, (job_id, event) in expected.items():
        attempts = [r for r in receiver.received if r.path == path]
        assert [r.answered for r in attempts] == [500, 200]
        for request in attempts:
            assert verify(secret, request.headers["X-Condenser-Timestamp"], request.headers["X-Condenser-Signature"],
                          request.body)
            assert not verify("whsec_wrong", request.headers["X-Condenser-Timestamp"],
                              request.headers["X-Condenser-Signature"], request.body)
        payload = json.loads(attempts[1].body)
        assert (payload["type"], payload["job"]["id"], attempts[1].headers["X-Condenser-Event"]) == \
            (event, job_id, event)
        # A retry is the same delivery: same id, same body, so a receiver can drop duplicates.
        assert attempts[0].body == attempts[1].body
        assert attempts[0].headers["X-Condenser-Delivery"] == attempts[1].headers["X-Condenser-Delivery"] == \
            payload["id"]
        history = [e for e in service.api_job(job_id)["events"] if e["kind"] == "webhook"]
        assert [(e["data"]["attempt"], e["data"]["state"], e["data"]["status_code"]) for e in history] == [
            (1, "pending", 500), (2, "delivered", 200)]
        assert "retrying in" in history[0]["message"]
    delivered = receiver.delivered("/job-c")
    assert delivered is not None
    artifacts = json.loads(delivered.body)["job"]["artifacts"]
    assert {a["kind"] for a in artifacts} >= {"student_safetensors", "student_torchscript"}


def test_the_target_is_checked_again_when_delivering(receiver: Receiver) -> None:
    """A URL that passed at submission but now resolves to a refused address (DNS rebinding) gets nothing."""
    strict = Settings(webhook_allow_http=True)  # loopback no longer allowed
    attempt = post(receiver.url("/rebound"), "whsec_x", "whd_1", "job.succeeded", {"id": "whd_1"}, strict)
    assert not attempt.delivered and "loopback" in (attempt.error or "")
    assert receiver.received == []
