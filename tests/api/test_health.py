"""Probes, the OpenAPI document and error shapes."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from core.errors import Invalid
from tests.conftest import AppEnv

API_METHODS = {"get", "post", "put", "patch", "delete"}


def test_healthz_needs_no_key(client: TestClient) -> None:
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


def test_readyz_checks_database_and_broker(client: TestClient) -> None:
    response = client.get("/readyz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "checks": {"database": "ok", "broker": "ok", "storage": "ok"},
                               "reasons": {}}


@pytest.mark.redis
def test_readyz_reaches_a_real_redis_broker(client: TestClient, app_env: AppEnv,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(app_env.settings, "broker_url", "redis://127.0.0.1:6379/0")
    response = client.get("/readyz")
    if response.status_code == 503:
        pytest.skip("Redis is not running at 127.0.0.1:6379")
    assert response.json()["checks"]["broker"] == "ok"


def test_readyz_is_503_when_the_broker_is_unreachable(client: TestClient, app_env: AppEnv,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    # Port 1 on loopback: connection refused at once.
    monkeypatch.setattr(app_env.settings, "broker_url", "redis://127.0.0.1:1/0")
    response = client.get("/readyz")
    assert response.status_code == 503
    assert response.json() == {"status": "unavailable", "reasons": {},
                               "checks": {"database": "ok", "broker": "unavailable", "storage": "ok"}}


def test_readyz_is_503_when_the_data_directory_is_short_of_space(client: TestClient, app_env: AppEnv,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    free = shutil.disk_usage(app_env.settings.storage_dir).free
    monkeypatch.setattr(app_env.settings, "readiness_min_free_bytes", free + (1 << 40))
    response = client.get("/readyz")
    assert response.status_code == 503
    assert response.json()["checks"]["storage"] == "unavailable"
    assert response.json()["reasons"]["storage"].startswith(f"the data directory has {free >> 20} MiB free, below ")


def test_readyz_is_503_when_the_data_directory_is_not_writable(client: TestClient, app_env: AppEnv,
                                                               monkeypatch: pytest.MonkeyPatch,
                                                               tmp_path: Path) -> None:
    # chmod does not stop root (CI runs as root); a data directory that cannot be created stops everyone.
    (tmp_path / "a-file").write_text("")
    monkeypatch.setattr(app_env.settings, "data_dir", tmp_path / "a-file" / "data")
    response = client.get("/readyz")
    assert response.status_code == 503
    assert response.json()["reasons"] == {"storage": "the data directory is not writable"}
    assert "a-file" not in response.text


def test_openapi_documents_every_operation(client: TestClient) -> None:
    document = client.get("/openapi.json").json()
    assert "ApiKey" in document["components"]["securitySchemes"]
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            if method not in API_METHODS:
                continue
            where = f"{method.upper()} {path}"
            assert operation.get("summary"), f"{where} has no summary"
            assert operation.get("description"), f"{where} has no description"
            if path.startswith("/v1/"):
                assert operation.get("security") == [{"ApiKey": []}], f"{where} is not marked as needing a key"
                assert "401" in operation["responses"], f"{where} does not document 401"


def test_openapi_describes_upload_bodies_and_job_examples(client: TestClient) -> None:
    document = client.get("/openapi.json").json()
    for path, fields in (("/v1/models", {"file", "spec", "name", "format"}), ("/v1/datasets", {"file", "name"})):
        schema = document["paths"][path]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
        assert set(schema["properties"]) == fields
        assert "file" in schema["required"]
    job_schema = document["components"]["schemas"]["JobCreate"]
    assert job_schema["additionalProperties"] is False
    assert job_schema["examples"][0]["dataset"] == "digits"


def test_unknown_route_is_json_404(client: TestClient) -> None:
    response = client.get("/v1/nothing-here")
    assert response.status_code == 404
    assert response.json() == {"detail": "Not Found"}


def test_a_405_lists_every_method_of_the_path(client: TestClient, auth_headers: dict[str, str]) -> None:
    # Two routes share /v1/jobs (GET, POST); Starlette's own Allow named only the first one's.
    response = client.request("OPTIONS", "/v1/jobs")
    assert response.status_code == 405
    assert response.headers["allow"] == "GET, POST"
    # A concrete path's own methods: /v1/datasets/builtin is not one of the ids DELETE /v1/datasets/{id} takes.
    assert client.request("OPTIONS", "/v1/datasets/builtin").headers["allow"] == "GET"
    assert client.request("OPTIONS", "/v1/datasets/dst_0").headers["allow"] == "DELETE, GET"
    # ...even for a method a templated path has: /v1/datasets/{dataset_id} would refuse "builtin" as an id.
    refused = client.delete("/v1/datasets/builtin", headers=auth_headers)
    assert (refused.status_code, refused.headers["allow"]) == (405, "GET")


def test_openapi_offers_code_formats_only_where_allowed(client: TestClient) -> None:
    document = client.get("/openapi.json").json()
    upload = document["paths"]["/v1/models"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert upload["properties"]["format"]["enum"] == ["safetensors", "state_dict"]
    assert upload["additionalProperties"] is False


def test_error_messages_carry_no_heap_address_or_host_path(app_env: AppEnv) -> None:
    app = create_app()

    @app.get("/leaky")
    def leaky() -> None:
        raise Invalid("cannot read <_io.BytesIO object at 0x7f3a2c1d9e40> from /srv/condenser/storage/tmp/ab12.upload; "
                      "see GET /v1/datasets/builtin")

    with TestClient(app) as leaky_client:
        response = leaky_client.get("/leaky")
    assert response.status_code == 422
    assert response.json() == {"detail": "cannot read <_io.BytesIO object> from <path>; see GET /v1/datasets/builtin"}
