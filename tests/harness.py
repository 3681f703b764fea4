"""A whole service for end-to-end and fault tests: the in-process API, real worker processes, and
either the distributed backends (PostgreSQL + Redis) or the embedded default (SQLite + files)."""

from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from app.main import create_app
from core.db.migrate import upgrade_to_head
from core.db.models import Artifact, Job, JobEvent
from core.db.session import session_scope
from tests.conftest import AppEnv, bearer, clear_cached_singletons, fresh_postgres_database, unique_tenant
from tests.support import ApiServerProcess, WorkerProcess, wait_for

REDIS_SERVER = os.environ.get("CONDENSER_TEST_REDIS_URL", "redis://127.0.0.1:6379")
# Short leases so that a killed worker's job is noticed in seconds, not minutes.
FAST_RECOVERY = {
    "CONDENSER_LEASE_SECONDS": "3",
    "CONDENSER_HEARTBEAT_SECONDS": "0.5",
    "CONDENSER_REAPER_INTERVAL_SECONDS": "1",
}


def fresh_redis_url() -> Iterator[str]:
    """A Redis database of this test alone, flushed before and after.

    Databases 1-15 are reserved with a key in database 0, so that test runs side by side on one Redis
    (two checkouts, CI beside a developer) never flush or consume each other's queues."""
    import redis

    registry = redis.Redis.from_url(f"{REDIS_SERVER}/0")
    try:
        number = _reserve_database(registry)
    except redis.RedisError as exc:
        reason = f"Redis unreachable at {REDIS_SERVER}: {exc}"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    url = f"{REDIS_SERVER}/{number}"
    client = redis.Redis.from_url(url)
    client.flushdb()
    try:
        yield url
    finally:
        client.flushdb()
        client.close()
        registry.delete(_reservation(number))
        registry.close()


def _reservation(number: int) -> str:
    return f"condenser-tests:redis-db:{number}"


def _reserve_database(registry: Any, wait_seconds: float = 600) -> int:
    """The number of a free database, held for an hour at most (a killed run's reservation expires)."""
    deadline = time.monotonic() + wait_seconds
    while time.monotonic() < deadline:
        for number in random.sample(range(1, 16), 15):
            if registry.set(_reservation(number), os.getpid(), nx=True, ex=3600):
                return number
        time.sleep(0.5)
    pytest.fail(f"no free Redis database on {REDIS_SERVER} in {wait_seconds:.0f} s: other test runs hold all 15")


