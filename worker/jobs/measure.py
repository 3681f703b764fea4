"""One way of measuring, for every job kind: what users download is reloaded from disk and run the way
they will run it (TorchScript with torch.jit.load, ONNX with an ONNX Runtime CPU session, .pt2 with
torch.export.load(...).module()), and the input model is exported to the same formats and measured the same
way, so each ratio compares like with like.

Accuracy and agreement are on the held-out split only (never used for training or calibration).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from worker.engine import evaluate, export, models, onnxio
from worker.engine.evaluate import AnyModel
from worker.engine.macs import count_macs

LATENCY_BATCH_SIZES = (1, 32)
# How far below its float source a published format may score before the job says it is not a usable result:
# int8 rounding costs a fraction of a point on a healthy model; a broken kernel or export costs tens.
FORMAT_TOLERANCE_PTS = 3.0
FLOAT_SOURCES = {"input": "float input model", "output": "float model in the weights file"}
# Artifact formats as users run them, with the file suffix that tells them apart.
TORCHSCRIPT, ONNX, PT2 = "torchscript", "onnx", "pt2"
SUFFIXES = {TORCHSCRIPT: ".torchscript.pt", ONNX: ".onnx", PT2: ".pt2"}
# How a float model becomes each format: (model, example input, path). Float models are published in all.
EXPORTERS = {TORCHSCRIPT: export.export_torchscript, ONNX: onnxio.export_onnx, PT2: export.export_program}


@dataclass(frozen=True)
class HeldOut:
    """The held-out split and the input model's predictions on it, the reference for agreement."""

    x: torch.Tensor
    y: torch.Tensor
    input_predictions: torch.Tensor

    @classmethod
    def of(cls, input_model: AnyModel, val: tuple[torch.Tensor, torch.Tensor]) -> HeldOut:
        x, y = val
        return cls(x=x, y=y.cpu(), input_predictions=evaluate.predict(input_model, x))

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])

    def scores(self, predictions: torch.Tensor) -> dict[str, float]:
        return {"accuracy": _fraction_equal(predictions, self.y),
                "agreement_with_input": _fraction_equal(predictions, self.input_predictions)}


def _fraction_equal(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a == b).sum().item() / len(a)  # exact, like evaluate.accuracy (a float32 mean is not)


def latencies(model: AnyModel, input_shape: tuple[int, ...]) -> dict[str, float]:
    return {f"cpu_latency_ms_batch{size}": evaluate.cpu_latency_ms(model, input_shape, batch_size=size)
            for size in LATENCY_BATCH_SIZES}


def float_model_summary(model: nn.Module, held_out: HeldOut) -> dict[str, Any]:
    """The engine's float model in memory: its scores, parameters and MACs."""
    return {**held_out.scores(evaluate.predict(model, held_out.x)), "params": models.param_count(model),
            "macs": count_macs(model, held_out.input_shape)}


def load_artifact(path: Path) -> AnyModel:
    """A downloaded file, loaded the way its users load it."""
    if path.suffix == SUFFIXES[ONNX]:
        return onnxio.OnnxModel(path)
    return export.load_program(path) if path.suffix == SUFFIXES[PT2] else export.load_torchscript(path)


def measure_artifact(path: Path, runtime: str, held_out: HeldOut,
                     engine_predictions: torch.Tensor | None = None) -> dict[str, Any]:
    """Size, scores and CPU latency (batch 1 and 32) of one artifact reloaded from disk; with the engine
    model's predictions, also how often the artifact agrees with it."""
    model = load_artifact(path)
    predictions = evaluate.predict(model, held_out.x)
    result: dict[str, Any] = {"runtime": runtime, "file_bytes": path.stat().st_size, **held_out.scores(predictions)}
    if engine_predictions is not None:
        result["agreement_with_engine_model"] = _fraction_equal(predictions, engine_predictions)
    return {**result, **latencies(model, held_out.input_shape)}


def input_baseline(model: nn.Module, held_out: HeldOut, folder: Path,
                   formats: tuple[str, ...] = tuple(EXPORTERS)) -> dict[str, dict[str, Any]]:
    """The input model exported to `formats` in `folder` (kept there for reuse) and measured like an output."""
    example = held_out.x[:1]
    measured = {}
    for fmt in formats:
        path = baseline_path(folder, fmt)
        EXPORTERS[fmt](model, example, path)
        measured[fmt] = measure_artifact(path, runtime_of(fmt), held_out)
    return measured


def baseline_path(folder: Path, fmt: str) -> Path:
    return folder / f"input{SUFFIXES[fmt]}"


def runtime_of(fmt: str, detail: str = "fp32") -> str:
    """The runtime column of an artifact: what runs it, and how."""
    torch_version = torch.__version__.split("+")[0]
    if fmt == TORCHSCRIPT:
        return f"torchscript (torch {torch_version}, {detail})"
    if fmt == PT2:
        return f"torch.export (torch {torch_version}, {detail})"
    return f"onnxruntime (CPU, {detail})"


def format_check(float_source: str, source_accuracy: float,
                 artifacts: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Each published format's accuracy against the float model it was made from (`float_source` names it):
    a format more than FORMAT_TOLERANCE_PTS below it is marked failed, and `notes` says so in words."""
    formats = {}
    for fmt, artifact in artifacts.items():
        drop_pts = round((source_accuracy - artifact["accuracy"]) * 100, 2)
        formats[fmt] = {"accuracy": artifact["accuracy"], "drop_pts": drop_pts,
                        "passed": drop_pts <= FORMAT_TOLERANCE_PTS}
    notes = [f"NOT A USABLE RESULT: the {fmt} file scores {entry['accuracy']:.2%}, {entry['drop_pts']:.2f} points "
             f"below the {float_source} it was made from ({source_accuracy:.2%}; at most {FORMAT_TOLERANCE_PTS:g} "
             f"allowed); do not deploy it" for fmt, entry in formats.items() if not entry["passed"]]
    return {"float_source": float_source, "float_source_accuracy": source_accuracy,
            "tolerance_pts": FORMAT_TOLERANCE_PTS, "formats": formats, "notes": notes}


def compression_metrics(input_summary: dict[str, Any], output_summary: dict[str, Any],
                        input_artifacts: dict[str, dict[str, Any]], output_artifacts: dict[str, dict[str, Any]],
                        held_out: HeldOut, float_source: str) -> dict[str, Any]:
    """The metrics of a prune or quantize job: input and output side by side, their ratios (input / output:
    above 1 means smaller or faster), and each output format checked against its float source ("input" for
    an int8 model, "output" for a float one)."""
    ratios: dict[str, Any] = {name: input_summary[name] / output_summary[name]
                              for name in ("params", "macs", "file_bytes") if output_summary.get(name)}
    for fmt, output in output_artifacts.items():
        base = input_artifacts.get(fmt)
        if base is not None:
            ratios[fmt] = {"file_bytes": base["file_bytes"] / output["file_bytes"],
                           **{f"cpu_latency_speedup_batch{size}": base[f"cpu_latency_ms_batch{size}"]
                              / output[f"cpu_latency_ms_batch{size}"] for size in LATENCY_BATCH_SIZES}}
    return {
        "validation_samples": len(held_out.y),
        "input": {**input_summary, "artifacts": input_artifacts},
        "output": {**output_summary, "artifacts": output_artifacts},
        "ratios": ratios,
        "format_check": format_check(FLOAT_SOURCES[float_source],
                                     (input_summary if float_source == "input" else output_summary)["accuracy"],
                                     output_artifacts),
    }
