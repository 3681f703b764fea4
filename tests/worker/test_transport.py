"""The broker carries JSON only. A pickled message would run code in the worker as it is decoded: a real
worker on the real Redis broker drops it, logs it, and unpickles nothing."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from core.broker import QUEUE, RUN_JOB_TASK, make_celery
from core.db.models import Job
from tests.api.helpers import count_rows
from tests.conftest import AppEnv
from tests.harness import fresh_redis_url
from tests.hostile import PickleCanary
from tests.support import WorkerProcess, wait_for

pytestmark = pytest.mark.redis


@pytest.fixture(scope="module")
def database_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    # The broker is what is under test; one database is enough.
    return f"sqlite:///{tmp_path_factory.mktemp('sqlite') / 'condenser.db'}"


@pytest.fixture(scope="module")
def broker_url() -> Iterator[str]:
    yield from fresh_redis_url()


def test_a_pickled_message_is_dropped_and_logged(app_env: AppEnv, tenant: str, tmp_path: Path) -> None:
    import redis

    canary = tmp_path / "canary"
    jobs_before = count_rows(Job, tenant)
    # The sender may pick any serializer; only what the worker accepts matters.
    make_celery(app_env.settings).send_task(RUN_JOB_TASK, args=[PickleCanary(canary)], serializer="pickle")
    broker = redis.Redis.from_url(app_env.settings.broker_url)
    assert broker.llen(QUEUE) == 1
    worker = WorkerProcess(app_env.subprocess_env(), tmp_path / "worker.log").start()
    try:
        wait_for(lambda: "Refusing to deserialize" in worker.log(), timeout=120,
                 what="the worker to refuse the pickled message")
        # Acknowledged, not requeued: nothing waits in the queue or among the unacknowledged.
        wait_for(lambda: broker.llen(QUEUE) == 0 and broker.hlen("unacked") == 0, timeout=10,
                 what="the message to be dropped")
    finally:
        worker.stop()
        broker.close()
    assert "pickle" in worker.log()
    assert not canary.exists()
    assert count_rows(Job, tenant) == jobs_before
