"""Pruned models as specs: ArchSpec.pruned_shapes rebuilds a structurally pruned model (on the meta device too),
refuses records that do not fit the architecture, and lets a pruned model be pruned again, distilled from and
quantized; the service's own .arch.json documents read back as the specs they describe."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from tests.engine.conftest import small_cnn
from worker.engine import budget, evaluate, export, models, prune, quantize, validate
from worker.engine.config import ADAMW_LOOP, ArchSpec, DistillConfig, PruneConfig, StudentSpec, student_arch
from worker.engine.distill import distill
from worker.engine.errors import ModelLoadError, SpecError

CALIBRATION_SAMPLES = 64


@pytest.fixture(scope="module")
def calibration(digits_splits) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = digits_splits[0]
    return x[:CALIBRATION_SAMPLES], y[:CALIBRATION_SAMPLES]


def pruned_once(model: nn.Module, calibration, **settings) -> tuple[nn.Module, prune.Shapes]:
    """A structurally pruned copy of `model`, and the layers this pruning changed."""
    pruned = copy.deepcopy(model)
    prune.prune_structured_(pruned, PruneConfig(**settings), calibration, num_classes=10)
    return pruned, prune.pruned_shapes(pruned, model)


@pytest.fixture(scope="module")
def pruned_model(trained_small_cnn, calibration) -> tuple[ArchSpec, nn.Module]:
    arch, model = trained_small_cnn
    pruned, shapes = pruned_once(model, calibration, channel_ratio=0.5)
    return prune.pruned_arch(arch, shapes), pruned.eval()


def test_a_pruned_spec_builds_the_pruned_model(pruned_model, digits_splits, tmp_path: Path) -> None:
    pruned_arch, pruned = pruned_model
    assert pruned_arch.pruned_shapes is not None and pruned_arch.pruned_shapes["features.0"] == [8, 1, 1]
    export.save_safetensors(pruned, tmp_path / "pruned.safetensors")
    rebuilt = models.load_model(tmp_path / "pruned.safetensors", "safetensors", pruned_arch).eval()
    x_val = digits_splits[1][0]
    assert torch.equal(evaluate.logits(rebuilt, x_val), evaluate.logits(pruned, x_val))
    # The stored form of the spec (a model row's columns) gives it back.
    stored = pruned_arch.stored_arch()
    assert stored["pruned_shapes"] == pruned_arch.pruned_shapes
    assert ArchSpec.from_stored(stored, pruned_arch.input.model_dump(mode="json")) == pruned_arch
    # The unpruned architecture does not take these weights.
    base = pruned_arch.replace(pruned_shapes=None)
    assert base.stored_arch() == {"arch": "small_cnn", "kwargs": {"num_classes": 10, "width": 16, "depth": 3}}
    with pytest.raises(ModelLoadError, match=r"features\.0\.weight has shape \[8, 1, 3, 3\] but the spec's model "
                                             r"expects \[16, 1, 3, 3\]"):
        models.load_model(tmp_path / "pruned.safetensors", "safetensors", base)


def test_the_budget_and_the_upload_check_build_pruned_specs_on_meta(pruned_model, tmp_path: Path) -> None:
    pruned_arch, pruned = pruned_model
    cost = budget.estimate(pruned_arch)
    assert cost.parameters == models.param_count(pruned)
    assert all(parameter.device.type == "meta" for parameter in budget.build_on_meta(pruned_arch).parameters())
    weights = tmp_path / "pruned.safetensors"
    export.save_safetensors(pruned, weights)
    assert validate.validate(weights, "safetensors", pruned_arch.model_dump_json()) == {
        "ok": True, "param_count": cost.parameters, "num_classes": 10,
        "activations_per_sample": cost.activations_per_sample}
    # Pruned weights under a spec with other sizes: refused, naming the tensor.
    wider = pruned_arch.replace(pruned_shapes={**pruned_arch.pruned_shapes, "features.0": [12, 1, 1],
                                               "features.1": [12], "features.4": [16, 12, 1]})
    verdict = validate.validate(weights, "safetensors", wider.model_dump_json())
    assert verdict["ok"] is False
    assert "features.0.weight has shape [8, 1, 3, 3] but the spec's model expects [12, 1, 3, 3]" in verdict["error"]
    # Sizes that do not chain (a convolution fed fewer channels than it takes) fail at the shape check.
    broken = pruned_arch.replace(pruned_shapes={"features.0": [8, 1, 1]})
    assert "does not run on 1x8x8 inputs" in budget.estimate_all(json.dumps([broken.model_dump(mode="json")]))["error"]


@pytest.mark.parametrize(("shapes", "message"), [
    ({"features.12": [8]}, r"pruned_shapes: small_cnn has no module named 'features\.12'; its resizable layers are "
                          r"named like features\.0, features\.1, features\.4"),
    ({"features.2": [8]}, r"pruned_shapes: 'features\.2' is a ReLU; only Conv2d, Linear and BatchNorm2d layers are "
                          r"resized"),
    ({"features.0": [8, 1]}, r"pruned_shapes: 'features\.0' is a Conv2d, whose shape is \[out_channels, "
                             r"in_channels, groups\]; got \[8, 1\]"),
    ({"classifier": [10]}, r"'classifier' is a Linear, whose shape is \[out_features, in_features\]; got \[10\]"),
    ({"features.0": [8, 1, 3]}, r"'features\.0' has 3 groups, which must divide both its 1 input and 8 output"),
])
def test_a_record_that_does_not_fit_the_architecture_is_a_spec_error(shapes, message: str) -> None:
    arch = small_cnn(16, depth=3).replace(pruned_shapes=shapes)
    with pytest.raises(SpecError, match=message):
        models.build_model(arch)
    with pytest.raises(SpecError, match=message):
        budget.build_on_meta(arch)


@pytest.mark.parametrize(("shapes", "message"), [
    ({"features.0": []}, "at least 1 item"),
    ({"features.0": [8, 1, 1, 1]}, "at most 3 items"),
    ({"features.0": [0]}, "greater than or equal to 1"),
    ({"features.0": [100_001]}, "less than or equal to 100000"),
    ({"features.0": [8.0]}, "valid integer"),
    ({"features.0": ["8"]}, "valid integer"),
    ({"features.0": [True]}, "valid integer"),
    ({"features/0": [8]}, "should match pattern"),
    ({"f" * 201: [8]}, "at most 200 characters"),
    ({f"layer{index}": [8] for index in range(4097)}, "at most 4096 items"),
])
def test_a_malformed_record_is_refused_by_the_spec(shapes, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        small_cnn(16).replace(pruned_shapes=shapes)


def test_an_empty_record_is_an_unpruned_model() -> None:
    assert small_cnn(16).replace(pruned_shapes={}) == small_cnn(16)
    assert small_cnn(16).replace(pruned_shapes={}).stored_arch() == {"arch": "small_cnn",
                                                                     "kwargs": {"num_classes": 10, "width": 16}}


def test_a_pruned_model_pruned_again_keeps_one_record_against_the_base_architecture(
        pruned_model, calibration, digits_splits, tmp_path: Path) -> None:
    pruned_arch, pruned = pruned_model
    # The first layer keeps its channels this time: only the first pruning's record says its size.
    again, changed = pruned_once(pruned, calibration, channel_ratio=0.5, keep_layers=("features.0",))
    assert "features.0" not in changed and changed["features.4"] == [8, 8, 1]
    twice_arch = prune.pruned_arch(pruned_arch, changed)
    assert twice_arch.pruned_shapes == {**pruned_arch.pruned_shapes, **changed}
    document = export.arch_spec_document(twice_arch, with_pruned_shapes=True)
    assert (document["arch"], document["kwargs"]) == ("small_cnn", {"num_classes": 10, "width": 16, "depth": 3})
    assert document["pruned_shapes"]["features.0"] == [8, 1, 1]

    export.save_safetensors(again, tmp_path / "twice.safetensors")
    export.save_json(document, tmp_path / "twice.arch.json")
    spec = ArchSpec.from_document(json.loads((tmp_path / "twice.arch.json").read_text()))
    rebuilt = models.load_model(tmp_path / "twice.safetensors", "safetensors", spec).eval()
    x_val = digits_splits[1][0]
    assert torch.equal(evaluate.logits(rebuilt, x_val), evaluate.logits(again.eval(), x_val))


def test_a_pruned_model_teaches_and_is_quantized(pruned_model, calibration, digits_splits) -> None:
    pruned_arch, pruned = pruned_model
    student_spec = student_arch(StudentSpec(arch="small_cnn", kwargs={"width": 4, "depth": 2}), pruned_arch)
    assert student_spec.pruned_shapes is None  # the student is its own architecture
    student = models.build_model(student_spec)
    config = DistillConfig(epochs=1, batch_size=64, lr=1e-2, **ADAMW_LOOP)
    result = distill(pruned, student, digits_splits[0], digits_splits[1], config, lambda _: None, device="cpu")
    assert len(result.history) == 1

    int8 = quantize.quantize_static(pruned, "x86", calibration[0])
    assert quantize.layer_report(int8)["float_layers"] == []
    x_val = digits_splits[1][0]
    with quantize.quantized_engine("x86"):
        agreeing = (evaluate.logits(int8, x_val).argmax(1) == evaluate.logits(pruned, x_val).argmax(1)).float()
    assert agreeing.mean() >= 0.95
    # The quantize job's document describes its pruned input model.
    assert export.arch_spec_document(pruned_arch)["pruned_shapes"] == pruned_arch.pruned_shapes


@pytest.mark.parametrize("arch", [small_cnn(8), ArchSpec(arch="resnet18", kwargs={"num_classes": 3},
                                                         input={"image_size": 32})])
def test_the_documents_this_service_writes_read_back_as_their_specs(arch: ArchSpec) -> None:
    document = json.loads(json.dumps(export.arch_spec_document(arch)))
    assert {"framework", "how_to_load"} <= document.keys()
    assert ArchSpec.from_document(document) == arch
    with pytest.raises(ValidationError, match="framework\n  Extra inputs are not permitted"):
        ArchSpec.model_validate(document)  # a job's spec stays strict


@pytest.mark.parametrize(("change", "message"), [
    ({"framework": "torchvision"}, "framework 'torchvision' does not match arch 'small_cnn', whose framework is "
                                   "'condenser.small_cnn'"),
    ({"framework": "keras"}, "framework\n  Input should be 'condenser.small_cnn' or 'torchvision'"),
    ({"quantization": {"method": "static"}}, "quantized.json .* int8 files cannot be uploaded as a model; upload the "
                                             "float model's safetensors with its arch spec"),
    ({"how_to_loaad": "typo"}, "how_to_loaad\n  Extra inputs are not permitted"),
])
def test_a_document_that_is_not_a_float_models_spec_is_refused(change: dict, message: str) -> None:
    document = {**export.arch_spec_document(small_cnn(8)), **change}
    with pytest.raises(ValidationError, match=message):
        ArchSpec.from_document(document)
