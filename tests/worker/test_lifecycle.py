"""The job state machine on a real database (SQLite and PostgreSQL): claims, leases, the reaper."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import select, update

from core import lifecycle
from core.db.models import Job, JobEvent, Model, utcnow
from core.db.session import session_scope
from core.errors import Conflict
from core.settings import get_settings

GRACE = timedelta(minutes=15)

@pytest.fixture
def job_id(app_env: object) -> str:
    with session_scope() as session:
        teacher = Model(tenant="t1", name="m", format="safetensors", sha256="0" * 64, bytes=1,
                        arch={"arch": "small_cnn", "kwargs": {"num_classes": 10}}, input_spec={"image_size": 8},
                        num_classes=10, param_count=1)
        session.add(teacher)
        session.flush()
        job = Job(tenant="t1", kind="distill", spec={}, teacher_id=teacher.id, max_attempts=2)
        session.add(job)
        session.flush()
        return job.id


def _job(job_id: str) -> Job:
    with session_scope() as session:
        job = session.get(Job, job_id)
        assert job is not None
        return job


def _expire_lease(job_id: str) -> None:
    with session_scope() as session:
        session.get(Job, job_id).lease_expires_at = utcnow() - timedelta(seconds=1)


def test_only_one_of_two_claims_wins(job_id: str) -> None:
    with session_scope() as session:
        first = lifecycle.claim(session, job_id, "w1", lease_seconds=60)
    with session_scope() as session:
        second = lifecycle.claim(session, job_id, "w2", lease_seconds=60)
    assert first is not None and second is None
    job = _job(job_id)
    assert (job.status, job.attempt, job.lease_owner) == ("running", 1, "w1")


def test_expired_lease_is_claimable_and_old_owner_loses_it(job_id: str) -> None:
    with session_scope() as session:
        lifecycle.claim(session, job_id, "w1", lease_seconds=60)
    _expire_lease(job_id)
    with session_scope() as session:
        assert lifecycle.claim(session, job_id, "w2", lease_seconds=60) is not None
    with session_scope() as session:
        assert lifecycle.renew_lease(session, job_id, "w1", 60, None) == (False, False)
        assert not lifecycle.finish(session, job_id, "w1", "succeeded", "late")
    job = _job(job_id)
    assert (job.status, job.attempt, job.lease_owner) == ("running", 2, "w2")


def test_reaper_requeues_then_fails_after_the_attempt_limit(job_id: str) -> None:
    for attempt in (1, 2):
        with session_scope() as session:
            assert lifecycle.claim(session, job_id, f"w{attempt}", lease_seconds=60) is not None
        _expire_lease(job_id)
        with session_scope() as session:
            resend = lifecycle.reap(session, "reaper", redispatch_all_queued=False, message_grace=GRACE)
        job = _job(job_id)
        if attempt == 1:
            assert job.status == "queued" and job_id in resend
        else:
            assert job.status == "failed" and job_id not in resend
            assert "gave up after 2 attempts" in job.error
    with session_scope() as session:
        assert lifecycle.claim(session, job_id, "w3", lease_seconds=60) is None
        messages = [e.message for e in session.scalars(select(JobEvent).where(JobEvent.job_id == job_id))]
    assert any(m.startswith("requeued") for m in messages) and any(m.startswith("failed") for m in messages)


def test_preemption_refunds_the_attempt(job_id: str) -> None:
    with session_scope() as session:
        lifecycle.claim(session, job_id, "w1", lease_seconds=60)
    with session_scope() as session:
        assert lifecycle.release(session, job_id, "w1", "preempted", refund_attempt=True)
    job = _job(job_id)
    assert (job.status, job.attempt, job.enqueued_at) == ("queued", 0, None)


def test_cancel_running_job_sets_flag_seen_by_heartbeat(job_id: str) -> None:
    with session_scope() as session:
        lifecycle.claim(session, job_id, "w1", lease_seconds=60)
    with session_scope() as session:
        lifecycle.request_cancel(session, session.get(Job, job_id), "api:t1")
    with session_scope() as session:
        assert lifecycle.renew_lease(session, job_id, "w1", 60, {"epoch": 1}) == (True, True)
        assert lifecycle.finish(session, job_id, "w1", "canceled", "stopped")
    job = _job(job_id)
    assert job.status == "canceled" and job.progress == {"epoch": 1}
    with session_scope() as session, pytest.raises(Conflict):
        lifecycle.request_cancel(session, session.get(Job, job_id), "api:t1")


def test_abandoned_cancel_is_settled_by_the_reaper(job_id: str) -> None:
    with session_scope() as session:
        lifecycle.claim(session, job_id, "w1", lease_seconds=60)
    with session_scope() as session:
        lifecycle.request_cancel(session, session.get(Job, job_id), "api:t1")
    _expire_lease(job_id)
    with session_scope() as session:
        lifecycle.reap(session, "reaper", redispatch_all_queued=False, message_grace=GRACE)
    assert _job(job_id).status == "canceled"


def test_outbox_resends_only_unsent_unless_broker_lost_messages(job_id: str) -> None:
    # The module shares one database, so look only at this test's job.
    with session_scope() as session:
        assert job_id in lifecycle.reap(session, "reaper", redispatch_all_queued=False, message_grace=GRACE)
        session.get(Job, job_id).enqueued_at = utcnow()
    with session_scope() as session:
        assert job_id not in lifecycle.reap(session, "reaper", redispatch_all_queued=False, message_grace=GRACE)
        assert job_id in lifecycle.reap(session, "reaper", redispatch_all_queued=True, message_grace=GRACE)


def test_work_dirs_of_jobs_finished_before_the_retention_are_collected(job_id: str) -> None:
    from worker.reaper import collect_work_dirs

    work_dir = get_settings().data_dir.resolve() / "jobs" / job_id
    (work_dir / "checkpoint.pt").parent.mkdir(parents=True)
    (work_dir / "checkpoint.pt").write_bytes(b"state")
    assert job_id not in collect_work_dirs() and work_dir.exists()  # still queued
    with session_scope() as session:
        job = session.get(Job, job_id)
        job.status, job.finished_at = "failed", utcnow() - timedelta(hours=25)
    assert job_id in collect_work_dirs()
    assert not work_dir.exists()


def test_a_job_whose_message_was_sent_longer_ago_than_the_grace_is_sent_again(job_id: str) -> None:
    # Its message was taken while the database was down, or by a worker that died: only the database knows.
    with session_scope() as session:
        session.get(Job, job_id).enqueued_at = utcnow() - GRACE + timedelta(seconds=30)
    with session_scope() as session:
        assert job_id not in lifecycle.reap(session, "reaper", redispatch_all_queued=False, message_grace=GRACE)
        session.get(Job, job_id).enqueued_at = utcnow() - GRACE - timedelta(seconds=1)
    with session_scope() as session:
        assert job_id in lifecycle.reap(session, "reaper", redispatch_all_queued=False, message_grace=GRACE)


def _queue(tenant: str, count: int) -> list[str]:
    ids = []
    for _ in range(count):
        with session_scope() as session:  # one transaction each: distinct created_at, in this order
            teacher = session.scalars(select(Model).limit(1)).one()
            job = Job(tenant=tenant, kind="distill", spec={}, teacher_id=teacher.id, max_attempts=2)
            session.add(job)
            session.flush()
            ids.append(job.id)
    return ids


def _run_next(owner: str) -> str | None:
    with session_scope() as session:
        job = lifecycle.claim_next(session, owner, lease_seconds=60)
        return job.id if job else None


def _finish(job_id: str, owner: str) -> None:
    with session_scope() as session:
        assert lifecycle.finish(session, job_id, owner, "succeeded", "done")


def _drain_queue() -> None:
    """Jobs the module's other tests left claimable would be picked first (they are older): settle them."""
    with session_scope() as session:
        session.execute(update(Job).where(Job.status.in_(("queued", "running"))).values(status="failed"))


