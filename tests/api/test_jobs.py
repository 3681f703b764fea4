"""POST/GET /v1/jobs and cancel: everything checked before queueing, dispatched after commit, newest first."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from app.auth.service import revoke_key
from app.jobs.service import EVENTS_SHOWN
from core import lifecycle
from core.db.models import Job
from core.db.session import session_scope
from tests.api.helpers import count_rows, files_in, npz_dataset, upload_dataset
from tests.conftest import SMALL_CNN_SPEC, AppEnv, bearer

STUDENT = {"arch": "small_cnn", "kwargs": {"width": 2, "depth": 1}}


@pytest.fixture
def teacher_id(insert_model: Callable[..., str], tenant: str) -> str:
    return insert_model(tenant)


def job_body(teacher_id: str, **overrides: Any) -> dict[str, Any]:
    return {"kind": "distill", "teacher": teacher_id, "dataset": "digits", "student": STUDENT, "epochs": 2,
            **overrides}


def submit(client: TestClient, headers: dict[str, str], body: dict[str, Any]) -> httpx.Response:
    return client.post("/v1/jobs", headers=headers, json=body)


def test_submit_queues_and_dispatches(client: TestClient, app_env: AppEnv, auth_headers: dict[str, str],
                                      teacher_id: str) -> None:
    response = submit(client, auth_headers, job_body(teacher_id, lr=0.01))
    assert response.status_code == 201, response.text
    job = response.json()
    assert job["id"].startswith("job_")
    assert (job["status"], job["kind"], job["teacher"], job["dataset"]) == ("queued", "distill", teacher_id, "digits")
    assert (job["attempt"], job["max_attempts"]) == (0, app_env.settings.max_attempts)
    # Stored normalized: every default filled in, the student's classes taken from the teacher.
    assert job["spec"]["student"] == {"arch": "small_cnn", "kwargs": {"width": 2, "depth": 1, "num_classes": 10}}
    # The flat training fields of the body are stored in the distillation config they belong to.
    training = job["spec"]["distill"]["training"]
    assert (training["epochs"], training["lr"], training["batch_size"]) == (2, 0.01, 64)
    assert "epochs" not in job["spec"] and job["spec"]["distill"]["temperature"] == 4.0
    assert job["progress"]["epoch"] is None
    assert job["artifacts"] == [] and job["metrics"] == {} and job["error"] is None
    (event,) = job["events"]
    assert (event["kind"], event["status"], event["message"]) == ("state", "queued", "submitted")
    assert event["actor"].startswith("api-key:")

    # Sent to the broker only after the commit, and stamped as sent.
    with session_scope() as session:
        row = session.get(Job, job["id"])
        assert row is not None and row.enqueued_at is not None
    assert files_in(app_env.settings.broker_folder / "queue")

    assert client.get(f"/v1/jobs/{job['id']}", headers=auth_headers).json()["spec"] == job["spec"]


def test_submit_with_an_uploaded_dataset(client: TestClient, auth_headers: dict[str, str], teacher_id: str) -> None:
    dataset_id = upload_dataset(client, auth_headers, npz_dataset(num_classes=10), "ten.npz").json()["id"]
    response = submit(client, auth_headers, job_body(teacher_id, dataset=dataset_id))
    assert response.status_code == 201, response.text
    assert response.json()["dataset"] == dataset_id


@pytest.mark.parametrize(
    ("overrides", "message_part"),
    [
        ({"epochs": 0}, "epochs: Input should be greater than or equal to 1"),
        ({"lr": -1}, "lr: Input should be greater than 0"),
        ({"alpha": 1.5}, "alpha: Input should be less than or equal to 1"),
        ({"batch_size": 10**9}, "batch_size"),
        ({"optimizer": "rmsprop"}, "optimizer: Input should be 'adamw' or 'sgd'"),
        ({"learning_rate": 0.1}, "learning_rate: unknown field"),
        ({"kind": "sparsify"}, "kind: Input should be 'distill', 'prune' or 'quantize'"),
        ({"student": {"arch": "small_cnn", "kwarg": {}}}, "student.kwarg: unknown field"),
        ({"teacher": None}, "teacher"),
    ],
    ids=["epochs", "lr", "alpha", "batch-size", "optimizer", "unknown-field", "kind", "student-field", "null"],
)
def test_request_validation(client: TestClient, auth_headers: dict[str, str], teacher_id: str, tenant: str,
                            overrides: dict[str, Any], message_part: str) -> None:
    response = submit(client, auth_headers, job_body(teacher_id, **overrides))
    assert response.status_code == 422, response.text
    assert message_part in response.json()["detail"]
    assert response.json()["errors"]
    assert count_rows(Job, tenant) == 0


def test_invalid_json_body(client: TestClient, auth_headers: dict[str, str]) -> None:
    response = client.post("/v1/jobs", headers={**auth_headers, "Content-Type": "application/json"}, content=b"{")
    assert response.status_code == 422
    assert "JSON" in response.json()["detail"]


def test_a_job_on_photo_patches_is_queued(client: TestClient, auth_headers: dict[str, str],
                                          insert_model: Callable[..., str], tenant: str) -> None:
    teacher = insert_model(tenant, spec={"arch": "small_cnn", "kwargs": {"num_classes": 14},
                                         "input": {"image_size": 32, "channels": 3}})
    response = submit(client, auth_headers, job_body(teacher, dataset="photo-patches"))
    assert response.status_code == 201, response.text
    assert (response.json()["dataset"], response.json()["spec"]["student"]["kwargs"]["num_classes"]) == (
        "photo-patches", 14)


def test_references_and_compatibility(client: TestClient, auth_headers: dict[str, str],
                                      other_auth_headers: dict[str, str], insert_model: Callable[..., str],
                                      tenant: str, teacher_id: str) -> None:
    dataset_id = upload_dataset(client, auth_headers, npz_dataset(num_classes=10), "ten.npz").json()["id"]
    rgb_dataset = upload_dataset(client, auth_headers, npz_dataset(num_classes=10, shape=(8, 8, 3)), "rgb.npz")
    five_classes = insert_model(tenant, spec={**SMALL_CNN_SPEC, "kwargs": {"num_classes": 5}})
    padded = insert_model(tenant, spec={**SMALL_CNN_SPEC, "input": {"image_size": 8, "channels": 1,
                                                                     "resize": "pad"}})
    large_images = upload_dataset(client, auth_headers, npz_dataset(num_classes=10, shape=(16, 16)), "big.npz")
    cases: list[tuple[dict[str, Any], int, str]] = [
        ({"teacher": "mdl_000000000000000000000000"}, 404, "model mdl_000000000000000000000000 not found"),
        ({"teacher": dataset_id}, 422,
         f"teacher must be an uploaded model's id (mdl_...); '{dataset_id}' is a dataset id"),
        ({"teacher": "resnet18"}, 422, "teacher must be an uploaded model's id"),
        ({"dataset": teacher_id}, 422, f"'{teacher_id}' is a model id"),
        ({"dataset": "mnist"}, 422, "a built-in name (digits, photo-patches, shapes)"),
        ({"dataset": "photo-patches"}, 422, "the dataset has 14 classes but the teacher"),
        ({"dataset": "dst_000000000000000000000000"}, 404, "dataset dst_000000000000000000000000 not found"),
        ({"student": {"arch": "resnet1000"}}, 422, "invalid student: arch: unknown architecture 'resnet1000'"),
        ({"student": {"arch": "small_cnn", "kwargs": {"width": 0}}}, 422, "small_cnn width must be"),
        ({"student": {"arch": "resnet18"}}, 422, "torchvision models take 3-channel input"),
        ({"student": {"arch": "small_cnn", "kwargs": {"num_classes": 3}}}, 422,
         f"student.kwargs.num_classes is 3 but the teacher {teacher_id} predicts 10 classes"),
        ({"teacher": five_classes}, 422, "the dataset has 10 classes but the teacher"),
        ({"dataset": rgb_dataset.json()["id"]}, 422, "the dataset has 3-channel images but the model takes 1"),
        ({"teacher": padded, "dataset": large_images.json()["id"]}, 422, "resize policy 'pad' cannot shrink"),
    ]
    for overrides, status, message_part in cases:
        response = submit(client, auth_headers, job_body(teacher_id, **overrides))
        assert response.status_code == status, (overrides, response.text)
        assert message_part in response.json()["detail"], (overrides, response.json())
    assert count_rows(Job, tenant) == 0
    # Another tenant's teacher is as good as missing.
    response = submit(client, other_auth_headers, job_body(teacher_id))
    assert response.status_code == 404


def test_idempotent_submission(client: TestClient, auth_headers: dict[str, str], teacher_id: str,
                               tenant: str) -> None:
    headers = {**auth_headers, "Idempotency-Key": "job-1"}
    first = submit(client, headers, job_body(teacher_id))
    assert first.status_code == 201
    # The same request, with a default spelled out: canonically the same body.
    again = submit(client, headers, job_body(teacher_id, batch_size=64))
    assert again.status_code == 201
    assert again.json()["id"] == first.json()["id"]
    assert again.headers["idempotent-replayed"] == "true"
    different = submit(client, headers, job_body(teacher_id, epochs=3))
    assert different.status_code == 409
    assert "Idempotency-Key 'job-1'" in different.json()["detail"]
    assert submit(client, {**auth_headers, "Idempotency-Key": "job-2"}, job_body(teacher_id)).json()["id"] != \
        first.json()["id"]
    assert count_rows(Job, tenant) == 2


def test_list_newest_first_with_cursor_and_status(client: TestClient, auth_headers: dict[str, str],
                                                  teacher_id: str) -> None:
    ids = [submit(client, auth_headers, job_body(teacher_id, seed=index)).json()["id"] for index in range(5)]
    seen: list[str] = []
    url: str | None = "/v1/jobs?limit=2"
    while url is not None:
        page = client.get(url, headers=auth_headers).json()
        assert len(page["items"]) <= 2
        seen += [item["id"] for item in page["items"]]
        url = page["next"]
    assert seen == ids[::-1]

    cancel = client.post(f"/v1/jobs/{ids[1]}/cancel", headers=auth_headers)
    assert cancel.status_code == 202
    canceled = client.get("/v1/jobs", headers=auth_headers, params={"status": "canceled"}).json()
    assert [item["id"] for item in canceled["items"]] == [ids[1]]
    queued = client.get("/v1/jobs", headers=auth_headers, params={"status": "queued", "limit": 100}).json()
    assert [item["id"] for item in queued["items"]] == [ids[4], ids[3], ids[2], ids[0]]


@pytest.mark.parametrize(
    ("params", "message_part"),
    [({"limit": 0}, "query.limit"), ({"limit": 101}, "query.limit"), ({"status": "done"}, "query.status"),
     ({"cursor": "not-a-cursor"}, "cursor is not valid"),
     # A time in year 1 whose offset puts it before year 1 in UTC (was a 500: OverflowError).
     ({"cursor": "WyIwMDAxLTAxLTAxVDAwOjAwOjAwKzAxOjAwIiwieCJd"}, "cursor is not valid")],
    ids=["limit-0", "limit-101", "status", "cursor", "cursor-out-of-range"],
)
def test_list_rejects_bad_parameters(client: TestClient, auth_headers: dict[str, str], params: dict[str, Any],
                                     message_part: str) -> None:
    response = client.get("/v1/jobs", headers=auth_headers, params=params)
    assert response.status_code == 422
    assert message_part in response.json()["detail"]


def test_cancel_a_queued_job(client: TestClient, auth_headers: dict[str, str], teacher_id: str) -> None:
    job_id = submit(client, auth_headers, job_body(teacher_id)).json()["id"]
    response = client.post(f"/v1/jobs/{job_id}/cancel", headers=auth_headers)
    assert response.status_code == 202, response.text
    job = response.json()
    assert job["status"] == "canceled"
    assert job["finished_at"] is not None
    assert [(event["status"], event["message"]) for event in job["events"]] == [
        ("queued", "submitted"), ("canceled", "canceled before it started")]
    assert job["events"][1]["actor"] == job["events"][0]["actor"]
    again = client.post(f"/v1/jobs/{job_id}/cancel", headers=auth_headers)
    assert again.status_code == 409
    assert "already canceled" in again.json()["detail"]


def test_other_tenant_gets_404_everywhere(client: TestClient, auth_headers: dict[str, str],
                                          other_auth_headers: dict[str, str], teacher_id: str) -> None:
    job_id = submit(client, auth_headers, job_body(teacher_id)).json()["id"]
    for method, path in (("GET", f"/v1/jobs/{job_id}"), ("POST", f"/v1/jobs/{job_id}/cancel"),
                         ("GET", f"/v1/jobs/{job_id}/artifacts")):
        response = client.request(method, path, headers=other_auth_headers)
        assert response.status_code == 404, path
        assert response.json() == {"detail": f"job {job_id} not found"}
    assert client.get("/v1/jobs", headers=other_auth_headers).json()["items"] == []
    assert client.get(f"/v1/jobs/{job_id}", headers=auth_headers).json()["status"] == "queued"


@pytest.mark.parametrize("send_length", [True, False], ids=["content-length", "chunked"])
def test_huge_json_body_is_refused_before_it_is_buffered(client: TestClient, auth_headers: dict[str, str],
                                                         teacher_id: str, send_length: bool) -> None:
    body = json.dumps(job_body(teacher_id, student={"arch": "small_cnn", "kwargs": {"pad": "x" * (2 << 20)}}))
    content = body.encode() if send_length else iter([body[:1000].encode(), body[1000:].encode()])
    response = client.post("/v1/jobs", headers={**auth_headers, "Content-Type": "application/json"},
                           content=content)
    assert response.status_code == 413
    assert "exceeds the limit of 1048576 bytes" in response.json()["detail"]


def test_eval_dataset_must_be_other_images_of_the_same_classes(client: TestClient, auth_headers: dict[str, str],
                                                               teacher_id: str, tenant: str) -> None:
    train_id = upload_dataset(client, auth_headers, npz_dataset(num_classes=10), "train.npz").json()["id"]
    eval_id = upload_dataset(client, auth_headers, npz_dataset(num_classes=10, seed=1), "eval.npz").json()["id"]
    same_images = upload_dataset(client, auth_headers, npz_dataset(num_classes=10), "again.npz").json()["id"]
    five = upload_dataset(client, auth_headers, npz_dataset(num_classes=5, per_class=8), "five.npz").json()["id"]
    rgb = upload_dataset(client, auth_headers, npz_dataset(num_classes=10, shape=(8, 8, 3), seed=2), "rgb.npz")
    cases: list[tuple[dict[str, Any], int, str]] = [
        ({"eval_dataset": train_id}, 422, "holds the same images as dataset"),
        ({"eval_dataset": same_images}, 422, "holds the same images as dataset"),
        ({"eval_dataset": "digits", "dataset": "digits"}, 422, "holds the same images as dataset"),
        ({"eval_dataset": five}, 422, "an evaluation set needs the same classes in the same order"),
        ({"eval_dataset": rgb.json()["id"]}, 422, "eval_dataset: the dataset has 3-channel images"),
        ({"eval_dataset": teacher_id}, 422, f"eval_dataset must be an uploaded dataset's id (dst_...) or a built-in "
                                            f"name (digits, photo-patches, shapes); '{teacher_id}' is a model id"),
        ({"eval_dataset": "dst_000000000000000000000000"}, 404, "dataset dst_000000000000000000000000 not found"),
    ]
    for overrides, status, message_part in cases:
        response = submit(client, auth_headers, job_body(teacher_id, **{"dataset": train_id, **overrides}))
        assert response.status_code == status, (overrides, response.text)
        assert message_part in response.json()["detail"], (overrides, response.json())
    assert count_rows(Job, tenant) == 0

    response = submit(client, auth_headers, job_body(teacher_id, dataset=train_id, eval_dataset=eval_id))
    assert response.status_code == 201, response.text
    assert response.json()["spec"]["eval_dataset"] == eval_id
    # A built-in evaluates an upload of the same classes, and the gate is stored with its kind's default.
    built_in = submit(client, auth_headers, job_body(teacher_id, dataset=train_id, eval_dataset="digits")).json()
    assert built_in["spec"]["eval_dataset"] == "digits" and built_in["spec"]["max_accuracy_drop_pts"] is None


def test_a_polled_job_shows_every_change_and_a_revoked_key_reads_nothing(
        client: TestClient, make_api_key: Callable[[str], str], tenant: str, teacher_id: str) -> None:
    # The process keeps the latest events of the jobs it serves: what changed between two reads must show.
    key = make_api_key(tenant)
    job_id = submit(client, bearer(key), job_body(teacher_id)).json()["id"]
    first = client.get(f"/v1/jobs/{job_id}", headers=bearer(key)).json()
    assert [event["message"] for event in first["events"]] == ["submitted"]
    with session_scope() as session:
        job = session.get(Job, job_id)
        assert job is not None
        job.progress = {"stage": "training", "epoch": 1}
        for epoch in range(EVENTS_SHOWN + 1):
            lifecycle.record_event(session, job, "progress", "worker", f"epoch {epoch} done", {"epoch": epoch})
    later = client.get(f"/v1/jobs/{job_id}", headers=bearer(key)).json()
    assert later["progress"]["epoch"] == 1
    assert [event["message"] for event in later["events"]] == [f"epoch {n} done" for n in range(1, EVENTS_SHOWN + 1)]
    with session_scope() as session:
        revoke_key(session, tenant, key.split("_")[1])
    revoked = client.get(f"/v1/jobs/{job_id}", headers=bearer(key))
    assert revoked.status_code == 401 and "revoked" in revoked.json()["detail"]
