"""Artifacts users download: safetensors weights + a spec document, TorchScript, and ExportedPrograms (.pt2).

TorchScript is deprecated upstream; torch.export's .pt2 is its maintained successor, so both are published.

Every file is written atomically (temporary sibling, fsync, rename).
"""

from __future__ import annotations

import copy
import json
import warnings
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import nn

from worker.engine.catalog import SMALL_CNN
from worker.engine.config import PRUNED_SHAPES_FORMAT, ArchSpec, framework_of
from worker.engine.errors import EngineError, ModelLoadError
from worker.engine.fileio import atomic_write


def save_safetensors(model: nn.Module, path: Path) -> None:
    tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}
    payload = safetensors.torch.save(tensors, metadata={"format": "pt"})
    atomic_write(path, lambda handle: handle.write(payload))


def save_json(document: dict[str, Any], path: Path) -> None:
    text = json.dumps(document, indent=2, sort_keys=True) + "\n"
    atomic_write(path, lambda handle: handle.write(text.encode()))


def arch_spec_document(arch: ArchSpec, with_pruned_shapes: bool = False) -> dict[str, Any]:
    """What a user needs to rebuild the model and feed it: architecture, kwargs, preprocessing, and a pruned
    model's resized layers (`with_pruned_shapes`: even when none were, as every prune job's document says). The
    upload of a model accepts it as it is (ArchSpec.from_document)."""
    document = {
        "arch": arch.arch,
        "kwargs": arch.kwargs,
        "input": arch.input.model_dump(mode="json"),
        "framework": framework_of(arch.arch),
        "how_to_load": _how_to_load(arch),
    }
    if arch.heads is not None:
        document["heads"] = arch.heads
        document["how_to_load"] = _how_to_load_heads(arch.heads) + " " + document["how_to_load"]
    if with_pruned_shapes or arch.pruned_shapes is not None:
        document["pruned_shapes"] = arch.pruned_shapes or {}
        document["pruned_shapes_format"] = PRUNED_SHAPES_FORMAT
        document["how_to_load"] = (
            "Build the architecture as below, then replace each module named in pruned_shapes by one of the same "
            "type with those sizes, then load the weights; with condenser installed, model = "
            "worker.engine.models.build_model(worker.engine.config.ArchSpec.from_document(<this document>)) does "
            "both. " + document["how_to_load"]
        )
    return document


def _how_to_load_heads(heads: dict[str, int]) -> str:
    first = next(iter(heads))
    return (
        f"A multi-head model: one head per task in heads ({', '.join(heads)}); every file returns each task's logits "
        f"by its name: TorchScript and .pt2 a dict (model(x)['{first}']), ONNX one output per task named by it "
        f"(session.run(['{first}'], ...)). The weights hold the architecture's layers but its final Linear under "
        "backbone.* and each head's Linear under heads.<task>.*; worker.engine.models.build_model(worker.engine."
        "config.ArchSpec.from_document(<this document>)) builds it."
    )


def _how_to_load(arch: ArchSpec) -> str:
    spec = arch.input
    load_weights = "model.load_state_dict(safetensors.torch.load_file(<the .safetensors file>)); model.eval()"
    preprocessing = (
        f"Inputs: float N x {spec.channels} x {spec.image_size} x {spec.image_size} (resize policy "
        f"'{spec.resize}'), pixel values / 255, then (x - mean) / std with the mean and std above."
    )
    without_condenser = (
        "The other model files need only PyTorch or ONNX Runtime: model = torch.export.load(<the .pt2 file>)"
        ".module() (already in eval mode, which it does not let you change); model = torch.jit.load(<the "
        "TorchScript file>); session = onnxruntime.InferenceSession(<the .onnx file>)."
    )
    if arch.arch == SMALL_CNN:
        build = ("With condenser installed: model = worker.engine.models.build_model(worker.engine.config.ArchSpec("
                 "arch=arch, kwargs=kwargs, input=input))")
    else:
        build = f"model = torchvision.models.get_model('{arch.arch}', weights=None, **kwargs)"
    return f"{without_condenser} {build}; {load_weights}. {preprocessing}"


