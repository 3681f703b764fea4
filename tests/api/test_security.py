"""Hostile requests against every entry point: each is refused, and nothing stored is added, lost or changed.

Uploads (pickles that run code, code checkpoints, archives that escape or explode, malformed multipart,
aborted bodies), specs out of bounds, path parameters that try to walk the file system, Range headers
that multiply work, other tenants' ids, and tenants that go past their limits.
"""

from __future__ import annotations

import asyncio
import io
import pickle
import re
import secrets
import tarfile
import time
import tracemalloc
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from app.models import service as models_service
from core.db.models import Artifact, Dataset, Job, Model
from tests.api.helpers import (
    count_rows,
    files_in,
    multipart_body,
    npz_dataset,
    png,
    upload_dataset,
    upload_model,
    zip_archive,
)
from tests.conftest import AppEnv, SmallCnnFiles, bearer, unique_tenant
from tests.hostile import PickleCanary, png_claiming, zip_bomb


@dataclass(frozen=True)
class Stored:
    """Everything a request could have added, removed or changed for a tenant."""

    rows: tuple[int, ...]
    blobs: tuple[tuple[Path, int], ...]
    temp_files: tuple[Path, ...]


def stored(app_env: AppEnv, tenant: str) -> Stored:
    return Stored(rows=tuple(count_rows(table, tenant) for table in (Model, Dataset, Job, Artifact)),
                  blobs=tuple((path, path.stat().st_size) for path in files_in(app_env.store.blob_dir)),
                  temp_files=tuple(files_in(app_env.store.tmp_dir)))


def assert_refused(response: httpx.Response, status: int, message_part: str) -> None:
    assert response.status_code == status, response.text
    assert message_part in response.json()["detail"]


def submit_job(client: TestClient, headers: dict[str, str], teacher_id: str, **fields: Any) -> httpx.Response:
    body = {"teacher": teacher_id, "dataset": "digits", "student": {"arch": "small_cnn", "kwargs": {"width": 2}},
            **fields}
    return client.post("/v1/jobs", headers=headers, json=body)


# --- checkpoints -------------------------------------------------------------------------------------


def _write_pickle_bomb(path: Path, canary: Path, container: str) -> None:
    import torch

    payload = {"classifier.weight": PickleCanary(canary)}
    if container == "plain-pickle":
        path.write_bytes(pickle.dumps(payload, protocol=2))
    else:
        torch.save(payload, path, _use_new_zipfile_serialization=container == "torch-zip")


@pytest.mark.parametrize("allow_code", [False, True], ids=["default", "code-checkpoints-allowed"])
@pytest.mark.parametrize("container", ["torch-zip", "torch-legacy", "plain-pickle"])
def test_a_pickle_that_would_write_a_file_never_runs(client: TestClient, app_env: AppEnv, auth_headers: dict[str, str],
                                                     tenant: str, small_cnn_files: SmallCnnFiles, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch, container: str,
                                                     allow_code: bool) -> None:
    # Allowing TorchScript and .pt2 must not loosen how a state_dict is read.
    monkeypatch.setattr(app_env.settings, "allow_code_checkpoints", allow_code)
    canary = tmp_path / "canary"
    evil = tmp_path / "evil.pt"
    _write_pickle_bomb(evil, canary, container)
    before = stored(app_env, tenant)
    assert_refused(upload_model(client, auth_headers, evil, small_cnn_files.spec), 422, "weights_only")
    assert not canary.exists()
    assert stored(app_env, tenant) == before


def _code_checkpoint(small_cnn_files: SmallCnnFiles, fmt: str, folder: Path) -> Path:
    import torch

    from worker.engine.config import ArchSpec
    from worker.engine.models import build_model

    model = build_model(ArchSpec.model_validate(small_cnn_files.spec)).eval()
    path = folder / f"teacher.{fmt}"
    if fmt == "torchscript":
        torch.jit.save(torch.jit.script(model), path)
    else:
        torch.export.save(torch.export.export(model, (torch.zeros(1, 1, 8, 8),)), path)
    return path


