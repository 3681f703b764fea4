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
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError

from core import lifecycle
from core.db.models import Artifact, Dataset, Job, Model
from core.db.session import session_scope
from core.jobspec import JobSpecBase, load_stored, stored_form
from core.settings import Settings, get_settings
from core.storage import BlobStore, StoredBlob, get_store
from core.views import as_utc
from worker import report
from worker.engine import cpu
from worker.engine.errors import Canceled, EngineError
from worker.engine.hardware import pick_device
from worker.engine.models import describe_validation_error
from worker.guard import JobGuard, LeaseLost, Preempted, record_epochs
from worker.heartbeat import Heartbeat
from worker.jobs.base import Checkpoints, JobContext, JobOutcome, ModelSource, OutputFile, job_function
from worker.preemption import stop_requested

log = logging.getLogger(__name__)


def job_work_dir(settings: Settings, job_id: str) -> Path:
    return settings.data_dir.resolve() / "jobs" / job_id


def worker_identity() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


def run(job_id: str) -> None:
    settings = get_settings()
    owner = worker_identity()
    with session_scope() as session:
        job = lifecycle.claim(session, job_id, owner, settings.lease_seconds)
        if job is None:
            log.info("job %s not claimable here (held by a live lease, finished, or out of attempts)", job_id)
            return
        try:
            spec = load_stored(job.spec)
        # The API validated this spec with the same classes: only a version skew between API and worker gets here.
        except ValidationError as exc:
            reason = f"the job's stored spec does not validate: {describe_validation_error(exc)}"
            lifecycle.finish(session, job_id, owner, "failed", f"failed: {reason}", error=reason)
            return
        ctx = _context(session, job, spec, owner, settings)
    heartbeat = Heartbeat(job_id, owner, settings.lease_seconds, settings.heartbeat_seconds)
    heartbeat.start()
    try:
        _run_claimed(ctx, heartbeat, settings)
    finally:
        heartbeat.stop()


def _context(session: Any, job: Job, spec: JobSpecBase, owner: str, settings: Settings) -> JobContext:
    store = get_store()
    teacher = session.get(Model, job.teacher_id)
    dataset = session.get(Dataset, job.dataset_id) if job.dataset_id else None
    return JobContext(
        job_id=job.id, kind=job.kind, owner=owner, attempt=job.attempt, max_attempts=job.max_attempts,
        spec=spec,
        teacher=ModelSource(path=store.path_for(teacher.sha256), format=teacher.format, arch=teacher.arch,
                            input_spec=teacher.input_spec, bytes=teacher.bytes),
        dataset_path=store.path_for(dataset.canonical_sha256) if dataset else None,
        work_dir=job_work_dir(settings, job.id),
        provenance=_provenance(spec, teacher, dataset),
        deadline=_deadline(job, spec),
    )


def _deadline(job: Job, spec: JobSpecBase) -> datetime | None:
    limit = spec.time_limit_seconds
    if limit is None or job.started_at is None:
        return None
    return as_utc(job.started_at) + timedelta(seconds=limit)


def _provenance(spec: JobSpecBase, model: Model, dataset: Dataset | None) -> dict[str, Any]:
    model_fields = {"id": model.id, "name": model.name, "format": model.format, "sha256": model.sha256,
                    "bytes": model.bytes, "arch": model.arch, "input_spec": model.input_spec}
    if dataset is None:
        return {"model": model_fields, "dataset": {"builtin": spec.dataset}}
    dataset_fields = {"id": dataset.id, "name": dataset.name, "format": dataset.format, "sha256": dataset.sha256,
                      "canonical_sha256": dataset.canonical_sha256, "num_samples": dataset.num_samples,
                      "num_classes": dataset.num_classes}
    return {"model": model_fields, "dataset": dataset_fields}


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
        log.exception("job %s attempt %d crashed", ctx.job_id, ctx.attempt)
        _retry_or_fail(ctx, f"{type(error).__name__}: {error}")


