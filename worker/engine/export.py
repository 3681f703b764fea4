"""Artifacts users download: safetensors weights + a spec document, and TorchScript.

Every file is written atomically (temporary sibling, fsync, rename).
"""

from __future__ import annotations

import copy
import json
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import nn

from worker.engine.catalog import SMALL_CNN
from worker.engine.config import ArchSpec
from worker.engine.errors import EngineError, ModelLoadError
from worker.engine.fileio import atomic_write


def save_safetensors(model: nn.Module, path: Path) -> None:
    tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}
    payload = safetensors.torch.save(tensors, metadata={"format": "pt"})
    atomic_write(path, lambda handle: handle.write(payload))


def save_json(document: dict[str, Any], path: Path) -> None:
    text = json.dumps(document, indent=2, sort_keys=True) + "\n"
    atomic_write(path, lambda handle: handle.write(text.encode()))


def arch_spec_document(arch: ArchSpec) -> dict[str, Any]:
    """What a user needs to rebuild the model and feed it: architecture, kwargs, preprocessing."""
    return {
        "arch": arch.arch,
        "kwargs": arch.kwargs,
        "input": arch.input.model_dump(mode="json"),
        "framework": "condenser.small_cnn" if arch.arch == SMALL_CNN else "torchvision",
        "how_to_load": _how_to_load(arch),
    }


def _how_to_load(arch: ArchSpec) -> str:
    spec = arch.input
    load_weights = "model.load_state_dict(safetensors.torch.load_file(<the .safetensors file>)); model.eval()"
    preprocessing = (
        f"Inputs: float N x {spec.channels} x {spec.image_size} x {spec.image_size} (resize policy "
        f"'{spec.resize}'), pixel values / 255, then (x - mean) / std with the mean and std above."
    )
    if arch.arch == SMALL_CNN:
        return (
            "The TorchScript artifact needs only PyTorch: model = torch.jit.load(<file>). With condenser "
            "installed: model = worker.engine.models.build_model(worker.engine.config.ArchSpec(arch=arch, "
            f"kwargs=kwargs, input=input)); {load_weights}. {preprocessing}"
        )
    build = f"model = torchvision.models.get_model('{arch.arch}', weights=None, **kwargs)"
    return f"{build}; {load_weights}. {preprocessing}"


def trace_torchscript(model: nn.Module, example_input: torch.Tensor) -> torch.jit.ScriptModule:
    """A CPU TorchScript trace of `model` in eval mode, checked to reproduce its outputs.

    The caller's model is left untouched (device and train/eval mode).
    """
    model = copy.deepcopy(model).cpu().eval()
    example_input = example_input.cpu()
    with _torchscript_deprecation_silenced(), torch.no_grad():
        traced = torch.jit.trace(model, example_input, check_trace=False)
        expected, got = model(example_input), traced(example_input)
    if not torch.allclose(expected, got, rtol=1e-4, atol=1e-5):
        raise EngineError("the TorchScript trace does not reproduce the model's outputs; it cannot be exported")
    return traced


def export_torchscript(model: nn.Module, example_input: torch.Tensor, path: Path) -> None:
    traced = trace_torchscript(model, example_input)
    with _torchscript_deprecation_silenced():
        atomic_write(path, lambda handle: torch.jit.save(traced, handle))


def load_torchscript(path: Path) -> torch.jit.ScriptModule:
    """TorchScript carries code: load only inside worker processes, and only files this service wrote
    or that the server is configured to accept."""
    try:
        with _torchscript_deprecation_silenced():
            return torch.jit.load(str(path), map_location="cpu")
    except (RuntimeError, OSError, ValueError) as exc:
        raise ModelLoadError(f"{path.name} is not a loadable TorchScript file: {exc}") from exc


@contextmanager
def _torchscript_deprecation_silenced() -> Iterator[None]:
    """TorchScript is deprecated upstream, but it is still the format that loads with nothing but torch."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit\..* is deprecated", category=FutureWarning)
        yield
