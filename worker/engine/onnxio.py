"""ONNX export of float models, and ONNX Runtime sessions wrapped as modules.

The wrapper lets evaluate.* (accuracy, agreement, latency) run an .onnx file exactly as it runs a torch
model, so both are measured by one code path.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

import onnxruntime
import torch
from torch import nn

from worker.engine.errors import EngineError, ModelLoadError
from worker.engine.fileio import atomic_write

OPSET = 17
INPUT_NAME, OUTPUT_NAME = "input", "logits"
# Batch and image size stay free: a model trained on 32 px runs on 224 px as users deploy it.
INPUT_AXES = {0: "batch", 2: "height", 3: "width"}


def export_onnx(model: nn.Module, example_input: torch.Tensor, path: Path) -> None:
    """A float32 ONNX file of `model` in eval mode (the caller's model is left untouched): its output is named
    `logits`, or a multi-head model's outputs by their tasks, in its heads' order."""
    model = copy.deepcopy(model).cpu().eval()
    example_input = example_input.cpu()
    with torch.no_grad():
        output = model(example_input)
    output_names = list(output) if isinstance(output, dict) else [OUTPUT_NAME]
    dynamic_axes = {INPUT_NAME: INPUT_AXES, **{name: {0: "batch"} for name in output_names}}

    def write(handle: BinaryIO) -> None:
        torch.onnx.export(model, (example_input,), handle, dynamo=False, opset_version=OPSET,
                          input_names=[INPUT_NAME], output_names=output_names, dynamic_axes=dynamic_axes)

    try:
        with _legacy_exporter_deprecation_silenced(), torch.no_grad():
            atomic_write(path, write)
    # The exporter reports an unsupported operator by name ("Exporting the operator 'aten::...'").
    except (torch.onnx.errors.OnnxExporterError, RuntimeError) as exc:
        raise EngineError(f"the model cannot be exported to ONNX opset {OPSET}: {exc}") from exc


class OnnxModel(nn.Module):
    """An ONNX Runtime CPU session that behaves like a module: tensor in, logits tensor out, or {task: logits} for
    a multi-head model's file (whose outputs are named by their tasks rather than `logits`)."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        try:
            self.session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        except (onnxruntime.capi.onnxruntime_pybind11_state.Fail, RuntimeError, OSError) as exc:
            raise ModelLoadError(f"{path.name} is not a loadable ONNX model: {exc}") from exc
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [output.name for output in self.session.get_outputs()]

    def forward(self, x: torch.Tensor) -> torch.Tensor | dict[str, torch.Tensor]:
        outputs = self.session.run(None, {self.input_name: x.detach().float().contiguous().numpy()})
        if self.output_names == [OUTPUT_NAME]:
            return torch.from_numpy(outputs[0])
        return {name: torch.from_numpy(logits) for name, logits in zip(self.output_names, outputs, strict=True)}


@contextmanager
def _legacy_exporter_deprecation_silenced() -> Iterator[None]:
    """The torch.export-based exporter needs onnxscript, which is not a dependency; the TorchScript-based
    one still exports every CNN we support and is what ORT's quantization tools expect."""
    with warnings.catch_warnings():
        for message in (r".*legacy TorchScript-based ONNX export", r".*feature will be removed"):
            warnings.filterwarnings("ignore", message=message, category=DeprecationWarning)
        yield
