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
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import torch
from sqlalchemy import select
from sqlalchemy.exc import OperationalError

from app.config import Settings, get_settings
from app.db.models import Artifact, Dataset, Job, JobEvent, Model, utcnow
from app.db.session import session_scope
from app.jobs import lifecycle
from app.schemas import as_utc
from app.storage import BlobStore, StoredBlob, get_store
from worker import report
from worker.engine import cpu
from worker.engine.distill import Progress
from worker.engine.errors import Canceled, EngineError, Interrupted
from worker.engine.fileio import atomic_write
from worker.engine.models import pick_device
from worker.heartbeat import Heartbeat
from worker.jobs import job_function
from worker.preemption import stop_requested

log = logging.getLogger(__name__)


class LeaseLost(Exception):
    """Another worker owns the job now; stop without touching it."""


class Preempted(Interrupted):
    """SIGTERM or the soft time limit: the engine checkpoints, then the job is given back."""


class TimeLimitExceeded(EngineError):
    """The job's own time_limit_seconds ran out: it fails (a retry would run out of time too)."""


@dataclass(frozen=True)
class ModelSource:
    path: Path
    format: str
    arch: dict[str, Any]
    input_spec: dict[str, Any]
    bytes: int


@dataclass(frozen=True)
class JobContext:
    job_id: str
    kind: str
    owner: str
    attempt: int
    max_attempts: int
    spec: dict[str, Any]
    teacher: ModelSource
    dataset_path: Path | None  # None: the built-in dataset named in spec["dataset"]
    work_dir: Path
    provenance: dict[str, Any]  # what went in, with sha256s, for the report
    deadline: datetime | None = None  # from the spec's time_limit_seconds, counted from the first start


@dataclass(frozen=True)
class OutputFile:
    kind: str
    path: Path
    filename: str
    media_type: str
    runtime: str


@dataclass
class JobOutcome:
    files: list[OutputFile]
    metrics: dict[str, Any]


class Checkpoints:
    """The job's single checkpoint file, replaced atomically so a crash never leaves half of one."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def save(self, state: dict[str, Any]) -> None:
        atomic_write(self.path, lambda handle: torch.save(state, handle))

    def load(self) -> dict[str, Any] | None:
        if not self.path.exists():
            return None
        return torch.load(self.path, weights_only=True, map_location="cpu")


def record_epochs(session: Any, ctx: JobContext, history: list[dict[str, Any]]) -> None:
    """Add a progress event for each finished epoch of `history` that the job's events lack.

    The checkpoint's history is the truth: epochs that ended while the database was unreachable, or in an
    attempt that died before recording them, are filled in by the next write that gets through."""
    recorded = {event.data.get("epoch") for event in session.scalars(
        select(JobEvent).where(JobEvent.job_id == ctx.job_id, JobEvent.kind == "progress"))}
    job = session.get(Job, ctx.job_id)
    for entry in history:
        if entry["epoch"] not in recorded:
            lifecycle.record_event(session, job, "progress", ctx.owner,
                                   f"epoch {entry['epoch']} done; checkpoint written", entry)


class JobGuard:
    """The engine's progress callback: publishes progress, stops the loop when it must."""

    def __init__(self, heartbeat: Heartbeat, checkpoints: Checkpoints, ctx: JobContext) -> None:
        self.heartbeat = heartbeat
        self.checkpoints = checkpoints
        self.ctx = ctx

    def stage(self, name: str) -> None:
        self.heartbeat.progress = {**(self.heartbeat.progress or {}), "stage": name}
        self.check()

    def on_progress(self, progress: Progress) -> None:
        self.heartbeat.progress = asdict(progress)
        self.check()

    def on_checkpoint(self, state: dict[str, Any]) -> None:
        self.checkpoints.save(state)
        if state.get("step_in_epoch") or not state.get("history"):
            return  # a mid-epoch checkpoint on the way out: the give-back event says why
        try:
            with session_scope() as session:
                record_epochs(session, self.ctx, state["history"])
        except OperationalError:
            # The checkpoint (and its history) is on disk: the next checkpoint or the publish records the epoch.
            log.warning("job %s: could not record epoch %s yet", self.ctx.job_id, state["epoch"], exc_info=True)

    def check(self) -> None:
        if self.heartbeat.cancel_requested.is_set():
            raise Canceled("canceled by request")
        if self.heartbeat.lease_lost.is_set():
            raise LeaseLost(self.ctx.job_id)
        if request := stop_requested():
            raise Preempted(request.reason)
        if self.ctx.deadline is not None and utcnow() > self.ctx.deadline:
            limit = self.ctx.spec["time_limit_seconds"]
            raise TimeLimitExceeded(f"still running after its time_limit_seconds of {limit}; no artifact published")


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
        ctx = _context(session, job, owner, settings)
    heartbeat = Heartbeat(job_id, owner, settings.lease_seconds, settings.heartbeat_seconds)
    heartbeat.start()
    try:
        _run_claimed(ctx, heartbeat, settings)
    finally:
        heartbeat.stop()


def _context(session: Any, job: Job, owner: str, settings: Settings) -> JobContext:
    store = get_store()
    teacher = session.get(Model, job.teacher_id)
    dataset = session.get(Dataset, job.dataset_id) if job.dataset_id else None
    return JobContext(
        job_id=job.id, kind=job.kind, owner=owner, attempt=job.attempt, max_attempts=job.max_attempts,
        spec=dict(job.spec),
        teacher=ModelSource(path=store.path_for(teacher.sha256), format=teacher.format, arch=teacher.arch,
                            input_spec=teacher.input_spec, bytes=teacher.bytes),
        dataset_path=store.path_for(dataset.canonical_sha256) if dataset else None,
        work_dir=job_work_dir(settings, job.id),
        provenance=_provenance(job, teacher, dataset),
        deadline=_deadline(job),
    )


def _deadline(job: Job) -> datetime | None:
    limit = job.spec.get("time_limit_seconds")
    if limit is None or job.started_at is None:
        return None
    return as_utc(job.started_at) + timedelta(seconds=limit)


def _provenance(job: Job, model: Model, dataset: Dataset | None) -> dict[str, Any]:
    model_fields = {"id": model.id, "name": model.name, "format": model.format, "sha256": model.sha256,
                    "bytes": model.bytes, "arch": model.arch, "input_spec": model.input_spec}
    if dataset is None:
        return {"model": model_fields, "dataset": {"builtin": job.spec.get("dataset")}}
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
    document = report.build_document({"id": ctx.job_id, "kind": ctx.kind, "attempt": ctx.attempt, "spec": ctx.spec},
                                     ctx.provenance, outcome.metrics, artifacts, report.environment(_device_name(ctx)))
    return [OutputFile(item.kind, item.path, item.path.name, item.media_type, "report")
            for item in report.write_report(ctx.work_dir / "report", document)]


def _device_name(ctx: JobContext) -> str:
    """The device the job trained and measured on, as the engine picked it from the spec."""
    device = pick_device(ctx.spec.get("device", "auto"))
    return f"cuda ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "cpu"
