"""POST/GET /v1/datasets: uploads ingested into a canonical .npz, built-ins, and hostile archives refused."""

from __future__ import annotations

import hashlib
import io

import numpy as np
import pytest
from fastapi.testclient import TestClient

from core.db.models import Dataset
from tests.api.helpers import count_rows, files_in, npz_dataset, png, upload_dataset, zip_archive
from tests.conftest import AppEnv


def test_upload_npz_then_read_it_back(client: TestClient, app_env: AppEnv, auth_headers: dict[str, str]) -> None:
    content = npz_dataset(num_classes=3, per_class=5)
    response = upload_dataset(client, auth_headers, content, "blobs.npz", name="blobs")
    assert response.status_code == 201, response.text
    dataset = response.json()
    assert dataset["id"].startswith("dst_")
    assert dataset["name"] == "blobs"
    assert dataset["format"] == "npz"
    assert dataset["sha256"] == hashlib.sha256(content).hexdigest()
    assert dataset["bytes"] == len(content)
    assert (dataset["num_classes"], dataset["num_samples"]) == (3, 15)
    assert dataset["class_counts"] == [5, 5, 5]
    assert dataset["image_shape"] == [8, 8, 1]
    with np.load(io.BytesIO(app_env.store.path_for(dataset["canonical_sha256"]).read_bytes())) as canonical:
        assert canonical["x"].shape == (15, 8, 8, 1)
    assert files_in(app_env.store.tmp_dir) == []

    assert client.get(f"/v1/datasets/{dataset['id']}", headers=auth_headers).json() == dataset
    listing = client.get("/v1/datasets", headers=auth_headers).json()
    assert listing["items"] == [dataset]
    assert listing["builtin"] == ["digits", "photo-patches", "shapes"]


def test_upload_image_folder_zip(client: TestClient, auth_headers: dict[str, str]) -> None:
    members = {f"{label}/{index}.png": png(value=40 * index) for label in ("cat", "dog") for index in range(3)}
    response = upload_dataset(client, auth_headers, zip_archive(members), "pets.zip")
    assert response.status_code == 201, response.text
    dataset = response.json()
    assert (dataset["format"], dataset["name"]) == ("zip", "pets")
    assert dataset["class_names"] == ["cat", "dog"]
    assert dataset["class_counts"] == [3, 3]


def test_builtin_datasets(client: TestClient, auth_headers: dict[str, str]) -> None:
    response = client.get("/v1/datasets/builtin", headers=auth_headers)
    assert response.status_code == 200
    digits, patches, shapes = response.json()
    assert digits["name"] == "digits"
    assert (digits["num_classes"], digits["num_samples"], digits["image_shape"]) == (10, 1797, [8, 8, 1])
    assert patches["name"] == "photo-patches"
    assert (patches["num_classes"], patches["num_samples"], patches["image_shape"]) == (14, 1400, [32, 32, 3])
    assert patches["class_counts"] == [100] * 14 and patches["class_names"][:3] == ["astronaut", "brick", "camera"]
    assert shapes["name"] == "shapes"
    assert (shapes["num_classes"], shapes["num_samples"], shapes["image_shape"]) == (10, 2000, [32, 32, 3])
    assert shapes["class_counts"] == [200] * 10 and shapes["class_names"][:3] == ["circle", "square", "triangle"]


def test_idempotent_upload(client: TestClient, auth_headers: dict[str, str], tenant: str) -> None:
    headers = {**auth_headers, "Idempotency-Key": "data-1"}
    first = upload_dataset(client, headers, npz_dataset(seed=1), "a.npz")
    again = upload_dataset(client, headers, npz_dataset(seed=1), "a.npz")
    assert first.status_code == again.status_code == 201
    assert again.json()["id"] == first.json()["id"]
    changed = upload_dataset(client, headers, npz_dataset(seed=2), "a.npz")
    assert changed.status_code == 409
    assert count_rows(Dataset, tenant) == 1


def test_other_tenant_cannot_see_a_dataset(client: TestClient, auth_headers: dict[str, str],
                                           other_auth_headers: dict[str, str]) -> None:
    dataset_id = upload_dataset(client, auth_headers, npz_dataset(), "d.npz").json()["id"]
    response = client.get(f"/v1/datasets/{dataset_id}", headers=other_auth_headers)
    assert response.status_code == 404
    assert response.json() == {"detail": f"dataset {dataset_id} not found"}
    assert client.get("/v1/datasets", headers=other_auth_headers).json()["items"] == []


@pytest.mark.parametrize(
    ("content", "filename", "message_part"),
    [
        (zip_archive({"cat/1.png": png(), "../escape/2.png": png()}), "evil.zip", ".."),
        (zip_archive({"cat/1.png": png(), "/abs/2.png": png()}), "evil.zip", "abs"),
        (b"just some text, not a dataset", "notes.txt", "is not a dataset this service reads"),
        (zip_archive({"cat/1.png": b"not a png"}), "broken.zip", "cat/1.png"),
    ],
    ids=["member-escapes-folder", "absolute-member", "not-an-archive", "broken-image"],
)
def test_bad_dataset_is_refused_and_nothing_kept(client: TestClient, app_env: AppEnv, auth_headers: dict[str, str],
                                                 tenant: str, content: bytes, filename: str,
                                                 message_part: str) -> None:
    blobs_before = files_in(app_env.store.blob_dir)
    response = upload_dataset(client, auth_headers, content, filename)
    assert response.status_code == 422, response.text
    assert message_part in response.json()["detail"]
    assert count_rows(Dataset, tenant) == 0
    assert files_in(app_env.store.tmp_dir) == []
    assert files_in(app_env.store.blob_dir) == blobs_before
