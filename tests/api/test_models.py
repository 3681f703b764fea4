"""POST/GET /v1/models: streaming upload, weights checked in a child process, nothing stored on failure."""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from core.db.models import Model
from tests.api.helpers import count_rows, files_in, multipart_body, upload_model
from tests.conftest import AppEnv, SmallCnnFiles


def assert_nothing_stored(app_env: AppEnv, tenant: str) -> None:
    assert count_rows(Model, tenant) == 0
    assert files_in(app_env.store.tmp_dir) == []


def assert_rejected(response: httpx.Response, status: int, message_part: str) -> None:
    assert response.status_code == status, response.text
    assert message_part in response.json()["detail"]


def test_upload_safetensors_then_read_it_back(client: TestClient, app_env: AppEnv, auth_headers: dict[str, str],
                                              small_cnn_files: SmallCnnFiles) -> None:
    response = upload_model(client, auth_headers, small_cnn_files.safetensors, small_cnn_files.spec,
                            name="digits teacher")
    assert response.status_code == 201, response.text
    model = response.json()
    content = small_cnn_files.safetensors.read_bytes()
    assert model["id"].startswith("mdl_")
    assert model["name"] == "digits teacher"
    assert model["format"] == "safetensors"  # detected from the bytes
    assert model["sha256"] == hashlib.sha256(content).hexdigest()
    assert model["bytes"] == len(content)
    assert model["arch"] == "small_cnn"
    assert model["kwargs"] == small_cnn_files.spec["kwargs"]
    assert model["input"]["image_size"] == 8 and model["input"]["channels"] == 1
    assert model["num_classes"] == 10
    assert model["param_count"] > 0
    assert model["created_at"].endswith("Z") or model["created_at"].endswith("+00:00")
    assert app_env.store.path_for(model["sha256"]).read_bytes() == content
    assert files_in(app_env.store.tmp_dir) == []

    assert client.get(f"/v1/models/{model['id']}", headers=auth_headers).json() == model
    listing = client.get("/v1/models", headers=auth_headers).json()
    assert listing["items"] == [model]
    assert listing["next_cursor"] is None


def test_upload_state_dict_detected_and_named_after_the_file(
    client: TestClient, auth_headers: dict[str, str], small_cnn_files: SmallCnnFiles
) -> None:
    response = upload_model(client, auth_headers, small_cnn_files.state_dict, small_cnn_files.spec)
    assert response.status_code == 201, response.text
    assert response.json()["format"] == "state_dict"
    assert response.json()["name"] == "teacher"


def test_idempotent_upload(client: TestClient, auth_headers: dict[str, str], small_cnn_files: SmallCnnFiles,
                           tenant: str) -> None:
    headers = {**auth_headers, "Idempotency-Key": "upload-1"}
    first = upload_model(client, headers, small_cnn_files.safetensors, small_cnn_files.spec)
    assert first.status_code == 201, first.text
    again = upload_model(client, headers, small_cnn_files.safetensors, small_cnn_files.spec)
    assert again.status_code == 201
    assert again.json()["id"] == first.json()["id"]
    assert again.headers["idempotent-replayed"] == "true"
    different = upload_model(client, headers, small_cnn_files.state_dict, small_cnn_files.spec)
    assert_rejected(different, 409, "Idempotency-Key 'upload-1' was already used")
    assert count_rows(Model, tenant) == 1


def test_other_tenant_cannot_see_a_model(client: TestClient, auth_headers: dict[str, str],
                                         other_auth_headers: dict[str, str], insert_model: Callable[..., str],
                                         tenant: str) -> None:
    model_id = insert_model(tenant)
    assert client.get(f"/v1/models/{model_id}", headers=auth_headers).status_code == 200
    assert_rejected(client.get(f"/v1/models/{model_id}", headers=other_auth_headers), 404,
                    f"model {model_id} not found")
    assert client.get("/v1/models", headers=other_auth_headers).json()["items"] == []


def test_models_page_newest_first(client: TestClient, auth_headers: dict[str, str],
                                  insert_model: Callable[..., str], tenant: str) -> None:
    ids = [insert_model(tenant, name=f"m{index}") for index in range(3)]
    first = client.get("/v1/models", headers=auth_headers, params={"limit": 2}).json()
    assert [item["id"] for item in first["items"]] == ids[::-1][:2]
    second = client.get(first["next"], headers=auth_headers).json()
    assert [item["id"] for item in second["items"]] == ids[:1]
    assert second["next"] is None


