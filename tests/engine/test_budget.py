"""Model cost from the constructor on the meta device: nothing allocated, whatever the spec asks for."""

from __future__ import annotations

import json

import torch

from tests.engine.conftest import small_cnn
from worker.engine import budget, models
from worker.engine.config import ArchSpec, InputSpec


def test_small_cnn_counts_parameters_and_every_layer_output() -> None:
    arch = small_cnn(4, depth=1)
    cost = budget.estimate(arch)
    assert cost.parameters == models.param_count(models.build_model(arch))
    # conv, batch norm and ReLU outputs at 4x8x8, the pooled 4 values (dropout passes them on), 10 logits.
    assert cost.activations_per_sample == 3 * 4 * 8 * 8 + 4 + 4 + 10


def test_a_huge_model_costs_nothing_to_estimate() -> None:
    arch = ArchSpec(arch="vit_h_14", kwargs={"num_classes": 1000}, input=InputSpec(image_size=224))
    cost = budget.estimate(arch)
    assert cost.parameters > 600_000_000
    assert cost.activations_per_sample > 100_000_000
    assert not any(parameter.device.type != "meta" for parameter in budget.build_on_meta(arch).parameters())


def test_estimate_all_reports_each_spec_or_the_reason() -> None:
    specs = [small_cnn(4).model_dump(mode="json"), small_cnn(8).model_dump(mode="json")]
    result = budget.estimate_all(json.dumps(specs))
    assert result["ok"] is True and [item["parameters"] for item in result["estimates"]] == [
        models.param_count(models.build_model(small_cnn(width))) for width in (4, 8)]
    wrong_size = ArchSpec(arch="vit_b_16", kwargs={"num_classes": 10}, input=InputSpec(image_size=32))
    refused = budget.estimate_all(json.dumps([wrong_size.model_dump(mode="json")]))
    assert refused["ok"] is False and "vit_b_16 does not run on 3x32x32 inputs" in refused["error"]
    assert torch.get_default_device().type == "cpu"  # building on meta changed no global default
