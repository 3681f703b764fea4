"""Model budget (issue 13, item 6): a job whose models are too large to train is refused before it is queued,
with the figure and the limit, from the models' constructors on the meta device (in a child: no torch here)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.models import budget
from core.db.models import Job
from core.errors import Invalid
from tests.api.helpers import count_rows
from worker.engine.config import ArchSpec

RGB_224 = {"arch": "resnet18", "kwargs": {"num_classes": 10}, "input": {"image_size": 224, "channels": 3}}


@pytest.fixture
def teacher_224(insert_model: Callable[..., str], tenant: str) -> str:
    return insert_model(tenant, spec=RGB_224)


def distill(client: TestClient, headers: dict[str, str], teacher: str, student: dict[str, Any],
            **training: Any) -> Any:
    body = {"teacher": teacher, "dataset": "digits", "student": student, "epochs": 1, **training}
    return client.post("/v1/jobs", headers=headers, json=body)


def test_student_too_large_to_train_at_its_batch_size(client: TestClient, auth_headers: dict[str, str],
                                                      tenant: str, teacher_224: str) -> None:
    response = distill(client, auth_headers, teacher_224, {"arch": "vit_h_14"}, batch_size=4096)
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert "the student vit_h_14 at batch 4096 (training)" in detail
    needed_gib = float(detail.split("needs about ")[1].split(" GiB")[0].replace(",", ""))
    assert needed_gib > 8 * 1024  # terabytes: ~180M activation values per 224 px sample
    assert "this server allows 256.0 GiB (setting max_training_memory_bytes)" in detail
    assert count_rows(Job, tenant) == 0


def test_student_with_too_many_parameters(client: TestClient, auth_headers: dict[str, str], tenant: str,
                                          teacher_224: str) -> None:
    response = distill(client, auth_headers, teacher_224, {"arch": "resnet101", "kwargs": {"width_per_group": 4096}})
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert "the student resnet101 has 88,600,449,354 parameters" in detail
    assert "at most 2,000,000,000 (setting max_model_parameters)" in detail
    # torchvision fixes wide_resnet101_2's width: asking for another is refused as unbuildable, not queued.
    response = distill(client, auth_headers, teacher_224, {"arch": "wide_resnet101_2",
                                                           "kwargs": {"width_per_group": 4096}})
    assert response.status_code == 422, response.text
    assert "cannot build wide_resnet101_2" in response.json()["detail"]
    assert count_rows(Job, tenant) == 0


def test_a_job_within_the_budget_is_accepted(client: TestClient, auth_headers: dict[str, str],
                                             teacher_224: str) -> None:
    response = distill(client, auth_headers, teacher_224, {"arch": "resnet18"}, batch_size=256)
    assert response.status_code == 201, response.text


def test_an_estimate_past_the_child_limits_is_a_refusal() -> None:
    """A constructor that runs wild even on meta meets the child's limits (here its time): a 422, and the API
    process carries on."""
    arch = ArchSpec(arch="small_cnn", kwargs={"num_classes": 10, "width": 7}, input={"image_size": 8, "channels": 1})
    with pytest.raises(Invalid, match=r"estimating the model's size took longer than 0\.01 s"):
        budget.estimate([arch], timeout=0.01)


def test_a_pruned_model_is_estimated_as_pruned() -> None:
    """Its estimate is its own, not the one kept for its base architecture."""
    base = ArchSpec(arch="small_cnn", kwargs={"num_classes": 10, "width": 4, "depth": 1},
                    input={"image_size": 8, "channels": 1})
    pruned = base.replace(pruned_shapes={"features.0": [2, 1, 1], "features.1": [2], "classifier": [10, 2]})
    base_cost, pruned_cost = budget.estimate([base, pruned], timeout=60)
    # Convolution 4x1x3x3, batch norm 2x4, classifier 10x4 + 10; pruned: half the channels.
    assert (base_cost.parameters, pruned_cost.parameters) == (36 + 8 + 50, 18 + 4 + 30)
    assert budget.estimate([pruned], timeout=60) == [pruned_cost]
