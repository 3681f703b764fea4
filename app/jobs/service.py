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
from worker.engine.config import (
    BUILTIN_DATASETS,
    ArchSpec,
    InputSpec,
    StudentSpec,
    check_dataset_fits,
    multi_head_refusal,
    multitask_student_arch,
    student_arch,
)
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
    source = input_model(session, tenant, body.input_model, _input_field(body))
    checked = check_job(session, tenant, body, source)
    if webhook_url is not None:
        webhooks.check_job_webhook(session, tenant, webhook_url, settings)
    # The input model goes in teacher_id whatever the kind: the worker loads it from there.
    stored, inputs = stored_form(checked.spec), job_inputs(session, checked.spec, source)
    return lambda job_id: Job(id=job_id, tenant=tenant, kind=body.kind, spec=stored, teacher_id=source.id,
                              dataset_id=checked.dataset_id, status="queued", max_attempts=settings.max_attempts,
                              webhook_url=webhook_url, inputs=inputs, replay_of=replay_of), checked.uses


def _input_field(body: JobSpecBase) -> str:
    """Where the body names its input model: a distillation's first teacher may be in `teachers` or `tasks`."""
    return _task_inputs(body)[0].teachers[0][0] if isinstance(body, DistillJobSpec) else body.input_field


@dataclass(frozen=True)
class CheckedJob:
    spec: JobSpecBase  # typed, every default filled in
    dataset_id: str | None  # None: a built-in
    uses: list[budget.ModelUse]  # the models it runs, for the budget check


def check_job(session: Session, tenant: str, body: JobSpecBase, source: Model) -> CheckedJob:
    """Everything a job names, checked against its input model: a stored model, or (for a pipeline's later stage)
    the model the stage before it will make."""
    if isinstance(body, DistillJobSpec):
        return _check_distillation(session, tenant, body, source)
    field = body.input_field
    _check_trainable(session, source, body.kind, field)
    source_input = InputSpec.model_validate(source.input_spec)
    dataset_id, dataset = _dataset(session, tenant, body.dataset)
    spec = SPEC_CLASSES[body.kind](**_spec_fields(body))
    _check_dataset(dataset, source, source_input, field, body.kind)
    if body.eval_dataset is not None:
        _check_eval_dataset(session, tenant, body.eval_dataset, body.dataset, dataset,
                            [(f"the {field} {source.id}", source_input)])
    return CheckedJob(spec=spec, dataset_id=dataset_id,
                      uses=_compression_uses(spec, ArchSpec.from_stored(source.arch, source.input_spec)))


def _spec_fields(body: JobSpecBase) -> dict[str, Any]:
    # Where to announce the end is not a compression setting: it has its own column.
    return {name: getattr(body, name) for name in SPEC_CLASSES[body.kind].model_fields}


@dataclass(frozen=True)
class _TaskInputs:
    """What one task of a distillation names (a distillation with `teacher` or `teachers` is one task)."""

    where: str  # how messages name the task: "" for the only one
    teachers: list[tuple[str, str]]  # (field, model id)
    dataset: tuple[str, str]  # (field, name or id)
    eval_dataset: tuple[str, str | None]


@dataclass(frozen=True)
class _CheckedTask:
    teachers: list[Model]
    dataset_id: str | None

    @property
    def num_classes(self) -> int:
        return self.teachers[0].num_classes


def _check_distillation(session: Session, tenant: str, body: DistillJobSpec, source: Model) -> CheckedJob:
    """Every teacher of every task (`source` is the first) is a live float model of the tenant's predicting its
    task's classes, and every task's images fit each teacher's input and the student's."""
    _check_multitask_options(body)
    student_input = body.student.input or InputSpec.model_validate(source.input_spec)
    known = {source.id: source}
    tasks = [_check_task(session, tenant, task, known, student_input) for task in _task_inputs(body)]
    stored_student, student = _student(body, tasks, student_input)
    spec = DistillJobSpec(**{**_spec_fields(body), "student": stored_student})
    batch = spec.distill.training.batch_size
    teachers = list({model.id: model for task in tasks for model in task.teachers}.values())
    uses = [budget.ModelUse("teacher" if len(teachers) == 1 else f"teacher {model.id}",
                            ArchSpec.from_stored(model.arch, model.input_spec), batch, trains=False)
            for model in teachers]
    # A control student trains after the distilled one, never beside it: the student counts once.
    return CheckedJob(spec=spec, dataset_id=tasks[0].dataset_id,
                      uses=[*uses, budget.ModelUse("student", student, batch, trains=True)])