# --- rejected uploads: a clear 4xx and nothing half-written --------------------------------------


def test_corrupt_safetensors(client: TestClient, app_env: AppEnv, auth_headers: dict[str, str], tenant: str,
                             small_cnn_files: SmallCnnFiles, tmp_path: Path) -> None:
    header = b'{"w": {"dtype": "F32", "shape": [1000], "data_offsets": [0, 4000]}}'
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(struct.pack("<Q", len(header)) + header + b"\x00" * 16)
    response = upload_model(client, auth_headers, corrupt, small_cnn_files.spec)
    assert_rejected(response, 422, "the weights do not fit the spec")
    assert_nothing_stored(app_env, tenant)
    assert not app_env.store.exists(hashlib.sha256(corrupt.read_bytes()).hexdigest())


def test_spec_that_does_not_match_the_weights(client: TestClient, app_env: AppEnv, auth_headers: dict[str, str],
                                              tenant: str, small_cnn_files: SmallCnnFiles) -> None:
    spec = {**small_cnn_files.spec, "kwargs": {**small_cnn_files.spec["kwargs"], "num_classes": 5}}
    response = upload_model(client, auth_headers, small_cnn_files.safetensors, spec)
    assert_rejected(response, 422, "the weights do not fit the spec")
    assert_nothing_stored(app_env, tenant)


@pytest.mark.parametrize(
    ("spec", "message_part"),
    [
        ({"arch": "resnet1000", "kwargs": {"num_classes": 10}, "input": {"image_size": 8, "channels": 3}},
         "unknown architecture 'resnet1000'"),
        ({"arch": "small_cnn", "kwargs": {"num_classes": 10}, "input": {"image_size": 8, "channels": 1},
          "colour": "blue"}, "colour: unknown field"),
        ({"arch": "small_cnn", "kwargs": {"num_classes": 10, "widht": 4}, "input": {"image_size": 8, "channels": 1}},
         "unknown small_cnn kwargs ['widht']"),
        ({"arch": "small_cnn", "kwargs": {"num_classes": 10}, "input": {"image_size": 4, "channels": 1}},
         "input.image_size: Input should be greater than or equal to 8"),
        ({"arch": "small_cnn", "kwargs": {}, "input": {"image_size": 8, "channels": 1}},
         "kwargs.num_classes is required"),
        ("{not json", "form field 'spec' is not valid JSON"),
    ],
    ids=["unknown-arch", "unknown-field", "unknown-kwarg", "out-of-bounds", "no-num-classes", "not-json"],
)
def test_invalid_spec(client: TestClient, app_env: AppEnv, auth_headers: dict[str, str], tenant: str,
                      small_cnn_files: SmallCnnFiles, spec: dict[str, object] | str, message_part: str) -> None:
    response = upload_model(client, auth_headers, small_cnn_files.safetensors,
                            spec if isinstance(spec, str) else json.dumps(spec))
    assert_rejected(response, 422, message_part)
    assert_nothing_stored(app_env, tenant)


def test_undetectable_format(client: TestClient, app_env: AppEnv, auth_headers: dict[str, str], tenant: str,
                             small_cnn_files: SmallCnnFiles, tmp_path: Path) -> None:
    junk = tmp_path / "weights.bin"
    junk.write_bytes(b"hello, this is not a model")
    assert_rejected(upload_model(client, auth_headers, junk, small_cnn_files.spec), 422,
                    "could not tell the weights format")
    assert_rejected(upload_model(client, auth_headers, junk, small_cnn_files.spec, format="onnx"), 422,
                    "format must be one of safetensors, state_dict")
    assert_nothing_stored(app_env, tenant)


@pytest.mark.parametrize(
    ("fields", "with_file", "status", "message_part"),
    [
        ({}, True, 422, "form field 'spec' is required"),
        ({"spec": "{}"}, False, 422, "form field 'file' is required"),
        ({"spec": "{}", "colour": "blue"}, True, 422, "unknown form field 'colour'"),
        ({"spec": "x" * (64 * 1024 + 1)}, True, 422, "longer than 64 KiB"),
        ({"name": "n" * 201, "spec": json.dumps({"arch": "small_cnn", "kwargs": {"num_classes": 10},
                                                  "input": {"image_size": 8}})}, True, 422, "name is longer"),
    ],
    ids=["no-spec", "no-file", "unknown-field", "huge-field", "long-name"],
)
def test_malformed_form(client: TestClient, app_env: AppEnv, auth_headers: dict[str, str], tenant: str,
                        fields: dict[str, str], with_file: bool, status: int, message_part: str) -> None:
    content_type, body = multipart_body(fields, b"\x80\x02weights" if with_file else None)
    response = client.post("/v1/models", headers={**auth_headers, "Content-Type": content_type}, content=body)
    assert_rejected(response, status, message_part)
    assert_nothing_stored(app_env, tenant)


