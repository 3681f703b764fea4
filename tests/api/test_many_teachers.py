"""POST /v1/jobs with several teachers: an ensemble (`teachers`) and a multi-task distillation (`tasks`). Every
teacher and every task's data is checked before anything is stored, recorded with its hash, checked again on
replay, and kept from deletion while the job may still read it. On the real databases, without a worker."""

from __future__ import annotations

import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from app.client_cli.common import load_document
from app.jobs.schemas import JobCreate
from app.jobs.service import check_job
from core.db.models import Job, Model, utcnow
from core.db.session import session_scope
from tests.api.helpers import count_rows
from tests.conftest import SMALL_CNN_SPEC, AppEnv

STUDENT = {"arch": "small_cnn", "kwargs": {"width": 2, "depth": 1}}
RGB_16 = {"image_size": 16, "channels": 3}
# A second task: 5 classes of 16x16 colour images, which a one-channel student cannot read.
FIVE_CLASSES = {"num_classes": 5, "class_names": list("abcde"), "class_counts": [4] * 5, "image_shape": [16, 16, 3]}
TEACHER_INPUT = {"image_size": 8, "channels": 1, "mean": [0.5], "std": [0.5], "resize": "resize"}


@pytest.fixture
def stored_model(app_env: AppEnv, insert_model: Callable[..., str], tenant: str) -> Callable[..., str]:
    """stored_model(**fields) -> a model of the tenant's whose file is in the blob store (as a replay needs)."""

    def insert(**fields: Any) -> str:
        blob = app_env.store.put_bytes(secrets.token_bytes(64))
        return insert_model(tenant, sha256=blob.sha256, bytes=blob.bytes, **fields)

    return insert


@pytest.fixture
def stored_dataset(app_env: AppEnv, insert_dataset: Callable[..., str], tenant: str) -> Callable[..., str]:
    def insert(**fields: Any) -> str:
        blob = app_env.store.put_bytes(secrets.token_bytes(64))
        return insert_dataset(tenant, canonical_sha256=blob.sha256, canonical_bytes=blob.bytes, **fields)

    return insert


def five_class_teacher(insert: Callable[..., str]) -> str:
    return insert(spec={"arch": "small_cnn", "kwargs": {"num_classes": 5, "width": 4}, "input": RGB_16})


def ensemble_body(*teachers: str, **overrides: Any) -> dict[str, Any]:
    return {"kind": "distill", "teachers": [{"model": teacher} for teacher in teachers], "dataset": "digits",
            "student": STUDENT, "epochs": 1, **overrides}


def two_task_body(digits_teachers: list[str], letters_teacher: str, letters_dataset: str,
                  **overrides: Any) -> dict[str, Any]:
    return {"kind": "distill", "tasks": [
        {"name": "digits", "dataset": "digits", "teachers": [{"model": teacher} for teacher in digits_teachers]},
        {"name": "letters", "dataset": letters_dataset, "teachers": [{"model": letters_teacher}],
         "max_accuracy_drop_pts": 5}],
        "student": {**STUDENT, "input": RGB_16}, "epochs": 1, **overrides}


def submit(client: TestClient, headers: dict[str, str], body: dict[str, Any]) -> httpx.Response:
    return client.post("/v1/jobs", headers=headers, json=body)


def row_inputs(job_id: str) -> dict[str, Any]:
    with session_scope() as session:
        return session.get_one(Job, job_id).inputs


def sha256_of(model_id: str) -> str:
    with session_scope() as session:
        return session.get_one(Model, model_id).sha256


def test_an_ensemble_is_stored_with_every_teacher(client: TestClient, auth_headers: dict[str, str],
                                                  stored_model: Callable[..., str]) -> None:
    first = stored_model()
    # Another architecture and input spec: digits (8x8 grayscale) are brought to it as to the student.
    second = stored_model(spec={"arch": "small_cnn", "kwargs": {"num_classes": 10, "width": 8}, "input": RGB_16})
    body = ensemble_body(first, second, loss="dkd", teacher_weighting="confidence")
    body["teachers"][0]["weight"] = 2

    response = submit(client, auth_headers, body)
    assert response.status_code == 201, response.text
    job = response.json()
    assert (job["teacher"], job["dataset"]) == (first, "digits")
    spec = job["spec"]
    assert spec["teachers"] == [{"model": first, "weight": 2.0}, {"model": second, "weight": 1.0}]
    assert spec["teacher"] == first and spec["tasks"] is None
    assert (spec["distill"]["loss"], spec["distill"]["teacher_weighting"]) == ("dkd", "confidence")
    # The student predicts the teachers' classes and, unless told otherwise, sees what the first teacher sees.
    assert spec["student"] == {**STUDENT, "kwargs": {**STUDENT["kwargs"], "num_classes": 10},
                               "input": TEACHER_INPUT}
    inputs = row_inputs(job["id"])
    assert inputs["teachers"] == [{"id": first, "sha256": sha256_of(first)},
                                  {"id": second, "sha256": sha256_of(second)}]
    assert inputs["model"] == inputs["teachers"][0] and inputs["dataset"] == {"builtin": "digits"}