def trace_torchscript(model: nn.Module, example_input: torch.Tensor) -> torch.jit.ScriptModule:
    """A CPU TorchScript trace of `model` in eval mode, checked to reproduce its outputs.

    The caller's model is left untouched (device and train/eval mode).
    """
    model = copy.deepcopy(model).cpu().eval()
    example_input = example_input.cpu()
    with _torchscript_deprecation_silenced(), torch.no_grad():
        # strict=False lets a multi-head model's dict of logits be the output (Dict[str, Tensor] when loaded).
        traced = torch.jit.trace(model, example_input, check_trace=False, strict=False)
        expected, got = model(example_input), traced(example_input)
    if not _same_outputs(expected, got):
        raise EngineError("the TorchScript trace does not reproduce the model's outputs; it cannot be exported")
    return traced


def _same_outputs(expected: torch.Tensor | dict[str, torch.Tensor], got: torch.Tensor | dict[str, torch.Tensor]) -> (
        bool):
    if isinstance(expected, dict):
        return (isinstance(got, dict) and list(got) == list(expected)
                and all(_same_outputs(expected[task], got[task]) for task in expected))
    return torch.allclose(expected, got, rtol=1e-4, atol=1e-5)


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


def export_program(model: nn.Module, example_input: torch.Tensor, path: Path) -> None:
    """An ExportedProgram (.pt2) of `model` in eval mode whose batch dimension stays free.

    Export bakes the mode into the graph (BatchNorm on running statistics, no dropout): the loaded module
    cannot be switched back, so eval mode is the only one worth saving. The caller's model is left untouched.
    """
    model = copy.deepcopy(model).cpu().eval()
    save_program(exported_program(model, example_input), path)


def exported_program(model: nn.Module, example_input: torch.Tensor, strict: bool = False) -> (
        torch.export.ExportedProgram):
    """`model` captured by torch.export as it is (mode and device included), with a free batch dimension;
    `strict` traces with TorchDynamo (see quantize.quantize_pt2e for who needs it)."""
    # torch.export specialises a dimension whose example size is 1, so the example has a batch of two.
    batch = example_input[:1].cpu().expand(2, *example_input.shape[1:])
    try:
        return torch.export.export(model, (batch,), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},),
                                   strict=strict)
    # Data-dependent control flow and unsupported operators surface as one of these.
    except (torch._dynamo.exc.UserError, RuntimeError, NotImplementedError) as exc:
        raise EngineError(f"the model cannot be exported with torch.export: {exc}") from exc


def save_program(program: torch.export.ExportedProgram, path: Path) -> None:
    atomic_write(path, lambda handle: torch.export.save(program, handle))


class LoadedProgram(nn.Module):
    """A loaded ExportedProgram as a module that evaluate.* can run.

    torch.export's module refuses train() and eval(); its graph is already fixed in eval mode, so this
    wrapper accepts them without passing them on.
    """

    def __init__(self, program: torch.export.ExportedProgram) -> None:
        super().__init__()
        self.graph = program.module()

    def train(self, mode: bool = True) -> LoadedProgram:
        self.training = mode
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor | dict[str, torch.Tensor]:
        return self.graph(x)  # a multi-head model's program returns its dict of logits


def load_program(path: Path) -> LoadedProgram:
    """A .pt2 file as users load it (torch.export.load(path).module()). Like TorchScript it carries code:
    load only inside worker processes."""
    # Registers the int8 quantize / dequantize operators that PT2E int8 programs call (plain torch has them).
    import torch.ao.quantization.fx._decomposed

    try:
        return LoadedProgram(torch.export.load(path))
    # A .pt2 is a zip archive: a file that is not one fails in zipfile, a damaged one in torch.
    except (zipfile.BadZipFile, RuntimeError, OSError, ValueError) as exc:
        raise ModelLoadError(f"{path.name} is not a loadable ExportedProgram (.pt2): {exc}") from exc


@contextmanager
def _torchscript_deprecation_silenced() -> Iterator[None]:
    """TorchScript is deprecated upstream, but it is still the format that loads with nothing but torch."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit\..* is deprecated", category=FutureWarning)
        yield
