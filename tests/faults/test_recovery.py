"""Scheduling and recovery on a real worker, PostgreSQL and Redis: a claim that meets an unreachable database is
retried, one tenant's backlog does not hold back another's job, a queued job whose message is gone is sent again,
and a job past the worker's memory limit fails with what to change. One worker for all (its start is most of the
cost).

Most jobs here fail at once (their teacher's weights were never stored): what is under test is which job a worker
claims and when, which a job that trains would only make slower."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
import redis

from core.db.models import Job, utcnow
from core.db.session import session_scope
from tests.conftest import bearer, insert_model_row, unique_tenant
from tests.harness import Service
from tests.support import TcpProxy, wait_for
from worker.reaper import BROKER_MARKER

pytestmark = pytest.mark.slow

ONE_ATTEMPT = {"CONDENSER_MAX_ATTEMPTS": "1"}


def job_spec(teacher: str, **student: Any) -> dict[str, Any]:
    return {"kind": "distill", "teacher": teacher, "dataset": "digits", "epochs": 1, "batch_size": 32,
            "student": {"arch": "small_cnn", "kwargs": student or {"width": 2, "depth": 1}}}


def submit_as(service: Service, tenant: str, spec: dict[str, Any]) -> str:
    from app.auth.service import create_key

    with session_scope() as session:
        key = create_key(session, tenant)[1]
    response = service.client.post("/v1/jobs", headers=bearer(key), json=spec)
    assert response.status_code == 201, response.text
    return response.json()["id"]


def broker_keeps_its_messages(service: Service) -> None:
    """Mark the fresh Redis database as one that lost nothing, so that the reaper re-sends no queued job because
    the broker looks new: only the path under test may run the job."""
    client = redis.Redis.from_url(service.broker_url)
    client.set(BROKER_MARKER, "1")
    client.close()


def lost_message_job(tenant: str) -> str:
    """The issue's stranded job: queued, its message sent an hour ago (enqueued_at set) and gone since."""
    with session_scope() as session:
        job = Job(tenant=tenant, kind="distill", spec=job_spec(insert_model_row(tenant)), max_attempts=1,
                  teacher_id=insert_model_row(tenant), enqueued_at=utcnow() - timedelta(hours=1))
        session.add(job)
        session.flush()
        return job.id


def memory_hungry_job(service: Service, tenant: str, weights: Any) -> str:
    """The small teacher at 224 px (digits are resized to it), and a wide, deep student on a batch of 256: tens of
    GiB of activations."""
    stored = service.app_env.store.put_bytes(weights.safetensors.read_bytes())
    spec = {**weights.spec, "input": {"image_size": 224, "channels": 1}}
    teacher = insert_model_row(tenant, spec=spec, sha256=stored.sha256, bytes=stored.bytes)
    return submit_as(service, tenant, {**job_spec(teacher, width=512, depth=6), "batch_size": 256})


def test_one_worker_through_a_database_outage_serves_tenants_fairly_and_loses_no_job(
        service_factory: Any, small_cnn_files: Any) -> None:
    # One worker (one job at a time, one child for all: the order of claims is under test, not a process's
    # lifecycle), a memory limit per job, and messages presumed lost a second after they were sent. The API's
    # model budget admits the hungry job (it is the worker's limit under test here).
    service = service_factory("distributed", CONDENSER_MESSAGE_GRACE_SECONDS="1", CONDENSER_JOB_MEMORY_LIMIT_GIB="2",
                              CONDENSER_MAX_TRAINING_MEMORY_BYTES=str(1 << 40), **ONE_ATTEMPT)
    broker_keeps_its_messages(service)
    busy, other, stranded, hungry = (unique_tenant() for _ in range(4))
    backlog = [submit_as(service, busy, job_spec(insert_model_row(busy))) for _ in range(3)]
    late = submit_as(service, other, job_spec(insert_model_row(other)))
    lost = lost_message_job(stranded)
    too_big = memory_hungry_job(service, hungry, small_cnn_files)
    proxy = TcpProxy("127.0.0.1", 5432)
    try:
        proxy.down.set()  # the worker's database refuses every connection from the start
        proxied = service.app_env.database_url.replace("127.0.0.1:5432", f"127.0.0.1:{proxy.port}")
        worker = service.start_worker(CONDENSER_DATABASE_URL=proxied, CONDENSER_JOBS_PER_CHILD="0")
        # The claims fail on the database: the task is retried, not acked as done (the jobs would stay queued).
        wait_for(lambda: "Retry in" in worker.log(), timeout=60, what="a claim that failed to be retried")
        assert {service.job(job_id).status for job_id in [*backlog, late, lost, too_big]} == {"queued"}
        proxy.down.clear()
        jobs = {job_id: service.wait_status(job_id, ("succeeded", "failed"), timeout=120)
                for job_id in [*backlog, late, lost, too_big]}
    finally:
        proxy.close()
    # Each job ran exactly once, duplicates and retried messages notwithstanding. The API sent one message fewer
    # than there are jobs (the stranded job's is gone), and each message runs one job (whichever is fairest): all
    # ran only because the reaper sent a job again whose message was older than the grace.
    assert all(job.attempt == 1 and len(service.claims(job_id)) == 1 for job_id, job in jobs.items())
    # A queue served first come, first served would run the whole backlog before the other tenant's job.
    started = sorted(jobs, key=lambda job_id: jobs[job_id].started_at)
    assert started.index(late) < started.index(backlog[1]), started
    # Past the memory limit: the job fails saying what to change, and the worker is still there.
    error = jobs[too_big].error
    assert error.startswith("the job needed more than 2.0 GiB of memory"), error
    assert "smaller student, batch size or image size" in error
    assert worker.process is not None and worker.process.poll() is None