def test_every_teacher_counts_in_the_memory_budget(app_env: AppEnv, tenant: str,
                                                   stored_model: Callable[..., str]) -> None:
    first, second = stored_model(), stored_model()
    body = JobCreate.model_validate(ensemble_body(first, second, control=True))
    with session_scope() as session:
        checked = check_job(session, tenant, body, session.get_one(Model, first))
    assert [(use.role, use.trains) for use in checked.uses] == [
        (f"teacher {first}", False), (f"teacher {second}", False), ("student", True)]
    assert checked.uses[2].arch.num_classes == 10


def test_a_two_task_job_is_stored_with_its_tasks(client: TestClient, auth_headers: dict[str, str],
                                                 stored_model: Callable[..., str],
                                                 stored_dataset: Callable[..., str]) -> None:
    digits_teachers = [stored_model(), stored_model()]
    letters_teacher = five_class_teacher(stored_model)
    letters, letters_eval = stored_dataset(**FIVE_CLASSES), stored_dataset(**FIVE_CLASSES)
    body = two_task_body(digits_teachers, letters_teacher, letters, cross_task_soft_targets=True)
    body["tasks"][1]["eval_dataset"] = letters_eval

    response = submit(client, auth_headers, body)
    assert response.status_code == 201, response.text
    job = response.json()
    spec = job["spec"]
    # The job's teacher and dataset are the first task's first teacher and dataset.
    assert (job["teacher"], job["dataset"], spec["teacher"], spec["dataset"]) == (
        digits_teachers[0], "digits", digits_teachers[0], "digits")
    assert [task["name"] for task in spec["tasks"]] == ["digits", "letters"]
    assert spec["tasks"][1] == {"name": "letters", "dataset": letters, "eval_dataset": letters_eval,
                                "teachers": [{"model": letters_teacher, "weight": 1.0}],
                                "max_accuracy_drop_pts": 5.0}
    assert spec["cross_task_soft_targets"] is True
    # One head per task, of its task's classes (10 and 5): the student spec names no single num_classes.
    assert spec["student"] == {**STUDENT, "input": {**RGB_16, "mean": [0.5], "std": [0.5], "resize": "resize"}}
    inputs = row_inputs(job["id"])
    assert [teacher["id"] for teacher in inputs["teachers"]] == [*digits_teachers, letters_teacher]
    assert inputs["tasks"]["digits"] == {"dataset": {"builtin": "digits"}}
    assert inputs["tasks"]["letters"]["dataset"]["id"] == letters
    assert inputs["tasks"]["letters"]["eval_dataset"]["id"] == letters_eval


def test_a_job_file_with_tasks_is_submitted_as_it_is(client: TestClient, auth_headers: dict[str, str],
                                                     stored_model: Callable[..., str],
                                                     stored_dataset: Callable[..., str], tmp_path: Path) -> None:
    """What `condenser jobs submit job.yaml` sends: the YAML document as the body."""
    digits_teacher, letters_teacher = stored_model(), five_class_teacher(stored_model)
    letters = stored_dataset(**FIVE_CLASSES)
    path = tmp_path / "two-tasks.yaml"
    path.write_text(f"""\
kind: distill
tasks:
  - name: digits
    dataset: digits
    teachers: [{{model: {digits_teacher}}}]
  - name: letters
    dataset: {letters}
    teachers: [{{model: {letters_teacher}, weight: 1.0}}]
student: {{arch: small_cnn, kwargs: {{width: 2, depth: 1}}, input: {{image_size: 16, channels: 3}}}}
epochs: 1
""")
    response = submit(client, auth_headers, load_document(str(path)))
    assert response.status_code == 201, response.text
    assert [task["dataset"] for task in response.json()["spec"]["tasks"]] == ["digits", letters]