def test_one_worker_alternates_tenants_instead_of_draining_the_oldest_backlog(job_id: str) -> None:
    _drain_queue()
    backlog = _queue("tenant-a", 3)
    (other,) = _queue("tenant-b", 1)
    order = []
    while (claimed := _run_next("w1")) is not None:
        order.append(claimed)
        _finish(claimed, "w1")
    # B's job waits for one of A's, not for all three.
    assert order == [backlog[0], other, backlog[1], backlog[2]]


def test_a_tenant_with_a_job_running_waits_for_one_with_none(job_id: str) -> None:
    _drain_queue()
    first, second = _queue("tenant-c", 2)
    (other,) = _queue("tenant-d", 1)
    assert _run_next("w1") == first
    # Two workers, one free: the tenant running nothing goes first, though its job is younger.
    assert _run_next("w2") == other
    assert _run_next("w3") == second
    # Nothing left: a duplicate message, or the message of a job another message ran, does nothing.
    assert _run_next("w4") is None
    with session_scope() as session:
        claims = session.scalars(select(JobEvent.job_id).where(JobEvent.message.startswith("claimed"),
                                                               JobEvent.job_id.in_((first, second, other))))
        assert sorted(claims) == sorted((first, second, other))  # each exactly once


def test_expired_leases_are_claimed_again_and_canceled_jobs_never(job_id: str) -> None:
    _drain_queue()
    stale, canceled = _queue("tenant-e", 2)
    assert _run_next("w1") == stale
    _expire_lease(stale)
    with session_scope() as session:
        lifecycle.request_cancel(session, session.get(Job, canceled), "api")
    assert _run_next("w2") == stale
    assert _job(stale).attempt == 2
    assert _run_next("w3") is None and _job(canceled).status == "canceled"
