"""POST/GET /v1/pipelines and cancel: every stage checked before anything is stored, the first stages queued as
ordinary jobs, later stages waiting, canceling drops what has not started. (The stages' running, gates and
fan-out on real workers: tests/e2e/test_pipelines_e2e.py; the state machine alone: tests/worker.)"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from core import lifecycle
from core.db.models import Job, Model, Pipeline
from core.db.session import session_scope
from tests.api.helpers import count_rows
from tests.conftest import AppEnv

STUDENT = {"arch": "small_cnn", "kwargs": {"width": 2, "depth": 1}}


@pytest.fixture
def model_id(insert_model: Callable[..., str], tenant: str) -> str:
    return insert_model(tenant)


def chain(model_id: str, *stages: dict[str, Any], **fields: Any) -> dict[str, Any]:
    return {"model": model_id, "dataset": "digits",
            "stages": list(stages) or [{"kind": "distill", "student": STUDENT, "epochs": 1},
                                       {"kind": "prune", "channel_ratio": 0.5, "epochs": 1},
                                       {"kind": "quantize", "method": "static"},
                                       {"kind": "quantize", "method": "dynamic", "after": "prune"}],
            **fields}


def submit(client: TestClient, headers: dict[str, str], body: dict[str, Any]) -> httpx.Response:
    return client.post("/v1/pipelines", headers=headers, json=body)


def test_submit_stores_every_stage_and_queues_the_first(client: TestClient, auth_headers: dict[str, str],
                                                         model_id: str) -> None:
    response = submit(client, auth_headers, chain(model_id, seed=5))
    assert response.status_code == 201, response.text
    pipeline = response.json()
    assert pipeline["id"].startswith("pip_") and pipeline["status"] == "queued"
    assert pipeline["name"] == "distill -> prune -> quantize -> quantize-2"
    stages = pipeline["stages"]
    assert [(s["name"], s["after"], s["status"]) for s in stages] == [
        ("distill", "input", "queued"), ("prune", "distill", "waiting"), ("quantize", "prune", "waiting"),
        ("quantize-2", "prune", "waiting")]
    assert pipeline["current_stages"] == ["distill"]
    job = client.get(f"/v1/jobs/{stages[0]['job_id']}", headers=auth_headers).json()
    assert (job["pipeline_id"], job["stage"], job["teacher"], job["spec"]["seed"]) == (
        pipeline["id"], "distill", model_id, 5)
    # Every stage's job spec is stored with its defaults, as POST /v1/jobs would store it.
    stored = pipeline["spec"]["stages"]
    prune = stored[1]["job"]["prune"]
    assert prune["channel_ratio"] == 0.5 and prune["recovery"]["training"]["epochs"] == 1
    assert stored[2]["job"]["quantize"]["calibration_samples"] == 256
    assert stored[0]["job"]["student"]["kwargs"]["num_classes"] == 10


@pytest.mark.parametrize(("stages", "message"), [
    ([{"kind": "prune", "channel_ratio": 0.5, "dataset": "digits"}],
     "stages[0] ('prune'): dataset cannot be set per stage"),
    ([{"kind": "prune", "channel_ratio": 0.5}, {"kind": "quantize", "after": "distill"}],
     "stages[1].after: 'distill' is not a stage listed before this one (prune)"),
    ([{"kind": "quantize"}, {"kind": "prune", "channel_ratio": 0.5}],
     "stages[1] ('prune'): model stage:quantize is an int8 model"),
    ([{"kind": "prune"}], "invalid stages[0] ('prune'): prune: structured pruning needs exactly one of"),
    ([{"kind": "prune", "channel_ratio": 0.5, "name": "same"}, {"kind": "quantize", "name": "same"}],
     "stages[1].name: 'same' is taken"),
    ([{"kind": "distill", "student": {"arch": "small_cnn", "kwargs": {"num_classes": 3}}}],
     "stages[0] ('distill'): student.kwargs.num_classes is 3"),
])
def test_a_bad_stage_is_a_422_naming_it_and_stores_nothing(client: TestClient, auth_headers: dict[str, str],
                                                           tenant: str, model_id: str, stages: list[dict[str, Any]],
                                                           message: str) -> None:
    response = submit(client, auth_headers, chain(model_id, *stages))
    assert response.status_code == 422, response.text
    assert message in response.json()["detail"]
    assert (count_rows(Pipeline, tenant), count_rows(Job, tenant)) == (0, 0)


def test_missing_input_model_and_another_tenants_model(client: TestClient, auth_headers: dict[str, str],
                                                       other_auth_headers: dict[str, str], model_id: str) -> None:
    response = submit(client, auth_headers, {"dataset": "digits", "stages": [{"kind": "quantize"}]})
    assert response.status_code == 422 and "model is required" in response.json()["detail"]
    assert submit(client, other_auth_headers, chain(model_id)).status_code == 404


def test_cancel_drops_the_stages_not_started(client: TestClient, auth_headers: dict[str, str],
                                             other_auth_headers: dict[str, str], model_id: str) -> None:
    pipeline = submit(client, auth_headers, chain(model_id)).json()
    assert client.post(f"/v1/pipelines/{pipeline['id']}/cancel", headers=other_auth_headers).status_code == 404
    response = client.post(f"/v1/pipelines/{pipeline['id']}/cancel", headers=auth_headers)
    assert response.status_code == 202, response.text
    canceled = response.json()
    assert canceled["status"] == "canceled" and canceled["current_stages"] == []
    assert [stage["status"] for stage in canceled["stages"]] == ["canceled", "skipped", "skipped", "skipped"]
    assert client.get(f"/v1/jobs/{canceled['stages'][0]['job_id']}", headers=auth_headers).json()["status"] == \
        "canceled"
    again = client.post(f"/v1/pipelines/{pipeline['id']}/cancel", headers=auth_headers)
    assert again.status_code == 409 and "already canceled" in again.json()["detail"]


def test_list_get_and_report_of_an_unfinished_pipeline(client: TestClient, auth_headers: dict[str, str],
                                                       other_auth_headers: dict[str, str], model_id: str) -> None:
    pipeline = submit(client, auth_headers, chain(model_id, name="mine")).json()
    listed = client.get("/v1/pipelines?status=queued", headers=auth_headers).json()
    assert pipeline["id"] in [item["id"] for item in listed["items"]]
    assert client.get(f"/v1/pipelines/{pipeline['id']}", headers=other_auth_headers).status_code == 404
    report = client.get(f"/v1/pipelines/{pipeline['id']}/report", headers=auth_headers).json()
    # Nothing measured yet: the input's row alone, its figures unknown.
    assert [row["stage"] for row in report["rows"]] == ["input"] and report["rows"][0]["accuracy"] is None
    assert report["final_model_lineage"] == []


def test_idempotent_submission_creates_one_pipeline(client: TestClient, auth_headers: dict[str, str],
                                                    model_id: str) -> None:
    headers = {**auth_headers, "Idempotency-Key": "pipeline-once"}
    first, second = (submit(client, headers, chain(model_id)) for _ in range(2))
    assert first.status_code == 201 and second.status_code == 201
    assert first.json()["id"] == second.json()["id"]


def claim_stage(job_id: str) -> None:
    with session_scope() as session:
        assert lifecycle.claim(session, job_id, "worker-under-test", 60) is not None


def end_stage(job_id: str, status: str, accuracy: float = 0.9, reference: float = 0.95) -> None:
    """What the runner does when a stage's job ends: a succeeded job registers its model, then finishes."""
    acceptance = {"reference_accuracy": reference,
                  "formats": {"safetensors": {"accuracy": accuracy, "passed": True}}}
    with session_scope() as session:
        job = session.get(Job, job_id)
        if status == "succeeded":
            session.add(Model(tenant=job.tenant, name="result", format="safetensors", sha256="1" * 64, bytes=1,
                              arch=job.spec.get("student") or {"arch": "small_cnn", "kwargs": {"num_classes": 10}},
                              input_spec={"image_size": 8, "channels": 1}, num_classes=10, param_count=1,
                              source_job_id=job.id))
        assert lifecycle.finish(session, job_id, "worker-under-test", status, status,
                                metrics={"acceptance": acceptance})


