"""Submit, read and cancel jobs. Everything a job needs is checked here, before it is queued, so that a
mistake is a 422 naming the field now rather than a failed job an hour later."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from pydantic import ValidationError
from sqlalchemy import event
from sqlalchemy.orm import Session

from app import quotas
from app.artifacts import repository as artifacts_repository
from app.auth.service import Principal
from app.config import Settings
from app.datasets import repository as datasets_repository
from app.datasets.service import builtin_summary
from app.db.models import Artifact, Job, JobEvent, Model, new_id
from app.errors import Invalid, NotFound
from app.idempotency import Outcome, claim, idempotent_request, previous_resource
from app.jobs import lifecycle, repository
from app.jobs.schemas import AnyJobCreate, JobCreate
from app.models import repository as models_repository
from app.pagination import PageRequest
from app.schemas import invalid_from
from app.webhooks import service as webhooks
from worker.engine.config import BUILTIN_DATASETS, ArchSpec, InputSpec, StudentSpec, check_dataset_fits
from worker.engine.errors import SpecError

ROUTE = "POST /v1/jobs"
EVENTS_SHOWN = 100
_ID_KINDS = {"mdl_": "model", "dst_": "dataset", "job_": "job", "art_": "artifact"}


class DatasetShape(Protocol):
    """An uploaded Dataset row or a built-in's summary: what a job checks against."""

    num_classes: int
    image_shape: list[int]


@dataclass(frozen=True)
class JobView:
    job: Job
    artifacts: list[Artifact]
    events: list[JobEvent]


def submit_job(session: Session, principal: Principal, body: AnyJobCreate, idempotency_key: str | None,
               settings: Settings) -> Outcome[Job]:
    request = idempotent_request(principal.tenant, ROUTE, idempotency_key, body.model_dump(mode="json"))
    earlier = previous_resource(session, request)
    if earlier is not None:
        return Outcome(get_job(session, principal.tenant, earlier), replayed=True)

    quotas.check_job_slot(session, principal.tenant, settings)
    # A distillation names its input model "teacher"; pruning and quantization name it "model".
    field, model_id = ("teacher", body.teacher) if isinstance(body, JobCreate) else ("model", body.model)
    source = _input_model(session, principal.tenant, model_id, field)
    source_input = InputSpec.model_validate(source.input_spec)
    dataset_id, dataset = _dataset(session, principal.tenant, body.dataset)
    spec = _stored_spec(body, source, source_input)
    if body.webhook_url is not None:
        webhooks.check_job_webhook(session, principal.tenant, body.webhook_url, settings)
    _check_dataset(dataset, source, source_input, field, body.kind)

    job_id = new_id("job")
    winner = claim(session, request, job_id)
    if winner is not None:
        return Outcome(get_job(session, principal.tenant, winner), replayed=True)
    # The input model goes in teacher_id whatever the kind: the worker loads it from there.
    job = Job(id=job_id, tenant=principal.tenant, kind=body.kind, spec=spec, teacher_id=source.id,
              dataset_id=dataset_id, status="queued", max_attempts=settings.max_attempts,
              webhook_url=body.webhook_url)
    repository.add(session, job)
    lifecycle.record_event(session, job, "state", principal.actor, "submitted")
    # The message names a row that must exist when a worker reads it: send only after the commit.
    _after_commit(session, lambda: lifecycle.dispatch([job_id]))
    return Outcome(job)


def get_job(session: Session, tenant: str, job_id: str) -> Job:
    job = repository.get(session, tenant, job_id)
    if job is None:
        raise NotFound(f"job {job_id} not found")
    return job


def describe_job(session: Session, tenant: str, job_id: str) -> JobView:
    job = get_job(session, tenant, job_id)
    return JobView(job=job, artifacts=artifacts_repository.for_job(session, tenant, job.id),
                   events=repository.latest_events(session, job.id, EVENTS_SHOWN))


def events_after(session: Session, tenant: str, job_id: str, after_id: int, limit: int) -> list[JobEvent]:
    return repository.events_after(session, get_job(session, tenant, job_id).id, after_id, limit)


