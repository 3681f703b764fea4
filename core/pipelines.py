"""Pipelines: stages that run as ordinary jobs, each taking the model another stage made.

The API stores a pipeline with every stage's job spec checked and fully defaulted, and creates the jobs of the
stages that take the pipeline's input. From then on the database moves it along, in the transaction that ends a
stage's job (lifecycle calls stage_ended): a stage that succeeded and passed its gate starts the stages that take
its model (several at once: they are ordinary queued jobs, claimed by whichever workers are free), a stage that
failed, missed its gate or was canceled ends the pipeline and drops what had not started. Stages still running
then are returned to the caller (lifecycle) to cancel: this module only reads and writes rows, so that it needs
nothing of lifecycle, which calls it.

queued -> running -> succeeded | failed | canceled, plus canceling (a canceled pipeline's running stage stopping).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from core.db.models import Job, Model, Pipeline, utcnow
from core.db.session import after_commit
from core.dispatch import dispatch
from core.errors import Conflict
from core.events import record_event
from core.jobspec import SPEC_CLASSES
from core.lineage import job_inputs, output_model
from core.settings import get_settings

FINISHED = frozenset({"succeeded", "failed", "canceled"})
INPUT = "input"  # a stage's `after` when it takes the pipeline's input model
ACTOR = "pipeline"


def stages(pipeline: Pipeline) -> list[dict[str, Any]]:
    """The stored stages: {"name", "after", "gate", "job" (the stored job spec, its input model not yet set
    unless the stage takes the pipeline's input)}."""
    return list(pipeline.spec["stages"])


def stage_jobs(session: Session, pipeline_id: str) -> dict[str, Job]:
    """Each started stage's job, by stage name."""
    return {job.stage: job for job in session.scalars(select(Job).where(Job.pipeline_id == pipeline_id))
            if job.stage is not None}


def start(session: Session, pipeline: Pipeline, input_model: Model) -> list[str]:
    """Create the jobs of the stages that take the pipeline's input; returns their ids (to send after commit)."""
    return [_create_stage_job(session, pipeline, stage, input_model).id
            for stage in stages(pipeline) if stage["after"] == INPUT]


def _create_stage_job(session: Session, pipeline: Pipeline, stage: dict[str, Any], model: Model) -> Job:
    spec_class = SPEC_CLASSES[stage["job"]["kind"]]
    stored = {**stage["job"], spec_class.input_field: model.id}
    spec = spec_class.model_validate(stored)
    job = Job(tenant=pipeline.tenant, kind=spec.kind, spec=stored, teacher_id=model.id,
              dataset_id=pipeline.spec.get("dataset_id"), status="queued",
              max_attempts=get_settings().max_attempts, pipeline_id=pipeline.id, stage=stage["name"],
              inputs=job_inputs(session, spec, model))
    session.add(job)
    session.flush()
    record_event(session, job, "state", ACTOR,
                 f"submitted: stage '{stage['name']}' of pipeline {pipeline.id}, on model {model.id}")
    return job


def mark_running(session: Session, job: Job) -> None:
    """A stage's job was claimed: its pipeline is running (if it was still queued)."""
    if job.pipeline_id is None:
        return
    now = utcnow()
    session.execute(update(Pipeline).where(Pipeline.id == job.pipeline_id, Pipeline.status == "queued")
                    .values(status="running", started_at=now, updated_at=now)
                    .execution_options(synchronize_session=False))


def stage_ended(session: Session, job: Job) -> list[Job]:
    """Move the job's pipeline along now that the job (one of its stages) has ended. Returns the pipeline's stages
    still queued or running that it no longer needs (it failed or is canceled): the caller cancels them."""
    if job.pipeline_id is None:
        return []
    pipeline = _locked(session, job.pipeline_id)
    if pipeline is None or pipeline.status in FINISHED:
        return []  # a stage that was still stopping when the pipeline ended
    if pipeline.status == "canceling" or job.status == "canceled":
        return _settle_cancel(session, pipeline, job)
    if job.status == "failed":
        return _fail(session, pipeline, f"stage '{job.stage}' failed: {job.error or 'see its job ' + job.id}")
    return _stage_succeeded(session, pipeline, job)


def _locked(session: Session, pipeline_id: str) -> Pipeline | None:
    """The pipeline row, locked until commit on PostgreSQL: two stages that end at once (fan-out) must not both
    decide what comes next from the same state. SQLite has one writer at a time."""
    query = select(Pipeline).where(Pipeline.id == pipeline_id).execution_options(populate_existing=True)
    if session.get_bind().dialect.name == "postgresql":
        query = query.with_for_update()
    return session.scalar(query)


def _stage_succeeded(session: Session, pipeline: Pipeline, job: Job) -> list[Job]:
    stage = _stage(pipeline, job.stage)
    model = output_model(session, job.id)
    if model is None:
        return _fail(session, pipeline, f"stage '{job.stage}' succeeded without a model that passed its acceptance "
                                        "checks (see its job's acceptance verdicts)")
    acceptance = (job.metrics or {}).get("acceptance") or {}
    if stage["after"] == INPUT and pipeline.input_accuracy is None:
        pipeline.input_accuracy = acceptance.get("reference_accuracy")
    missed = gate_miss(stage, acceptance, pipeline.input_accuracy)
    if missed is not None:
        return _fail(session, pipeline, f"stage '{job.stage}' missed its gate: {missed}; the stages before it, and "
                                        f"its own model {model.id}, stay available")
    started = [_create_stage_job(session, pipeline, child, model).id
               for child in stages(pipeline) if child["after"] == job.stage]
    if started:
        after_commit(session, lambda: dispatch(started))
    ended = stage_jobs(session, pipeline.id)
    if all(name in ended and ended[name].status == "succeeded" for name in _names(pipeline)):
        _end(pipeline, "succeeded", None)
    return []


def gate_miss(stage: dict[str, Any], acceptance: dict[str, Any], input_accuracy: float | None) -> str | None:
    """Why the stage's files miss its gate, or None when they pass (or it has none). Every file published as a
    result must pass: the gate is applied to the worst of them."""
    gate = stage.get("gate")
    if not gate:
        return None
    against_input = gate["against"] == INPUT
    reference = input_accuracy if against_input else acceptance.get("reference_accuracy")
    formats = {fmt: entry["accuracy"] for fmt, entry in (acceptance.get("formats") or {}).items()
               if entry.get("passed")}
    if reference is None or not formats:
        return "its accuracy could not be compared (no published file, or no reference measured)"
    worst = min(formats, key=lambda fmt: formats[fmt])
    drop = round((reference - formats[worst]) * 100, 2)
    if drop <= gate["max_accuracy_drop_pts"]:
        return None
    what = "the pipeline's input model" if against_input else "the model it started from"
    return (f"its {worst} file scores {formats[worst]:.2%}, {drop:.2f} points below {what} ({reference:.2%}); the "
            f"gate allows {gate['max_accuracy_drop_pts']:g}")


def cancel(session: Session, pipeline: Pipeline) -> list[Job]:
    """Drop the stages that have not started; returns those queued or running, for the caller to cancel. The
    pipeline is canceled once none of them runs (at once when none did)."""
    if pipeline.status in FINISHED:
        raise Conflict(f"pipeline {pipeline.id} already {pipeline.status}; only queued or running pipelines can be "
                       "canceled")
    pipeline.status = "canceling"
    if not _active(session, pipeline):
        _end(pipeline, "canceled", None)
    return _unfinished(session, pipeline)


def _settle_cancel(session: Session, pipeline: Pipeline, job: Job) -> list[Job]:
    """A stage's job was canceled (by the pipeline's cancel, or on its own): the pipeline ends canceled once no
    stage runs."""
    if pipeline.status != "canceling":  # the stage's own job was canceled, not the pipeline
        pipeline.status, pipeline.error = "canceling", f"stage '{job.stage}' was canceled (job {job.id})"
    if not _active(session, pipeline):
        _end(pipeline, "canceled", pipeline.error)
    return _unfinished(session, pipeline)


def _fail(session: Session, pipeline: Pipeline, reason: str) -> list[Job]:
    _end(pipeline, "failed", reason)
    return _unfinished(session, pipeline)


def _active(session: Session, pipeline: Pipeline) -> bool:
    """Whether a stage is queued, running or stopping."""
    return any(job.status not in FINISHED for job in stage_jobs(session, pipeline.id).values())


def _unfinished(session: Session, pipeline: Pipeline) -> list[Job]:
    """The stages still queued or running (not those already stopping)."""
    return [job for job in stage_jobs(session, pipeline.id).values() if job.status in ("queued", "running")]


def _end(pipeline: Pipeline, status: str, error: str | None) -> None:
    now = utcnow()
    pipeline.status, pipeline.error, pipeline.finished_at, pipeline.updated_at = status, error, now, now


def _stage(pipeline: Pipeline, name: str | None) -> dict[str, Any]:
    return next(stage for stage in stages(pipeline) if stage["name"] == name)


def _names(pipeline: Pipeline) -> list[str]:
    return [stage["name"] for stage in stages(pipeline)]
