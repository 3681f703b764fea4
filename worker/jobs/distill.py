"""The distillation job: teacher + dataset + student spec -> trained student, measured and exported."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from worker.engine import data, evaluate, export, models
from worker.engine.config import ArchSpec, DistillConfig, InputSpec
from worker.engine.distill import distill

if TYPE_CHECKING:
    from worker.runner import Checkpoints, JobContext, JobGuard, JobOutcome


def run_distill(ctx: JobContext, guard: JobGuard, checkpoints: Checkpoints) -> JobOutcome:
    from worker.runner import JobOutcome, OutputFile

    guard.stage("loading")
    spec = ctx.spec
    config = DistillConfig(**{name: spec[name] for name in DistillConfig.model_fields if name in spec})
    input_spec = InputSpec(**ctx.teacher.input_spec)
    teacher_arch = ArchSpec(arch=ctx.teacher.arch["arch"], kwargs=ctx.teacher.arch["kwargs"], input=input_spec)
    student_arch = ArchSpec(arch=spec["student"]["arch"], input=input_spec,
                            kwargs={"num_classes": teacher_arch.num_classes, **spec["student"].get("kwargs", {})})
    teacher = models.load_model(ctx.teacher.path, ctx.teacher.format, teacher_arch)
    student = models.build_model(student_arch)
    train, val = _splits(ctx, config, input_spec)

    guard.stage("training")
    result = distill(teacher, student, train, val, config, on_progress=guard.on_progress,
                     on_checkpoint=guard.on_checkpoint, resume=checkpoints.load())

    guard.stage("exporting")
    ctx.work_dir.mkdir(parents=True, exist_ok=True)
    weights = ctx.work_dir / "student.safetensors"
    spec_file = ctx.work_dir / "student.arch.json"
    scripted = ctx.work_dir / "student.torchscript.pt"
    example = val[0][:1]
    export.save_safetensors(student, weights)
    export.save_json(export.arch_spec_document(student_arch), spec_file)
    export.export_torchscript(student, example, scripted)

    guard.stage("evaluating")
    metrics = _measure(ctx, teacher, teacher_arch, student_arch, weights, scripted, val)
    metrics["history"] = result.history
    files = [
        OutputFile("student_safetensors", weights, "student.safetensors", "application/octet-stream",
                   "safetensors (+ student.arch.json)"),
        OutputFile("student_arch_spec", spec_file, "student.arch.json", "application/json", "spec"),
        OutputFile("student_torchscript", scripted, "student.torchscript.pt", "application/octet-stream",
                   f"torchscript (torch {torch.__version__.split('+')[0]})"),
    ]
    return JobOutcome(files=files, metrics=metrics)


def _splits(ctx: JobContext, config: DistillConfig, input_spec: InputSpec) -> tuple[Any, Any]:
    dataset = data.load_canonical(ctx.dataset_path) if ctx.dataset_path else data.load_builtin(ctx.spec["dataset"])
    train_idx, val_idx = data.stratified_split(dataset.y, config.val_fraction, config.seed)

    def part(indices: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return data.to_model_input(dataset.x[indices], input_spec), torch.from_numpy(dataset.y[indices]).long()

    return part(train_idx), part(val_idx)


def _measure(ctx: JobContext, teacher: torch.nn.Module, teacher_arch: ArchSpec, student_arch: ArchSpec,
             weights: Path, scripted: Path, val: tuple[torch.Tensor, torch.Tensor]) -> dict[str, Any]:
    """Measure the files the user downloads, reloaded from disk, with one method for both models."""
    x_val, y_val = val
    teacher = teacher.cpu().eval()
    student = models.load_model(weights, "safetensors", student_arch)
    student_script = export.load_torchscript(scripted)
    shape = tuple(x_val.shape[1:])
    teacher_script = torch.jit.trace(teacher, x_val[:1])
    teacher_latency = evaluate.cpu_latency_ms(teacher_script, shape)
    student_latency = evaluate.cpu_latency_ms(student_script, shape)
    teacher_params, student_params = models.param_count(teacher), models.param_count(student)
    student_bytes = weights.stat().st_size
    return {
        "validation_samples": len(y_val),
        "teacher": {"accuracy": evaluate.accuracy(teacher, x_val, y_val), "param_count": teacher_params,
                    "file_bytes": ctx.teacher.bytes, "cpu_latency_ms_batch1": teacher_latency},
        "student": {
            "accuracy": evaluate.accuracy(student, x_val, y_val),
            "torchscript_accuracy": evaluate.accuracy(student_script, x_val, y_val),
            "agreement_with_teacher": evaluate.agreement(student, teacher, x_val),
            "param_count": student_params, "file_bytes": student_bytes,
            "torchscript_bytes": scripted.stat().st_size, "cpu_latency_ms_batch1": student_latency,
        },
        "ratios": {"params": teacher_params / student_params, "file_bytes": ctx.teacher.bytes / student_bytes,
                   "cpu_latency_speedup": teacher_latency / student_latency},
    }
