"""Runs one job: claim it, train with progress, evaluate and export, publish. Job <-> engine glue.

The engine knows nothing of jobs; this module knows nothing of HTTP. Every outcome ends in exactly
one lifecycle transition, made only while this process still holds the job's lease.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import socket
from dataclasses import replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError

from core import lifecycle
from core.db.models import Artifact, Dataset, Job, Model
from core.db.session import session_scope, through_outage
from core.dispatch import dispatch
from core.jobspec import DistillJobSpec, JobSpecBase, load_stored, stored_form
from core.logs import job_context
from core.settings import Settings, get_settings
from core.storage import BlobStore, StoredBlob, get_store
from core.views import as_utc
from worker import report
from worker.engine import cpu
from worker.engine.config import BUILTIN_DATASETS
from worker.engine.errors import Canceled, EngineError
from worker.engine.hardware import pick_device
from worker.engine.models import describe_validation_error
from worker.guard import JobGuard, LeaseLost, Preempted, record_epochs
from worker.heartbeat import Heartbeat
from worker.jobs import acceptance
from worker.jobs.base import (
    Checkpoints,
    JobContext,
    JobOutcome,
    ModelSource,
    OutputFile,
    OutputModel,
    job_function,
)
from worker.memory import is_out_of_memory, out_of_memory_message
from worker.preemption import stop_requested

log = logging.getLogger(__name__)
# The name a file that failed its acceptance checks is published under, so that nobody deploys it by mistake.
DIAGNOSTIC_PREFIX = "REJECTED-"
REJECTED_RUNTIME = "REJECTED: "  # before the runtime it was measured with (the column holds 64 characters)
RUNTIME_LENGTH = Artifact.runtime.type.length


def job_work_dir(settings: Settings, job_id: str) -> Path:
    return settings.data_dir.resolve() / "jobs" / job_id


def worker_identity() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


def run(message_id: str) -> None:
    """Run the job a free worker should run next (lifecycle.claim_next). The message's own job (`message_id`) is
    that one only when it is the fairest; with none claimable, the message was a duplicate, or stood for a job
    that another message already ran."""
    settings = get_settings()
    owner = worker_identity()
    with session_scope() as session:
        job = lifecycle.claim_next(session, owner, settings.lease_seconds)
        if job is None:
            log.info("message %s: no job to run (all running under live leases, finished, or out of attempts)",
                     message_id)
            return
        ctx = _prepare(session, job, owner, settings)
    if ctx is None:
        return
    with job_context(ctx.job_id):
        heartbeat = Heartbeat(ctx.job_id, owner, settings.lease_seconds, settings.heartbeat_seconds)
        heartbeat.start()
        try:
            _run_claimed(ctx, heartbeat, settings)
        finally:
            heartbeat.stop()


def _prepare(session: Any, job: Job, owner: str, settings: Settings) -> JobContext | None:
    """The claimed job's context; None when its spec does not validate (the job is failed, here)."""
    try:
        spec = load_stored(job.spec)
    # The API validated this spec with the same classes: only a version skew between API and worker gets here.
    except ValidationError as exc:
        reason = f"the job's stored spec does not validate: {describe_validation_error(exc)}"
        lifecycle.finish(session, job.id, owner, "failed", f"failed: {reason}", error=reason)
        return None
    return _context(session, job, spec, owner, settings)


def _context(session: Any, job: Job, spec: JobSpecBase, owner: str, settings: Settings) -> JobContext:
    store = get_store()
    teacher = session.get(Model, job.teacher_id)
    dataset = session.get(Dataset, job.dataset_id) if job.dataset_id else None
    # The API checked that the evaluation set is the tenant's and fits; rows are never removed (deleting marks them).
    eval_dataset = session.get(Dataset, spec.eval_dataset) if spec.eval_dataset not in (None, *BUILTIN_DATASETS) \
        else None
    teachers = _named_models(session, spec)
    return JobContext(
        job_id=job.id, kind=job.kind, owner=owner, attempt=job.attempt, max_attempts=job.max_attempts,
        spec=spec,
        teacher=_model_source(store, teacher),
        dataset_path=store.path_for(dataset.canonical_sha256) if dataset else None,
        work_dir=job_work_dir(settings, job.id),
        provenance=_provenance(session, spec, teacher, dataset, eval_dataset, teachers),
        deadline=_deadline(job, spec),
        eval_dataset_path=store.path_for(eval_dataset.canonical_sha256) if eval_dataset else None,
        original=_original(session.get(Job, job.replay_of)) if job.replay_of else None,
        models={model.id: _model_source(store, model) for model in teachers},
        dataset_paths={name: _dataset_path(session, store, name) for name in _named_datasets(spec)},
    )