INVALID_CASES = [
    ("teacher-and-teachers", lambda ids: ensemble_body(ids["a"], ids["b"], teacher=ids["b"]),
     "give `teacher` or `teachers`, not both"),
    ("teachers-and-tasks", lambda ids: {**ids["tasks"], "teachers": [{"model": ids["a"]}]},
     "give `teachers` (one task, several teachers) or `tasks` (several tasks), not both"),
    ("teachers-of-other-classes", lambda ids: ensemble_body(ids["a"], ids["five"]),
     "teachers[1].model: the teacher {five} predicts 5 classes but teachers[0].model {a} predicts 10"),
    ("teacher-named-twice", lambda ids: ensemble_body(ids["a"], ids["a"]), "teachers[1].model: {a} is named twice"),
    ("int8-teacher", lambda ids: ensemble_body(ids["a"], ids["int8"]),
     "teachers[1].model {int8} is an int8 model"),
    ("not-a-model-id", lambda ids: ensemble_body(ids["a"], "digits"),
     "teachers[1].model must be an uploaded model's id (mdl_...)"),
    ("first-not-a-model-id", lambda ids: {**ids["tasks"], "tasks": [
        {**ids["tasks"]["tasks"][0], "teachers": [{"model": ids["letters"]}]}, ids["tasks"]["tasks"][1]]},
     "tasks[0].teachers[0].model must be an uploaded model's id (mdl_...); '{letters}' is a dataset id"),
    ("task-dataset-of-other-classes", lambda ids: {**ids["tasks"], "tasks": [
        ids["tasks"]["tasks"][0], {**ids["tasks"]["tasks"][1], "dataset": "digits"}]},
     "tasks[1] ('letters'): the dataset has 10 classes but the teacher {five} predicts 5"),
    ("task-teachers-of-other-classes", lambda ids: {**ids["tasks"], "tasks": [
        {**ids["tasks"]["tasks"][0], "teachers": [{"model": ids["a"]}, {"model": ids["five"]}]},
        ids["tasks"]["tasks"][1]]},
     "tasks[0].teachers[1].model: the teacher {five} predicts 5 classes but tasks[0].teachers[0].model {a} "
     "predicts 10"),
    ("duplicate-task-names", lambda ids: {**ids["tasks"], "tasks": [
        ids["tasks"]["tasks"][0], {**ids["tasks"]["tasks"][1], "name": "digits"}]},
     "task names must differ"),
    ("bad-task-name", lambda ids: {**ids["tasks"], "tasks": [
        ids["tasks"]["tasks"][0], {**ids["tasks"]["tasks"][1], "name": "Letters!"}]},
     "tasks.1.name"),
    ("student-cannot-read-a-task", lambda ids: {**ids["tasks"], "student": STUDENT},
     "tasks[1] ('letters'): the dataset has 3-channel images but the model takes 1 channels; only grayscale to "
     "RGB is converted (by repeating the channel) (student.input)"),
    ("feature-loss-with-tasks", lambda ids: {**ids["tasks"], "loss": "feature",
                                             "feature": {"teacher_layer": "features", "student_layer": "features"}},
     "distill.loss: 'feature' is not supported with `tasks`"),
    ("feature-loss-without-layers", lambda ids: ensemble_body(ids["a"], ids["b"], loss="feature"),
     "loss 'feature' needs `feature` (teacher_layer, student_layer)"),
    ("control-with-tasks", lambda ids: {**ids["tasks"], "control": True},
     "control: the control run applies to single-task distillation"),
    ("eval-dataset-with-tasks", lambda ids: {**ids["tasks"], "eval_dataset": ids["letters"]},
     "eval_dataset: with `tasks`, give each task its own eval_dataset"),
    ("num-classes-with-tasks", lambda ids: {**ids["tasks"], "student": {
        **ids["tasks"]["student"], "kwargs": {"num_classes": 10}}},
     "student.kwargs.num_classes: with `tasks` the student has one head per task"),
    ("one-task", lambda ids: {**ids["tasks"], "tasks": ids["tasks"]["tasks"][:1]},
     "tasks: List should have at least 2 items"),
    ("cross-task-without-tasks", lambda ids: ensemble_body(ids["a"], ids["b"], cross_task_soft_targets=True),
     "cross_task_soft_targets applies to `tasks` only"),
]


@pytest.mark.parametrize(("body_of", "message"), [case[1:] for case in INVALID_CASES],
                         ids=[case[0] for case in INVALID_CASES])
def test_invalid_teachers_and_tasks_are_refused(client: TestClient, auth_headers: dict[str, str], tenant: str,
                                                stored_model: Callable[..., str], stored_dataset: Callable[..., str],
                                                body_of: Callable[[dict[str, Any]], dict[str, Any]],
                                                message: str) -> None:
    ids: dict[str, Any] = {"a": stored_model(), "b": stored_model(), "five": five_class_teacher(stored_model),
                           "letters": stored_dataset(**FIVE_CLASSES)}
    ids["int8"] = stored_model(precision="int8")
    ids["tasks"] = two_task_body([ids["a"]], ids["five"], ids["letters"])
    response = submit(client, auth_headers, body_of(ids))
    assert response.status_code == 422, response.text
    assert message.format(**{name: value for name, value in ids.items() if isinstance(value, str)}) in (
        response.json()["detail"])
    assert count_rows(Job, tenant) == 0