@pytest.mark.parametrize("fmt", ["torchscript", "pt2"])
def test_code_checkpoints_only_when_the_server_allows_them_and_never_loaded_by_the_api(
        client: TestClient, app_env: AppEnv, auth_headers: dict[str, str], tenant: str,
        small_cnn_files: SmallCnnFiles, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str) -> None:
    path = _code_checkpoint(small_cnn_files, fmt, tmp_path)
    before = stored(app_env, tenant)
    assert_refused(upload_model(client, auth_headers, path, small_cnn_files.spec), 422,
                   "CONDENSER_ALLOW_CODE_CHECKPOINTS is off")
    assert stored(app_env, tenant) == before

    monkeypatch.setattr(app_env.settings, "allow_code_checkpoints", True)

    def never(*_: object) -> None:
        raise AssertionError("the API tried to load a code checkpoint")

    monkeypatch.setattr(models_service, "check_weights", never)
    assert_refused(upload_model(client, auth_headers, small_cnn_files.state_dict, small_cnn_files.spec, format=fmt),
                   422, f"not a {fmt} archive")
    response = upload_model(client, auth_headers, path, small_cnn_files.spec)
    assert response.status_code == 201, response.text
    model = response.json()
    assert (model["format"], model["param_count"], model["num_classes"]) == (fmt, None, 10)
    assert app_env.store.path_for(model["sha256"]).read_bytes() == path.read_bytes()


# --- archives ----------------------------------------------------------------------------------------


def _tar_with(member: tarfile.TarInfo) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for name in ("cat/a.png", "dog/b.png"):
            data = png()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
        archive.addfile(member)
    return buffer.getvalue()


def _tar_special(kind: bytes, linkname: str = "") -> bytes:
    member = tarfile.TarInfo("cat/c.png")
    member.type = kind
    member.linkname = linkname
    return _tar_with(member)


def _zip_symlink() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("cat/a.png", png())
        archive.writestr("dog/b.png", png())
        link = zipfile.ZipInfo("cat/c.png")
        link.external_attr = 0o120777 << 16
        archive.writestr(link, "/etc/passwd")
    return buffer.getvalue()


HOSTILE_ARCHIVES = {
    "tar-symlink": (lambda: _tar_special(tarfile.SYMTYPE, "/etc/passwd"), "u.tar", "link or special file"),
    "tar-hardlink": (lambda: _tar_special(tarfile.LNKTYPE, "/etc/passwd"), "u.tar", "link or special file"),
    "tar-device": (lambda: _tar_special(tarfile.CHRTYPE), "u.tar", "link or special file"),
    "zip-symlink": (_zip_symlink, "u.zip", "symbolic link"),
    "zip-bomb": (lambda: zip_bomb({"cat/a.png": png(), "dog/b.png": png()}, "cat/bomb.png", 256 << 20), "u.zip",
                 "zip bomb"),
    "image-bomb": (lambda: zip_archive({"cat/a.png": png(), "dog/bomb.png": png_claiming(100_000, 100_000)}), "u.zip",
                   "far too many pixels"),
}


@pytest.mark.parametrize("hostile", list(HOSTILE_ARCHIVES))
def test_hostile_archives_are_refused_fast_in_bounded_memory(client: TestClient, app_env: AppEnv,
                                                              auth_headers: dict[str, str], tenant: str,
                                                              hostile: str) -> None:
    make, filename, message = HOSTILE_ARCHIVES[hostile]
    content = make()
    before = stored(app_env, tenant)
    tracemalloc.start()
    started = time.perf_counter()
    try:
        response = upload_dataset(client, auth_headers, content, filename)
        elapsed = time.perf_counter() - started
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert_refused(response, 422, message)
    # The bomb unpacks to 256 MiB, the image to 10^10 pixels: refused from the headers, neither is expanded.
    assert elapsed < 5.0
    assert peak < 32 << 20
    assert stored(app_env, tenant) == before


# --- multipart ---------------------------------------------------------------------------------------


