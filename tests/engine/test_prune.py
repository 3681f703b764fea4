"""Pruning: structured channels really removed (MACs, shapes), rebuilt from the arch document, exported
files that predict like the engine's model; unstructured sparsity reached and kept; clear failures."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from worker.engine import evaluate, export, models, onnxio, prune
from worker.engine.config import ADAMW_LOOP, ArchSpec, DistillConfig, InputSpec, PruneConfig
from worker.engine.distill import distill
from worker.engine.errors import SpecError
from worker.engine.macs import count_macs

CALIBRATION_SAMPLES = 64


@pytest.fixture(scope="module")
def calibration(digits_splits) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = digits_splits[0]
    return x[:CALIBRATION_SAMPLES], y[:CALIBRATION_SAMPLES]


def pruned_copy(model: nn.Module, calibration, **settings) -> tuple[nn.Module, prune.StructuredResult]:
    pruned = copy.deepcopy(model)
    return pruned, prune.prune_structured_(pruned, PruneConfig(**settings), calibration, num_classes=10)


@pytest.mark.parametrize("importance", ["magnitude", "taylor", "lamp"])
def test_structured_pruning_removes_channels_and_is_deterministic(trained_small_cnn, calibration,
                                                                  importance: str) -> None:
    _, model = trained_small_cnn
    pruned, result = pruned_copy(model, calibration, channel_ratio=0.5, importance=importance)
    # Half the channels of each layer: about 4x fewer MACs where both sides of a convolution shrink.
    assert result.macs_before == count_macs(model, (1, 8, 8))
    assert result.macs_before / result.macs_after >= 3.0
    assert models.param_count(pruned) * 3 <= models.param_count(model)
    shapes = prune.pruned_shapes(pruned, model)
    assert shapes["features.0"] == [8, 1, 1] and shapes["features.1"] == [8]
    assert pruned.classifier.out_features == 10  # the output layer is always kept
    # Ranked in eval mode on a fixed batch: a retried job prunes to the very same model.
    again, _ = pruned_copy(model, calibration, channel_ratio=0.5, importance=importance)
    assert all(torch.equal(a, b) for a, b in zip(pruned.state_dict().values(), again.state_dict().values(),
                                                   strict=True))


def test_rebuilt_from_the_arch_document_and_exports_predict_the_same(trained_small_cnn, calibration, digits_splits,
                                                                     tmp_path: Path) -> None:
    arch, model = trained_small_cnn
    pruned, _ = pruned_copy(model, calibration, channel_ratio=0.5)
    pruned_arch = prune.pruned_arch(arch, prune.pruned_shapes(pruned, model))
    export.save_safetensors(pruned, tmp_path / "pruned.safetensors")
    export.save_json(export.arch_spec_document(pruned_arch, with_pruned_shapes=True), tmp_path / "pruned.arch.json")
    # The document as a user downloads it, with its explanations, is the spec that rebuilds the model.
    document = json.loads((tmp_path / "pruned.arch.json").read_text())
    assert document["pruned_shapes"] == pruned_arch.pruned_shapes and "pruned_shapes_format" in document
    assert ArchSpec.from_document(document) == pruned_arch
    rebuilt = models.load_model(tmp_path / "pruned.safetensors", "safetensors", ArchSpec.from_document(document))
    x_val = digits_splits[1][0]
    expected = evaluate.logits(pruned, x_val)
    assert torch.equal(evaluate.logits(rebuilt, x_val), expected)

    example = x_val[:1]
    export.export_torchscript(rebuilt, example, tmp_path / "pruned.torchscript.pt")
    onnxio.export_onnx(rebuilt, example, tmp_path / "pruned.onnx")
    for artifact in (export.load_torchscript(tmp_path / "pruned.torchscript.pt"),
                     onnxio.OnnxModel(tmp_path / "pruned.onnx")):
        logits = evaluate.logits(artifact, x_val)
        assert torch.allclose(logits, expected, atol=1e-4, rtol=1e-4)
        assert (logits.argmax(1) == expected.argmax(1)).float().mean() >= 0.99


def test_target_macs_reduction_is_reached(trained_small_cnn, calibration) -> None:
    _, model = trained_small_cnn
    _, result = pruned_copy(model, calibration, target_macs_reduction=2.0)
    assert 2.0 <= result.macs_before / result.macs_after <= 2.0 * prune.MACS_TOLERANCE
    assert 0 < result.channel_ratio < 0.5


def test_target_out_of_reach_says_how_far_it_got(trained_small_cnn, calibration) -> None:
    _, model = trained_small_cnn
    # Only the last convolution may lose channels, and it holds a minority of the MACs.
    with pytest.raises(SpecError, match=r"target_macs_reduction 4.0 is out of reach: 1\.\d+x fewer MACs at channel "
                                        r"ratio 0\.8\d+ with the kept layers"):
        pruned_copy(model, calibration, target_macs_reduction=4.0, keep_layers=("features.0", "features.4"))


def test_kept_layers_keep_their_channels_and_unknown_ones_are_named(trained_small_cnn, calibration) -> None:
    _, model = trained_small_cnn
    pruned, _ = pruned_copy(model, calibration, channel_ratio=0.5, keep_layers=("features.4",))
    assert pruned.features[4].out_channels == model.features[4].out_channels
    assert pruned.features[0].out_channels < model.features[0].out_channels
    with pytest.raises(SpecError, match=r"keep_layers: no module named 'fc' in the model; its layers are named "
                                        r"like features.0, features.4"):
        pruned_copy(model, calibration, channel_ratio=0.5, keep_layers=("fc",))


def test_a_classifier_convolution_is_kept(calibration) -> None:
    """squeezenet ends on a 1x1 convolution with num_classes outputs instead of a Linear layer."""
    arch = ArchSpec(arch="squeezenet1_1", kwargs={"num_classes": 10}, input=InputSpec(image_size=32, channels=3))
    torch.manual_seed(0)
    model = models.build_model(arch).eval()
    images = torch.randn(4, 3, 32, 32)
    pruned, result = pruned_copy(model, (images, calibration[1][:4]), channel_ratio=0.3)
    assert prune.output_layer_name(model, 10) == "classifier.1"
    assert evaluate.logits(pruned, images).shape == (4, 10)
    assert result.macs_after < result.macs_before
    rebuilt = models.build_model(prune.pruned_arch(arch, prune.pruned_shapes(pruned, model)))
    rebuilt.load_state_dict(pruned.state_dict())


def test_an_architecture_torch_pruning_cannot_follow_fails_naming_the_operator(calibration) -> None:
    """shufflenet's channel shuffle (a reshape that interleaves channels) defeats the dependency graph."""
    model = torchvision.models.shufflenet_v2_x0_5(num_classes=10).eval()
    images = torch.randn(2, 3, 32, 32)
    with pytest.raises(SpecError, match=r"cannot prune this model at operator _Reshape\w*\(\) after layer "
                                        r"'stage\d\.\d\.branch\d\.\d'.*use method 'unstructured'"):
        pruned_copy(model, (images, calibration[1][:2]), channel_ratio=0.5)


