"""POST /v1/jobs/{id}/replay: a new job with the original's stored spec on the same inputs, checked as a
submission is; refused while the original runs, or when an input was deleted, changed or lost its file. On the
real databases and the real blob store."""

from __future__ import annotations

import secrets
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from core.db.models import Dataset, Job, Model, utcnow
from core.db.session import session_scope
from tests.conftest import AppEnv

STUDENT = {"arch": "small_cnn", "kwargs": {"width": 2, "depth": 1}}


def ended_job(client: TestClient, headers: dict[str, str], body: dict[str, Any], status: str = "succeeded") -> str:
    """A job submitted through the API, then ended as a worker would end it."""
    response = client.post("/v1/jobs", headers=headers, json=body)
    assert response.status_code == 201, response.text
    with session_scope() as session:
        job = session.get(Job, response.json()["id"])
        job.status, job.finished_at = status, utcnow()
        return job.id


def replay(client: TestClient, headers: dict[str, str], job_id: str, **extra: str) -> httpx.Response:
    return client.post(f"/v1/jobs/{job_id}/replay", headers={**headers, **extra})


@pytest.fixture
def inputs(app_env: AppEnv, insert_model: Callable[..., str], insert_dataset: Callable[..., str],
           tenant: str) -> dict[str, str]:
    """A teacher, a training dataset and an evaluation dataset of the test's tenant, each with its file stored (its
    own content, so that a test may remove it)."""
    blobs = [app_env.store.put_bytes(secrets.token_bytes(64)) for _ in range(3)]
    return {"teacher": insert_model(tenant, sha256=blobs[0].sha256, bytes=blobs[0].bytes),
            **{role: insert_dataset(tenant, canonical_sha256=blob.sha256, canonical_bytes=blob.bytes)
               for role, blob in (("dataset", blobs[1]), ("eval_dataset", blobs[2]))}}


def distill_body(inputs: dict[str, str]) -> dict[str, Any]:
    return {"kind": "distill", **inputs, "student": STUDENT, "epochs": 1, "lr": 0.02, "seed": 3}


def test_a_replay_runs_the_stored_spec_on_the_same_inputs(client: TestClient, auth_headers: dict[str, str],
                                                          other_auth_headers: dict[str, str],
                                                          inputs: dict[str, str]) -> None:
    original_id = ended_job(client, auth_headers, distill_body(inputs), status="failed")
    original = client.get(f"/v1/jobs/{original_id}", headers=auth_headers).json()

    response = replay(client, auth_headers, original_id)
    assert response.status_code == 201, response.text
    job = response.json()
    assert job["id"] != original_id and (job["status"], job["replay_of"]) == ("queued", original_id)
    assert job["spec"] == original["spec"] and job["kind"] == "distill"
    assert (job["model"], job["dataset"], job["spec"]["eval_dataset"]) == (inputs["teacher"], inputs["dataset"],
                                                                          inputs["eval_dataset"])
    assert job["events"][0]["message"] == f"submitted: replay of job {original_id}"
    assert client.get(f"/v1/jobs/{job['id']}", headers=auth_headers).json()["replay_of"] == original_id
    assert original["replay_of"] is None and (original["pipeline_id"], original["stage"]) == (None, None)
    with session_scope() as session:
        assert session.get(Job, job["id"]).inputs == session.get(Job, original_id).inputs

    # Another tenant's job is a 404, as everywhere.
    assert replay(client, other_auth_headers, original_id).status_code == 404


def test_a_replay_is_idempotent_with_a_key(client: TestClient, auth_headers: dict[str, str],
                                           inputs: dict[str, str]) -> None:
    original_id = ended_job(client, auth_headers, distill_body(inputs))
    first = replay(client, auth_headers, original_id, **{"Idempotency-Key": "replay-once"})
    again = replay(client, auth_headers, original_id, **{"Idempotency-Key": "replay-once"})
    assert first.status_code == again.status_code == 201
    assert again.json()["id"] == first.json()["id"] and again.headers["Idempotent-Replayed"] == "true"
    assert "Idempotent-Replayed" not in first.headers

    # The same key for another job's replay is a client bug, not a replay.
    other_id = ended_job(client, auth_headers, distill_body(inputs))
    reused = replay(client, auth_headers, other_id, **{"Idempotency-Key": "replay-once"})
    assert reused.status_code == 409 and "already used for a different request" in reused.json()["detail"]


def test_an_unfinished_job_is_not_replayed(client: TestClient, auth_headers: dict[str, str],
                                           inputs: dict[str, str]) -> None:
    queued = client.post("/v1/jobs", headers=auth_headers, json=distill_body(inputs)).json()["id"]
    response = replay(client, auth_headers, queued)
    assert response.status_code == 409
    assert response.json()["detail"] == f"job {queued} is queued: wait for it to end, or cancel it, then replay it"