def _with_extra_part_headers(headers: str) -> tuple[str, bytes]:
    content_type, body = multipart_body({"name": "x"}, npz_dataset(), filename="d.npz")
    first_header_end = body.index(b"\r\n") + 2
    return content_type, body[:first_header_end] + headers.encode() + body[first_header_end:]


@pytest.mark.parametrize(
    ("make_body", "status", "message"),
    [
        (lambda: _with_extra_part_headers(f"X-Padding: {'a' * 10_000}\r\n"), 400, "Maximum header size exceeded"),
        (lambda: _with_extra_part_headers("".join(f"X-H{i}: v\r\n" for i in range(100))), 400,
         "Maximum header count exceeded"),
        (lambda: multipart_body({"name": "x" * (64 * 1024 + 1)}, npz_dataset()), 422, "longer than 64 KiB"),
        (lambda: multipart_body({"name": "a\x00b"}, npz_dataset()), 422, "must not contain NUL"),
    ],
    ids=["header-size", "header-count", "field-size", "nul-in-field"],
)
def test_multipart_limits(client: TestClient, app_env: AppEnv, auth_headers: dict[str, str], tenant: str,
                          make_body: Callable[[], tuple[str, bytes]], status: int, message: str) -> None:
    content_type, body = make_body()
    before = stored(app_env, tenant)
    response = client.post("/v1/datasets", headers={**auth_headers, "Content-Type": content_type}, content=body)
    assert_refused(response, status, message)
    assert stored(app_env, tenant) == before


def test_parts_are_bounded(client: TestClient, app_env: AppEnv, auth_headers: dict[str, str], tenant: str) -> None:
    # Every part needs a known name, once: a thousand parts are refused at the second.
    content_type, body = multipart_body({"name": "x"}, npz_dataset())
    boundary = content_type.split("boundary=")[1]
    extra = f'--{boundary}\r\nContent-Disposition: form-data; name="name"\r\n\r\nx\r\n'.encode() * 1000
    before = stored(app_env, tenant)
    response = client.post("/v1/datasets", headers={**auth_headers, "Content-Type": content_type},
                           content=extra + body)
    assert_refused(response, 422, "form field 'name' was sent twice")
    assert stored(app_env, tenant) == before


def test_an_upload_aborted_midway_leaves_no_temp_file_and_no_row(client: TestClient, app_env: AppEnv,
                                                                  auth_headers: dict[str, str], tenant: str) -> None:
    content_type, body = multipart_body({"name": "aborted"}, npz_dataset(per_class=200))
    headers = {**auth_headers, "Content-Type": content_type, "Content-Length": str(len(body))}
    before = stored(app_env, tenant)
    sent_while_receiving: list[Stored] = []

    async def receive() -> dict[str, Any]:
        if not sent_while_receiving:
            sent_while_receiving.append(stored(app_env, tenant))
            return {"type": "http.request", "body": body[: len(body) // 2], "more_body": True}
        return {"type": "http.disconnect"}

    async def send(_: dict[str, Any]) -> None:
        return None

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/v1/datasets", "raw_path": b"/v1/datasets", "root_path": "", "query_string": b"",
             "headers": [(name.lower().encode(), value.encode()) for name, value in headers.items()],
             "client": ("127.0.0.1", 1234), "server": ("testserver", 80)}
    asyncio.run(client.app(scope, receive, send))
    assert sent_while_receiving
    assert stored(app_env, tenant) == before


# --- specs -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"epochs": 10**9}, "epochs"),
        ({"batch_size": 0}, "batch_size"),
        ({"time_limit_seconds": 5}, "time_limit_seconds"),
        ({"time_limit_seconds": 10**9}, "time_limit_seconds"),
        ({"student": {"arch": "resnet18", "kwargs": {"width_per_group": 10**6}}}, "kwargs.width_per_group"),
        ({"student": {"arch": "resnet18", "kwargs": {f"k{i}": 1 for i in range(100)}}}, "at most 32 kwargs"),
        ({"student": {"arch": "small_cnn", "kwargs": {"dropout": {"nested": 1}}}}, "kwargs.dropout"),
        ({"teacher": "mdl_\x00"}, "NUL characters"),
        ({"colour": "blue"}, "unknown field"),
    ],
    ids=["epochs", "batch-size", "short-time-limit", "long-time-limit", "huge-kwarg", "many-kwargs", "nested-kwarg",
         "nul", "extra-field"],
)
def test_job_specs_are_bounded(client: TestClient, app_env: AppEnv, auth_headers: dict[str, str], tenant: str,
                               insert_model: Callable[..., str], fields: dict[str, Any], message: str) -> None:
    teacher_id = insert_model(tenant)
    before = stored(app_env, tenant)
    assert_refused(submit_job(client, auth_headers, teacher_id, **fields), 422, message)
    assert stored(app_env, tenant) == before