def _model_source(store: BlobStore, model: Model) -> ModelSource:
    return ModelSource(path=store.path_for(model.sha256), format=model.format, arch=model.arch,
                       input_spec=model.input_spec, bytes=model.bytes, id=model.id)


def _named_models(session: Any, spec: JobSpecBase) -> list[Model]:
    """The models a distillation names as teachers (the API checked each is the tenant's and live)."""
    if not isinstance(spec, DistillJobSpec):
        return []
    return [session.get(Model, model_id) for model_id in dict.fromkeys(ref.model for ref in spec.teacher_refs)]


def _named_datasets(spec: JobSpecBase) -> list[str]:
    names = [spec.dataset, spec.eval_dataset]
    if isinstance(spec, DistillJobSpec) and spec.tasks is not None:
        names += [name for task in spec.tasks for name in (task.dataset, task.eval_dataset)]
    return [name for name in dict.fromkeys(names) if name is not None]


def _dataset_path(session: Any, store: BlobStore, name: str) -> Path | None:
    if name in BUILTIN_DATASETS:
        return None
    return store.path_for(session.get(Dataset, name).canonical_sha256)


def _original(job: Job | None) -> dict[str, Any] | None:
    """What a replay's report shows of the job it replays (its figures, and where they were measured)."""
    if job is None:
        return None
    metrics = job.metrics or {}
    return {"id": job.id, "kind": job.kind, "status": job.status, "metrics": metrics,
            "finished_at": as_utc(job.finished_at).isoformat() if job.finished_at else None,
            "environment": metrics.get("environment")}


def _deadline(job: Job, spec: JobSpecBase) -> datetime | None:
    limit = spec.time_limit_seconds
    if limit is None or job.started_at is None:
        return None
    return as_utc(job.started_at) + timedelta(seconds=limit)


def _provenance(session: Any, spec: JobSpecBase, model: Model, dataset: Dataset | None,
                eval_dataset: Dataset | None, teachers: list[Model]) -> dict[str, Any]:
    inputs: dict[str, Any] = {"model": _model_fields(model), "dataset": _dataset_fields(spec.dataset, dataset)}
    if spec.eval_dataset is not None:
        inputs["eval_dataset"] = _dataset_fields(spec.eval_dataset, eval_dataset)
    if len(teachers) > 1:
        inputs["teachers"] = [_model_fields(teacher) for teacher in teachers]
    if isinstance(spec, DistillJobSpec) and spec.tasks is not None:
        inputs["task_datasets"] = {
            name: _dataset_fields(name, None if name in BUILTIN_DATASETS else session.get(Dataset, name))
            for name in _named_datasets(spec)}
    return inputs


def _model_fields(model: Model) -> dict[str, Any]:
    return {"id": model.id, "name": model.name, "format": model.format, "sha256": model.sha256, "bytes": model.bytes,
            "arch": model.arch, "input_spec": model.input_spec}


def _dataset_fields(name: str, dataset: Dataset | None) -> dict[str, Any]:
    if dataset is None:
        return {"builtin": name}
    return {"id": dataset.id, "name": dataset.name, "format": dataset.format, "sha256": dataset.sha256,
            "canonical_sha256": dataset.canonical_sha256, "num_samples": dataset.num_samples,
            "num_classes": dataset.num_classes}