def test_a_spec_this_version_no_longer_takes_is_not_replayed(client: TestClient, auth_headers: dict[str, str],
                                                             inputs: dict[str, str]) -> None:
    original_id = ended_job(client, auth_headers, distill_body(inputs))
    with session_scope() as session:
        job = session.get(Job, original_id)
        job.spec = {**job.spec, "distill": {**job.spec["distill"], "retired_setting": 1}}
    response = replay(client, auth_headers, original_id)
    assert response.status_code == 409
    assert response.json()["detail"].startswith(f"job {original_id}'s stored spec is not valid for this version")
    assert "distill.retired_setting: unknown field" in response.json()["detail"]


def test_a_replay_goes_through_the_submission_checks(client: TestClient, app_env: AppEnv,
                                                     auth_headers: dict[str, str], inputs: dict[str, str],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    original_id = ended_job(client, auth_headers, distill_body(inputs))
    client.post("/v1/jobs", headers=auth_headers, json=distill_body(inputs))  # one job still queued
    monkeypatch.setattr(app_env.settings, "max_active_jobs_per_tenant", 1)
    response = replay(client, auth_headers, original_id)
    assert response.status_code == 429 and "unfinished jobs" in response.json()["detail"]


def _delete(client: TestClient, headers: dict[str, str], role: str, row_id: str) -> None:
    resource = "models" if role == "teacher" else "datasets"
    assert client.delete(f"/v1/{resource}/{row_id}", headers=headers).status_code == 204


def _change(row_id: str) -> None:
    """Stands for a store edited behind the service's back: the row's content address is not what a job read."""
    with session_scope() as session:
        if row_id.startswith("mdl_"):
            session.get(Model, row_id).sha256 = "e" * 64
        else:
            session.get(Dataset, row_id).canonical_sha256 = "e" * 64


def _lose_file(app_env: AppEnv, row_id: str) -> None:
    with session_scope() as session:
        row = session.get(Model, row_id) if row_id.startswith("mdl_") else session.get(Dataset, row_id)
        sha256 = row.sha256 if isinstance(row, Model) else row.canonical_sha256
    app_env.store.path_for(sha256).unlink()


@pytest.mark.parametrize(("role", "recorded_as"), [("teacher", "model"), ("dataset", "dataset"),
                                                   ("eval_dataset", "eval_dataset")])
@pytest.mark.parametrize("what", ["deleted", "changed", "lost"])
def test_a_replay_is_refused_when_an_input_is_not_what_the_original_read(
        client: TestClient, app_env: AppEnv, auth_headers: dict[str, str], inputs: dict[str, str], role: str,
        recorded_as: str, what: str) -> None:
    original_id = ended_job(client, auth_headers, distill_body(inputs))
    row_id = inputs[role]
    if what == "deleted":
        _delete(client, auth_headers, role, row_id)
    elif what == "changed":
        _change(row_id)
    else:
        _lose_file(app_env, row_id)

    response = replay(client, auth_headers, original_id)
    assert response.status_code == 409, response.text
    detail = response.json()["detail"]
    assert detail.startswith(f"cannot replay job {original_id}: its {recorded_as} {row_id} ")
    assert {"deleted": "was deleted on ", "changed": "is not what it was: it was read with sha256 ",
            "lost": "has lost its stored file"}[what] in detail
    assert "a replay reads exactly the inputs its original read" in detail


def test_a_job_from_before_inputs_were_recorded_replays_on_its_ids(client: TestClient, app_env: AppEnv,
                                                                   auth_headers: dict[str, str],
                                                                   inputs: dict[str, str]) -> None:
    original_id = ended_job(client, auth_headers, distill_body(inputs))
    other_weights = app_env.store.put_bytes(secrets.token_bytes(64))
    with session_scope() as session:
        session.get(Job, original_id).inputs = None
        # Without a recorded hash, other content under the same id cannot be told apart.
        session.get(Model, inputs["teacher"]).sha256 = other_weights.sha256
    response = replay(client, auth_headers, original_id)
    assert response.status_code == 201, response.text
    with session_scope() as session:  # the replay records what it reads
        assert session.get(Job, response.json()["id"]).inputs["model"] == {"id": inputs["teacher"],
                                                                            "sha256": other_weights.sha256}

    # Its ids are still checked: a deleted input is refused (once the queued replay that uses it is canceled).
    assert client.post(f"/v1/jobs/{response.json()['id']}/cancel", headers=auth_headers).status_code == 202
    _delete(client, auth_headers, "eval_dataset", inputs["eval_dataset"])
    response = replay(client, auth_headers, original_id)
    assert response.status_code == 409 and f"eval_dataset {inputs['eval_dataset']} was deleted" in \
        response.json()["detail"]
