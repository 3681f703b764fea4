"""Architectures and safe weight loading.

Weights are read as plain tensors (safetensors, or `torch.load(weights_only=True)`), so a hostile upload
cannot run code; the architecture always comes from a spec, never from the file. TorchScript and .pt2
files carry code and are read only when the caller says it may (a worker, on the server's setting): even
then only their tensors are kept, loaded into the spec's architecture.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
import torchvision
from pydantic import ValidationError
from safetensors import SafetensorError
from torch import nn

from worker.engine.catalog import SMALL_CNN
from worker.engine.config import CODE_FORMATS, ArchSpec, WeightsFormat, multi_head_refusal
from worker.engine.errors import ModelLoadError, SpecError
from worker.engine.resize import resize_

# Containers that training scripts commonly wrap a state_dict in.
_NESTING_KEYS = ("state_dict", "model")
# DistributedDataParallel prefixes every key with this.
_DDP_PREFIX = "module."
_KEYS_SHOWN = 3


class SmallCNN(nn.Module):
    """conv3x3-BN-ReLU blocks doubling the width, 2x2 max-pool between them, global average pool."""

    def __init__(
        self, num_classes: int, width: int = 16, depth: int = 3, in_channels: int = 3, dropout: float = 0.0
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for index in range(depth):
            if index > 0:
                # ceil_mode keeps a 1x1 map at 1x1, so deep variants still run on 8x8 inputs.
                layers.append(nn.MaxPool2d(2, ceil_mode=True))
            out_channels = width * 2**index
            layers += [
                nn.Conv2d(channels, out_channels, 3, padding=1, bias=False),
                nn.BatchNorm2d(out_channels),
                nn.ReLU(inplace=True),
            ]
            channels = out_channels
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.features(x)).flatten(1)
        return self.classifier(self.dropout(x))


class MultiHeadModel(nn.Module):
    """A shared backbone and one Linear head per task: forward returns {task: logits}, in the heads' order.

    The backbone is the architecture with its final Linear layer replaced by an identity, so that it returns the
    features that layer read; the heads read them. TorchScript, ONNX and torch.export all keep a dict of tensors
    (ONNX as one named output per task).
    """

    def __init__(self, backbone: nn.Module, features: int, heads: dict[str, int]) -> None:
        super().__init__()
        self.backbone = backbone
        self.heads = nn.ModuleDict({task: nn.Linear(features, classes) for task, classes in heads.items()})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        features = logits_of(self.backbone(x))
        return {task: head(features) for task, head in self.heads.items()}


def build_model(arch: ArchSpec) -> nn.Module:
    """A freshly initialised model (never pretrained weights: nothing is downloaded), with the layers a structured
    pruning resized (arch.pruned_shapes) at their recorded sizes, or one head per task (arch.heads)."""
    model = _base_model(arch)
    if arch.heads is not None:
        return MultiHeadModel(*_without_classifier(model, arch), heads=arch.heads)
    return resize_(model, arch.pruned_shapes, arch.arch) if arch.pruned_shapes else model


def refuse_multi_head_model(model: nn.Module, use: str) -> None:
    """Raise SpecError when `model` has one head per task, which `use` (e.g. "cannot prune") does not support."""
    if isinstance(model, MultiHeadModel):
        raise SpecError(multi_head_refusal(model.heads, use))


def _without_classifier(model: nn.Module, arch: ArchSpec) -> tuple[nn.Module, int]:
    """`model` with its final Linear layer (registered last in SmallCNN and every torchvision classifier that has
    one) replaced by an identity, and that layer's number of input features."""
    name, classifier = next(((name, module) for name, module in reversed(list(model.named_modules()))
                             if isinstance(module, nn.Linear)), ("", None))
    if classifier is None or classifier.out_features != arch.num_classes:
        raise SpecError(f"{arch.arch} does not end in a Linear classifier, so it cannot have one head per task; "
                        "choose another architecture (small_cnn, resnet18, mobilenet_v3_small, efficientnet_b0...)")
    parent, _, attribute = name.rpartition(".")
    setattr(model.get_submodule(parent), attribute, nn.Identity())
    return model, classifier.in_features


def _base_model(arch: ArchSpec) -> nn.Module:
    try:
        if arch.arch == SMALL_CNN:
            kwargs = {"in_channels": arch.input.channels, **arch.kwargs}
            return SmallCNN(**kwargs)
        return torchvision.models.get_model(arch.arch, weights=None, **arch.kwargs)
    # Unknown kwargs raise TypeError; torchvision checks values with ValueError or torch._assert.
    except (TypeError, ValueError, AssertionError) as exc:
        raise SpecError(f"cannot build {arch.arch} with kwargs {arch.kwargs}: {exc}") from exc


def describe_validation_error(exc: ValidationError) -> str:
    """Pydantic's errors as one short line: 'field.path: message; ...'."""
    parts = []
    for error in exc.errors():
        location = ".".join(str(part) for part in error["loc"])
        parts.append(f"{location}: {error['msg']}" if location else error["msg"])
    return "; ".join(parts)


def logits_of(output: Any) -> Any:
    """googlenet and inception_v3 return a namedtuple with auxiliary heads in train mode. (A multi-head model's
    dict of logits passes through.)"""
    return output.logits if hasattr(output, "logits") else output


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def load_model(path: Path, fmt: WeightsFormat, arch: ArchSpec, allow_code: bool = False) -> nn.Module:
    """Build `arch` and load the weights at `path` into it, refusing any mismatch. TorchScript and .pt2
    files are read only with `allow_code`."""
    state = _read_weights(path, fmt, allow_code)
    model = build_model(arch)
    _check_state_matches(model.state_dict(), state, arch)
    model.load_state_dict(state)
    return model