def _check_multitask_options(body: DistillJobSpec) -> None:
    if body.tasks is None:
        return
    if body.control:
        raise Invalid("control: the control run applies to single-task distillation (`teacher` or `teachers`); "
                      "with `tasks`, leave control out")
    if body.distill.loss == "feature":
        raise Invalid("distill.loss: 'feature' is not supported with `tasks` (its layers name one teacher and one "
                      "head); use kd, dkd or kd_ls")
    if body.eval_dataset is not None:
        raise Invalid("eval_dataset: with `tasks`, give each task its own eval_dataset (tasks[i].eval_dataset)")
    if "num_classes" in body.student.kwargs:
        raise Invalid("student.kwargs.num_classes: with `tasks` the student has one head per task, of its task's "
                      "classes; leave num_classes out")


def _task_inputs(body: DistillJobSpec) -> list[_TaskInputs]:
    if body.tasks is not None:
        return [_TaskInputs(where=f"tasks[{index}] ('{task.name}')",
                            teachers=[(f"tasks[{index}].teachers[{number}].model", ref.model)
                                      for number, ref in enumerate(task.teachers)],
                            dataset=(f"tasks[{index}].dataset", task.dataset),
                            eval_dataset=(f"tasks[{index}].eval_dataset", task.eval_dataset))
                for index, task in enumerate(body.tasks)]
    teachers = ([("teacher", body.teacher)] if body.teachers is None
                else [(f"teachers[{number}].model", ref.model) for number, ref in enumerate(body.teachers)])
    return [_TaskInputs(where="", teachers=teachers, dataset=("dataset", body.dataset),
                        eval_dataset=("eval_dataset", body.eval_dataset))]


def _check_task(session: Session, tenant: str, task: _TaskInputs, known: dict[str, Model],
                student_input: InputSpec) -> _CheckedTask:
    """The task's teachers (loaded once per job: `known`; messages name their fields), its dataset and eval dataset
    (messages name the task)."""
    teachers = _task_teachers(session, tenant, task.teachers, known)
    dataset_field, dataset_name = task.dataset
    dataset_id, dataset = _dataset(session, tenant, dataset_name, dataset_field)
    try:
        readers = [(f"the teacher {model.id}", InputSpec.model_validate(model.input_spec)) for model in teachers]
        readers.append(("student.input", student_input))
        _check_dataset(dataset, teachers[0], readers[0][1], "teacher", "distill")
        _check_fits(dataset.image_shape, readers[1:])
        eval_field, eval_name = task.eval_dataset
        if eval_name is not None:
            _check_eval_dataset(session, tenant, eval_name, dataset_name, dataset, readers, eval_field)
    except Invalid as exc:
        raise Invalid(f"{task.where}: {exc.message}" if task.where else exc.message) from exc
    return _CheckedTask(teachers=teachers, dataset_id=dataset_id)


def _task_teachers(session: Session, tenant: str, fields: list[tuple[str, str]], known: dict[str, Model]) -> (
        list[Model]):
    """Each teacher: a live float model of the tenant's, named once, predicting the first one's classes."""
    teachers: list[Model] = []
    for field, model_id in fields:
        if model_id in (teacher.id for teacher in teachers):
            raise Invalid(f"{field}: {model_id} is named twice; give each teacher once (its weight sets its share)")
        if model_id not in known:
            known[model_id] = input_model(session, tenant, model_id, field)
        model = known[model_id]
        _check_trainable(session, model, "distill", field)
        if teachers and model.num_classes != teachers[0].num_classes:
            raise Invalid(f"{field}: the teacher {model.id} predicts {model.num_classes} classes but "
                          f"{fields[0][0]} {teachers[0].id} predicts {teachers[0].num_classes}; the teachers of "
                          "one task predict the same classes")
        teachers.append(model)
    return teachers


