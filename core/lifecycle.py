"""The job state machine, owned by the database.

queued -> running -> succeeded | failed | canceled, plus canceling. A worker claims a job with one
conditional UPDATE and holds a lease that it renews; whoever finds a lease expired (the reaper)
gives the job back or fails it. Every transition writes a job event: who, when, why.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, and_, case, func, or_, select, update
from sqlalchemy.orm import Session, aliased

from core import pipelines
from core.db.models import Job, utcnow
from core.db.session import after_commit
from core.dispatch import revoke_after_commit
from core.errors import Conflict, public_text
from core.events import record_event
from core.webhooks.outbox import announce_end

log = logging.getLogger(__name__)

FINISHED = frozenset({"succeeded", "failed", "canceled"})
ACTIVE = frozenset({"running", "canceling"})
JOB_TEXT_LIMIT = 8000


def _record(session: Session, job_id: str, kind: str, actor: str, message: str,
            data: dict[str, Any] | None = None) -> None:
    job = session.get(Job, job_id, populate_existing=True)
    if job is not None:
        record_event(session, job, kind, actor, message, data)


def _ended(session: Session, job: Job, actor: str, message: str, data: dict[str, Any] | None = None) -> None:
    """Record the final state and, in the same transaction, announce it to the job's webhook (if any) and move
    its pipeline (if it is a stage of one) along."""
    record_event(session, job, "state", actor, message, data)
    announce_end(session, job)
    for stage in pipelines.stage_ended(session, job):
        stop_stage(session, stage, pipelines.ACTOR)


def stop_stage(session: Session, job: Job, actor: str) -> None:
    """Cancel a job its pipeline no longer needs (the pipeline failed or was canceled), unless it has stopped or
    is stopping already (canceling one stage may have ended the others)."""
    if job.status not in ("queued", "running"):
        return
    task_ids = request_cancel(session, job, actor)
    if task_ids:
        after_commit(session, lambda: revoke_after_commit(task_ids))


# ---- submission side (API) -------------------------------------------------------------------

def request_cancel(session: Session, job: Job, actor: str) -> list[str]:
    """Cancel a queued job at once; ask a running one to stop. Returns task ids to revoke.

    Only a queued job's message is revoked: a message runs whichever job is fairest (claim_next), so a running
    job's own message may still be out, standing for another queued job, which revoking it would strand."""
    if job.status in FINISHED:
        raise Conflict(f"job {job.id} already {job.status}; only queued or running jobs can be canceled")
    if job.status == "queued":
        job.status = "canceled"
        job.finished_at = utcnow()
        _ended(session, job, actor, "canceled before it started")
        return [job.id]
    if job.status == "running":
        job.status = "canceling"
        job.cancel_requested = True
        record_event(session, job, "state", actor, "cancel requested; the worker stops between steps")
    return []


# ---- worker side ------------------------------------------------------------------------------

def _claimable(job: Any, now: datetime) -> ColumnElement[bool]:
    """Queued, or running under an expired lease (its worker vanished), with an attempt left."""
    return and_(or_(job.status == "queued", and_(job.status == "running", job.lease_expires_at < now)),
                job.attempt < job.max_attempts)


def _fairest_claimable(session: Session, now: datetime) -> Any:
    """The id of the job a free worker should run next, as a scalar subquery: the oldest claimable job of the
    tenant with the fewest live leases; between tenants running as many, the one whose latest job started
    longest ago (never: first), so that one worker alternates tenants instead of draining the oldest backlog.
    Per tenant that has claimable jobs, this reads its jobs (index ix_jobs_tenant_created): once per job run."""
    live = and_(Job.status.in_(ACTIVE), Job.lease_expires_at >= now)
    candidate = aliased(Job, name="candidate")
    waiting_tenants = select(candidate.tenant).where(_claimable(candidate, now))
    tenants = (select(Job.tenant.label("tenant"), func.sum(case((live, 1), else_=0)).label("running"),
                      func.max(Job.started_at).label("last_start"))
               .where(Job.tenant.in_(waiting_tenants)).group_by(Job.tenant).subquery("tenant_load"))
    pick = aliased(Job, name="pick")
    query = (select(pick.id).join(tenants, tenants.c.tenant == pick.tenant).where(_claimable(pick, now))
             .order_by(tenants.c.running, tenants.c.last_start.asc().nulls_first(), pick.created_at, pick.id)
             .limit(1))
    if session.get_bind().dialect.name == "postgresql":
        # Two workers claiming at once: the second skips the row the first has locked instead of waiting for it
        # (and then finding it taken). SQLite runs one writer at a time, so the UPDATE below is atomic there.
        query = query.with_for_update(skip_locked=True, of=pick)
    return query.scalar_subquery()


def claim_next(session: Session, owner: str, lease_seconds: int) -> Job | None:
    """Take the fairest claimable job (see _fairest_claimable). None: nothing to run.

    A task's message means "run one job now", not "run this job": every message claims at most one job and
    every queued job has a message out, so each job is run, exactly once (the UPDATE is conditional), while
    another tenant's next job waits at most for one job to end. A duplicate message, or the message of a job
    that another message already ran, runs the next queued job or does nothing."""
    now = utcnow()
    return _take(session, Job.id == _fairest_claimable(session, now), owner, lease_seconds, now)


def claim(session: Session, job_id: str, owner: str, lease_seconds: int) -> Job | None:
    """Take this job if it is claimable, whatever else is queued (the tests set up a job's state with it)."""
    return _take(session, Job.id == job_id, owner, lease_seconds, utcnow())