def stage_statuses(client: TestClient, headers: dict[str, str], pipeline_id: str) -> dict[str, str]:
    pipeline = client.get(f"/v1/pipelines/{pipeline_id}", headers=headers).json()
    return {"pipeline": pipeline["status"], **{stage["name"]: stage["status"] for stage in pipeline["stages"]}}


def test_a_succeeded_stage_starts_every_stage_after_it(client: TestClient, auth_headers: dict[str, str],
                                                       model_id: str) -> None:
    pipeline = submit(client, auth_headers, chain(model_id)).json()
    first = pipeline["stages"][0]["job_id"]
    claim_stage(first)
    assert stage_statuses(client, auth_headers, pipeline["id"])["pipeline"] == "running"
    end_stage(first, "succeeded")
    prune = client.get(f"/v1/pipelines/{pipeline['id']}", headers=auth_headers).json()["stages"][1]
    assert prune["status"] == "queued"
    claim_stage(prune["job_id"])
    end_stage(prune["job_id"], "succeeded")
    # Both quantizations take the pruned model, at once.
    statuses = stage_statuses(client, auth_headers, pipeline["id"])
    assert (statuses["quantize"], statuses["quantize-2"]) == ("queued", "queued")
    ended = client.get(f"/v1/pipelines/{pipeline['id']}", headers=auth_headers).json()
    for stage in ended["stages"][2:]:
        claim_stage(stage["job_id"])
        end_stage(stage["job_id"], "succeeded")
    done = client.get(f"/v1/pipelines/{pipeline['id']}", headers=auth_headers).json()
    assert done["status"] == "succeeded" and done["final_model"] == done["stages"][-1]["model_id"]
    assert done["input_accuracy"] == 0.95