def _student(body: DistillJobSpec, tasks: list[_CheckedTask], student_input: InputSpec) -> (
        tuple[StudentSpec, ArchSpec]):
    """The student as the stored spec holds it (its input filled in, and with one task its classes: the
    teacher's) and its full architecture, for the budget."""
    student = body.student
    if body.tasks is None:
        first = tasks[0].teachers[0]
        # The student's classes are its teacher's; its input is its own when given, the teacher's otherwise.
        teacher_arch = ArchSpec.from_stored(first.arch, first.input_spec).model_copy(update={"input": student_input})
        arch = _student_arch(student, teacher_arch, first.id)
        return StudentSpec(arch=arch.arch, kwargs=arch.kwargs, input=student_input), arch
    stored = StudentSpec(arch=student.arch, kwargs=student.kwargs, input=student_input)
    heads = {task.name: checked.num_classes for task, checked in zip(body.tasks, tasks, strict=True)}
    return stored, _multitask_student_arch(stored, heads)


def _multitask_student_arch(student: StudentSpec, heads: dict[str, int]) -> ArchSpec:
    """The multi-head student's architecture (one head per task: the worker builds it from the tasks' classes)."""
    try:
        return multitask_student_arch(student, heads, student.input)
    except SpecError as exc:
        raise Invalid(str(exc)) from exc
    except ValidationError as exc:
        raise invalid_from(exc, "student") from exc


_INT8_ADVICE = {
    "distill": "it runs only on int8 CPU kernels and cannot teach here; distill from the float model it was "
               "quantized from{parent}",
    "prune": "pruning needs float weights; prune the float model it was quantized from{parent}, then quantize the "
             "pruned model",
    "quantize": "it is quantized already; quantize the float model it came from{parent} with other settings instead",
}


def _check_trainable(session: Session, source: Model, kind: str, field: str) -> None:
    """An int8 model (a quantize job's result) is an end product: no job takes it as its input. Nor does any job
    take a multi-head model (a multi-task distillation's student) yet: each one expects one output."""
    if source.arch.get("heads"):
        raise Invalid(multi_head_refusal(source.arch["heads"], f"{field} {source.id} cannot be a job's input"))
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
    _check_fits(dataset.image_shape, [(f"the {role} {model.id}", model_input)])


def _check_fits(image_shape: list[int], readers: list[tuple[str, InputSpec]], field: str = "") -> None:
    """Each reader ("the teacher mdl_...", its input spec) can be given these images: a 422 naming the first that
    cannot (and `field`, the dataset's, when given)."""
    for reader, input_spec in readers:
        try:
            check_dataset_fits(image_shape, input_spec)
        except SpecError as exc:
            raise Invalid(f"{field + ': ' if field else ''}{exc} ({reader})") from exc


def _check_eval_dataset(session: Session, tenant: str, eval_name: str, train_name: str, train: DatasetShape,
                        readers: list[tuple[str, InputSpec]], field: str = "eval_dataset") -> None:
    """The evaluation set must be other images of the same classes, in the same order, that every model reading it
    (`readers`: description, input spec) can read."""
    _, evaluation = _dataset(session, tenant, eval_name, field)
    if eval_name == train_name or _same_images(evaluation, train):
        raise Invalid(f"{field} '{eval_name}' holds the same images as dataset '{train_name}'; give a dataset "
                      f"that the job does not train on, or omit {field} to evaluate on a held-out split")
    if list(evaluation.class_names) != list(train.class_names):
        raise Invalid(f"{field} '{eval_name}' has classes {_names(evaluation)} but dataset '{train_name}' has "
                      f"{_names(train)}; an evaluation set needs the same classes in the same order")
    _check_fits(evaluation.image_shape, readers, field)


def _same_images(a: DatasetShape, b: DatasetShape) -> bool:
    """Two uploads of the same images (a built-in has no canonical hash: its name says which it is)."""
    hashes = [getattr(dataset, "canonical_sha256", None) for dataset in (a, b)]
    return hashes[0] is not None and hashes[0] == hashes[1]


def _names(dataset: DatasetShape, shown: int = 12) -> str:
    names = [str(name)[:40] for name in dataset.class_names]
    return str(names[:shown])[:-1] + (f", ... {len(names) - shown} more]" if len(names) > shown else "]")
