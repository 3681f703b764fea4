"""Recovery paths on the real databases (SQLite and PostgreSQL) and the real blob store: files nothing references
are collected (never one a row names, nor a young one), epochs keep the attempt that ran them, and a database
outage at publish costs no attempt."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, make_url, select, text

from app.main import create_app
from core import lifecycle
from core.db.models import Job, JobEvent
from core.db.session import session_scope
from core.orphans import collect_orphans
from core.storage import BlobStore
from tests.conftest import POSTGRES_SERVER_URL, AppEnv
from tests.support import wait_for
from tests.worker.test_publish import claimed_job, publish
from worker.guard import JobGuard
from worker.heartbeat import Heartbeat
from worker.jobs.base import Checkpoints, JobContext

DAY = 24 * 3600


def age(path: Path, seconds: float) -> Path:
    then = time.time() - seconds
    os.utime(path, (then, then))
    return path


def test_collector_removes_only_old_files_that_nothing_references(
        app_env: AppEnv, insert_model: Callable[..., str], tenant: str) -> None:
    store = app_env.store
    named = store.put_bytes(b"weights a row names")
    insert_model(tenant, sha256=named.sha256, bytes=named.bytes)
    orphan = store.put_bytes(b"written by a transaction that never committed")
    young_orphan = store.put_bytes(b"its row is about to commit")
    for blob in (named, orphan):
        age(blob.path, 2 * DAY)
    stale_upload, upload_in_flight = store.tmp_dir / "cut-off-by-a-crash.upload", store.tmp_dir / "in-flight.upload"
    for path in (stale_upload, upload_in_flight):
        path.write_bytes(b"part of an upload")
    age(stale_upload, 2 * DAY)

    collected = collect_orphans()

    assert orphan.sha256 in collected.blobs and not orphan.path.exists()
    assert named.path.exists() and young_orphan.path.exists()
    assert not stale_upload.exists() and upload_in_flight.exists()


def test_publishing_content_an_old_orphan_holds_makes_it_young_again(app_env: AppEnv) -> None:
    store = app_env.store
    content = b"an orphan, about to be named by a new row"
    old = age(store.put_bytes(content).path, 2 * DAY)
    assert store.put_bytes(content).path == old  # deduplicated, and touched
    assert old.name not in collect_orphans().blobs and old.exists()


def test_a_blob_published_while_the_collector_holds_it_aside_stays(app_env: AppEnv) -> None:
    store = app_env.store
    content = b"removed and published at the same moment"
    orphan = age(store.put_bytes(content).path, 2 * DAY)
    sha256 = orphan.name

    def publish_meanwhile(shas: list[str]) -> set[str]:
        # Between the move aside and the last look at the rows, a writer stores the same content.
        assert not orphan.exists()
        store.put_bytes(content)
        return set()

    assert store.remove_blobs([sha256], publish_meanwhile, DAY) == [sha256]
    assert orphan.exists() and orphan.read_bytes() == content


def test_the_api_collects_at_start_up(app_env: AppEnv) -> None:
    orphan = age(BlobStore(app_env.settings.storage_dir).put_bytes(b"left by a crash before start-up").path, 2 * DAY)
    with TestClient(create_app()):
        wait_for(lambda: not orphan.exists(), timeout=30, what="the start-up collection")


def test_epochs_recorded_late_keep_the_attempt_that_ran_them(app_env: AppEnv, insert_model: Callable[..., str],
                                                             tenant: str, tmp_path: Path) -> None:
    job_id = claimed_job(insert_model(tenant), tenant, "worker-1")
    checkpoints = Checkpoints(tmp_path / "checkpoint.pt")
    # Attempt 1 ends epoch 1 while the database is away (nothing recorded), then stops mid-epoch 2 on the way out.
    attempt_1 = guard_for(job_id, 1, "worker-1", checkpoints)
    attempt_1.on_checkpoint({"epoch": 1, "step_in_epoch": 3, "history": [{"epoch": 1, "val_accuracy": 0.5}]})
    with session_scope() as session:
        session.get(Job, job_id).max_attempts = 2
        assert lifecycle.release(session, job_id, "worker-1", "stopped", refund_attempt=False)
        assert lifecycle.claim(session, job_id, "worker-2", lease_seconds=60) is not None
    # Attempt 2 resumes from that checkpoint and ends epoch 2: both epochs are recorded now.
    state = checkpoints.load()
    assert state is not None
    state["history"].append({"epoch": 2, "val_accuracy": 0.6})
    guard_for(job_id, 2, "worker-2", checkpoints).on_checkpoint({**state, "epoch": 2, "step_in_epoch": 0})
    with session_scope() as session:
        events = session.scalars(select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.kind == "progress"))
        assert {event.data["epoch"]: event.attempt for event in events} == {1: 1, 2: 2}


def guard_for(job_id: str, attempt: int, owner: str, checkpoints: Checkpoints) -> JobGuard:
    ctx = JobContext(job_id=job_id, kind="quantize", owner=owner, attempt=attempt, max_attempts=2, spec=None,
                     teacher=None, dataset_path=None, work_dir=checkpoints.path.parent, provenance={})  # type: ignore[arg-type]
    return JobGuard(Heartbeat(job_id, owner, 60, 10), checkpoints, ctx)


def test_a_database_outage_at_publish_costs_no_attempt(app_env: AppEnv, insert_model: Callable[..., str],
                                                       tenant: str, tmp_path: Path,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    if not app_env.database_url.startswith("postgresql"):
        pytest.skip("the outage is made on the PostgreSQL server (SQLite has no server to lose)")
    job_id = claimed_job(insert_model(tenant), tenant, "worker-a")
    restore = refuse_connections(app_env.database_url, seconds=3)
    with caplog.at_level(logging.WARNING, logger="core.db.session"):
        publish(job_id, "worker-a", tmp_path / "work", {})
    restore.join()
    assert "database unavailable; trying again" in caplog.text  # the outage was met, and outlived
    with session_scope() as session:
        job = session.get(Job, job_id)
        assert (job.status, job.attempt) == ("succeeded", 1)


def refuse_connections(database_url: str, seconds: float) -> threading.Thread:
    """Cut every connection to the database and refuse new ones (superusers too); a thread lets them in again
    after `seconds`."""
    name = make_url(database_url).database
    admin = create_engine(POSTGRES_SERVER_URL, isolation_level="AUTOCOMMIT")

    def allow(flag: bool) -> None:
        with admin.connect() as connection:
            connection.execute(text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS {str(flag).lower()}'))
            if not flag:
                connection.execute(text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :n"),
                                   {"n": name})

    allow(False)

    def later() -> None:
        time.sleep(seconds)
        allow(True)
        admin.dispose()

    thread = threading.Thread(target=later, daemon=True)
    thread.start()
    return thread