def list_jobs(session: Session, tenant: str, status: str | None, page: PageRequest) -> tuple[list[Job], str | None]:
    return repository.page(session, tenant, status, page)


def cancel_job(session: Session, principal: Principal, job_id: str) -> Job:
    job = get_job(session, principal.tenant, job_id)
    task_ids = lifecycle.request_cancel(session, job, principal.actor)
    _after_commit(session, lambda: lifecycle.revoke_after_commit(task_ids))
    return job


def _after_commit(session: Session, action: Callable[[], None]) -> None:
    """Run `action` once the request's transaction commits (not when a savepoint is released)."""
    pending = [action]

    def run(committed: Session) -> None:
        if pending and not committed.in_nested_transaction():
            pending.pop()()

    event.listen(session, "after_commit", run)


def _stored_spec(body: AnyJobCreate, source: Model, source_input: InputSpec) -> dict[str, Any]:
    """The submission with every default filled in (and a distillation student's classes taken from its
    teacher), as the worker will read it."""
    # Where to announce the end is not a compression setting: it has its own column.
    spec: dict[str, Any] = body.model_dump(mode="json", exclude={"webhook_url"})
    if isinstance(body, JobCreate):
        student = _student_arch(body.student, source, source_input)
        spec["student"] = {"arch": student.arch, "kwargs": student.kwargs}
    return spec


def _input_model(session: Session, tenant: str, model_id: str, field: str) -> Model:
    _expect_kind(model_id, field, "model", "an uploaded model's id (mdl_...)")
    model = models_repository.get(session, tenant, model_id)
    if model is None:
        raise NotFound(f"model {model_id} not found")
    return model


def _dataset(session: Session, tenant: str, name_or_id: str) -> tuple[str | None, DatasetShape]:
    """(dataset id or None for a built-in, its shape)."""
    if name_or_id in BUILTIN_DATASETS:
        return None, builtin_summary(name_or_id)
    _expect_kind(name_or_id, "dataset", "dataset",
                 f"an uploaded dataset's id (dst_...) or a built-in name ({', '.join(BUILTIN_DATASETS)})")
    dataset = datasets_repository.get(session, tenant, name_or_id)
    if dataset is None:
        raise NotFound(f"dataset {name_or_id} not found")
    return dataset.id, dataset


def _expect_kind(value: str, field: str, kind: str, expected: str) -> None:
    actual = next((name for prefix, name in _ID_KINDS.items() if value.startswith(prefix)), None)
    if actual == kind:
        return
    got = f"a {actual} id" if actual else "neither an id nor a known name"
    raise Invalid(f"{field} must be {expected}; '{value}' is {got}")


def _student_arch(student: StudentSpec, teacher: Model, teacher_input: InputSpec) -> ArchSpec:
    """The student's full spec: its own architecture and kwargs, the teacher's input and classes."""
    declared = student.kwargs.get("num_classes", teacher.num_classes)
    if declared != teacher.num_classes:
        raise Invalid(f"student.kwargs.num_classes is {declared} but the teacher {teacher.id} predicts "
                      f"{teacher.num_classes} classes; omit it to use the teacher's")
    try:
        return ArchSpec(arch=student.arch, kwargs={**student.kwargs, "num_classes": teacher.num_classes},
                        input=teacher_input)
    except ValidationError as exc:
        raise invalid_from(exc, "student") from exc


_PURPOSES = {"distill": "distillation", "prune": "fine-tuning and evaluating a pruned model",
             "quantize": "calibrating and evaluating a quantized model"}


def _check_dataset(dataset: DatasetShape, model: Model, model_input: InputSpec, role: str, kind: str) -> None:
    if dataset.num_classes != model.num_classes:
        raise Invalid(f"the dataset has {dataset.num_classes} classes but the {role} {model.id} predicts "
                      f"{model.num_classes}; {_PURPOSES[kind]} needs the same classes")
    try:
        check_dataset_fits(dataset.image_shape, model_input)
    except SpecError as exc:
        raise Invalid(str(exc)) from exc
