"""API keys: every /v1 route needs one; missing, malformed, wrong or revoked keys are 401."""

from __future__ import annotations

import re
from collections.abc import Callable

import httpx
import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from app.auth.service import create_key, list_keys, revoke_key
from app.cli import app as cli_app
from core.db.session import session_scope
from core.errors import Invalid, NotFound
from tests.conftest import bearer


def assert_unauthorized(response: httpx.Response, message_part: str) -> None:
    assert response.status_code == 401
    assert message_part in response.json()["detail"]
    assert response.headers["www-authenticate"].startswith("Bearer")


def test_key_identifies_its_tenant(client: TestClient, make_api_key: Callable[[str], str], tenant: str) -> None:
    key = make_api_key(tenant)
    assert re.fullmatch(r"cnd_[0-9a-f]{8}_[A-Za-z0-9_-]+", key)
    response = client.get("/v1/me", headers=bearer(key))
    assert response.status_code == 200
    assert response.json() == {"tenant": tenant, "key_prefix": key.split("_")[1]}


def test_missing_key(client: TestClient) -> None:
    assert_unauthorized(client.get("/v1/me"), "missing API key")


def test_other_scheme(client: TestClient, make_api_key: Callable[[str], str], tenant: str) -> None:
    assert_unauthorized(client.get("/v1/me", headers={"Authorization": f"Basic {make_api_key(tenant)}"}),
                        "missing API key")


def test_malformed_key(client: TestClient) -> None:
    assert_unauthorized(client.get("/v1/me", headers=bearer("not-a-key")), "malformed API key")


def test_unknown_key(client: TestClient) -> None:
    assert_unauthorized(client.get("/v1/me", headers=bearer("cnd_00000000_" + "x" * 43)), "invalid API key")


def test_right_prefix_wrong_secret(client: TestClient, make_api_key: Callable[[str], str], tenant: str) -> None:
    prefix = make_api_key(tenant).split("_")[1]
    assert_unauthorized(client.get("/v1/me", headers=bearer(f"cnd_{prefix}_" + "y" * 43)), "invalid API key")


def test_revoked_key(client: TestClient, make_api_key: Callable[[str], str], tenant: str) -> None:
    key = make_api_key(tenant)
    assert client.get("/v1/me", headers=bearer(key)).status_code == 200
    with session_scope() as session:
        revoke_key(session, tenant, key.split("_")[1])
    assert_unauthorized(client.get("/v1/me", headers=bearer(key)), "revoked")


def test_every_v1_route_needs_a_key(client: TestClient) -> None:
    checked = 0
    for path, operations in client.get("/openapi.json").json()["paths"].items():
        if not path.startswith("/v1/"):
            continue
        for method in operations:
            assert_unauthorized(client.request(method, re.sub(r"\{[^}]+\}", "x", path)), "missing API key")
            checked += 1
    assert checked >= 12


def test_key_service_lists_and_revokes_per_tenant(app_env: object, tenant: str) -> None:
    with session_scope() as session:
        first, _ = create_key(session, tenant)
        second, _ = create_key(session, tenant)
        other, _ = create_key(session, tenant + "-other")
    with session_scope() as session:
        assert [key.prefix for key in list_keys(session, tenant)] == [first.prefix, second.prefix]
        with pytest.raises(NotFound):
            revoke_key(session, tenant, other.prefix)
        revoke_key(session, tenant, f"cnd_{first.prefix}")
    with session_scope() as session:
        states = {key.prefix: key.revoked_at is not None for key in list_keys(session, tenant)}
    assert states == {first.prefix: True, second.prefix: False}
    # Only hashes are stored.
    assert all(len(key.key_hash) == 64 for key in (first, second))


def test_tenant_names_are_checked(app_env: object) -> None:
    with session_scope() as session, pytest.raises(Invalid):
        create_key(session, "bad tenant/name")


def test_cli_revoke_with_a_wrong_tenant_is_one_error_line(app_env: object, make_api_key: Callable[[str], str],
                                                          tenant: str) -> None:
    prefix = make_api_key(tenant).split("_")[1]
    result = CliRunner().invoke(cli_app, ["keys", "revoke", "--tenant", "someone-else", prefix])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
    assert result.stderr == f"error: tenant someone-else has no API key with prefix {prefix}\n"
    with session_scope() as session:
        assert [key.revoked_at for key in list_keys(session, tenant)] == [None]
