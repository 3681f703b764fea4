"""A distillation's teachers as the job loads and measures them: each on the images preprocessed by its own input
spec, together as an ensemble (the weighted mean of their probabilities), each exported to TorchScript and timed
beside the student's files. Shared by single-task (distill.py) and multi-task (distill_tasks.py) jobs."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from core.jobspec import TeacherRef
from worker.engine import data, evaluate
from worker.engine.config import ArchSpec, InputSpec
from worker.jobs import inputs, measure
from worker.jobs.base import JobContext, ModelSource

# Files timed beside the teachers: (figures by format, updated in place; the files by format).
TimedSide = tuple[dict[str, dict[str, Any]], dict[str, Path]]
SUMMED = ("param_count", "macs", "file_bytes", "torchscript_bytes", "cpu_latency_ms_batch1", "cpu_latency_ms_batch32")


@dataclasses.dataclass(frozen=True)
class LoadedTeacher:
    ref: TeacherRef
    source: ModelSource
    arch: ArchSpec
    model: nn.Module
    evaluation_x: torch.Tensor  # the evaluation images as this teacher takes them


def load_teacher(ctx: JobContext[Any], ref: TeacherRef, evaluation: data.ArrayDataset) -> LoadedTeacher:
    source = ctx.models.get(ref.model, ctx.teacher)
    arch, model = inputs.load_model(source)
    return LoadedTeacher(ref=ref, source=source, arch=arch, model=model,
                         evaluation_x=data.to_model_input(evaluation.x, arch.input))


def own_view(images: data.ArrayDataset, teacher_input: InputSpec, student_input: InputSpec) -> torch.Tensor | None:
    return None if teacher_input == student_input else data.to_model_input(images.x, teacher_input)


def ensemble_predictions(teachers: Sequence[LoadedTeacher]) -> torch.Tensor:
    """What the teachers predict together: the argmax of the weighted mean of their probabilities."""
    total = sum(teacher.ref.weight for teacher in teachers)
    probabilities = sum(teacher.ref.weight / total
                        * evaluate.logits(teacher.model, teacher.evaluation_x).softmax(dim=1) for teacher in teachers)
    return torch.as_tensor(probabilities).argmax(dim=1)


def measure_teacher(folder: Path, teacher: LoadedTeacher, labels: torch.Tensor,
                    on_step: Callable[[], None]) -> dict[str, Any]:
    """One teacher on its own view of the evaluation images, and its TorchScript file (timed later)."""
    held_out = measure.HeldOut.of(teacher.model, (teacher.evaluation_x, labels))
    summary = measure.float_model_summary(teacher.model, held_out)
    scripted = measure.input_baseline(teacher.model, held_out, folder, (measure.TORCHSCRIPT,), on_step)
    return {"id": teacher.source.id, "arch": teacher.arch.arch, "weight": teacher.ref.weight,
            "input_shape": list(held_out.input_shape), "accuracy": summary["accuracy"],
            "param_count": summary["params"], "macs": summary["macs"], "file_bytes": teacher.source.bytes,
            "torchscript_bytes": scripted[measure.TORCHSCRIPT]["file_bytes"],
            "torchscript_path": str(measure.baseline_path(folder, measure.TORCHSCRIPT))}


def time_with_teachers(members: list[dict[str, Any]], sides: dict[str, TimedSide], shape: tuple[int, ...],
                       on_step: Callable[[], None]) -> None:
    """Every teacher's TorchScript file timed in the same rounds as `sides` (name -> (figures by format, files by
    format): the student's files, which take `shape`) when it takes the same shape; teachers with other input
    specs in rounds of their own, at their own shape. Adds the latencies to members and to the figures."""
    by_shape: dict[tuple[int, ...], list[dict[str, Any]]] = {shape: []}
    for member in members:
        by_shape.setdefault(tuple(member["input_shape"]), []).append(member)
    for group_shape, group in by_shape.items():
        measured = {f"teacher-{index}": {measure.TORCHSCRIPT: member} for index, member in enumerate(group)}
        paths = {f"teacher-{index}": {measure.TORCHSCRIPT: Path(member.pop("torchscript_path"))}
                 for index, member in enumerate(group)}
        if group_shape == shape:
            measured.update({name: figures for name, (figures, _) in sides.items()})
            paths.update({name: files for name, (_, files) in sides.items()})
        measure.add_latencies_(measured, paths, group_shape)
    on_step()


def sums(members: list[dict[str, Any]]) -> dict[str, Any]:
    """What running every member costs: their sizes and latencies added up."""
    return {key: sum(member[key] for member in members) for key in SUMMED}