def _end(ctx: JobContext, status: str, message: str, error: str | None = None) -> None:
    with session_scope() as session:
        lifecycle.finish(session, ctx.job_id, ctx.owner, status, message, error=error)


def _requeue(ctx: JobContext, message: str, refund_attempt: bool) -> None:
    with session_scope() as session:
        released = lifecycle.release(session, ctx.job_id, ctx.owner, message, refund_attempt=refund_attempt)
    if released:
        lifecycle.dispatch([ctx.job_id])


def _retry_or_fail(ctx: JobContext, reason: str) -> None:
    if ctx.attempt >= ctx.max_attempts:
        # The work dir (last checkpoint) stays for inspection; the reaper removes it after the retention.
        _end(ctx, "failed", f"failed after {ctx.attempt} attempts: {reason}", error=reason)
        return
    _requeue(ctx, f"attempt {ctx.attempt} stopped: {reason}; retrying", refund_attempt=False)


def _publish(ctx: JobContext, outcome: JobOutcome, store: BlobStore) -> None:
    """Store the files, then in one transaction add their rows (and any epoch events not yet recorded)
    and mark the job succeeded."""
    message = _conclude(outcome.metrics)
    blobs = [(output, store.put_file(output.path)) for output in outcome.files]
    blobs += [(output, store.put_file(output.path)) for output in _report(ctx, outcome, blobs)]
    with session_scope() as session:
        record_epochs(session, ctx, outcome.metrics.get("history", []))
        tenant = session.get(Job, ctx.job_id).tenant
        for output, blob in blobs:
            session.add(Artifact(tenant=tenant, job_id=ctx.job_id, kind=output.kind, filename=output.filename,
                                 media_type=output.media_type, runtime=output.runtime, sha256=blob.sha256,
                                 bytes=blob.bytes))
        if not lifecycle.finish(session, ctx.job_id, ctx.owner, "succeeded", message, metrics=outcome.metrics):
            # Someone else owns the job now: roll back so that only one attempt ever publishes.
            raise LeaseLost(ctx.job_id)
    shutil.rmtree(ctx.work_dir, ignore_errors=True)


def _conclude(metrics: dict[str, Any]) -> str:
    """Adds what every kind's figures need (the CPU they were measured on; a failed format check first among
    the notes) and returns the job's closing message, which names any format that failed its check."""
    metrics["measured_on"] = cpu.describe()
    check = metrics.get("format_check") or {}
    metrics["notes"] = [*check.get("notes", []), *metrics.get("notes", [])]
    failed = [fmt for fmt, entry in check.get("formats", {}).items() if not entry["passed"]]
    if failed:
        return (f"succeeded, but the {' and '.join(failed)} file(s) failed the accuracy check against their float "
                f"source: not usable results (see the notes)")
    return "succeeded; artifacts published"


def _report(ctx: JobContext, outcome: JobOutcome, blobs: list[tuple[OutputFile, StoredBlob]]) -> list[OutputFile]:
    """The report files of a job about to succeed; they describe the artifacts, so they come after them."""
    artifacts = [{"kind": output.kind, "filename": output.filename, "runtime": output.runtime,
                  "sha256": blob.sha256, "bytes": blob.bytes} for output, blob in blobs]
    job = {"id": ctx.job_id, "kind": ctx.kind, "attempt": ctx.attempt, "spec": stored_form(ctx.spec)}
    document = report.build_document(job, ctx.provenance, outcome.metrics, artifacts,
                                     report.environment(_device_name(ctx)))
    return [OutputFile(item.kind, item.path, item.path.name, item.media_type, "report")
            for item in report.write_report(ctx.work_dir / "report", document)]


def _device_name(ctx: JobContext) -> str:
    """The device the job trained and measured on, as the engine picked it from the spec."""
    device = pick_device(ctx.spec.device)
    return f"cuda ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "cpu"
