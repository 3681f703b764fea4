"""POST /v1/jobs for kind prune and quantize: the input model in "model", settings checked per method,
mistakes answered with a 422 that names the field and says what to do."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from fastapi.testclient import TestClient

from core.db.models import Job
from tests.api.helpers import count_rows, npz_dataset, upload_dataset
from tests.conftest import SMALL_CNN_SPEC


@pytest.fixture
def model_id(insert_model: Callable[..., str], tenant: str) -> str:
    return insert_model(tenant)


def body(kind: str, model_id: str, **overrides: Any) -> dict[str, Any]:
    settings = {"prune": {"channel_ratio": 0.5}, "quantize": {}}[kind]
    return {"kind": kind, "model": model_id, "dataset": "digits", **settings, **overrides}


def dotted(spec: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """The nested spec as {"prune.recovery.training.epochs": 2, ...}."""
    flat: dict[str, Any] = {}
    for key, value in spec.items():
        if isinstance(value, dict):
            flat.update(dotted(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


@pytest.mark.parametrize(
    ("kind", "overrides", "stored"),
    [
        ("prune", {"importance": "taylor", "epochs": 2},
         {"prune.method": "structured", "prune.channel_ratio": 0.5, "prune.importance": "taylor",
          "prune.recovery.training.epochs": 2, "prune.recovery.training.lr": 0.001, "prune.keep_layers": [],
          "prune.calibration_samples": 128, "prune.sparsity": None}),
        ("prune", {"method": "unstructured", "sparsity": 0.8, "channel_ratio": None},
         {"prune.method": "unstructured", "prune.sparsity": 0.8, "prune.channel_ratio": None,
          "prune.importance": None, "prune.recovery.training.epochs": 3}),
        ("prune", {"epochs": 0}, {"prune.recovery": None}),
        ("quantize", {}, {"quantize.method": "static", "quantize.backend": "x86", "quantize.calibration_samples": 256,
                          "quantize.qat": None}),
        ("quantize", {"method": "qat", "backend": "qnnpack", "epochs": 1, "lr": 1e-5},
         {"quantize.method": "qat", "quantize.backend": "qnnpack", "quantize.qat.training.epochs": 1,
          "quantize.qat.training.lr": 1e-5}),
    ],
    ids=["structured", "unstructured", "no-recovery", "static", "qat"],
)
def test_submit_stores_the_input_model_and_every_setting(client: TestClient, auth_headers: dict[str, str],
                                                         model_id: str, kind: str, overrides: dict[str, Any],
                                                         stored: dict[str, Any]) -> None:
    response = client.post("/v1/jobs", headers=auth_headers, json=body(kind, model_id, **overrides))
    assert response.status_code == 201, response.text
    job = response.json()
    assert (job["kind"], job["status"], job["model"], job["teacher"]) == (kind, "queued", model_id, model_id)
    expected = {"kind": kind, "model": model_id, "dataset": "digits", **stored}
    assert {key: value for key, value in dotted(job["spec"]).items() if key in expected} == expected


@pytest.mark.parametrize(
    ("overrides", "message_part"),
    [
        ({"kind": "prune", "channel_ratio": None}, "structured pruning needs exactly one of channel_ratio"),
        ({"kind": "prune", "target_macs_reduction": 2.0}, "structured pruning needs exactly one of channel_ratio"),
        ({"kind": "prune", "channel_ratio": 0.95}, "prune.channel_ratio: Input should be less than or equal to 0.9"),
        ({"kind": "prune", "target_macs_reduction": 1.0, "channel_ratio": None},
         "prune.target_macs_reduction: Input should be greater than 1"),
        ({"kind": "prune", "method": "unstructured", "channel_ratio": None}, "unstructured pruning needs sparsity"),
        ({"kind": "prune", "method": "unstructured", "sparsity": 0.5},
         "channel_ratio only apply to method 'structured'; remove them or change method"),
        ({"kind": "prune", "sparsity": 0.5}, "sparsity only apply to method 'unstructured'"),
        ({"kind": "prune", "importance": "random"},
         "prune.importance: Input should be 'magnitude', 'taylor' or 'lamp'"),
        ({"kind": "prune", "epochs": -1}, "prune.prune.recovery.training.epochs: Input should be greater than or "
                                          "equal to 1"),
        ({"kind": "prune", "student": {"arch": "small_cnn"}}, "prune.student: unknown field"),
        ({"kind": "quantize", "epochs": 3}, "epochs only apply to method 'qat'"),
        ({"kind": "quantize", "method": "dynamic", "calibration_samples": 10},
         "calibration_samples only apply to methods 'static' and 'qat'"),
        ({"kind": "quantize", "backend": "arm"}, "quantize.backend: Input should be 'x86' or 'qnnpack'"),
        ({"kind": "quantize", "calibration_samples": 0}, "quantize.calibration_samples: Input should be greater"),
        ({"kind": "quantize", "method": "int4"}, "quantize.method: Input should be 'dynamic', 'static' or 'qat'"),
        ({"kind": "quantize", "teacher": "mdl_x"}, "quantize.teacher: unknown field"),
        ({"kind": "quantize", "method": "qat", "compile": "on"}, "compile 'on' is not available with method 'qat'"),
        ({"kind": "compress"}, "kind: Input should be 'distill', 'prune' or 'quantize'"),
    ],
)
def test_settings_are_checked_per_kind_and_method(client: TestClient, auth_headers: dict[str, str], model_id: str,
                                                  tenant: str, overrides: dict[str, Any], message_part: str) -> None:
    kind = overrides["kind"] if overrides["kind"] in ("prune", "quantize") else "quantize"
    payload = {key: value for key, value in {**body(kind, model_id), **overrides}.items() if value is not None}
    response = client.post("/v1/jobs", headers=auth_headers, json=payload)
    assert response.status_code == 422, response.text
    assert message_part in response.json()["detail"], response.json()
    assert count_rows(Job, tenant) == 0


def test_the_model_and_dataset_are_checked_like_a_teacher(client: TestClient, auth_headers: dict[str, str],
                                                         insert_model: Callable[..., str], tenant: str,
                                                         model_id: str) -> None:
    dataset_id = upload_dataset(client, auth_headers, npz_dataset(num_classes=10), "ten.npz").json()["id"]
    five_classes = insert_model(tenant, spec={**SMALL_CNN_SPEC, "kwargs": {"num_classes": 5}})
    cases: list[tuple[dict[str, Any], int, str]] = [
        (body("prune", "mdl_000000000000000000000000"), 404, "model mdl_000000000000000000000000 not found"),
        (body("quantize", dataset_id), 422, f"model must be an uploaded model's id (mdl_...); '{dataset_id}' is a "
                                            "dataset id"),
        (body("prune", five_classes), 422, f"the dataset has 10 classes but the model {five_classes} predicts 5; "
                                           "fine-tuning and evaluating a pruned model needs the same classes"),
        (body("quantize", model_id, dataset="mnist"), 422, "a built-in name (digits, photo-patches, shapes)"),
    ]
    for payload, status, message_part in cases:
        response = client.post("/v1/jobs", headers=auth_headers, json=payload)
        assert response.status_code == status, (payload, response.text)
        assert message_part in response.json()["detail"], (payload, response.json())
    response = client.post("/v1/jobs", headers=auth_headers, json=body("quantize", model_id, dataset=dataset_id))
    assert response.status_code == 201, response.text
    assert response.json()["dataset"] == dataset_id
