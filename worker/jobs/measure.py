"""One way of measuring, for every job kind: what users download is reloaded from disk and run the way
they will run it (TorchScript with torch.jit.load, ONNX with an ONNX Runtime CPU session, .pt2 with
torch.export.load(...).module()), and the input model is exported to the same formats and measured the same
way, so each ratio compares like with like.

Accuracy and agreement are on the job's evaluation images (inputs.JobInputs.evaluation: the eval_dataset, or the
held-out split), never used for training or calibration; acceptance.py judges each file on them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from core.jobspec import JobSpecBase
from worker.engine import evaluate, export, models, onnxio
from worker.engine.evaluate import AnyModel
from worker.engine.macs import count_macs
from worker.jobs import acceptance

LATENCY_BATCH_SIZES = (1, 32)
FLOAT_SOURCES = {"input": "float input model", "output": "float model in the weights file"}
# Artifact formats as users run them, with the file suffix that tells them apart.
TORCHSCRIPT, ONNX, PT2, SAFETENSORS = "torchscript", "onnx", "pt2", "safetensors"
SUFFIXES = {TORCHSCRIPT: ".torchscript.pt", ONNX: ".onnx", PT2: ".pt2"}
# How a float model becomes each format: (model, example input, path). Float models are published in all.
EXPORTERS = {TORCHSCRIPT: export.export_torchscript, ONNX: onnxio.export_onnx, PT2: export.export_program}


@dataclass(frozen=True)
class HeldOut:
    """The evaluation images and the input model's predictions on them, the reference for agreement."""

    x: torch.Tensor
    y: torch.Tensor
    input_predictions: torch.Tensor
    num_classes: int

    @classmethod
    def of(cls, input_model: AnyModel, evaluation: tuple[torch.Tensor, torch.Tensor]) -> HeldOut:
        x, y = evaluation
        logits = evaluate.logits(input_model, x)
        return cls(x=x, y=y.cpu(), input_predictions=logits.argmax(dim=1), num_classes=logits.shape[1])

    @property
    def input_accuracy(self) -> float:
        return fraction_equal(self.input_predictions, self.y)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])

    @property
    def label_counts(self) -> list[int]:
        return torch.bincount(self.y, minlength=self.num_classes).tolist()

    def scores(self, predictions: torch.Tensor) -> dict[str, float]:
        return {"accuracy": fraction_equal(predictions, self.y),
                "agreement_with_input": fraction_equal(predictions, self.input_predictions),
                "dominant_class_share": torch.bincount(predictions).max().item() / len(predictions)}


def fraction_equal(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a == b).sum().item() / len(a)  # exact, like evaluate.accuracy (a float32 mean is not)


def add_latencies_(measured: dict[str, dict[str, dict[str, Any]]], paths: dict[str, dict[str, Path]],
                   input_shape: tuple[int, ...], on_step: Callable[[], None] = lambda: None) -> None:
    """Adds CPU latency at batch 1 and 32 (median, p10, p90) to every measured file, all reloaded from disk and
    timed in the same interleaved rounds, so that the ratio of an input's and an output's figures holds on a busy
    host. `measured` and `paths` are keyed alike: side ("input", "output", ...) -> format -> figures / file."""
    keys = {f"{side}/{fmt}": (side, fmt) for side, files in paths.items() for fmt in files}
    loaded = {key: load_artifact(paths[side][fmt]) for key, (side, fmt) in keys.items()}
    stats = evaluate.interleaved_latency(loaded, input_shape, LATENCY_BATCH_SIZES)
    for key, (side, fmt) in keys.items():
        measured[side][fmt].update(evaluate.latency_metrics(stats[key]))
    on_step()


def float_model_summary(model: nn.Module, held_out: HeldOut) -> dict[str, Any]:
    """The engine's float model in memory: its scores, parameters and MACs."""
    return {**held_out.scores(evaluate.predict(model, held_out.x)), "params": models.param_count(model),
            "macs": count_macs(model, held_out.input_shape)}


def load_artifact(path: Path) -> AnyModel:
    """A downloaded file, loaded the way its users load it."""
    if path.suffix == SUFFIXES[ONNX]:
        return onnxio.OnnxModel(path)
    return export.load_program(path) if path.suffix == SUFFIXES[PT2] else export.load_torchscript(path)


def measure_artifact(path: Path, runtime: str, held_out: HeldOut, engine_predictions: torch.Tensor | None = None,
                     on_step: Callable[[], None] = lambda: None) -> dict[str, Any]:
    """Size and scores of one artifact reloaded from disk; with the engine model's predictions, also how often
    the artifact agrees with it. (add_latencies_ times it, beside the files it is compared with.)"""
    model = load_artifact(path)
    predictions = evaluate.predict(model, held_out.x)
    result: dict[str, Any] = {"runtime": runtime, "file_bytes": path.stat().st_size, **held_out.scores(predictions)}
    if engine_predictions is not None:
        result["agreement_with_engine_model"] = fraction_equal(predictions, engine_predictions)
    on_step()
    return result


def input_baseline(model: nn.Module, held_out: HeldOut, folder: Path, formats: tuple[str, ...] = tuple(EXPORTERS),
                   on_step: Callable[[], None] = lambda: None) -> dict[str, dict[str, Any]]:
    """The input model exported to `formats` in `folder` (kept there for reuse) and measured like an output."""
    example = held_out.x[:1]
    measured = {}
    for fmt in formats:
        path = baseline_path(folder, fmt)
        EXPORTERS[fmt](model, example, path)
        measured[fmt] = measure_artifact(path, runtime_of(fmt), held_out, on_step=on_step)
    return measured


