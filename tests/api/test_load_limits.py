"""Long requests are counted: uploads in flight and open event streams are capped per tenant and in all (429 with
Retry-After), and a crowd of open streams costs one poller, not a thread and a session each, so another
tenant's reads still answer (issue 13, item 4 and "bounded concurrency")."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import text

from app.client import parse_sse
from app.jobs.stream import EventHub
from app.limits import Slots
from app.main import create_app
from core.db.session import get_engine, session_scope
from tests.api.helpers import multipart_body
from tests.api.test_events import SSE, cancel
from tests.conftest import AppEnv

MANY_STREAMS = 100


@pytest.fixture
def make_job(client: TestClient, insert_model: Callable[..., str]) -> Callable[[str, dict[str, str]], str]:
    def make(tenant: str, headers: dict[str, str]) -> str:
        body = {"teacher": insert_model(tenant), "dataset": "digits", "student": {"arch": "small_cnn"}}
        response = client.post("/v1/jobs", headers=headers, json=body)
        assert response.status_code == 201, response.text
        return response.json()["id"]

    return make


def run_against(app: FastAPI, scenario: Callable[[httpx.AsyncClient], Coroutine[Any, Any, None]]) -> None:
    """Run `scenario` with an async client that streams request bodies into `app` as they are produced, so
    that requests overlap as they would on a server."""

    async def main() -> None:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
            await scenario(http)

    asyncio.run(main())


async def until(condition: Callable[[], bool]) -> None:
    while not condition():
        await asyncio.sleep(0.01)


def test_a_tenant_past_its_upload_cap_gets_429_while_another_tenant_uploads(
        app_env: AppEnv, tenant: str, auth_headers: dict[str, str], other_auth_headers: dict[str, str]) -> None:
    app = create_app()
    slots = app.state.upload_slots = Slots("uploads in progress", total=2, per_tenant=1, retry_after_seconds=10)
    # A spec that names no architecture: the route reads the whole upload, then refuses it with a 422.
    content_type, body = multipart_body({"spec": "{}"}, b"\0" * 1024)
    gate = asyncio.Event()

    async def held_body() -> AsyncIterator[bytes]:
        yield body[:100]
        await gate.wait()
        yield body[100:]

    async def scenario(http: httpx.AsyncClient) -> None:
        def upload(headers: dict[str, str], content: Any) -> Coroutine[Any, Any, httpx.Response]:
            return http.post("/v1/models", headers={**headers, "Content-Type": content_type}, content=content)

        first = asyncio.create_task(upload(auth_headers, held_body()))
        await until(lambda: slots.held[tenant] == 1)
        refused = await upload(auth_headers, body)
        assert refused.status_code == 429, refused.text
        assert refused.headers["Retry-After"] == "10"
        assert "uploads in progress" in refused.json()["detail"]
        # Another tenant's upload is received and judged on its content, not refused for want of a slot.
        other = await upload(other_auth_headers, body)
        assert other.status_code == 422 and "spec" in other.json()["detail"], other.text
        gate.set()
        assert (await first).status_code == 422
        assert slots.held.total() == 0  # every way out gives the slot back
        assert (await upload(auth_headers, body)).status_code == 422

    run_against(app, scenario)


def test_streams_are_capped_per_tenant_and_in_all(
        app_env: AppEnv, tenant: str, auth_headers: dict[str, str], make_api_key: Callable[[str], str],
        make_job: Callable[[str, dict[str, str]], str]) -> None:
    app = create_app()
    hub: EventHub = app.state.event_hub
    hub.slots = Slots("open event streams", total=2, per_tenant=1, retry_after_seconds=30)
    second_tenant, third_tenant = f"{tenant}-2", f"{tenant}-3"
    headers = {name: {"Authorization": f"Bearer {make_api_key(name)}", **SSE}
               for name in (tenant, second_tenant, third_tenant)}
    jobs = {name: make_job(name, headers[name]) for name in headers}

    async def scenario(http: httpx.AsyncClient) -> None:
        def follow(name: str) -> Coroutine[Any, Any, httpx.Response]:
            return http.get(f"/v1/jobs/{jobs[name]}/events", headers=headers[name])

        open_streams = [asyncio.create_task(follow(tenant))]
        await until(lambda: len(hub.subscriptions) == 1)
        same_tenant = await follow(tenant)
        assert same_tenant.status_code == 429 and same_tenant.headers["Retry-After"] == "30"
        assert "per tenant" in same_tenant.json()["detail"]
        open_streams.append(asyncio.create_task(follow(second_tenant)))
        await until(lambda: len(hub.subscriptions) == 2)
        over_all = await follow(third_tenant)
        assert over_all.status_code == 429 and "the server already has 2 open event streams" in over_all.text
        for name in (tenant, second_tenant):
            await asyncio.to_thread(cancel, jobs[name])
        for response in await asyncio.gather(*open_streams):
            assert response.status_code == 200 and "event: end" in response.text
        assert hub.slots.held.total() == 0 and not hub.subscriptions

    run_against(app, scenario)


def test_many_open_streams_cost_one_poller_and_another_tenant_still_reads(
        app_env: AppEnv, tenant: str, auth_headers: dict[str, str], make_api_key: Callable[[str], str],
        make_job: Callable[[str, dict[str, str]], str]) -> None:
    app = create_app()
    hub: EventHub = app.state.event_hub
    followed = make_job(tenant, auth_headers)
    reader = f"{tenant}-reader"
    reader_headers = {"Authorization": f"Bearer {make_api_key(reader)}"}
    read_job = make_job(reader, reader_headers)
    pool: Any = get_engine().pool

    async def scenario(http: httpx.AsyncClient) -> None:
        streams = [asyncio.create_task(http.get(f"/v1/jobs/{followed}/events", headers={**auth_headers, **SSE}))
                   for _ in range(MANY_STREAMS)]
        await until(lambda: len(hub.subscriptions) == MANY_STREAMS)
        await asyncio.sleep(3 * app_env.settings.events_poll_seconds)  # a few ticks with every stream open
        assert hub.task is not None and not hub.task.done()
        # The streams hold no connections: at most the poller's, for the milliseconds of a tick.
        assert pool.checkedout() <= 1
        read = await http.get(f"/v1/jobs/{read_job}", headers=reader_headers)
        assert read.status_code == 200 and read.json()["status"] == "queued", read.text
        await asyncio.to_thread(cancel, followed)
        for response in await asyncio.gather(*streams):
            events = [event for event in parse_sse(iter(response.text.splitlines())) if event is not None]
            assert events[-1].event == "end" and events[-1].data == {"status": "canceled"}
        await until(lambda: hub.task is not None and hub.task.done())  # the poller stops with its last stream

    run_against(app, scenario)


def rename_table(old: str, new: str) -> None:
    with session_scope() as session:
        session.execute(text(f"ALTER TABLE {old} RENAME TO {new}"))


def test_a_failing_poller_logs_once_not_at_every_tick(
        app_env: AppEnv, tenant: str, auth_headers: dict[str, str], make_job: Callable[[str, dict[str, str]], str],
        caplog: pytest.LogCaptureFixture) -> None:
    app = create_app()
    hub: EventHub = app.state.event_hub
    hub.poll_seconds = 0.02
    followed = make_job(tenant, auth_headers)

    async def scenario(http: httpx.AsyncClient) -> None:
        stream = asyncio.create_task(http.get(f"/v1/jobs/{followed}/events", headers={**auth_headers, **SSE}))
        await until(lambda: len(hub.subscriptions) == 1)
        # A real database error at every tick: the table each tick reads is gone for a while.
        await asyncio.to_thread(rename_table, "job_events", "job_events_away")
        try:
            await until(lambda: hub.failures.in_a_row >= 10)
        finally:
            await asyncio.to_thread(rename_table, "job_events_away", "job_events")
        await until(lambda: hub.failures.in_a_row == 0)
        await asyncio.to_thread(cancel, followed)
        assert (await stream).status_code == 200

    with caplog.at_level(logging.WARNING, logger="app.jobs.stream"):
        run_against(app, scenario)
    records = [record for record in caplog.records if record.name == "app.jobs.stream"]
    assert [record.levelname for record in records] == ["ERROR", "WARNING"], [r.getMessage() for r in records]
    assert records[0].exc_info is not None  # the first failure with its traceback
    assert "works again after" in records[1].getMessage()
