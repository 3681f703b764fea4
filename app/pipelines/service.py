"""Submit, read and cancel pipelines. Every stage is checked as POST /v1/jobs checks a job, against the model the
stage before it will make, so that a mistake in the last stage is a 422 now, not a failure hours later."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError
from sqlalchemy.orm import Session

from app import quotas
from app.auth.service import Principal
from app.deps import release_connection
from app.idempotency import IdempotentRequest, Outcome, create_once, idempotent_request, replay
from app.inputs import check_recorded_inputs
from app.jobs import service as jobs_service
from app.jobs.schemas import AnyJobCreate, JobCreate, PruneJobCreate, QuantizeJobCreate
from app.models import budget
from app.pagination import PageRequest
from app.pipelines import repository
from app.pipelines.repository import pipelines
from app.pipelines.schemas import PIPELINE_LEVEL_FIELDS, PipelineCreate, StageCreate
from app.schemas import invalid_from
from core import lifecycle
from core import pipelines as machine
from core.db.models import Model, Pipeline
from core.db.session import after_commit
from core.dispatch import dispatch
from core.errors import Conflict, Invalid
from core.jobspec import SPEC_CLASSES, DistillJobSpec, JobSpecBase, stored_form
from core.lineage import job_inputs
from core.settings import Settings
from core.storage import BlobStore

ROUTE = "POST /v1/pipelines"
REPLAY_ROUTE = "POST /v1/pipelines/{id}/replay"
# A stage's teacher is the model it takes: the fields that name other teachers are for jobs alone.
_SEVERAL_TEACHERS = ("teachers", "tasks")
# Each stage's body as POST /v1/jobs takes a job of its kind (validated by its class: errors name the field, not
# the union's tag).
_JOB_BODIES: dict[str, type[AnyJobCreate]] = {"distill": JobCreate, "prune": PruneJobCreate,
                                              "quantize": QuantizeJobCreate}


@dataclass(frozen=True)
class Plan:
    """A checked pipeline: how to build its row, its input model, and every model its stages run."""

    build: Callable[[str], Pipeline]
    input_model: Model
    uses: list[budget.ModelUse]


def submit_pipeline(session: Session, principal: Principal, body: PipelineCreate, idempotency_key: str | None,
                    settings: Settings) -> Outcome[Pipeline]:
    request = idempotent_request(principal.tenant, ROUTE, idempotency_key, body.model_dump(mode="json"))
    return _create(session, principal, request, settings,
                   lambda: plan_pipeline(session, principal.tenant, body, settings))


def replay_pipeline(session: Session, principal: Principal, pipeline_id: str, idempotency_key: str | None,
                    settings: Settings, store: BlobStore) -> Outcome[Pipeline]:
    """A new pipeline with the original's stored stages (every default as it was filled in then) on the same inputs,
    refused (409) while the original runs or if an input was deleted or changed since; checked as a submission."""
    request = idempotent_request(principal.tenant, REPLAY_ROUTE, idempotency_key, {"replay_of": pipeline_id})

    def prepare() -> Plan:
        original = get_pipeline(session, principal.tenant, pipeline_id)
        if original.status not in machine.FINISHED:
            raise Conflict(f"pipeline {pipeline_id} is {original.status}: wait for it to end, or cancel it, then "
                           "replay it")
        check_recorded_inputs(session, principal.tenant, _recorded_inputs(original), store, f"pipeline {pipeline_id}")
        return plan_pipeline(session, principal.tenant, _stored_body(original), settings, replay_of=original.id)

    return _create(session, principal, request, settings, prepare)


def _create(session: Session, principal: Principal, request: IdempotentRequest | None, settings: Settings,
            prepare: Callable[[], Plan]) -> Outcome[Pipeline]:
    """Check (`prepare`), store the pipeline and create the jobs of the stages that take its input (sent once
    committed), once per idempotent request."""
    earlier = replay(session, pipelines, principal.tenant, request)
    if earlier is not None:
        return earlier
    plan = prepare()
    # Estimating a spec not seen before runs a child: no pooled connection is held meanwhile.
    release_connection(session)
    budget.check_models(plan.uses, settings)
    outcome = create_once(session, pipelines, principal.tenant, request, lambda: plan.build)
    if not outcome.replayed:
        started = machine.start(session, outcome.resource, plan.input_model)
        after_commit(session, lambda: dispatch(started))
    return outcome


def _recorded_inputs(pipeline: Pipeline) -> dict[str, Any]:
    spec = pipeline.spec
    return spec.get("inputs") or {"model": {"id": spec["model"]}}


def _stored_body(pipeline: Pipeline) -> PipelineCreate:
    """The stored pipeline as a submission: each stage's stored job spec without what the pipeline sets."""
    spec = pipeline.spec
    stages = [{**{key: value for key, value in stage["job"].items() if key not in PIPELINE_LEVEL_FIELDS},
               "name": stage["name"], "after": stage["after"], "gate": stage["gate"]} for stage in spec["stages"]]
    return PipelineCreate.model_validate({"name": pipeline.name, "model": spec["model"], "dataset": spec["dataset"],
                                          "eval_dataset": spec.get("eval_dataset"),
                                          "val_fraction": spec["val_fraction"], "seed": spec["seed"],
                                          "stages": stages})


