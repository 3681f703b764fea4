"""GET /v1/jobs/{id}/events: a JSON listing, or Server-Sent Events with Accept: text/event-stream that resume
with Last-Event-ID and end with the job."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.auth.service import revoke_key
from app.client import Event, parse_sse
from core import lifecycle
from core.db.models import Job
from core.db.session import session_scope

SSE = {"Accept": "text/event-stream"}


@pytest.fixture
def job_id(client: TestClient, auth_headers: dict[str, str], insert_model: Callable[..., str], tenant: str) -> str:
    body = {"teacher": insert_model(tenant), "dataset": "digits", "student": {"arch": "small_cnn"}}
    response = client.post("/v1/jobs", headers=auth_headers, json=body)
    assert response.status_code == 201, response.text
    return response.json()["id"]


def stream(client: TestClient, headers: dict[str, str], job_id: str, **extra: str) -> list[Event]:
    response = client.get(f"/v1/jobs/{job_id}/events", headers={**headers, **SSE, **extra})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    return [event for event in parse_sse(iter(response.text.splitlines())) if event is not None]


def record_progress(job_id: str, epoch: int) -> None:
    """What the worker writes: the heartbeat's snapshot on the row, and an event per finished epoch."""
    with session_scope() as session:
        job = session.get(Job, job_id)
        assert job is not None
        job.progress = {"stage": "distill", "epoch": epoch, "epochs": 3, "step": epoch * 10, "total_steps": 30,
                        "eta_seconds": 4.0, "train_loss": 0.5, "val_accuracy": 0.8}
        lifecycle.record_event(session, job, "progress", "worker", f"epoch {epoch} done", {"epoch": epoch})


def cancel(job_id: str) -> None:
    with session_scope() as session:
        job = session.get(Job, job_id)
        assert job is not None
        lifecycle.request_cancel(session, job, "test")


def test_json_listing_pages_with_after(client: TestClient, auth_headers: dict[str, str], job_id: str) -> None:
    record_progress(job_id, 1)
    events = client.get(f"/v1/jobs/{job_id}/events", headers=auth_headers).json()
    assert [(e["kind"], e["message"]) for e in events] == [("state", "submitted"), ("progress", "epoch 1 done")]
    assert events[0]["id"] < events[1]["id"]
    later = client.get(f"/v1/jobs/{job_id}/events", headers=auth_headers, params={"after": events[0]["id"]}).json()
    assert later == events[1:]


def test_stream_follows_a_live_job_and_ends_with_it(client: TestClient, auth_headers: dict[str, str],
                                                     job_id: str) -> None:
    def worker_side() -> None:
        time.sleep(0.8)
        record_progress(job_id, 1)
        time.sleep(0.8)
        cancel(job_id)

    thread = threading.Thread(target=worker_side)
    thread.start()
    started = time.monotonic()
    events = stream(client, auth_headers, job_id)
    thread.join()
    assert time.monotonic() - started >= 1.5  # it waited for the job rather than ending at once
    names = [event.event for event in events]
    assert names[0] == "state" and names[-1] == "end", names
    assert events[-1].data == {"status": "canceled"}
    stored = [event for event in events if event.id is not None]
    assert [(e.event, e.data["message"]) for e in stored] == [
        ("state", "submitted"), ("progress", "epoch 1 done"), ("state", "canceled before it started")]
    snapshots = [event.data for event in events if event.event == "snapshot"]
    assert snapshots[0]["status"] == "queued"
    assert any(snap["progress"]["epoch"] == 1 and snap["progress"]["eta_seconds"] == 4.0 for snap in snapshots)


def test_a_stream_ends_when_its_key_is_revoked(client: TestClient, auth_headers: dict[str, str], tenant: str,
                                               job_id: str) -> None:
    prefix = auth_headers["Authorization"].split("_")[1]

    def revoke_later() -> None:
        time.sleep(0.8)
        with session_scope() as session:
            revoke_key(session, tenant, prefix)

    thread = threading.Thread(target=revoke_later)
    thread.start()
    events = stream(client, auth_headers, job_id)  # the job stays queued: only the revocation can end it
    thread.join()
    assert events[-1].event == "error" and events[-1].data == {"detail": f"API key cnd_{prefix} was revoked"}
    assert client.get(f"/v1/jobs/{job_id}/events", headers={**auth_headers, **SSE}).status_code == 401


def test_last_event_id_resumes_without_repeats(client: TestClient, auth_headers: dict[str, str], job_id: str) -> None:
    record_progress(job_id, 1)
    record_progress(job_id, 2)
    cancel(job_id)
    everything = [event.id for event in stream(client, auth_headers, job_id) if event.id is not None]
    assert len(everything) == 4
    resumed = stream(client, auth_headers, job_id, **{"Last-Event-ID": str(everything[1])})
    assert [event.id for event in resumed if event.id is not None] == everything[2:]
    assert resumed[-1].event == "end"
    # Resuming after the last event of a finished job: nothing more, just the end.
    after_all = stream(client, auth_headers, job_id, **{"Last-Event-ID": str(everything[-1])})
    assert [event.event for event in after_all] == ["snapshot", "end"]


def test_another_tenant_gets_404_and_no_stream(client: TestClient, auth_headers: dict[str, str],
                                               other_auth_headers: dict[str, str], job_id: str) -> None:
    for headers in (other_auth_headers, {**other_auth_headers, **SSE}):
        response = client.get(f"/v1/jobs/{job_id}/events", headers=headers)
        assert response.status_code == 404
        assert response.json() == {"detail": f"job {job_id} not found"}
    assert client.get(f"/v1/jobs/{job_id}/events", headers=SSE).status_code == 401


# b"\xb2" arrives as '²', a digit to str.isdigit() but not to int().
@pytest.mark.parametrize("header", ["abc", "-1", "1.5", "99999999999999999999", b"\xb2"])
def test_a_malformed_last_event_id_is_a_422(client: TestClient, auth_headers: dict[str, str], job_id: str,
                                            header: str | bytes) -> None:
    response = client.get(f"/v1/jobs/{job_id}/events", headers={**auth_headers, **SSE, "Last-Event-ID": header})
    assert response.status_code == 422
    assert "Last-Event-ID" in response.json()["detail"]


def test_the_stream_holds_no_database_connection_between_polls(client: TestClient, auth_headers: dict[str, str],
                                                              job_id: str) -> None:
    from core.db.session import get_engine

    pool: Any = get_engine().pool
    if not hasattr(pool, "checkedout"):
        pytest.skip("this pool does not count connections")
    seen: list[int] = []

    def sample() -> None:
        for _ in range(10):
            time.sleep(0.1)
            seen.append(pool.checkedout())
        cancel(job_id)

    thread = threading.Thread(target=sample)
    thread.start()
    stream(client, auth_headers, job_id)
    thread.join()
    # Polls take milliseconds of each 0.5 s: most samples find no connection checked out.
    assert sorted(seen)[len(seen) // 2] == 0, seen