def test_a_missed_gate_fails_the_pipeline_and_skips_the_rest(client: TestClient, auth_headers: dict[str, str],
                                                             model_id: str) -> None:
    stages = [{"kind": "prune", "channel_ratio": 0.5, "gate": {"max_accuracy_drop_pts": 1}},
              {"kind": "quantize"}]
    pipeline = submit(client, auth_headers, chain(model_id, *stages)).json()
    first = pipeline["stages"][0]["job_id"]
    claim_stage(first)
    end_stage(first, "succeeded", accuracy=0.90, reference=0.95)
    failed = client.get(f"/v1/pipelines/{pipeline['id']}", headers=auth_headers).json()
    assert failed["status"] == "failed"
    assert "stage 'prune' missed its gate: its safetensors file scores 90.00%, 5.00 points below the pipeline's " \
           "input model (95.00%); the gate allows 1" in failed["error"]
    assert [stage["status"] for stage in failed["stages"]] == ["succeeded", "skipped"]
    assert failed["stages"][0]["model_id"] is not None


def test_cancel_while_a_stage_runs_waits_for_it_to_stop(client: TestClient, auth_headers: dict[str, str],
                                                        model_id: str) -> None:
    pipeline = submit(client, auth_headers, chain(model_id)).json()
    first = pipeline["stages"][0]["job_id"]
    claim_stage(first)
    canceling = client.post(f"/v1/pipelines/{pipeline['id']}/cancel", headers=auth_headers).json()
    assert canceling["status"] == "canceling" and canceling["stages"][0]["status"] == "canceling"
    end_stage(first, "canceled")
    assert stage_statuses(client, auth_headers, pipeline["id"]) == {
        "pipeline": "canceled", "distill": "canceled", "prune": "skipped", "quantize": "skipped",
        "quantize-2": "skipped"}


def test_a_failed_stage_fails_the_pipeline_with_its_reason(client: TestClient, auth_headers: dict[str, str],
                                                           model_id: str) -> None:
    pipeline = submit(client, auth_headers, chain(model_id)).json()
    first = pipeline["stages"][0]["job_id"]
    claim_stage(first)
    with session_scope() as session:
        lifecycle.finish(session, first, "worker-under-test", "failed", "failed: out of ideas", error="out of ideas")
    failed = client.get(f"/v1/pipelines/{pipeline['id']}", headers=auth_headers).json()
    assert failed["status"] == "failed" and failed["error"] == "stage 'distill' failed: out of ideas"


@pytest.fixture
def stored_model_id(insert_model: Callable[..., str], tenant: str, app_env: AppEnv) -> str:
    """A model whose file is in the store (a replay checks that its inputs' files are still there)."""
    blob = app_env.store.put_bytes(b"weights of " + tenant.encode())
    return insert_model(tenant, sha256=blob.sha256, bytes=blob.bytes)


def test_replay_runs_the_stored_stages_on_the_same_inputs(client: TestClient, auth_headers: dict[str, str],
                                                          stored_model_id: str) -> None:
    model_id = stored_model_id
    original = submit(client, auth_headers, chain(model_id, name="to replay")).json()
    early = client.post(f"/v1/pipelines/{original['id']}/replay", headers=auth_headers)
    assert early.status_code == 409 and "wait for it to end, or cancel it" in early.json()["detail"]
    client.post(f"/v1/pipelines/{original['id']}/cancel", headers=auth_headers)
    response = client.post(f"/v1/pipelines/{original['id']}/replay", headers=auth_headers)
    assert response.status_code == 201, response.text
    replayed = response.json()
    assert replayed["replay_of"] == original["id"] and replayed["status"] == "queued"
    assert replayed["name"] == "to replay"
    assert [stage["job"] for stage in replayed["spec"]["stages"]] == \
        [stage["job"] for stage in original["spec"]["stages"]]
    report = client.get(f"/v1/pipelines/{replayed['id']}/report", headers=auth_headers).json()
    assert report["original_rows"] is not None and report["original_rows"][0]["model"] == model_id
    markdown = client.get(f"/v1/pipelines/{replayed['id']}/report",
                          headers={**auth_headers, "Accept": "text/markdown"}).text
    assert f"The original, pipeline {original['id']}:" in markdown


def test_replay_refuses_a_deleted_input(client: TestClient, auth_headers: dict[str, str],
                                        stored_model_id: str) -> None:
    model_id = stored_model_id
    original = submit(client, auth_headers, chain(model_id)).json()
    client.post(f"/v1/pipelines/{original['id']}/cancel", headers=auth_headers)
    assert client.delete(f"/v1/models/{model_id}", headers=auth_headers).status_code == 204
    response = client.post(f"/v1/pipelines/{original['id']}/replay", headers=auth_headers)
    assert response.status_code == 409, response.text
    assert f"cannot replay pipeline {original['id']}: its model {model_id} was deleted on" in \
        response.json()["detail"]