def _take(session: Session, which: ColumnElement[bool], owner: str, lease_seconds: int, now: datetime) -> Job | None:
    result = session.execute(
        update(Job)
        .where(which, _claimable(Job, now))
        .values(status="running", attempt=Job.attempt + 1, lease_owner=owner,
                lease_expires_at=now + timedelta(seconds=lease_seconds), updated_at=now)
        .returning(Job.id)
        .execution_options(synchronize_session=False)
    )
    job_id = result.scalar_one_or_none()
    if job_id is None:
        return None
    job = session.get(Job, job_id, populate_existing=True)
    assert job is not None
    if job.started_at is None:
        job.started_at = now
    record_event(session, job, "state", owner, f"claimed (attempt {job.attempt} of {job.max_attempts})")
    pipelines.mark_running(session, job)
    return job


def renew_lease(session: Session, job_id: str, owner: str, lease_seconds: int,
                progress: dict[str, Any] | None) -> tuple[bool, bool]:
    """Extend our lease (and store the latest progress). Returns (still ours, cancel requested)."""
    now = utcnow()
    values: dict[str, Any] = {"lease_expires_at": now + timedelta(seconds=lease_seconds), "updated_at": now}
    if progress is not None:
        values["progress"] = progress
    result = session.execute(
        update(Job).where(Job.id == job_id, Job.lease_owner == owner, Job.status.in_(ACTIVE))
        .values(**values).execution_options(synchronize_session=False)
    )
    if result.rowcount != 1:
        return False, False
    cancel = session.scalar(select(Job.cancel_requested).where(Job.id == job_id))
    return True, bool(cancel)


def finish(session: Session, job_id: str, owner: str, status: str, message: str,
           error: str | None = None, metrics: dict[str, Any] | None = None) -> bool:
    """Move our job to a final state, only while we still hold its lease."""
    # The client reads both: a library's text may carry a host path or a heap address (never its length cap:
    # an acceptance verdict is long and all of it matters).
    message = public_text(message, limit=JOB_TEXT_LIMIT)
    error = None if error is None else public_text(error, limit=JOB_TEXT_LIMIT)
    now = utcnow()
    values: dict[str, Any] = {"status": status, "finished_at": now, "lease_owner": None,
                              "lease_expires_at": None, "error": error, "updated_at": now}
    if metrics is not None:
        values["metrics"] = metrics
    result = session.execute(
        update(Job).where(Job.id == job_id, Job.lease_owner == owner, Job.status.in_(ACTIVE))
        .values(**values).execution_options(synchronize_session=False)
    )
    if result.rowcount != 1:
        return False
    job = session.get(Job, job_id, populate_existing=True)
    assert job is not None
    _ended(session, job, owner, message, {"error": error} if error else None)
    return True


def release(session: Session, job_id: str, owner: str, message: str, refund_attempt: bool) -> bool:
    """Give our job back to the queue (preemption, retryable error). Send it again after commit."""
    now = utcnow()
    values: dict[str, Any] = {"status": "queued", "lease_owner": None, "lease_expires_at": None,
                              "enqueued_at": None, "updated_at": now}
    if refund_attempt:
        # Preemption is not the job's fault: it must not use up the attempt limit.
        values["attempt"] = Job.attempt - 1
    result = session.execute(
        update(Job).where(Job.id == job_id, Job.lease_owner == owner, Job.status == "running")
        .values(**values).execution_options(synchronize_session=False)
    )
    if result.rowcount != 1:
        return False
    _record(session, job_id, "state", owner, message)
    return True


def reap(session: Session, actor: str, redispatch_all_queued: bool, message_grace: timedelta) -> list[str]:
    """Requeue jobs whose lease expired, fail those out of attempts, settle abandoned cancels.

    Returns the ids of queued jobs to (re)send: those never sent (outbox), those just requeued, those sent longer
    than `message_grace` ago (their message may be gone: a worker took it while the database was down, or died
    holding it; a duplicate is harmless, the claim being conditional), and, when the broker lost its messages,
    every queued job.
    """
    now = utcnow()
    stale = select(Job).where(Job.status.in_(ACTIVE), Job.lease_expires_at < now)
    # skip_locked: two reapers (one per worker host) never settle the same job twice.
    expired = list(session.scalars(stale.with_for_update(skip_locked=True)))
    for job in expired:
        _settle_expired(session, job, actor, now)
    queued = select(Job.id).where(Job.status == "queued")
    if not redispatch_all_queued:
        queued = queued.where(or_(Job.enqueued_at.is_(None), Job.enqueued_at < now - message_grace))
    return list(session.scalars(queued.order_by(Job.created_at)))


def finished_before(session: Session, job_ids: list[str], cutoff: datetime) -> list[str]:
    """Those of job_ids that ended before cutoff (their files may go)."""
    if not job_ids:
        return []
    query = select(Job.id).where(Job.id.in_(job_ids), Job.status.in_(FINISHED), Job.finished_at < cutoff)
    return list(session.scalars(query))


def _settle_expired(session: Session, job: Job, actor: str, now: datetime) -> None:
    reason = f"worker {job.lease_owner} stopped renewing its lease (attempt {job.attempt})"
    job.lease_owner = None
    job.lease_expires_at = None
    if job.status == "canceling":
        job.status, job.finished_at = "canceled", now
        _ended(session, job, actor, f"canceled; {reason}")
    elif job.attempt >= job.max_attempts:
        job.status, job.finished_at = "failed", now
        job.error = f"{reason}; gave up after {job.attempt} attempts"
        _ended(session, job, actor, f"failed: {job.error}")
    else:
        job.status, job.enqueued_at = "queued", None
        record_event(session, job, "state", actor, f"requeued: {reason}")