def test_truncated_body_and_wrong_content_type(client: TestClient, app_env: AppEnv, auth_headers: dict[str, str],
                                               tenant: str) -> None:
    content_type, body = multipart_body({"spec": "{}"}, b"\x80\x02weights", closing=False)
    response = client.post("/v1/models", headers={**auth_headers, "Content-Type": content_type}, content=body)
    assert_rejected(response, 400, "ended before its closing boundary")
    assert_rejected(client.post("/v1/models", headers=auth_headers, json={"spec": {}}), 415, "multipart/form-data")
    assert_nothing_stored(app_env, tenant)


@pytest.mark.parametrize("send_length", [True, False], ids=["content-length", "chunked"])
@pytest.mark.parametrize("file_bytes", [4096, 2 << 20], ids=["file-over-cap", "body-over-cap"])
def test_oversize_upload(client: TestClient, app_env: AppEnv, auth_headers: dict[str, str], tenant: str,
                         monkeypatch: pytest.MonkeyPatch, small_cnn_files: SmallCnnFiles, send_length: bool,
                         file_bytes: int) -> None:
    monkeypatch.setattr(app_env.settings, "max_upload_bytes", 1024)
    content_type, body = multipart_body({"spec": json.dumps(small_cnn_files.spec)}, b"\x80" * file_bytes)
    headers = {**auth_headers, "Content-Type": content_type}
    # A generator makes httpx send Transfer-Encoding: chunked, with no Content-Length to refuse up front.
    content = body if send_length else iter([body[:1000], body[1000:]])
    response = client.post("/v1/models", headers=headers, content=content)
    assert_rejected(response, 413, "exceeds the limit of 1024 bytes")
    assert_nothing_stored(app_env, tenant)


def test_one_file_per_upload(client: TestClient, app_env: AppEnv, auth_headers: dict[str, str],
                                tenant: str) -> None:
    content_type, body = multipart_body({"spec": "{}"}, b"\x80\x02first")
    boundary = content_type.split("boundary=")[1]
    second_file = (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="b"\r\n\r\n'
                   "second\r\n").encode()
    doubled = body.replace(f"--{boundary}--".encode(), second_file + f"--{boundary}--".encode())
    response = client.post("/v1/models", headers={**auth_headers, "Content-Type": content_type}, content=doubled)
    assert_rejected(response, 422, "form field 'file' was sent twice")
    assert_nothing_stored(app_env, tenant)


# --- this service's own spec documents, uploaded as they are -------------------------------------


@dataclass(frozen=True)
class ServiceDocuments:
    """What a distill job (student.arch.json) and a prune job (pruned.arch.json) write, made by the same engine
    functions from the small_cnn teacher, and the pruned weights."""

    student: dict[str, Any]
    pruned: dict[str, Any]
    pruned_weights: Path
    pruned_params: int


@pytest.fixture(scope="module")
def service_documents(small_cnn_files: SmallCnnFiles, tmp_path_factory: pytest.TempPathFactory) -> ServiceDocuments:
    import copy

    from worker.engine import data, export, models, prune
    from worker.engine.config import ArchSpec, PruneConfig

    arch = ArchSpec.model_validate(small_cnn_files.spec)
    model = models.load_model(small_cnn_files.safetensors, "safetensors", arch).eval()
    x, y = data.train_val_tensors(data.load_builtin("digits"), arch.input, 0.2, 0)[0]
    pruned = copy.deepcopy(model)
    prune.prune_structured_(pruned, PruneConfig(channel_ratio=0.5), (x[:64], y[:64]), arch.num_classes)
    pruned_arch = prune.pruned_arch(arch, prune.pruned_shapes(pruned, model))
    weights = tmp_path_factory.mktemp("pruned") / "pruned.safetensors"
    export.save_safetensors(pruned, weights)
    # Through JSON, as the files are downloaded.
    return ServiceDocuments(
        student=json.loads(json.dumps(export.arch_spec_document(arch))),
        pruned=json.loads(json.dumps(export.arch_spec_document(pruned_arch, with_pruned_shapes=True))),
        pruned_weights=weights, pruned_params=models.param_count(pruned))


