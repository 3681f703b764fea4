"""Submit, read and cancel jobs. Everything a job needs is checked here, before it is queued, so that a
mistake is a 422 naming the field now rather than a failed job an hour later."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from pydantic import ValidationError
from sqlalchemy import Row
from sqlalchemy.orm import Session

from app import quotas
from app.auth.service import Principal
from app.datasets.repository import datasets
from app.datasets.service import builtin_summary
from app.deps import release_connection
from app.idempotency import IdempotentRequest, Outcome, create_once, idempotent_request, replay
from app.inputs import check_recorded_inputs
from app.jobs import repository
from app.jobs.repository import jobs
from app.jobs.schemas import AnyJobCreate
from app.models import budget
from app.models.repository import models
from app.pagination import PageRequest
from app.schemas import field_problems, invalid_from, summarize
from app.webhooks import service as webhooks
from core import lifecycle
from core.db.models import Artifact, Job, JobEvent, Model
from core.db.repository import job_artifacts
from core.db.session import after_commit
from core.dispatch import dispatch, revoke_after_commit
from core.errors import Conflict, Invalid
from core.jobspec import SPEC_CLASSES, DistillJobSpec, JobSpecBase, PruneJobSpec, load_stored, stored_form
from core.lineage import job_inputs, recorded_inputs
from core.settings import Settings
from core.storage import BlobStore
from worker.engine.config import BUILTIN_DATASETS, ArchSpec, InputSpec, StudentSpec, check_dataset_fits, student_arch
from worker.engine.errors import SpecError

ROUTE = "POST /v1/jobs"
REPLAY_ROUTE = "POST /v1/jobs/{id}/replay"
EVENTS_SHOWN = 100
_ID_KINDS = {"mdl_": "model", "dst_": "dataset", "job_": "job", "art_": "artifact"}


class DatasetShape(Protocol):
    """An uploaded Dataset row or a built-in's summary: what a job checks against."""

    num_classes: int
    class_names: list[Any]
    image_shape: list[int]


# A checked job: how to build its row from its new id, and the models it runs (for the memory budget).
Prepared = tuple[Callable[[str], Job], list[budget.ModelUse]]


@dataclass(frozen=True)
class JobView:
    job: Job
    artifacts: list[Artifact]
    events: list[Row[Any]]  # with the attributes of a JobEvent


def submit_job(session: Session, principal: Principal, body: AnyJobCreate, idempotency_key: str | None,
               settings: Settings) -> Outcome[Job]:
    request = idempotent_request(principal.tenant, ROUTE, idempotency_key, body.model_dump(mode="json"))
    return _create(session, principal, request, settings, "submitted",
                   lambda: _prepare(session, principal.tenant, body, body.webhook_url, settings))


def replay_job(session: Session, principal: Principal, job_id: str, idempotency_key: str | None,
               settings: Settings, store: BlobStore) -> Outcome[Job]:
    """A new job that runs the original's stored spec (every default as it was filled in then) on the same
    inputs, refused (409) if one of them was deleted or changed since, or while the original has not ended.
    It goes through every check a submission does (job slots, budget, webhook)."""
    request = idempotent_request(principal.tenant, REPLAY_ROUTE, idempotency_key, {"replay_of": job_id})

    def prepare() -> Prepared:
        original = get_job(session, principal.tenant, job_id)
        if original.status not in lifecycle.FINISHED:
            raise Conflict(f"job {job_id} is {original.status}: wait for it to end, or cancel it, then replay it")
        check_recorded_inputs(session, principal.tenant, recorded_inputs(original), store, f"job {job_id}")
        return _prepare(session, principal.tenant, _stored_spec(original), original.webhook_url, settings,
                        replay_of=original.id)

    return _create(session, principal, request, settings, f"submitted: replay of job {job_id}", prepare)


def _stored_spec(job: Job) -> JobSpecBase:
    try:
        return load_stored(job.spec)
    except ValidationError as exc:
        # Only a spec stored by a version whose settings this one no longer takes gets here.
        raise Conflict(f"job {job.id}'s stored spec is not valid for this version of condenser "
                       f"({summarize(field_problems(exc.errors()))}); submit a new job instead") from exc


def _create(session: Session, principal: Principal, request: IdempotentRequest | None, settings: Settings,
            message: str, prepare: Callable[[], Prepared]) -> Outcome[Job]:
    """Check (`prepare`), create and queue a job once per idempotent request."""
    earlier = replay(session, jobs, principal.tenant, request)
    if earlier is not None:
        return earlier
    build, uses = prepare()
    # Estimating a spec not seen before runs a child: no pooled connection is held meanwhile.
    release_connection(session)
    budget.check_models(uses, settings)
    outcome = create_once(session, jobs, principal.tenant, request, lambda: build)
    if not outcome.replayed:
        job = outcome.resource
        lifecycle.record_event(session, job, "state", principal.actor, message)
        # The message names a row that must exist when a worker reads it: send only after the commit.
        after_commit(session, lambda: dispatch([job.id]))
    return outcome