def check_weights_fit(path: Path, fmt: WeightsFormat, model: nn.Module, arch: ArchSpec) -> None:
    """Refuse weights whose names or shapes do not fit `model` (which may live on the meta device), reading only
    what says so: a safetensors header, or a state_dict's tensors mapped from the file rather than read."""
    if fmt == "safetensors":
        shapes = _safetensors_shapes(path)
    else:
        shapes = _read_state_dict(path, mmap=zipfile.is_zipfile(path))
    _check_state_matches(model.state_dict(), shapes, arch)


def _safetensors_shapes(path: Path) -> dict[str, torch.Tensor]:
    """Each tensor's name and shape (as storage-less meta tensors), from the header; opening checks that the
    header's offsets tile the data region exactly, so a truncated or padded file is refused as load_file would."""
    try:
        with safetensors.safe_open(path, framework="pt") as weights:
            return {key: torch.empty(weights.get_slice(key).get_shape(), device="meta") for key in weights.keys()}  # noqa: SIM118 -- safe_open is no dict
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelLoadError(f"{path.name} is not a valid safetensors file: {exc}") from exc


def _read_weights(path: Path, fmt: WeightsFormat, allow_code: bool) -> dict[str, torch.Tensor]:
    if fmt in CODE_FORMATS:
        if not allow_code:
            raise ModelLoadError(f"{path.name} is a {fmt} file, which carries code; this server does not load "
                                 "those (setting CONDENSER_ALLOW_CODE_CHECKPOINTS)")
        return _read_code_checkpoint(path, fmt)
    return _read_safetensors(path) if fmt == "safetensors" else _read_state_dict(path)


def _read_code_checkpoint(path: Path, fmt: WeightsFormat) -> dict[str, torch.Tensor]:
    try:
        if fmt == "torchscript":
            state = torch.jit.load(path, map_location="cpu").state_dict()
        else:
            state = torch.export.load(path).state_dict
    # A malformed archive fails in whatever layer of the loader meets it first; every way is the upload's fault.
    except Exception as exc:
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ModelLoadError(f"{path.name} is not a loadable {fmt} file: {first_line[:300]}") from exc
    return _unwrap_state_dict(dict(state), path.name)


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return safetensors.torch.load_file(path, device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelLoadError(f"{path.name} is not a valid safetensors file: {exc}") from exc


def _read_state_dict(path: Path, mmap: bool = False) -> dict[str, torch.Tensor]:
    try:
        loaded = torch.load(path, weights_only=True, map_location="cpu", mmap=mmap)
    except (pickle.UnpicklingError, RuntimeError, OSError, EOFError, ValueError, TypeError) as exc:
        # weights_only refuses anything but tensors and plain containers; its message is pages long.
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(
            f"{path.name} is not a valid PyTorch state_dict file (only tensors are accepted, loaded with "
            f"weights_only=True): {first_line[:300]}"
        ) from exc
    return _unwrap_state_dict(loaded, path.name)


def _unwrap_state_dict(loaded: object, name: str) -> dict[str, torch.Tensor]:
    for key in _NESTING_KEYS:
        if isinstance(loaded, dict) and isinstance(loaded.get(key), dict):
            loaded = loaded[key]
    if not isinstance(loaded, dict) or not loaded:
        raise ModelLoadError(f"{name} does not hold a state_dict (a dict of parameter name to tensor)")
    not_tensors = [key for key, value in loaded.items() if not isinstance(value, torch.Tensor)]
    if not_tensors:
        raise ModelLoadError(f"{name}: entries {not_tensors[:_KEYS_SHOWN]} are not tensors")
    if all(key.startswith(_DDP_PREFIX) for key in loaded):
        return {key.removeprefix(_DDP_PREFIX): value for key, value in loaded.items()}
    return loaded


def _check_state_matches(expected: dict[str, torch.Tensor], given: dict[str, torch.Tensor], arch: ArchSpec) -> None:
    problems = []
    missing = [key for key in expected if key not in given]
    unexpected = sorted(key for key in given if key not in expected)
    if missing:
        problems.append(f"{len(missing)} missing keys ({_first(missing)})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys ({_first(unexpected)})")
    head_classes = _output_layer_classes(list(expected), arch)
    problems += [
        _shape_problem(key, list(expected[key].shape), list(given[key].shape), head_classes.get(key))
        for key in expected
        if key in given and expected[key].shape != given[key].shape
    ][:_KEYS_SHOWN]
    if problems:
        raise ModelLoadError(f"the weights do not match the {arch.arch} spec: " + "; ".join(problems))


def _output_layer_classes(keys: list[str], arch: ArchSpec) -> dict[str, tuple[str, int]]:
    """The output layers' weight and bias keys -> (what the spec calls their classes, how many)."""
    if arch.heads is not None:
        return {f"heads.{task}.{part}": (f"head '{task}' has {classes} classes", classes)
                for task, classes in arch.heads.items() for part in ("weight", "bias")}
    # Every torchvision classifier and SmallCNN registers its output layer last.
    return {key: (f"num_classes={arch.num_classes}", arch.num_classes) for key in keys[-2:]}


def _shape_problem(key: str, expected: list[int], given: list[int], head: tuple[str, int] | None) -> str:
    if head is not None and given and given[0] != head[1]:
        return f"the spec says {head[0]} but {key} has shape {given}"
    return f"{key} has shape {given} but the spec's model expects {expected}"


def _first(keys: list[str]) -> str:
    more = f", ... {len(keys) - _KEYS_SHOWN} more" if len(keys) > _KEYS_SHOWN else ""
    return ", ".join(keys[:_KEYS_SHOWN]) + more