def baseline_path(folder: Path, fmt: str) -> Path:
    return folder / f"input{SUFFIXES[fmt]}"


def baseline_paths(folder: Path, formats: tuple[str, ...] = tuple(EXPORTERS)) -> dict[str, Path]:
    return {fmt: baseline_path(folder, fmt) for fmt in formats}


def runtime_of(fmt: str, detail: str = "fp32") -> str:
    """The runtime column of an artifact: what runs it, and how."""
    torch_version = torch.__version__.split("+")[0]
    if fmt == TORCHSCRIPT:
        return f"torchscript (torch {torch_version}, {detail})"
    if fmt == PT2:
        return f"torch.export (torch {torch_version}, {detail})"
    return f"onnxruntime (CPU, {detail})"


def common_work(spec: JobSpecBase, evaluation_source: dict[str, Any], reference: str) -> dict[str, list[str]]:
    """What every kind did or did not do about judging its results: the evaluation images and the gate."""
    done = [f"every model file reloaded from disk and judged on {evaluation_source['samples']} evaluation images: "
            "chance floor, collapse, agreement with its float source"
            + (f", at most {spec.max_accuracy_drop_pts:g} points below the {reference}"
               if spec.max_accuracy_drop_pts is not None else "")]
    not_done = []
    if evaluation_source["source"] == "split":
        not_done.append("no separate evaluation dataset (eval_dataset): accuracies come from a split of the uploaded "
                        f"dataset, which the {reference} may have been trained on")
    if spec.max_accuracy_drop_pts is None:
        not_done.append(f"no accuracy gate against the {reference} (max_accuracy_drop_pts unset)")
    return {"done": done, "not_done": not_done}


def work_of(done: list[str], not_done: list[str], common: dict[str, list[str]]) -> dict[str, list[str]]:
    return {"done": [*done, *common["done"]], "not_done": [*not_done, *common["not_done"]]}


def batchnorm_work(report: dict[str, Any] | None) -> list[str]:
    if not report:
        return []
    verdict = "kept" if report["recalibrated"] else "not kept: the statistics training left did as well or better"
    return [f"BatchNorm running statistics re-estimated on {report['images']} training images ({verdict})"]


def batchnorm_notes(report: dict[str, Any] | None) -> list[str]:
    """What BatchNorm recalibration (engine/batchnorm.py) did, in words, when it changed the model."""
    if not report or not report["recalibrated"]:
        return []
    return [f"BatchNorm running statistics re-estimated on {report['images']} training images after training: "
            f"validation accuracy {report['val_accuracy_before']:.2%} with the statistics training left, "
            f"{report['val_accuracy_after']:.2%} re-estimated (kept)"]


def judge(held_out: HeldOut, max_drop_pts: float | None, reference: str, float_source: str,
          float_source_accuracy: float, artifacts: dict[str, dict[str, Any]],
          weights: dict[str, Any] | None = None) -> dict[str, Any]:
    """Every model file's acceptance verdict (acceptance.check): each format in `artifacts` (measured by
    measure_artifact) against its float source ("input" for an int8 model, "output" for a float one), and the
    float weights file rebuilt from its spec (`weights`, a float_model_summary), if the job has one, against the
    reference, which is the input model (`reference` names it: "teacher" for a distillation)."""
    source_name = FLOAT_SOURCES[float_source]
    agreement_key = "agreement_with_input" if float_source == "input" else "agreement_with_engine_model"
    formats = {fmt: _gate_entry(artifact, agreement_key, source_name) for fmt, artifact in artifacts.items()}
    if weights is not None:
        formats = {SAFETENSORS: _gate_entry(weights, "agreement_with_input", reference), **formats}
    gate = acceptance.Gate(reference=reference, reference_accuracy=held_out.input_accuracy, max_drop_pts=max_drop_pts,
                           float_source=source_name, float_source_accuracy=float_source_accuracy,
                           num_classes=held_out.num_classes, label_counts=held_out.label_counts)
    return acceptance.check(gate, formats)


def _gate_entry(measured: dict[str, Any], agreement_key: str, agreement_with: str) -> dict[str, Any]:
    return {"accuracy": measured["accuracy"], "agreement": measured[agreement_key], "agreement_with": agreement_with,
            "dominant_class_share": measured["dominant_class_share"]}


def compression_metrics(input_summary: dict[str, Any], output_summary: dict[str, Any],
                        input_artifacts: dict[str, dict[str, Any]], output_artifacts: dict[str, dict[str, Any]],
                        held_out: HeldOut, float_source: str, max_drop_pts: float | None,
                        paths: dict[str, dict[str, Path]],
                        on_step: Callable[[], None] = lambda: None) -> dict[str, Any]:
    """The metrics of a prune or quantize job: input and output side by side (their files timed together:
    `paths` holds them, {"input": {format: path}, "output": ...}), their ratios (input / output: above 1 means
    smaller or faster), and every output file judged (judge): a float output's weights file and its formats
    against the float output ("output"), an int8 output's formats against the input model ("input")."""
    add_latencies_({"input": input_artifacts, "output": output_artifacts}, paths, held_out.input_shape, on_step)
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
        "acceptance": judge(held_out, max_drop_pts, "input model", float_source,
                            (input_summary if float_source == "input" else output_summary)["accuracy"],
                            output_artifacts, weights=output_summary if float_source == "output" else None),
    }