def _run_claimed(ctx: JobContext, heartbeat: Heartbeat, settings: Settings) -> None:
    checkpoints = Checkpoints(ctx.work_dir / "checkpoint.pt")
    guard = JobGuard(heartbeat, checkpoints, ctx)
    try:
        outcome = job_function(ctx.kind)(ctx, guard, checkpoints)
        _publish(ctx, outcome, get_store())
    except Canceled:
        _end(ctx, "canceled", "canceled between steps; no artifact published")
        shutil.rmtree(ctx.work_dir, ignore_errors=True)
    except Preempted as stop:
        if stop_requested().counts_as_attempt:
            _retry_or_fail(ctx, f"{stop}; checkpointed")
        else:
            _requeue(ctx, f"preempted: {stop}; checkpointed, resumes on the next worker", refund_attempt=True)
    except LeaseLost:
        log.warning("job %s: lease lost to another worker; stopping without changes", ctx.job_id)
    except EngineError as error:
        # The input cannot work (bad weights, data that does not fit): retrying would not help.
        _end(ctx, "failed", f"failed: {error}", error=str(error))
    except Exception as error:
        if is_out_of_memory(error):
            # Another attempt would need as much: the job's own size is at fault, not the worker.
            reason = out_of_memory_message()
            _end(ctx, "failed", f"failed: {reason}", error=reason)
            return
        log.exception("job %s attempt %d crashed", ctx.job_id, ctx.attempt)
        _retry_or_fail(ctx, f"{type(error).__name__}: {error}")


def _end(ctx: JobContext, status: str, message: str, error: str | None = None) -> None:
    with session_scope() as session:
        lifecycle.finish(session, ctx.job_id, ctx.owner, status, message, error=error)


def _requeue(ctx: JobContext, message: str, refund_attempt: bool) -> None:
    with session_scope() as session:
        released = lifecycle.release(session, ctx.job_id, ctx.owner, message, refund_attempt=refund_attempt)
    if released:
        dispatch([ctx.job_id])


def _retry_or_fail(ctx: JobContext, reason: str) -> None:
    if ctx.attempt >= ctx.max_attempts:
        # The work dir (last checkpoint) stays for inspection; the reaper removes it after the retention.
        _end(ctx, "failed", f"failed after {ctx.attempt} attempts: {reason}", error=reason)
        return
    _requeue(ctx, f"attempt {ctx.attempt} stopped: {reason}; retrying", refund_attempt=False)


def _publish(ctx: JobContext, outcome: JobOutcome, store: BlobStore) -> None:
    """Store the files (those that failed their acceptance checks marked as diagnostics), then in one transaction
    add their rows, the epochs not yet recorded and the acceptance outcome, and end the job: succeeded, or failed
    when no result passed."""
    status, message, error = _conclude(ctx.kind, outcome.metrics)
    # Lineage shows what made each model (library versions, device): kept with the job's figures.
    outcome.metrics["environment"] = report.environment(_device_name(ctx))
    acceptance_result = outcome.metrics.get("acceptance") or {}
    files = [_as_diagnostic(output) if output.format in acceptance_result.get("failed_formats", ()) else output
             for output in outcome.files]
    blobs = [(output, store.put_file(output.path)) for output in files]
    blobs += [(output, store.put_file(output.path)) for output in _report(ctx, outcome, blobs)]
    result_file = _result_file(outcome, blobs) if status == "succeeded" else None

    def record() -> None:
        with session_scope() as session:
            record_epochs(session, ctx, outcome.metrics.get("history", []))
            job = session.get(Job, ctx.job_id)
            for output, blob in blobs:
                session.add(Artifact(tenant=job.tenant, job_id=ctx.job_id, kind=output.kind,
                                     filename=output.filename, media_type=output.media_type, runtime=output.runtime,
                                     sha256=blob.sha256, bytes=blob.bytes))
            if result_file is not None and outcome.model is not None:
                # Before the job ends: ending it moves its pipeline on, which takes this model.
                _register_model(session, job, outcome.model, *result_file)
            if acceptance_result:
                lifecycle.record_event(session, job, "acceptance", ctx.owner, _acceptance_line(acceptance_result),
                                       {"formats": acceptance_result["formats"]})
            if not lifecycle.finish(session, ctx.job_id, ctx.owner, status, message, error=error,
                                    metrics=outcome.metrics):
                # Someone else owns the job now: roll back so that only one attempt ever publishes.
                raise LeaseLost(ctx.job_id)

    # The work is done and its files stored: a database outage now must not cost the attempt (the heartbeat keeps
    # the lease through it). Blobs whose rows never commit are orphans for the collector (core.orphans).
    through_outage(record, get_settings().publish_retry_seconds, f"job {ctx.job_id}: publishing")
    shutil.rmtree(ctx.work_dir, ignore_errors=True)