def _prepare(session: Session, tenant: str, body: JobSpecBase, webhook_url: str | None, settings: Settings,
             replay_of: str | None = None) -> Prepared:
    """Check everything the job names; returns how to build its row from its id, and the models it runs."""
    quotas.check_job_slot(session, tenant, settings)
    source = input_model(session, tenant, body.input_model, body.input_field)
    checked = check_job(session, tenant, body, source)
    if webhook_url is not None:
        webhooks.check_job_webhook(session, tenant, webhook_url, settings)
    # The input model goes in teacher_id whatever the kind: the worker loads it from there.
    stored, inputs = stored_form(checked.spec), job_inputs(session, checked.spec, source)
    return lambda job_id: Job(id=job_id, tenant=tenant, kind=body.kind, spec=stored, teacher_id=source.id,
                              dataset_id=checked.dataset_id, status="queued", max_attempts=settings.max_attempts,
                              webhook_url=webhook_url, inputs=inputs, replay_of=replay_of), checked.uses


@dataclass(frozen=True)
class CheckedJob:
    spec: JobSpecBase  # typed, every default filled in
    dataset_id: str | None  # None: a built-in
    uses: list[budget.ModelUse]  # the models it runs, for the budget check


def check_job(session: Session, tenant: str, body: JobSpecBase, source: Model) -> CheckedJob:
    """Everything a job names, checked against its input model: a stored model, or (for a pipeline's later stage)
    the model the stage before it will make."""
    field = body.input_field
    _check_trainable(session, source, body.kind, field)
    source_input = InputSpec.model_validate(source.input_spec)
    dataset_id, dataset = _dataset(session, tenant, body.dataset)
    spec, uses = _typed_spec(body, source, source_input)
    _check_dataset(dataset, source, source_input, field, body.kind)
    if body.eval_dataset is not None:
        _check_eval_dataset(session, tenant, body.eval_dataset, body.dataset, dataset, source, source_input, field)
    return CheckedJob(spec=spec, dataset_id=dataset_id, uses=uses)


_INT8_ADVICE = {
    "distill": "it runs only on int8 CPU kernels and cannot teach here; distill from the float model it was "
               "quantized from{parent}",
    "prune": "pruning needs float weights; prune the float model it was quantized from{parent}, then quantize the "
             "pruned model",
    "quantize": "it is quantized already; quantize the float model it came from{parent} with other settings instead",
}


def _check_trainable(session: Session, source: Model, kind: str, field: str) -> None:
    """An int8 model (a quantize job's result) is an end product: no job takes it as its input."""
    if source.precision != "int8":
        return
    job = session.get(Job, source.source_job_id) if source.source_job_id else None
    parent = job.teacher_id if job is not None else None
    advice = _INT8_ADVICE[kind].format(parent=f" ({parent})" if parent else "")
    raise Invalid(f"{field} {source.id} is an int8 model: {advice}")


def get_job(session: Session, tenant: str, job_id: str) -> Job:
    return jobs.require(session, tenant, job_id)


def describe_job(session: Session, tenant: str, job_id: str) -> JobView:
    job = get_job(session, tenant, job_id)
    return JobView(job=job, artifacts=job_artifacts(session, tenant, job.id),
                   events=repository.latest_events(session, job.id, EVENTS_SHOWN))


def events_after(session: Session, tenant: str, job_id: str, after_id: int, limit: int) -> list[JobEvent]:
    return repository.events_after(session, get_job(session, tenant, job_id).id, after_id, limit)


def list_jobs(session: Session, tenant: str, status: str | None, page: PageRequest) -> tuple[list[Job], str | None]:
    return repository.page(session, tenant, status, page)


def cancel_job(session: Session, principal: Principal, job_id: str) -> Job:
    job = get_job(session, principal.tenant, job_id)
    task_ids = lifecycle.request_cancel(session, job, principal.actor)
    after_commit(session, lambda: revoke_after_commit(task_ids))
    return job


