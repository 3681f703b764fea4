"""Architectures and safe weight loading: roundtrips, strict mismatches, corrupt and hostile files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from tests.engine.conftest import small_cnn
from tests.hostile import PickleCanary
from worker.engine import models
from worker.engine.config import ArchSpec, InputSpec, StudentSpec, student_arch
from worker.engine.errors import ModelLoadError, SpecError
from worker.engine.export import save_safetensors

RESNET_INPUT = InputSpec(image_size=32)


def _seeded(arch: ArchSpec) -> torch.nn.Module:
    torch.manual_seed(0)
    return models.build_model(arch)


def _assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[key], sb[key]) for key in sa)


@pytest.mark.parametrize("depth", [1, 3, 6])
def test_small_cnn_runs_on_the_smallest_input(depth: int) -> None:
    model = models.build_model(small_cnn(4, num_classes=7, depth=depth)).eval()
    assert model(torch.zeros(2, 1, 8, 8)).shape == (2, 7)


def test_small_cnn_layout() -> None:
    model = models.build_model(small_cnn(16, input_spec=RESNET_INPUT))
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [(3, 16), (16, 32), (32, 64)]
    assert model.classifier.in_features == 64


def test_torchvision_models_are_built_without_pretrained_weights() -> None:
    model = models.build_model(ArchSpec(arch="resnet18", kwargs={"num_classes": 10}, input=RESNET_INPUT))
    assert model.fc.out_features == 10 and models.param_count(model) == 11_181_642


def test_unusable_kwargs_are_a_spec_error() -> None:
    with pytest.raises(SpecError, match="resnet18"):
        models.build_model(ArchSpec(arch="resnet18", kwargs={"num_classes": 10, "depth": 3}, input=RESNET_INPUT))


def test_safetensors_roundtrip(tmp_path: Path) -> None:
    arch = small_cnn(8)
    model = _seeded(arch)
    save_safetensors(model, tmp_path / "m.safetensors")
    _assert_same_state(model, models.load_model(tmp_path / "m.safetensors", "safetensors", arch))


@pytest.mark.parametrize(
    "wrap",
    [
        lambda state: state,
        lambda state: {"state_dict": state, "epoch": 3},
        lambda state: {"model": {f"module.{key}": value for key, value in state.items()}},
    ],
    ids=["plain", "nested", "ddp"],
)
def test_state_dict_roundtrip(tmp_path: Path, wrap) -> None:
    arch = small_cnn(8)
    model = _seeded(arch)
    torch.save(wrap(model.state_dict()), tmp_path / "m.pt")
    _assert_same_state(model, models.load_model(tmp_path / "m.pt", "state_dict", arch))


def test_wrong_num_classes_names_the_head(tmp_path: Path) -> None:
    five = ArchSpec(arch="resnet18", kwargs={"num_classes": 5}, input=RESNET_INPUT)
    save_safetensors(models.build_model(five), tmp_path / "r.safetensors")
    ten = five.model_copy(update={"kwargs": {"num_classes": 10}})
    with pytest.raises(ModelLoadError, match=r"the spec says num_classes=10 but fc.weight has shape \[5, 512\]"):
        models.load_model(tmp_path / "r.safetensors", "safetensors", ten)


def test_missing_and_unexpected_keys_are_named(tmp_path: Path) -> None:
    save_safetensors(models.build_model(small_cnn(8, depth=3)), tmp_path / "m.safetensors")
    with pytest.raises(ModelLoadError, match=r"6 unexpected keys \(features\.8\.weight, features\.9\.bias"):
        models.load_model(tmp_path / "m.safetensors", "safetensors", small_cnn(8, depth=2))
    with pytest.raises(ModelLoadError, match=r"missing keys \(features\.12\.weight"):
        models.load_model(tmp_path / "m.safetensors", "safetensors", small_cnn(8, depth=4))


def test_width_mismatch_names_key_and_shapes(tmp_path: Path) -> None:
    save_safetensors(models.build_model(small_cnn(8)), tmp_path / "m.safetensors")
    with pytest.raises(ModelLoadError, match=r"features\.0\.weight has shape \[8, 1, 3, 3\] but .* \[16, 1, 3, 3\]"):
        models.load_model(tmp_path / "m.safetensors", "safetensors", small_cnn(16))


@pytest.mark.parametrize(
    ("fmt", "message"),
    [("safetensors", "not a valid safetensors file"), ("state_dict", "not a valid PyTorch state_dict file")],
)
def test_corrupt_files_are_refused(tmp_path: Path, fmt: str, message: str) -> None:
    path = tmp_path / "corrupt.bin"
    path.write_bytes(b"\x00garbage" * 100)
    with pytest.raises(ModelLoadError, match=message):
        models.load_model(path, fmt, small_cnn(8))


def test_state_dict_of_non_tensors_is_refused(tmp_path: Path) -> None:
    torch.save({"classifier.weight": [1, 2, 3]}, tmp_path / "m.pt")
    with pytest.raises(ModelLoadError, match="are not tensors"):
        models.load_model(tmp_path / "m.pt", "state_dict", small_cnn(8))


def test_malicious_pickle_is_refused_without_running(tmp_path: Path) -> None:
    canary = tmp_path / "canary"
    torch.save({"classifier.weight": PickleCanary(canary)}, tmp_path / "evil.pt")

    with pytest.raises(ModelLoadError, match="weights_only"):
        models.load_model(tmp_path / "evil.pt", "state_dict", small_cnn(8))
    assert not canary.exists()

    torch.load(tmp_path / "evil.pt", weights_only=False)  # proves the payload is live
    assert canary.exists()


def _save_code_checkpoint(model: torch.nn.Module, fmt: str, path: Path) -> Path:
    if fmt == "torchscript":
        torch.jit.save(torch.jit.script(model.eval()), path)
    else:
        torch.export.save(torch.export.export(model.eval(), (torch.zeros(1, 1, 8, 8),)), path)
    return path


@pytest.mark.parametrize("fmt", ["torchscript", "pt2"])
def test_code_checkpoints_are_read_only_when_allowed_and_only_for_their_tensors(tmp_path: Path, fmt: str) -> None:
    arch = small_cnn(8)
    model = _seeded(arch)
    path = _save_code_checkpoint(model, fmt, tmp_path / f"m.{fmt}")
    with pytest.raises(ModelLoadError, match="carries code"):
        models.load_model(path, fmt, arch)
    loaded = models.load_model(path, fmt, arch, allow_code=True)
    # The spec's own architecture, with the file's tensors: the file's code is not what runs afterwards.
    assert type(loaded) is models.SmallCNN
    _assert_same_state(model, loaded)
    broken = tmp_path / "broken"
    broken.write_bytes(b"PK\x03\x04 not really an archive")
    with pytest.raises(ModelLoadError, match=f"not a loadable {fmt} file"):
        models.load_model(broken, fmt, arch, allow_code=True)


def test_student_arch_takes_the_teachers_input_and_classes() -> None:
    teacher = ArchSpec(arch="resnet18", kwargs={"num_classes": 10}, input=RESNET_INPUT)
    student = student_arch(StudentSpec(arch="small_cnn", kwargs={"width": 8}), teacher)
    assert student.input == teacher.input and student.num_classes == 10
    assert student_arch(StudentSpec(arch=student.arch, kwargs=student.kwargs), teacher) == student  # idempotent
    with pytest.raises(SpecError, match="num_classes is 3 but the teacher predicts 10 classes"):
        student_arch(StudentSpec(arch="small_cnn", kwargs={"num_classes": 3}), teacher)
    with pytest.raises(ValidationError, match="width"):
        student_arch(StudentSpec(arch="small_cnn", kwargs={"width": 0}), teacher)