@pytest.mark.parametrize(
    ("spec_input", "message"),
    [({"image_size": 100_000, "channels": 1}, "image_size"), ({"image_size": 8, "mean": [1e300]}, "mean")],
    ids=["image-size", "mean"],
)
def test_model_specs_are_bounded(client: TestClient, app_env: AppEnv, auth_headers: dict[str, str], tenant: str,
                                 small_cnn_files: SmallCnnFiles, spec_input: dict[str, Any], message: str) -> None:
    spec = {**small_cnn_files.spec, "input": spec_input}
    before = stored(app_env, tenant)
    assert_refused(upload_model(client, auth_headers, small_cnn_files.safetensors, spec), 422, message)
    assert stored(app_env, tenant) == before


# --- per-tenant limits -------------------------------------------------------------------------------


def test_unfinished_jobs_per_tenant_are_capped(client: TestClient, app_env: AppEnv, auth_headers: dict[str, str],
                                               tenant: str, make_api_key: Callable[[str], str],
                                               insert_model: Callable[..., str],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(app_env.settings, "max_active_jobs_per_tenant", 2)
    teacher_id = insert_model(tenant)
    first, second = (submit_job(client, auth_headers, teacher_id).json()["id"] for _ in range(2))
    before = stored(app_env, tenant)
    assert_refused(submit_job(client, auth_headers, teacher_id), 429, "already has 2 unfinished jobs")
    assert stored(app_env, tenant) == before
    assert [client.get(f"/v1/jobs/{job}", headers=auth_headers).json()["status"] for job in (first, second)] == [
        "queued", "queued"]

    other = unique_tenant()
    assert submit_job(client, bearer(make_api_key(other)), insert_model(other)).status_code == 201
    assert client.post(f"/v1/jobs/{first}/cancel", headers=auth_headers).status_code == 202
    assert submit_job(client, auth_headers, teacher_id).status_code == 201


def test_stored_bytes_per_tenant_are_capped(client: TestClient, app_env: AppEnv, auth_headers: dict[str, str],
                                            tenant: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # What counts is what is stored: the dataset's canonical .npz, not the upload.
    first = upload_dataset(client, auth_headers, npz_dataset(seed=1), "first.npz")
    assert first.status_code == 201
    canonical = first.json()["canonical_bytes"]
    monkeypatch.setattr(app_env.settings, "max_stored_bytes_per_tenant", canonical + 100)
    before = stored(app_env, tenant)
    assert_refused(upload_dataset(client, auth_headers, npz_dataset(seed=2), "second.npz"), 413,
                   "storage quota exceeded: this dataset is stored as")
    assert stored(app_env, tenant) == before

    # Full to the byte: refused before the body is read.
    monkeypatch.setattr(app_env.settings, "max_stored_bytes_per_tenant", canonical)
    assert_refused(upload_dataset(client, auth_headers, npz_dataset(seed=2), "second.npz"), 413,
                   "this upload does not fit")
    assert stored(app_env, tenant) == before


# --- paths, ranges, tenants --------------------------------------------------------------------------


@pytest.fixture
def owned(client: TestClient, auth_headers: dict[str, str], tenant: str, insert_model: Callable[..., str],
          insert_artifact: Callable[..., str]) -> dict[str, str]:
    """One resource of each kind, by the name of the path parameter that takes its id."""
    model_id = insert_model(tenant)
    dataset = upload_dataset(client, auth_headers, npz_dataset(seed=3), "owned.npz").json()
    job_id = submit_job(client, auth_headers, model_id).json()["id"]
    artifact_id = insert_artifact(tenant, job_id, secrets.token_bytes(100_000))
    pipeline = client.post("/v1/pipelines", headers=auth_headers, json={
        "model": model_id, "dataset": "digits", "stages": [{"kind": "quantize", "method": "dynamic"}]})
    assert pipeline.status_code == 201, pipeline.text
    return {"model_id": model_id, "dataset_id": dataset["id"], "job_id": job_id, "artifact_id": artifact_id,
            "pipeline_id": pipeline.json()["id"]}


HOSTILE_PATHS = [
    "/v1/models/%2e%2e", "/v1/models/%2E%2E%2Fetc%2Fpasswd", "/v1/models/..%2F..%2Fetc%2Fpasswd",
    "/v1/models/%00", "/v1/models/mdl_%00", "/v1/models/%2Fetc%2Fpasswd", "/v1/datasets/%252e%252e",
    "/v1/artifacts/%2e%2e/download", "/v1/artifacts/%2Fetc%2Fpasswd/download", "/v1/jobs/job_..%2F..%2Fx/artifacts",
    "/v1/jobs/" + "a" * 10_000, "/v1/models?cursor=%00", "/v1/artifacts/./download",
]


@pytest.mark.parametrize("path", HOSTILE_PATHS)
def test_hostile_path_parameters_are_4xx(client: TestClient, app_env: AppEnv, auth_headers: dict[str, str],
                                         tenant: str, owned: dict[str, str], path: str) -> None:
    before = stored(app_env, tenant)
    response = client.get(path, headers=auth_headers)
    assert 400 <= response.status_code < 500, (path, response.status_code, response.text)
    assert stored(app_env, tenant) == before
    assert client.get(f"/v1/artifacts/{owned['artifact_id']}/download", headers=auth_headers).status_code == 200


def test_hundreds_of_ranges_are_answered_with_the_whole_file_once(client: TestClient, app_env: AppEnv,
                                                                   auth_headers: dict[str, str], tenant: str,
                                                                   owned: dict[str, str]) -> None:
    url = f"/v1/artifacts/{owned['artifact_id']}/download"
    whole = client.get(url, headers=auth_headers).content
    before = stored(app_env, tenant)
    for ranges in (",".join(f"{i}-{i}" for i in range(0, 2000, 4)), ",".join(["0-99999"] * 500)):
        started = time.perf_counter()
        response = client.get(url, headers={**auth_headers, "Range": f"bytes={ranges}"})
        assert (response.status_code, response.content) == (200, whole)
        assert time.perf_counter() - started < 1.0
    assert stored(app_env, tenant) == before


def test_another_tenants_ids_are_404_on_every_route(client: TestClient, app_env: AppEnv,
                                                    auth_headers: dict[str, str], other_auth_headers: dict[str, str],
                                                    tenant: str, owned: dict[str, str]) -> None:
    before = stored(app_env, tenant)
    owner_view = {name: client.get(f"/v1/{kind}/{owned[name]}", headers=auth_headers).json()
                  for name, kind in (("model_id", "models"), ("dataset_id", "datasets"), ("job_id", "jobs"))}
    checked = []
    for template, operations in client.get("/openapi.json").json()["paths"].items():
        parameters = re.findall(r"\{([^}]+)\}", template)
        if not template.startswith("/v1/") or not parameters:
            continue
        path = template.format(**{name: owned[name] for name in parameters})
        for method in operations:
            response = client.request(method, path, headers=other_auth_headers)
            assert response.status_code == 404, (method, path, response.text)
            checked.append(f"{method.upper()} {template}")
    assert len(checked) >= 7, checked
    assert stored(app_env, tenant) == before
    assert owner_view == {name: client.get(f"/v1/{kind}/{owned[name]}", headers=auth_headers).json()
                          for name, kind in (("model_id", "models"), ("dataset_id", "datasets"), ("job_id", "jobs"))}