def _typed_spec(body: JobSpecBase, source: Model,
                source_input: InputSpec) -> tuple[JobSpecBase, list[budget.ModelUse]]:
    """The submission as its typed spec with every default filled in (and a distillation student's classes
    taken from its teacher, here and only here), as the worker will read it; and the models it runs."""
    # Where to announce the end is not a compression setting: it has its own column.
    fields: dict[str, Any] = {name: getattr(body, name) for name in SPEC_CLASSES[body.kind].model_fields}
    source_arch = ArchSpec.from_stored(source.arch, source.input_spec)
    if not isinstance(body, DistillJobSpec):
        spec = SPEC_CLASSES[body.kind](**fields)
        return spec, _compression_uses(spec, source_arch)
    student = _student_arch(body.student, source_arch, source.id)
    fields["student"] = StudentSpec(arch=student.arch, kwargs=student.kwargs)
    spec = SPEC_CLASSES[body.kind](**fields)
    batch = spec.distill.training.batch_size  # type: ignore[attr-defined]
    return spec, [budget.ModelUse("teacher", source_arch, batch, trains=False),
                  budget.ModelUse("student", student, batch, trains=True)]


def _compression_uses(spec: JobSpecBase, model: ArchSpec) -> list[budget.ModelUse]:
    """A pruned or quantized model is never bigger than its input: the input's estimate stands for it."""
    fine_tuning = spec.prune.recovery if isinstance(spec, PruneJobSpec) else spec.quantize.qat  # type: ignore[attr-defined]
    if fine_tuning is None:
        # Ranking channels and calibrating run the model forward on a few samples: its parameters are what count.
        return [budget.ModelUse("model", model, 1, trains=False)]
    # The fine-tuned copy learns from the original, which runs alongside it as its teacher.
    batch = fine_tuning.training.batch_size
    return [budget.ModelUse("model", model, batch, trains=False),
            budget.ModelUse(f"{spec.kind}d model", model, batch, trains=True)]


def input_model(session: Session, tenant: str, model_id: str, field: str) -> Model:
    _expect_kind(model_id, field, "model", "an uploaded model's id (mdl_...)")
    return models.require_live(session, tenant, model_id)


def _dataset(session: Session, tenant: str, name_or_id: str, field: str = "dataset") -> (
        tuple[str | None, DatasetShape]):
    """(dataset id or None for a built-in, its shape)."""
    if name_or_id in BUILTIN_DATASETS:
        return None, builtin_summary(name_or_id)
    _expect_kind(name_or_id, field, "dataset",
                 f"an uploaded dataset's id (dst_...) or a built-in name ({', '.join(BUILTIN_DATASETS)})")
    dataset = datasets.require_live(session, tenant, name_or_id)
    return dataset.id, dataset


def _expect_kind(value: str, field: str, kind: str, expected: str) -> None:
    actual = next((name for prefix, name in _ID_KINDS.items() if value.startswith(prefix)), None)
    if actual == kind:
        return
    got = f"a {actual} id" if actual else "neither an id nor a known name"
    raise Invalid(f"{field} must be {expected}; '{value}' is {got}")


def _student_arch(student: StudentSpec, teacher_arch: ArchSpec, teacher_id: str) -> ArchSpec:
    try:
        return student_arch(student, teacher_arch, f"the teacher {teacher_id}")
    except SpecError as exc:
        raise Invalid(str(exc)) from exc
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


def _check_eval_dataset(session: Session, tenant: str, eval_name: str, train_name: str, train: DatasetShape,
                        model: Model, model_input: InputSpec, role: str) -> None:
    """The evaluation set must be other images of the same classes, in the same order, that the model can read."""
    _, evaluation = _dataset(session, tenant, eval_name, "eval_dataset")
    if eval_name == train_name or _same_images(evaluation, train):
        raise Invalid(f"eval_dataset '{eval_name}' holds the same images as dataset '{train_name}'; give a dataset "
                      "that the job does not train on, or omit eval_dataset to evaluate on a held-out split")
    if list(evaluation.class_names) != list(train.class_names):
        raise Invalid(f"eval_dataset '{eval_name}' has classes {_names(evaluation)} but dataset '{train_name}' has "
                      f"{_names(train)}; an evaluation set needs the same classes in the same order")
    try:
        check_dataset_fits(evaluation.image_shape, model_input)
    except SpecError as exc:
        raise Invalid(f"eval_dataset: {exc} (the {role} {model.id})") from exc


def _same_images(a: DatasetShape, b: DatasetShape) -> bool:
    """Two uploads of the same images (a built-in has no canonical hash: its name says which it is)."""
    hashes = [getattr(dataset, "canonical_sha256", None) for dataset in (a, b)]
    return hashes[0] is not None and hashes[0] == hashes[1]


def _names(dataset: DatasetShape, shown: int = 12) -> str:
    names = [str(name)[:40] for name in dataset.class_names]
    return str(names[:shown])[:-1] + (f", ... {len(names) - shown} more]" if len(names) > shown else "]")
