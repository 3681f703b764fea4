"""A burst of model uploads must not starve other requests of database connections (issue 13, item 3).

The weights are checked in a child process that waits for one of two validator slots; an upload that held its
transaction meanwhile tied up a pooled connection for the whole wait. Here the pool has one connection and a
short timeout, so any upload that holds it while its child runs makes the others, and another tenant's
GET /v1/me, time out (a 500).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from app.models import service
from app.models.validator import WeightsReport
from core.db.session import get_engine
from core.settings import get_settings
from tests.api.helpers import upload_model
from tests.conftest import AppEnv, SmallCnnFiles, clear_cached_singletons

UPLOADS = 2
SMALL_POOL = {"CONDENSER_DATABASE_POOL_SIZE": "1", "CONDENSER_DATABASE_MAX_OVERFLOW": "0",
              "CONDENSER_DATABASE_POOL_TIMEOUT_SECONDS": "1.5"}


@pytest.fixture(scope="module")
def app_env(app_env: AppEnv) -> Iterator[AppEnv]:
    """The shared environment with a database pool of one connection."""
    with pytest.MonkeyPatch.context() as patch:
        for name, value in SMALL_POOL.items():
            patch.setenv(name, value)
        clear_cached_singletons()
        yield replace(app_env, settings=get_settings(), env={**app_env.env, **SMALL_POOL})
    clear_cached_singletons()


@pytest.fixture(scope="module")
def client(app_env: AppEnv) -> Iterator[TestClient]:
    # A pool timeout is an unexpected error: seen as the client sees it (500), not raised into the test.
    with TestClient(create_app(), raise_server_exceptions=False) as test_client:
        yield test_client


def test_uploads_waiting_for_the_validator_hold_no_connection(
        client: TestClient, auth_headers: dict[str, str], other_auth_headers: dict[str, str],
        small_cnn_files: SmallCnnFiles) -> None:
    uploads_done = threading.Event()
    other_tenant: list[httpx.Response] = []

    def ask_who_am_i_until_done() -> None:
        # Ask before waiting: with the validator's children warm, the uploads may take a fraction of a second.
        while True:
            other_tenant.append(client.get("/v1/me", headers=other_auth_headers))
            if uploads_done.wait(0.05):
                return

    with ThreadPoolExecutor(UPLOADS + 1) as pool:
        watcher = pool.submit(ask_who_am_i_until_done)
        uploads = [pool.submit(upload_model, client, auth_headers, small_cnn_files.safetensors, small_cnn_files.spec,
                                name=f"burst {index}") for index in range(UPLOADS)]
        responses = [upload.result() for upload in uploads]
        uploads_done.set()
        watcher.result()

    # A pool of one connection gives the session gate one place, which an upload holds while it streams: the
    # others may be told to retry (429 past the in-flight cap, 503 past the gate's wait), never a 500.
    statuses = [response.status_code for response in responses]
    assert set(statuses) <= {201, 429, 503} and 201 in statuses, [response.text for response in responses]
    assert all("retry-after" in response.headers for response in responses if response.status_code != 201)
    assert other_tenant, "GET /v1/me was not asked while the uploads ran"
    answered = [response.status_code for response in other_tenant]
    assert set(answered) <= {200, 503} and 200 in answered, answered


def test_no_connection_is_checked_out_while_the_weights_are_checked(
        client: TestClient, auth_headers: dict[str, str], small_cnn_files: SmallCnnFiles,
        monkeypatch: pytest.MonkeyPatch) -> None:
    checked_out: list[int] = []
    real_check = service.check_weights

    def check_counting_connections(*args: Any) -> WeightsReport:
        checked_out.append(get_engine().pool.checkedout())
        return real_check(*args)

    monkeypatch.setattr(service, "check_weights", check_counting_connections)
    response = upload_model(client, auth_headers, small_cnn_files.safetensors, small_cnn_files.spec)
    assert response.status_code == 201, response.text
    assert checked_out == [0]
