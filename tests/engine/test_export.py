"""Exported artifacts reload and predict exactly like the model they came from."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from tests.engine.conftest import small_cnn
from worker.engine import evaluate, export, models
from worker.engine.config import ArchSpec, InputSpec
from worker.engine.errors import ModelLoadError


@pytest.fixture
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    trained_looking = models.build_model(small_cnn(8, dropout=0.5))
    # Non-trivial BatchNorm statistics, so eval-mode tracing is actually exercised.
    trained_looking.train()(torch.randn(16, 1, 8, 8))
    return trained_looking.train()


def test_torchscript_reload_predicts_identically(tmp_path: Path, model: torch.nn.Module) -> None:
    inputs = torch.randn(20, 1, 8, 8)
    export.export_torchscript(model, inputs[:1], tmp_path / "m.ts")
    assert model.training  # the caller's model is left as it was
    loaded = export.load_torchscript(tmp_path / "m.ts")
    assert torch.allclose(evaluate.logits(loaded, inputs), evaluate.logits(model, inputs), atol=1e-6)
    assert list(tmp_path.iterdir()) == [tmp_path / "m.ts"]  # no temporary file left behind


def test_exported_program_reloads_in_eval_mode_at_any_batch_size(tmp_path: Path, model: torch.nn.Module) -> None:
    export.export_program(model, torch.randn(1, 1, 8, 8), tmp_path / "m.pt2")
    assert model.training  # the caller's model is left as it was
    loaded = export.load_program(tmp_path / "m.pt2")
    for batch_size in (1, 32):
        inputs = torch.randn(batch_size, 1, 8, 8)
        # evaluate.logits puts both in eval mode: the eager model's BatchNorm and dropout must match the export.
        assert torch.allclose(evaluate.logits(loaded, inputs), evaluate.logits(model, inputs), atol=1e-6)
    assert list(tmp_path.iterdir()) == [tmp_path / "m.pt2"]


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v3_small", "efficientnet_b0"])
def test_torchvision_families_export_to_programs(tmp_path: Path, arch: str) -> None:
    torch.manual_seed(0)
    model = models.build_model(ArchSpec(arch=arch, kwargs={"num_classes": 3}, input=InputSpec(image_size=32)))
    model.train()(torch.randn(4, 3, 32, 32))  # BatchNorm statistics that differ from their initial values
    export.export_program(model, torch.randn(1, 3, 32, 32), tmp_path / "m.pt2")
    inputs = torch.randn(3, 3, 32, 32)
    expected = evaluate.logits(model, inputs)
    assert torch.allclose(evaluate.logits(export.load_program(tmp_path / "m.pt2"), inputs), expected,
                          atol=1e-4 * expected.abs().max().item())


def test_unloadable_program(tmp_path: Path) -> None:
    (tmp_path / "m.pt2").write_bytes(b"nope")
    with pytest.raises(ModelLoadError, match="not a loadable ExportedProgram"):
        export.load_program(tmp_path / "m.pt2")


def test_safetensors_reload_equals(tmp_path: Path, model: torch.nn.Module) -> None:
    path = tmp_path / "m.safetensors"
    export.save_safetensors(model, path)
    with safe_open(str(path), framework="pt") as handle:
        assert handle.metadata() == {"format": "pt"}
    reloaded = models.load_model(path, "safetensors", small_cnn(8, dropout=0.5))
    inputs = torch.randn(5, 1, 8, 8)
    assert torch.equal(evaluate.logits(reloaded, inputs), evaluate.logits(model, inputs))


@pytest.mark.parametrize(
    ("arch", "framework", "loader"),
    [
        (small_cnn(8), "condenser.small_cnn", "torch.jit.load"),
        (
            ArchSpec(arch="resnet18", kwargs={"num_classes": 3}, input=InputSpec(image_size=32)),
            "torchvision",
            "torchvision.models.get_model('resnet18'",
        ),
    ],
)
def test_arch_spec_document_rebuilds_the_spec(tmp_path: Path, arch: ArchSpec, framework: str, loader: str) -> None:
    document = export.arch_spec_document(arch)
    export.save_json(document, tmp_path / "spec.json")
    loaded = json.loads((tmp_path / "spec.json").read_text())
    assert loaded["framework"] == framework and loader in loaded["how_to_load"]
    assert "torch.export.load(<the .pt2 file>).module()" in loaded["how_to_load"]
    assert ArchSpec(arch=loaded["arch"], kwargs=loaded["kwargs"], input=loaded["input"]) == arch


def test_unloadable_torchscript(tmp_path: Path) -> None:
    (tmp_path / "m.ts").write_bytes(b"nope")
    with pytest.raises(ModelLoadError, match="not a loadable TorchScript file"):
        export.load_torchscript(tmp_path / "m.ts")
