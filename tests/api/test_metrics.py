"""GET /metrics: Prometheus text with jobs by state and durations from the database, the broker's queue, and
bytes uploaded and served; open by default, a bearer token when the operator sets one."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from core.db.models import Job, utcnow
from core.db.session import session_scope
from tests.api.helpers import npz_dataset, upload_dataset
from tests.conftest import AppEnv


def scrape(client: TestClient, **headers: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = client.get("/metrics", headers=headers)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(response.text) for sample in family.samples}


def finished_job(tenant: str, teacher_id: str, seconds: float, status: str = "succeeded") -> None:
    finished = utcnow()
    with session_scope() as session:
        session.add(Job(tenant=tenant, kind="distill", spec={}, teacher_id=teacher_id, status=status, max_attempts=3,
                        started_at=finished - timedelta(seconds=seconds), finished_at=finished))


def test_jobs_by_state_and_durations_come_from_the_database(client: TestClient, tenant: str,
                                                           insert_model: Callable[..., str]) -> None:
    before = scrape(client)
    teacher_id = insert_model(tenant)
    finished_job(tenant, teacher_id, 3.0)
    finished_job(tenant, teacher_id, 100.0)
    finished_job(tenant, teacher_id, 10.0, status="failed")
    after = scrape(client)

    def grew(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after[key] - before.get(key, 0.0)

    assert grew("condenser_jobs", state="succeeded") == 2
    assert grew("condenser_jobs", state="failed") == 1
    assert ("condenser_jobs", (("state", "canceling"),)) in after  # every state is listed, zeros too
    succeeded = {"kind": "distill", "status": "succeeded"}
    assert grew("condenser_job_duration_seconds_count", **succeeded) == 2
    assert grew("condenser_job_duration_seconds_sum", **succeeded) == pytest.approx(103.0, abs=0.1)
    assert grew("condenser_job_duration_seconds_bucket", le="5.0", **succeeded) == 1
    assert grew("condenser_job_duration_seconds_bucket", le="120.0", **succeeded) == 2
    assert grew("condenser_job_duration_seconds_bucket", le="+Inf", **succeeded) == 2


def test_queue_depth_is_read_from_the_broker(client: TestClient, auth_headers: dict[str, str], tenant: str,
                                             insert_model: Callable[..., str]) -> None:
    before = scrape(client)[("condenser_broker_queue_messages", ())]
    body = {"teacher": insert_model(tenant), "dataset": "digits", "student": {"arch": "small_cnn"}}
    assert client.post("/v1/jobs", headers=auth_headers, json=body).status_code == 201
    after = scrape(client)
    # No worker runs in these tests, so the message waits in the (filesystem) broker.
    assert after[("condenser_broker_queue_messages", ())] == before + 1
    assert after[("condenser_broker_up", ())] == 1


def test_bytes_uploaded_and_served_are_counted(client: TestClient, auth_headers: dict[str, str], tenant: str,
                                               insert_model: Callable[..., str],
                                               insert_artifact: Callable[..., str]) -> None:
    before = scrape(client)
    content = npz_dataset()
    assert upload_dataset(client, auth_headers, content, "data.npz").status_code == 201
    finished_job(tenant, insert_model(tenant), 1.0)
    with session_scope() as session:
        job_id = session.query(Job.id).filter(Job.tenant == tenant).scalar()
    artifact_id = insert_artifact(tenant, job_id, b"x" * 1000)
    download = client.get(f"/v1/artifacts/{artifact_id}/download", headers={**auth_headers, "Range": "bytes=100-"})
    assert download.status_code == 206
    after = scrape(client)
    uploaded, served = ("condenser_uploaded_bytes_total", ()), ("condenser_served_bytes_total", ())
    assert (after[uploaded] - before[uploaded], after[served] - before[served]) == (len(content), 900)


def test_an_operator_token_closes_metrics(client: TestClient, app_env: AppEnv, auth_headers: dict[str, str],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(app_env.settings, "metrics_token", "s3cret-token")
    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", headers=auth_headers).status_code == 401  # a tenant's key is not the token
    refused = client.get("/metrics", headers={"Authorization": "Bearer wrong"})
    assert refused.status_code == 401 and "CONDENSER_METRICS_TOKEN" in refused.json()["detail"]
    assert scrape(client, Authorization="Bearer s3cret-token")
