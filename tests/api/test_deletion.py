"""DELETE /v1/models/{id} and /v1/datasets/{id}: the row stays (shown with deleted_at, left out of listings and
the quota), no new job may name it, one an unfinished job or pipeline uses is refused, and its file goes with the
collector once no live row holds the same content. On the real databases and the real blob store."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from fastapi.testclient import TestClient

from app.quotas import stored_bytes
from core.db.models import Model, Pipeline
from core.db.session import session_scope
from core.orphans import collect_orphans
from tests.api.helpers import npz_dataset, upload_dataset
from tests.conftest import AppEnv

STUDENT = {"arch": "small_cnn", "kwargs": {"width": 2, "depth": 1}}
DAY = 24 * 3600


def job_body(teacher_id: str, **overrides: Any) -> dict[str, Any]:
    return {"kind": "distill", "teacher": teacher_id, "dataset": "digits", "student": STUDENT, "epochs": 1,
            **overrides}


def submit(client: TestClient, headers: dict[str, str], body: dict[str, Any]) -> httpx.Response:
    return client.post("/v1/jobs", headers=headers, json=body)


def delete(client: TestClient, headers: dict[str, str], resource: str, row_id: str) -> httpx.Response:
    return client.delete(f"/v1/{resource}/{row_id}", headers=headers)


def listed(client: TestClient, headers: dict[str, str], resource: str, **params: str) -> list[str]:
    return [item["id"] for item in client.get(f"/v1/{resource}", headers=headers, params=params).json()["items"]]


def quota_used(tenant: str) -> int:
    with session_scope() as session:
        return stored_bytes(session, tenant)


def aged(path: Path) -> None:
    """As if written two days ago: past the collector's grace period."""
    then = time.time() - 2 * DAY
    os.utime(path, (then, then))


def test_a_deleted_model_stays_readable_but_leaves_listings_and_the_quota(
        client: TestClient, app_env: AppEnv, auth_headers: dict[str, str], other_auth_headers: dict[str, str],
        insert_model: Callable[..., str], tenant: str) -> None:
    blob = app_env.store.put_bytes(b"weights of a model deleted later")
    model_id = insert_model(tenant, sha256=blob.sha256, bytes=blob.bytes)
    kept_id = insert_model(tenant, bytes=500)
    before = quota_used(tenant)

    # Another tenant's id is a 404, as everywhere, and changes nothing.
    assert delete(client, other_auth_headers, "models", model_id).status_code == 404
    assert client.get(f"/v1/models/{model_id}", headers=auth_headers).json()["deleted_at"] is None

    response = delete(client, auth_headers, "models", model_id)
    assert response.status_code == 204 and response.content == b""
    shown = client.get(f"/v1/models/{model_id}", headers=auth_headers).json()
    assert shown["deleted_at"] is not None and shown["sha256"] == blob.sha256
    assert quota_used(tenant) == before - blob.bytes
    assert listed(client, auth_headers, "models") == [kept_id]
    assert set(listed(client, auth_headers, "models", include_deleted="true")) == {model_id, kept_id}

    # Deleting again answers the same (a retried DELETE), and keeps the first date.
    assert delete(client, auth_headers, "models", model_id).status_code == 204
    assert client.get(f"/v1/models/{model_id}", headers=auth_headers).json()["deleted_at"] == shown["deleted_at"]
    assert client.get(f"/v1/models/{model_id}", headers=other_auth_headers).status_code == 404


def test_a_deleted_dataset_stays_readable_but_leaves_listings_and_the_quota(
        client: TestClient, auth_headers: dict[str, str], other_auth_headers: dict[str, str], tenant: str) -> None:
    dataset = upload_dataset(client, auth_headers, npz_dataset(seed=11), "deleted.npz").json()
    before = quota_used(tenant)
    assert delete(client, other_auth_headers, "datasets", dataset["id"]).status_code == 404

    assert delete(client, auth_headers, "datasets", dataset["id"]).status_code == 204
    assert client.get(f"/v1/datasets/{dataset['id']}", headers=auth_headers).json()["deleted_at"] is not None
    assert quota_used(tenant) == before - dataset["canonical_bytes"]
    assert listed(client, auth_headers, "datasets") == []
    assert listed(client, auth_headers, "datasets", include_deleted="true") == [dataset["id"]]


def test_no_new_job_may_name_a_deleted_model_or_dataset(client: TestClient, auth_headers: dict[str, str],
                                                        insert_model: Callable[..., str],
                                                        insert_dataset: Callable[..., str], tenant: str) -> None:
    teacher_id, gone_teacher = insert_model(tenant), insert_model(tenant)
    train, evaluation, gone_dataset = (insert_dataset(tenant) for _ in range(3))
    for resource, row_id in (("models", gone_teacher), ("datasets", gone_dataset)):
        assert delete(client, auth_headers, resource, row_id).status_code == 204

    gone_model, gone_data = f"model {gone_teacher}", f"dataset {gone_dataset}"
    for body, gone in ((job_body(gone_teacher), gone_model), (job_body(teacher_id, dataset=gone_dataset), gone_data),
                       (job_body(teacher_id, dataset=train, eval_dataset=gone_dataset), gone_data),
                       ({"kind": "quantize", "model": gone_teacher, "dataset": "digits"}, gone_model)):
        response = submit(client, auth_headers, body)
        assert response.status_code == 409, response.text
        assert response.json()["detail"].startswith(f"{gone} was deleted on ")
        assert "upload it again" in response.json()["detail"]
    assert submit(client, auth_headers, job_body(teacher_id, dataset=train, eval_dataset=evaluation)).status_code == 201
    # Nor a new pipeline (its stages are checked as jobs are).
    pipeline = client.post("/v1/pipelines", headers=auth_headers, json={
        "model": teacher_id, "dataset": gone_dataset, "stages": [{"kind": "distill", "student": STUDENT}]})
    assert pipeline.status_code == 409 and f"{gone_data} was deleted on " in pipeline.json()["detail"]
    pipeline = client.post("/v1/pipelines", headers=auth_headers, json={
        "model": gone_teacher, "dataset": "digits", "stages": [{"kind": "distill", "student": STUDENT}]})
    assert pipeline.status_code == 409 and pipeline.json()["detail"].startswith(f"{gone_model} was deleted on ")


