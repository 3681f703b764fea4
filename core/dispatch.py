"""Sending jobs' messages to the broker (after their rows are committed) and revoking them."""

from __future__ import annotations

import logging

from sqlalchemy import update

from core.db.models import Job, utcnow

log = logging.getLogger("core.lifecycle")


def revoke_after_commit(task_ids: list[str]) -> None:
    """Revoke queued deliveries too; a running job stops through the database flag."""
    from core.broker import get_celery

    try:
        get_celery().control.revoke(task_ids)
    except Exception:  # the flag in the database is what stops the job; revoke is best effort
        log.warning("could not revoke %s: broker unreachable", task_ids, exc_info=True)


def dispatch(job_ids: list[str]) -> list[str]:
    """Send each job's message after its row is committed (outbox). Returns the ids sent.

    A broker outage is not an error here: the job stays queued with enqueued_at NULL and the
    reaper sends it when the broker is back.
    """
    from core.broker import RUN_JOB_TASK, get_celery
    from core.db.session import session_scope

    sent = []
    for job_id in job_ids:
        try:
            get_celery().send_task(RUN_JOB_TASK, args=[job_id], task_id=job_id,
                                   retry=True, retry_policy={"max_retries": 2, "interval_start": 0.2})
        except Exception:
            log.warning("broker unreachable; job %s stays in the outbox", job_id, exc_info=True)
            continue
        sent.append(job_id)
    if sent:
        with session_scope() as session:
            session.execute(update(Job).where(Job.id.in_(sent)).values(enqueued_at=utcnow()))
    return sent
