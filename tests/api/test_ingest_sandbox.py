"""Dataset ingestion runs in a limited child process: hostile uploads cost the child, never the API.

Each test reproduces a finding of issue 13 (items 1, 2 and 5) that the in-process ingestion failed.
"""

from __future__ import annotations

import gzip
import io
import os
import re
import tarfile
import threading
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from app.main import create_app
from app.quotas import stored_bytes
from core.db.models import Dataset
from core.db.session import get_engine, session_scope
from core.settings import get_settings
from tests.api.helpers import count_rows, files_in, png, upload_dataset, zip_archive
from tests.conftest import AppEnv
from tests.support import child_pids, wait_for

INGEST_MODULE = b"worker.engine.ingest_child"


@pytest.fixture(scope="module")
def sandbox_client(app_env: AppEnv) -> Iterator[TestClient]:
    with TestClient(create_app()) as test_client:
        yield test_client


@contextmanager
def settings_changed(client: TestClient, **changes: Any) -> Iterator[None]:
    """Serve requests with these settings (what an operator would set in CONDENSER_* variables)."""
    changed = get_settings().model_copy(update=changes)
    client.app.dependency_overrides[get_settings] = lambda: changed  # type: ignore[attr-defined]
    try:
        yield
    finally:
        client.app.dependency_overrides.clear()  # type: ignore[attr-defined]


def ingest_children() -> list[int]:
    children = []
    for pid in child_pids(os.getpid()):
        try:
            if INGEST_MODULE in Path(f"/proc/{pid}/cmdline").read_bytes():
                children.append(pid)
        except OSError:
            continue
    return children


def tar_bytes(info: tarfile.TarInfo, data: bytes, tar_format: int) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tar_format) as archive:
        info.size = len(data)
        archive.addfile(info, io.BytesIO(data))
    return gzip.compress(buffer.getvalue())


def pax_digits_tar(digits: int) -> bytes:
    """A tar whose PAX record is a run of digits: CVE-2024-6232's quadratic regex in Python < 3.11.10."""
    header = tarfile.TarInfo("././@PaxHeader")
    header.type = tarfile.XHDTYPE
    payload = b"1" * digits
    header.size = len(payload)
    raw = header.tobuf(tarfile.USTAR_FORMAT) + payload + bytes(-len(payload) % tarfile.BLOCKSIZE)
    return gzip.compress(raw + bytes(2 * tarfile.BLOCKSIZE))


def test_a_tar_that_spins_the_parser_freezes_only_its_child(sandbox_client: TestClient,
                                                             auth_headers: dict[str, str], tenant: str) -> None:
    # 64 KB of digits cost ~9 s of regex here; the child's CPU limit of 1 s ends it.
    content = pax_digits_tar(64 << 10)
    result: dict[str, httpx.Response] = {}
    with settings_changed(sandbox_client, ingest_cpu_seconds=1, max_tar_header_bytes=1 << 20):
        upload = threading.Thread(target=lambda: result.setdefault(
            "upload", upload_dataset(sandbox_client, auth_headers, content, "spin.tar.gz")))
        upload.start()
        child = wait_for(ingest_children, timeout=30, interval=0.02, what="an ingestion child")[0]
        # The API answers while the child spins, and the upload holds no pooled connection meanwhile.
        assert get_engine().pool.checkedout() == 0  # type: ignore[attr-defined]
        assert sandbox_client.get("/healthz").status_code == 200
        assert upload.is_alive() and child in ingest_children()
        upload.join(timeout=60)
    response = result["upload"]
    assert response.status_code == 422, response.text
    assert "more CPU time than an upload may use" in response.json()["detail"]
    assert count_rows(Dataset, tenant) == 0


def test_a_huge_gnu_long_name_is_a_short_422_that_does_not_repeat_it(client: TestClient, app_env: AppEnv,
                                                                     auth_headers: dict[str, str]) -> None:
    long_name = "n" * (3 << 20) + "/deep/er/x.png"
    content = tar_bytes(tarfile.TarInfo(long_name), png(), tarfile.GNU_FORMAT)
    response = upload_dataset(client, auth_headers, content, "longname.tar.gz")
    assert response.status_code == 422, response.text[:300]
    assert len(response.content) < 1000
    detail = response.json()["detail"]
    assert "extended tar header" in detail and "n" * 200 not in detail
    assert files_in(app_env.store.tmp_dir) == []


def test_a_float32_npz_is_converted_in_the_child(client: TestClient, app_env: AppEnv,
                                                 auth_headers: dict[str, str]) -> None:
    rng = np.random.default_rng(0)
    x = rng.random((40, 3, 16, 16), dtype=np.float32)
    y = np.arange(40) % 4
    buffer = io.BytesIO()
    np.savez(buffer, x=x, y=y)
    response = upload_dataset(client, auth_headers, buffer.getvalue(), "floats.npz")
    assert response.status_code == 201, response.text
    dataset = response.json()
    blob = app_env.store.path_for(dataset["canonical_sha256"])
    assert dataset["canonical_bytes"] == blob.stat().st_size
    with np.load(blob) as canonical:
        assert np.array_equal(canonical["x"], np.rint(x.transpose(0, 2, 3, 1) * 255).astype(np.uint8))
        assert np.array_equal(canonical["y"], y)


def test_a_zip_with_too_many_entries_is_refused_from_its_directory(sandbox_client: TestClient,
                                                                   auth_headers: dict[str, str]) -> None:
    limit = 100
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        for index in range(20 * limit):
            archive.writestr(f"c/{index}", b"")
    with settings_changed(sandbox_client, max_archive_entries=limit):
        response = upload_dataset(sandbox_client, auth_headers, buffer.getvalue(), "many.zip")
    assert response.status_code == 422, response.text
    assert f"more than {limit} entries" in response.json()["detail"]


def blank_png(size: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_the_quota_counts_the_canonical_size_and_refuses_before_writing(
        sandbox_client: TestClient, app_env: AppEnv, auth_headers: dict[str, str], tenant: str) -> None:
    small = upload_dataset(sandbox_client, auth_headers, zip_archive({"a/1.png": png(), "b/2.png": png()}), "s.zip")
    assert small.status_code == 201, small.text
    with session_scope() as session:
        assert stored_bytes(session, tenant) == small.json()["canonical_bytes"]

    # Blank 1024x1024 RGB PNGs: a few KB zipped, 3 MB each as canonical uint8.
    blank = blank_png(1024)
    content = zip_archive({f"{label}/{index}.png": blank for label in ("a", "b") for index in range(2)})
    quota = 2 << 20
    blobs_before = files_in(app_env.store.blob_dir)
    with settings_changed(sandbox_client, max_stored_bytes_per_tenant=quota):
        response = upload_dataset(sandbox_client, auth_headers, content, "blank.zip")
    assert response.status_code == 413, response.text
    detail = response.json()["detail"]
    stated = re.search(r"stored as (\d+) bytes", detail)
    assert stated is not None and 4 * 1024 * 1024 * 3 <= int(stated[1]) < 4 * 1024 * 1024 * 3 + 2048
    assert f"of its {quota}" in detail
    assert count_rows(Dataset, tenant) == 1
    assert files_in(app_env.store.blob_dir) == blobs_before
    assert files_in(app_env.store.tmp_dir) == []