def test_what_an_unfinished_job_uses_is_not_deleted(client: TestClient, auth_headers: dict[str, str],
                                                    insert_model: Callable[..., str],
                                                    insert_dataset: Callable[..., str], tenant: str) -> None:
    teacher_id = insert_model(tenant)
    train, evaluation = insert_dataset(tenant), insert_dataset(tenant)
    job_id = submit(client, auth_headers, job_body(teacher_id, dataset=train, eval_dataset=evaluation)).json()["id"]

    for resource, row_id in (("models", teacher_id), ("datasets", train), ("datasets", evaluation)):
        response = delete(client, auth_headers, resource, row_id)
        assert response.status_code == 409, response.text
        assert f"is in use by job {job_id} (queued)" in response.json()["detail"]
        assert client.get(f"/v1/{resource}/{row_id}", headers=auth_headers).json()["deleted_at"] is None

    assert client.post(f"/v1/jobs/{job_id}/cancel", headers=auth_headers).json()["status"] == "canceled"
    for resource, row_id in (("models", teacher_id), ("datasets", train), ("datasets", evaluation)):
        assert delete(client, auth_headers, resource, row_id).status_code == 204
    # The ended job still names them, and reads as before.
    job = client.get(f"/v1/jobs/{job_id}", headers=auth_headers).json()
    assert (job["model"], job["dataset"], job["spec"]["eval_dataset"]) == (teacher_id, train, evaluation)


def test_what_an_unfinished_pipeline_names_is_not_deleted(client: TestClient, auth_headers: dict[str, str],
                                                          insert_dataset: Callable[..., str], tenant: str) -> None:
    # A pipeline's later stages read its dataset when they start: while it runs, the dataset stays.
    dataset_id = insert_dataset(tenant)
    with session_scope() as session:
        pipeline = Pipeline(tenant=tenant, name="chain", status="running",
                            spec={"dataset_id": dataset_id, "stages": [{"name": "prune", "job": {
                                "kind": "prune", "dataset": dataset_id}}]})
        session.add(pipeline)
        session.flush()
        pipeline_id = pipeline.id
    response = delete(client, auth_headers, "datasets", dataset_id)
    assert response.status_code == 409 and f"pipeline {pipeline_id} (running)" in response.json()["detail"]

    with session_scope() as session:
        session.get(Pipeline, pipeline_id).status = "failed"
    assert delete(client, auth_headers, "datasets", dataset_id).status_code == 204


def test_a_deleted_rows_file_goes_once_no_live_row_holds_it(
        client: TestClient, app_env: AppEnv, auth_headers: dict[str, str], insert_model: Callable[..., str],
        insert_artifact: Callable[..., str], tenant: str) -> None:
    store = app_env.store
    shared = store.put_bytes(b"the same weights uploaded twice")
    first, second = (insert_model(tenant, sha256=shared.sha256, bytes=shared.bytes) for _ in range(2))
    alone = store.put_bytes(b"weights only one model holds")
    alone_id = insert_model(tenant, sha256=alone.sha256, bytes=alone.bytes)
    # A job's result model shares its file with the job's artifact.
    job_id = submit(client, auth_headers, job_body(insert_model(tenant))).json()["id"]
    artifact_data = b"a student's safetensors"
    insert_artifact(tenant, job_id, artifact_data)
    artifact_blob = store.put_bytes(artifact_data)
    result_id = insert_model(tenant, sha256=artifact_blob.sha256, bytes=artifact_blob.bytes, source_job_id=job_id)
    dataset = upload_dataset(client, auth_headers, npz_dataset(seed=51), "collected.npz").json()
    canonical = store.path_for(dataset["canonical_sha256"])

    for resource, row_id in (("models", first), ("models", alone_id), ("models", result_id),
                             ("datasets", dataset["id"])):
        assert delete(client, auth_headers, resource, row_id).status_code == 204
    for path in (shared.path, alone.path, artifact_blob.path, canonical):
        aged(path)
    collect_orphans()
    assert not alone.path.exists() and not canonical.exists()
    assert shared.path.exists() and artifact_blob.path.exists()

    assert delete(client, auth_headers, "models", second).status_code == 204
    collect_orphans()
    assert not shared.path.exists() and artifact_blob.path.exists()
    with session_scope() as session:  # the rows stay, for the jobs and lineage that name them
        assert all(session.get(Model, row_id).deleted_at is not None for row_id in (first, second, alone_id))
