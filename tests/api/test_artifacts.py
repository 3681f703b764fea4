"""Artifact metadata and downloads: checksums, names, ranges, conditional requests, tenant isolation."""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Callable
from dataclasses import dataclass

import pytest
from fastapi.testclient import TestClient

from core.storage import sha256_file
from tests.conftest import AppEnv

SIZE = 200_000  # several 64 KiB chunks


@dataclass(frozen=True)
class Published:
    job_id: str
    artifact_id: str
    data: bytes

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def url(self) -> str:
        return f"/v1/artifacts/{self.artifact_id}/download"


@pytest.fixture
def published(client: TestClient, auth_headers: dict[str, str], tenant: str, insert_model: Callable[..., str],
              insert_artifact: Callable[..., str]) -> Published:
    """A submitted job with one artifact, written the way the worker writes them."""
    body = {"teacher": insert_model(tenant), "dataset": "digits", "student": {"arch": "small_cnn"}}
    job_id = client.post("/v1/jobs", headers=auth_headers, json=body).json()["id"]
    data = secrets.token_bytes(SIZE)
    artifact_id = insert_artifact(tenant, job_id, data, filename="../tmp/student model.safetensors")
    return Published(job_id=job_id, artifact_id=artifact_id, data=data)


def test_metadata_and_job_listing(client: TestClient, auth_headers: dict[str, str], published: Published) -> None:
    response = client.get(f"/v1/artifacts/{published.artifact_id}", headers=auth_headers)
    assert response.status_code == 200
    artifact = response.json()
    assert artifact["job_id"] == published.job_id
    assert (artifact["kind"], artifact["sha256"], artifact["bytes"]) == ("student_safetensors", published.sha256, SIZE)
    assert artifact["download_url"] == published.url
    assert client.get(f"/v1/jobs/{published.job_id}/artifacts", headers=auth_headers).json() == [artifact]
    assert client.get(f"/v1/jobs/{published.job_id}", headers=auth_headers).json()["artifacts"] == [artifact]


def test_full_download(client: TestClient, app_env: AppEnv, auth_headers: dict[str, str], published: Published) -> None:
    response = client.get(published.url, headers=auth_headers)
    assert response.status_code == 200
    assert response.content == published.data
    assert response.headers["x-content-sha256"] == published.sha256
    assert response.headers["x-content-sha256"] == sha256_file(app_env.store.path_for(published.sha256))
    assert response.headers["etag"] == f'"{published.sha256}"'
    assert response.headers["accept-ranges"] == "bytes"
    assert response.headers["content-length"] == str(SIZE)
    # The client-supplied path is reduced to a plain name.
    assert response.headers["content-disposition"] == 'attachment; filename="student_model.safetensors"'
    # A file to save, never a page that could run script on the API's origin (an SVG report, say).
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["content-security-policy"].startswith("sandbox")


@pytest.mark.parametrize(
    ("range_header", "start", "end"),
    [("bytes=100-199", 100, 200), ("bytes=-10", SIZE - 10, SIZE), (f"bytes={SIZE - 5}-", SIZE - 5, SIZE),
     (f"bytes=70000-{SIZE * 2}", 70000, SIZE)],
    ids=["closed", "suffix", "open-ended", "end-past-size"],
)
def test_single_range(client: TestClient, auth_headers: dict[str, str], published: Published, range_header: str,
                      start: int, end: int) -> None:
    response = client.get(published.url, headers={**auth_headers, "Range": range_header})
    assert response.status_code == 206
    assert response.content == published.data[start:end]
    assert response.headers["content-range"] == f"bytes {start}-{end - 1}/{SIZE}"
    assert response.headers["x-content-sha256"] == published.sha256


def test_unsatisfiable_range(client: TestClient, auth_headers: dict[str, str], published: Published) -> None:
    response = client.get(published.url, headers={**auth_headers, "Range": f"bytes={SIZE}-"})
    assert response.status_code == 416
    assert response.headers["content-range"] == f"bytes */{SIZE}"


@pytest.mark.parametrize("malformed", ["", "bytes", "items=0-9", "bytes=9-0", "bytes=,"])
def test_a_malformed_range_is_ignored_and_the_whole_file_sent(client: TestClient, auth_headers: dict[str, str],
                                                              published: Published, malformed: str) -> None:
    response = client.get(published.url, headers={**auth_headers, "Range": malformed})
    assert response.status_code == 200
    assert response.content == published.data


def test_a_few_ranges_are_served_more_are_ignored(client: TestClient, auth_headers: dict[str, str],
                                                   published: Published) -> None:
    two = client.get(published.url, headers={**auth_headers, "Range": "bytes=0-9,100-109"})
    assert two.status_code == 206
    assert two.headers["content-type"].startswith("multipart/byteranges")
    assert published.data[100:110] in two.content
    many = ",".join(f"{offset}-{offset + 1}" for offset in range(0, 100, 10))
    response = client.get(published.url, headers={**auth_headers, "Range": f"bytes={many}"})
    assert response.status_code == 200
    assert response.content == published.data


def test_conditional_requests(client: TestClient, auth_headers: dict[str, str], published: Published) -> None:
    etag = f'"{published.sha256}"'
    not_modified = client.get(published.url, headers={**auth_headers, "If-None-Match": etag})
    assert not_modified.status_code == 304
    assert not_modified.content == b""
    resumed = client.get(published.url, headers={**auth_headers, "Range": "bytes=10-19", "If-Range": etag})
    assert (resumed.status_code, resumed.content) == (206, published.data[10:20])
    changed = client.get(published.url, headers={**auth_headers, "Range": "bytes=10-19", "If-Range": '"other"'})
    assert (changed.status_code, changed.content) == (200, published.data)


def test_other_tenant_gets_404(client: TestClient, other_auth_headers: dict[str, str], published: Published) -> None:
    for path in (f"/v1/artifacts/{published.artifact_id}", published.url, f"/v1/jobs/{published.job_id}/artifacts"):
        response = client.get(path, headers=other_auth_headers)
        assert response.status_code == 404, path
    assert client.get(published.url, headers=other_auth_headers).json() == {
        "detail": f"artifact {published.artifact_id} not found"}


def test_missing_blob_is_404_not_500(client: TestClient, app_env: AppEnv, auth_headers: dict[str, str],
                                     published: Published) -> None:
    app_env.store.path_for(published.sha256).unlink()
    response = client.get(published.url, headers=auth_headers)
    assert response.status_code == 404
    assert "missing from storage" in response.json()["detail"]


def test_unknown_artifact(client: TestClient, auth_headers: dict[str, str]) -> None:
    unknown = "art_" + "0" * 24
    assert client.get(f"/v1/artifacts/{unknown}", headers=auth_headers).status_code == 404
    assert client.get(f"/v1/artifacts/{unknown}/download", headers=auth_headers).status_code == 404
    # Not even shaped like an id: refused before any query.
    assert client.get("/v1/artifacts/art_nope", headers=auth_headers).status_code == 422