def test_a_student_arch_json_is_accepted_as_it_is(client: TestClient, auth_headers: dict[str, str],
                                                  small_cnn_files: SmallCnnFiles,
                                                  service_documents: ServiceDocuments) -> None:
    document = service_documents.student
    assert {"framework", "how_to_load"} <= document.keys()
    response = upload_model(client, auth_headers, small_cnn_files.safetensors, document)
    assert response.status_code == 201, response.text
    model = response.json()
    assert (model["arch"], model["kwargs"], model["pruned_shapes"]) == ("small_cnn", document["kwargs"], None)
    assert model["input"] == document["input"]


def test_a_pruned_model_is_uploaded_with_its_pruned_arch_json(client: TestClient, auth_headers: dict[str, str],
                                                              tenant: str, service_documents: ServiceDocuments) -> None:
    document = service_documents.pruned
    assert {"pruned_shapes", "pruned_shapes_format", "how_to_load"} <= document.keys()
    response = upload_model(client, auth_headers, service_documents.pruned_weights, document)
    assert response.status_code == 201, response.text
    model = response.json()
    assert model["pruned_shapes"] == document["pruned_shapes"] and model["pruned_shapes"]["features.0"] == [2, 1, 1]
    assert model["param_count"] == service_documents.pruned_params
    assert client.get(f"/v1/models/{model['id']}", headers=auth_headers).json() == model
    # The stored row rebuilds the pruned architecture: jobs take it as their input model.
    for job in ({"kind": "prune", "model": model["id"], "channel_ratio": 0.3, "epochs": 1},
                {"kind": "quantize", "model": model["id"]},
                {"kind": "distill", "teacher": model["id"], "student": {"arch": "small_cnn", "kwargs": {"width": 4}},
                 "epochs": 1}):
        submitted = client.post("/v1/jobs", headers=auth_headers, json={**job, "dataset": "digits"})
        assert submitted.status_code == 201, submitted.text


def test_pruned_weights_must_fit_the_pruned_shapes(client: TestClient, app_env: AppEnv, auth_headers: dict[str, str],
                                                   tenant: str, small_cnn_files: SmallCnnFiles,
                                                   service_documents: ServiceDocuments) -> None:
    # The unpruned teacher's weights under the pruned document, and the pruned weights under the unpruned spec.
    assert_rejected(upload_model(client, auth_headers, small_cnn_files.safetensors, service_documents.pruned), 422,
                    "features.0.weight has shape [4, 1, 3, 3] but the spec's model expects [2, 1, 3, 3]")
    assert_rejected(upload_model(client, auth_headers, service_documents.pruned_weights, service_documents.student),
                    422, "features.0.weight has shape [2, 1, 3, 3] but the spec's model expects [4, 1, 3, 3]")
    not_in_the_arch = {**service_documents.pruned, "pruned_shapes": {"fc": [10, 8]}}
    assert_rejected(upload_model(client, auth_headers, service_documents.pruned_weights, not_in_the_arch), 422,
                    "pruned_shapes: small_cnn has no module named 'fc'")
    assert_nothing_stored(app_env, tenant)


@pytest.mark.parametrize(
    ("change", "message_part"),
    [
        ({"quantization": {"method": "static", "backend": "x86"}},
         "int8 files cannot be uploaded as a model; upload the float model's safetensors with its arch spec"),
        ({"framework": "torchvision"},
         "framework 'torchvision' does not match arch 'small_cnn', whose framework is 'condenser.small_cnn'"),
        ({"how_to_laod": "..."}, "how_to_laod: unknown field"),
        ({"pruned_shapes": {"features.0": [8, "1", 1]}}, "pruned_shapes.features.0.1: Input should be a valid integer"),
    ],
    ids=["quantized-json", "wrong-framework", "unknown-key", "malformed-shapes"],
)
def test_a_document_that_is_no_float_models_spec_is_refused(
        client: TestClient, app_env: AppEnv, auth_headers: dict[str, str], tenant: str,
        small_cnn_files: SmallCnnFiles, service_documents: ServiceDocuments, change: dict[str, Any],
        message_part: str) -> None:
    document = {**service_documents.student, **change}
    if "quantization" in change:
        # As the quantize job writes it: how_to_load is a table of files there.
        document["how_to_load"] = {"quantized.onnx": {"runtime": "onnxruntime", "code": "..."}}
    assert_rejected(upload_model(client, auth_headers, small_cnn_files.safetensors, document), 422, message_part)
    assert_nothing_stored(app_env, tenant)