def test_an_unknown_or_deleted_teacher_is_refused(client: TestClient, auth_headers: dict[str, str], tenant: str,
                                                  stored_model: Callable[..., str]) -> None:
    first, gone = stored_model(), stored_model()
    assert client.delete(f"/v1/models/{gone}", headers=auth_headers).status_code == 204
    unknown = "mdl_000000000000000000000000"
    response = submit(client, auth_headers, ensemble_body(first, unknown))
    assert response.status_code == 404 and f"model {unknown} not found" in response.json()["detail"]
    response = submit(client, auth_headers, ensemble_body(first, gone))
    assert response.status_code == 409 and f"model {gone} was deleted on " in response.json()["detail"]
    assert count_rows(Job, tenant) == 0


def test_what_a_queued_job_of_many_teachers_reads_is_not_deleted(client: TestClient, auth_headers: dict[str, str],
                                                                 stored_model: Callable[..., str],
                                                                 stored_dataset: Callable[..., str]) -> None:
    first, second = stored_model(), stored_model()
    letters_teacher, letters = five_class_teacher(stored_model), stored_dataset(**FIVE_CLASSES)
    ensemble = submit(client, auth_headers, ensemble_body(first, second)).json()["id"]
    multitask = submit(client, auth_headers, two_task_body([first], letters_teacher, letters)).json()["id"]
    for resource, row_id, job_id in (("models", second, ensemble), ("models", letters_teacher, multitask),
                                     ("datasets", letters, multitask)):
        response = client.delete(f"/v1/{resource}/{row_id}", headers=auth_headers)
        assert response.status_code == 409, response.text
        assert f"is in use by job {job_id} (queued)" in response.json()["detail"]
    for job_id in (ensemble, multitask):
        assert client.post(f"/v1/jobs/{job_id}/cancel", headers=auth_headers).json()["status"] == "canceled"
    assert client.delete(f"/v1/models/{second}", headers=auth_headers).status_code == 204


def ended(client: TestClient, headers: dict[str, str], body: dict[str, Any]) -> str:
    response = submit(client, headers, body)
    assert response.status_code == 201, response.text
    with session_scope() as session:
        job = session.get_one(Job, response.json()["id"])
        job.status, job.finished_at = "succeeded", utcnow()
        return job.id


def test_a_replay_reads_every_teacher_and_every_tasks_data(client: TestClient, auth_headers: dict[str, str],
                                                           stored_model: Callable[..., str],
                                                           stored_dataset: Callable[..., str]) -> None:
    first, second = stored_model(), stored_model()
    letters_teacher, letters = five_class_teacher(stored_model), stored_dataset(**FIVE_CLASSES)
    ensemble = ended(client, auth_headers, ensemble_body(first, second))
    multitask = ended(client, auth_headers, two_task_body([first], letters_teacher, letters))
    for job_id in (ensemble, multitask):
        response = client.post(f"/v1/jobs/{job_id}/replay", headers=auth_headers)
        assert response.status_code == 201, response.text
        assert response.json()["spec"] == client.get(f"/v1/jobs/{job_id}", headers=auth_headers).json()["spec"]
        # Ended, so that it no longer keeps its inputs from deletion.
        cancel = client.post(f"/v1/jobs/{response.json()['id']}/cancel", headers=auth_headers)
        assert cancel.json()["status"] == "canceled"

    for resource, row_id, job_id, role in (("models", second, ensemble, "teacher"),
                                           ("datasets", letters, multitask, "task 'letters' dataset")):
        assert client.delete(f"/v1/{resource}/{row_id}", headers=auth_headers).status_code == 204
        response = client.post(f"/v1/jobs/{job_id}/replay", headers=auth_headers)
        assert response.status_code == 409, response.text
        assert f"cannot replay job {job_id}: its {role} {row_id} was deleted on " in response.json()["detail"]


def test_a_pipeline_stage_takes_one_teacher(client: TestClient, auth_headers: dict[str, str],
                                            stored_model: Callable[..., str]) -> None:
    first, second = stored_model(), stored_model()
    response = client.post("/v1/pipelines", headers=auth_headers, json={
        "model": first, "dataset": "digits",
        "stages": [{"kind": "distill", "student": STUDENT, "teachers": [{"model": first}, {"model": second}]}]})
    assert response.status_code == 422, response.text
    assert "stages[0] ('distill'): teachers cannot be set in a pipeline stage" in response.json()["detail"]


def test_the_students_own_input_is_stored(client: TestClient, auth_headers: dict[str, str],
                                          stored_model: Callable[..., str]) -> None:
    teacher = stored_model(spec={**SMALL_CNN_SPEC, "input": RGB_16})
    response = submit(client, auth_headers, {"kind": "distill", "teacher": teacher, "dataset": "digits",
                                             "student": {**STUDENT, "input": {"image_size": 8, "channels": 1}}})
    assert response.status_code == 201, response.text
    assert response.json()["spec"]["student"]["input"]["image_size"] == 8