@dataclass
class Service:
    app_env: AppEnv
    client: TestClient
    headers: dict[str, str]
    tmp: Path
    backend: str
    broker_url: str
    workers: list[WorkerProcess] = field(default_factory=list)
    servers: list[ApiServerProcess] = field(default_factory=list)

    def start_worker(self, concurrency: int = 1, **env: str) -> WorkerProcess:
        log = self.tmp / f"worker-{len(self.workers)}.log"
        worker = WorkerProcess({**self.app_env.subprocess_env(), **env}, log, concurrency).start()
        self.workers.append(worker)
        return worker

    def serve_http(self, **env: str) -> str:
        """Start the API as a real HTTP server on this service's database and broker; returns its base URL."""
        log_path = self.tmp / f"server-{len(self.servers)}.log"
        server = ApiServerProcess({**self.app_env.subprocess_env(), **env}, log_path)
        self.servers.append(server.start())
        return server.url

    @property
    def api_key(self) -> str:
        return self.headers["Authorization"].removeprefix("Bearer ")

    def worker_logs(self) -> str:
        return "\n".join(f"--- {w.log_path.name}\n{w.log()[-6000:]}" for w in self.workers)

    def upload_teacher(self, path: Path, spec: dict[str, Any]) -> str:
        with open(path, "rb") as handle:
            response = self.client.post("/v1/models", headers=self.headers, data={"spec": json.dumps(spec)},
                                        files={"file": (path.name, handle)})
        assert response.status_code == 201, response.text
        return response.json()["id"]

    def upload_dataset(self, content: bytes, filename: str) -> str:
        response = self.client.post("/v1/datasets", headers=self.headers, files={"file": (filename, content)})
        assert response.status_code == 201, response.text
        return response.json()["id"]

    def submit(self, spec: dict[str, Any]) -> str:
        response = self.client.post("/v1/jobs", headers=self.headers, json=spec)
        assert response.status_code == 201, response.text
        return response.json()["id"]

    def api_job(self, job_id: str) -> dict[str, Any]:
        response = self.client.get(f"/v1/jobs/{job_id}", headers=self.headers)
        assert response.status_code == 200, response.text
        return response.json()

    def job(self, job_id: str) -> Job:
        with session_scope() as session:
            job = session.get(Job, job_id)
            assert job is not None
            return job

    def events(self, job_id: str) -> list[JobEvent]:
        with session_scope() as session:
            return list(session.scalars(select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id)))

    def artifacts(self, job_id: str) -> list[Artifact]:
        with session_scope() as session:
            return list(session.scalars(select(Artifact).where(Artifact.job_id == job_id)))

    def wait_status(self, job_id: str, statuses: tuple[str, ...], timeout: float) -> Job:
        try:
            return wait_for(lambda: (job := self.job(job_id)).status in statuses and job, timeout,
                            interval=0.2, what=f"{job_id} to reach {statuses}")
        except AssertionError as error:
            raise AssertionError(f"{error}; job is {self.job(job_id).status}\n{self.worker_logs()}") from None

    def wait_epoch(self, job_id: str, epoch: int, timeout: float) -> None:
        """Until the job has checkpointed `epoch` epochs (a progress event per epoch)."""
        wait_for(lambda: any(e.kind == "progress" and e.data.get("epoch", 0) >= epoch for e in self.events(job_id)),
                 timeout, interval=0.1, what=f"{job_id} to finish epoch {epoch}")

    def claims(self, job_id: str) -> list[JobEvent]:
        return [e for e in self.events(job_id) if e.message.startswith("claimed")]

    def stop(self) -> None:
        for process in [*self.servers, *self.workers]:
            process.stop()


@pytest.fixture
def service_factory(tmp_path: Path, small_cnn_files: Any) -> Iterator[Any]:
    """service_factory(backend, **env) -> a running Service; everything is torn down afterwards."""
    with ExitStack() as services:
        yield lambda backend, **env: services.enter_context(running_service(tmp_path, backend, **env))


@contextmanager
def running_service(tmp_path: Path, backend: str, **env: str) -> Iterator[Service]:
    """A Service on fresh databases ("distributed": PostgreSQL + Redis; otherwise SQLite + files) under tmp_path,
    torn down on exit. For a module's tests that share one, enter it from a module-scoped fixture."""
    stack: list[Any] = []
    try:
        if backend == "distributed":
            database_gen, broker_gen = fresh_postgres_database(), fresh_redis_url()
            database_url, broker_url = next(database_gen), next(broker_gen)
            stack.extend([database_gen, broker_gen])
        else:
            database_url, broker_url = f"sqlite:///{tmp_path / 'condenser.db'}", "filesystem://"
        data_dir = tmp_path / "data"
        variables = {"CONDENSER_DATA_DIR": str(data_dir), "CONDENSER_DATABASE_URL": database_url,
                     "CONDENSER_BROKER_URL": broker_url, **FAST_RECOVERY, **env}
        patch = pytest.MonkeyPatch()
        stack.append(patch)
        for name, value in variables.items():
            patch.setenv(name, value)
        clear_cached_singletons()
        upgrade_to_head(database_url)
        from app.auth.service import create_key
        from core.settings import get_settings

        with session_scope() as session:
            key = create_key(session, unique_tenant())[1]
        app_env = AppEnv(settings=get_settings(), env=variables, data_dir=data_dir, database_url=database_url)
        client = TestClient(create_app())
        client.__enter__()
        stack.append(client)
        service = Service(app_env, client, bearer(key), tmp_path, backend, broker_url)
        stack.append(service)
        yield service
    finally:
        _tear_down(stack)


def _tear_down(stack: list[Any]) -> None:
    for item in reversed(stack):
        if isinstance(item, Service):
            item.stop()
        elif isinstance(item, TestClient):
            item.__exit__(None, None, None)
        elif isinstance(item, pytest.MonkeyPatch):
            item.undo()
        else:
            for _ in item:  # finish the generator: drops the database, flushes Redis
                pass
    clear_cached_singletons()