class ScaledBlock(nn.Module):
    """A per-channel scale held in a bare parameter (as convnext's layer_scale): no module records its size."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.scale = nn.Parameter(torch.ones(8, 1, 1))
        self.head = nn.Conv2d(8, 8, 1)
        self.classifier = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.head(self.conv(x) * self.scale).mean((2, 3)))


@pytest.mark.filterwarnings("ignore:Unwrapped parameters detected:UserWarning")
def test_pruned_tensors_the_shape_record_cannot_describe_are_refused(calibration) -> None:
    torch.manual_seed(0)
    model = ScaledBlock().eval()
    pruned, _ = pruned_copy(model, calibration, channel_ratio=0.5)
    with pytest.raises(SpecError, match=r"pruning resized scale \(of a ScaledBlock\), which the pruned-shapes record "
                                        r"cannot describe"):
        prune.pruned_shapes(pruned, model)


def test_unstructured_reaches_the_sparsity_and_fine_tuning_keeps_the_zeros(trained_small_cnn, digits_splits) -> None:
    _, model = trained_small_cnn
    pruned = copy.deepcopy(model)
    prune.prune_unstructured_(pruned, 0.7, keep_layers=(), num_classes=10)
    assert prune.weight_sparsity(pruned, (), 10)["pruned_weights"] == pytest.approx(0.7, abs=1e-3)
    assert torch.count_nonzero(pruned.classifier.weight) == pruned.classifier.weight.numel()  # kept

    config = DistillConfig(epochs=1, batch_size=64, lr=1e-3, **ADAMW_LOOP)
    distill(model, pruned, digits_splits[0], digits_splits[1], config, lambda _: None, device="cpu")
    prune.make_permanent_(pruned)
    sparsity = prune.weight_sparsity(pruned, (), 10)
    assert sparsity["pruned_weights"] == pytest.approx(0.7, abs=1e-3)
    assert 0 < sparsity["all_parameters"] < 0.7
    # A plain state_dict with the architecture's own keys and shapes: it loads into the unpruned model.
    assert pruned.state_dict().keys() == model.state_dict().keys()
    assert evaluate.accuracy(pruned, *digits_splits[1]) >= 0.9


def test_unstructured_with_everything_kept_has_nothing_to_prune() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    with pytest.raises(SpecError, match="nothing to prune"):
        prune.prune_unstructured_(model, 0.5, keep_layers=(), num_classes=10)