def plan_pipeline(session: Session, tenant: str, body: PipelineCreate, settings: Settings,
                  replay_of: str | None = None) -> Plan:
    quotas.check_job_slot(session, tenant, settings)
    source = jobs_service.input_model(session, tenant, _input_id(body), "model")
    predicted: dict[str, Model] = {machine.INPUT: source}
    stored_stages: list[dict[str, Any]] = []
    checked_stages: list[jobs_service.CheckedJob] = []
    for index, (name, after, stage) in enumerate(_named_stages(body.stages)):
        where = f"stages[{index}] ('{name}')"
        checked = _checked_stage(session, tenant, body, stage, predicted[after], where)
        predicted[name] = _predicted_output(checked.spec, predicted[after], name)
        stored_stages.append({"name": name, "after": after, "gate": stage.gate.model_dump() if stage.gate else None,
                              "job": stored_form(checked.spec)})
        checked_stages.append(checked)
    first = checked_stages[0]  # every stage reads the same datasets
    spec = {"model": source.id, "dataset": body.dataset, "dataset_id": first.dataset_id,
            "eval_dataset": body.eval_dataset, "val_fraction": body.val_fraction, "seed": body.seed,
            "stages": stored_stages,
            # What the pipeline reads, fixed now: a replay refuses inputs that changed since.
            "inputs": job_inputs(session, first.spec, source)}
    uses = [use for checked in checked_stages for use in checked.uses]
    name = body.name or " -> ".join(stage["name"] for stage in stored_stages)
    return Plan(build=lambda pipeline_id: Pipeline(id=pipeline_id, tenant=tenant, name=name, spec=spec,
                                                   status="queued", replay_of=replay_of),
                input_model=source, uses=uses)


def _input_id(body: PipelineCreate) -> str:
    if body.model and body.teacher and body.model != body.teacher:
        raise Invalid("give the input model as model or as teacher, not both")
    if body.input_model is None:
        raise Invalid("model is required: the pipeline's input model (mdl_...), which its first stage takes")
    return body.input_model


def _named_stages(stages: list[StageCreate]) -> list[tuple[str, str, StageCreate]]:
    """(name, the stage it takes its model from, the stage) for each stage, names and defaults resolved."""
    named: list[tuple[str, str, StageCreate]] = []
    for index, stage in enumerate(stages):
        name = stage.name or _default_name(stage.kind, {taken for taken, _, _ in named})
        earlier = [taken for taken, _, _ in named]
        if name in earlier or name == machine.INPUT:
            raise Invalid(f"stages[{index}].name: '{name}' is taken; give each stage a unique name")
        after = stage.after or (earlier[-1] if earlier else machine.INPUT)
        if after != machine.INPUT and after not in earlier:
            raise Invalid(f"stages[{index}].after: '{after}' is not a stage listed before this one "
                          f"({', '.join(earlier) or 'none'}) nor 'input' (the pipeline's input model)")
        named.append((name, after, stage))
    return named


def _default_name(kind: str, taken: set[str]) -> str:
    if kind not in taken:
        return kind
    return next(f"{kind}-{number}" for number in range(2, len(taken) + 3) if f"{kind}-{number}" not in taken)


def _checked_stage(session: Session, tenant: str, body: PipelineCreate, stage: StageCreate, source: Model,
                   where: str) -> jobs_service.CheckedJob:
    """The stage as the job it will be, checked as POST /v1/jobs checks one, against the model it will take."""
    fields = dict(stage.model_extra or {})
    misplaced = sorted(set(fields) & set(PIPELINE_LEVEL_FIELDS))
    if misplaced:
        raise Invalid(f"{where}: {', '.join(misplaced)} cannot be set per stage: the pipeline sets the input model "
                      "and the data once, so that every stage is measured on the same images")
    several = sorted(name for name in _SEVERAL_TEACHERS if fields.get(name) is not None)
    if several:
        raise Invalid(f"{where}: {', '.join(several)} cannot be set in a pipeline stage, whose teacher is the model "
                      "it takes; submit an ensemble or multi-task distillation as a job (POST /v1/jobs), then give "
                      "its model to a pipeline")
    spec_class = SPEC_CLASSES[stage.kind]
    document = {**fields, "kind": stage.kind, spec_class.input_field: source.id, "dataset": body.dataset,
                "eval_dataset": body.eval_dataset, "val_fraction": body.val_fraction, "seed": body.seed}
    try:
        job_body = _JOB_BODIES[stage.kind].model_validate(document)
    except ValidationError as exc:
        raise invalid_from(exc, where) from exc
    try:
        return jobs_service.check_job(session, tenant, job_body, source)
    except Invalid as exc:
        raise Invalid(f"{where}: {exc.message}") from exc


def _predicted_output(spec: JobSpecBase, source: Model, stage_name: str) -> Model:
    """What the stage will make, as far as later stages' checks need it (never stored): a distillation's student,
    a pruned model of the same architecture (its channel counts are known only once pruned: the unpruned
    estimate bounds its cost), or an int8 model."""
    arch, input_spec = source.arch, source.input_spec
    if isinstance(spec, DistillJobSpec):
        arch = {"arch": spec.student.arch, "kwargs": spec.student.kwargs}
        input_spec = spec.student.input.model_dump(mode="json") if spec.student.input else input_spec
    return Model(id=f"stage:{stage_name}", tenant=source.tenant, name=stage_name, format="safetensors",
                 sha256="", bytes=0, arch=arch, input_spec=input_spec, num_classes=source.num_classes,
                 param_count=0, precision="int8" if spec.kind == "quantize" else "float32")


def get_pipeline(session: Session, tenant: str, pipeline_id: str) -> Pipeline:
    return pipelines.require(session, tenant, pipeline_id)


def list_pipelines(session: Session, tenant: str, status: str | None,
                   page: PageRequest) -> tuple[list[Pipeline], str | None]:
    return repository.page(session, tenant, status, page)


def cancel_pipeline(session: Session, principal: Principal, pipeline_id: str) -> Pipeline:
    pipeline = get_pipeline(session, principal.tenant, pipeline_id)
    for stage in machine.cancel(session, pipeline):
        lifecycle.stop_stage(session, stage, principal.actor)
    return pipeline