def _result_file(outcome: JobOutcome,
                 blobs: list[tuple[OutputFile, StoredBlob]]) -> tuple[OutputFile, StoredBlob] | None:
    """The file that holds the job's result model: the first of its candidates still published as a result
    (a file that failed its acceptance checks was renamed to a diagnostic kind)."""
    if outcome.model is None:
        return None
    stored = {output.kind: (output, blob) for output, blob in blobs}
    return next((stored[kind] for kind in outcome.model.file_kinds if kind in stored), None)


def _register_model(session: Any, job: Job, result: OutputModel, output: OutputFile, blob: StoredBlob) -> Model:
    """The job's result as a model of the tenant's, sharing the artifact's stored file."""
    source = session.get(Model, job.teacher_id)
    name = f"{source.name} · {result.label}"[:Model.name.type.length]
    model = Model(tenant=job.tenant, name=name, format=output.format or "safetensors", sha256=blob.sha256,
                  bytes=blob.bytes, arch=result.arch, input_spec=result.input_spec, num_classes=result.num_classes,
                  param_count=result.param_count, precision=result.precision, source_job_id=job.id)
    session.add(model)
    session.flush()
    return model


def _as_diagnostic(output: OutputFile) -> OutputFile:
    """A file that failed its acceptance checks: kept for diagnosis under a name and kind no client takes for the
    result (clients that ask for `quantized_onnx` find none)."""
    return replace(output, kind=f"{output.kind}_rejected", filename=DIAGNOSTIC_PREFIX + output.filename,
                   runtime=f"{REJECTED_RUNTIME}{output.runtime}"[:RUNTIME_LENGTH])


def _acceptance_line(acceptance_result: dict[str, Any]) -> str:
    verdicts = [f"{fmt} {entry['accuracy']:.2%} {'passed' if entry['passed'] else 'FAILED'}"
                for fmt, entry in acceptance_result["formats"].items()]
    return "acceptance checks: " + ", ".join(verdicts)


def _conclude(kind: str, metrics: dict[str, Any]) -> tuple[str, str, str | None]:
    """Adds what every kind's figures need (the CPU they were measured on; the acceptance notes first among the
    notes) and returns the job's (status, closing message, error) from its acceptance checks."""
    metrics["measured_on"] = cpu.describe()
    acceptance_result = metrics.get("acceptance")
    if not acceptance_result:
        return "succeeded", "succeeded; artifacts published", None
    metrics["notes"] = [*acceptance_result["notes"], *metrics.get("notes", [])]
    return acceptance.conclusion(kind, acceptance_result)


def _report(ctx: JobContext, outcome: JobOutcome, blobs: list[tuple[OutputFile, StoredBlob]]) -> list[OutputFile]:
    """The report files of a job about to succeed; they describe the artifacts, so they come after them."""
    artifacts = [{"kind": output.kind, "filename": output.filename, "runtime": output.runtime,
                  "sha256": blob.sha256, "bytes": blob.bytes} for output, blob in blobs]
    job = {"id": ctx.job_id, "kind": ctx.kind, "attempt": ctx.attempt, "spec": stored_form(ctx.spec)}
    document = report.build_document(job, ctx.provenance, outcome.metrics, artifacts, outcome.metrics["environment"],
                                     ctx.original)
    return [OutputFile(item.kind, item.path, item.path.name, item.media_type, "report")
            for item in report.write_report(ctx.work_dir / "report", document)]


def _device_name(ctx: JobContext) -> str:
    """The device the job trained and measured on, as the engine picked it from the spec."""
    device = pick_device(ctx.spec.device)
    return f"cuda ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "cpu"
