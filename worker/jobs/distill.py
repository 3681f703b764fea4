"""The distillation job: teacher + dataset + student spec -> trained student, measured and exported."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from core.jobspec import DistillJobSpec
from worker.engine import evaluate, export, models
from worker.engine.config import ArchSpec, student_arch
from worker.engine.distill import distill
from worker.jobs import inputs, measure
from worker.jobs.base import Checkpoints, Guard, JobContext, JobOutcome, OutputFile, OutputModel, job_kind


@job_kind("distill")
def run_distill(ctx: JobContext[DistillJobSpec], guard: Guard, checkpoints: Checkpoints) -> JobOutcome:
    guard.stage("loading")
    spec = ctx.spec
    loaded = inputs.load(ctx)
    teacher_arch, teacher, train, val = loaded.arch, loaded.model, loaded.train, loaded.val
    # The API stored the student with the teacher's classes; this rebuilds it over the teacher's input.
    student_spec = student_arch(spec.student, teacher_arch)
    student = models.build_model(student_spec)

    guard.stage("training")
    result = distill(teacher, student, train, val, spec.distill, on_progress=guard.on_progress,
                     on_checkpoint=guard.on_checkpoint, resume=checkpoints.load(), seed=spec.seed,
                     device=spec.device)

    guard.stage("exporting", steps=len(measure.EXPORTERS))
    weights, spec_file, runnable = _export(student, student_spec, val[0][:1], ctx.work_dir, guard.step)

    # The teacher's TorchScript, each student file, then their latencies.
    guard.stage("evaluating", steps=len(runnable) + 2)
    metrics = _measure(ctx, teacher, student_spec, weights, runnable, loaded.evaluation, guard.step)
    metrics.update(history=result.history, evaluation=loaded.evaluation_source, batchnorm=result.batchnorm,
                   notes=measure.batchnorm_notes(result.batchnorm), work=_work(spec, student_spec, result.batchnorm,
                                                                              loaded.evaluation_source))
    files = [
        OutputFile("student_safetensors", weights, weights.name, "application/octet-stream",
                   "safetensors (+ student.arch.json)", measure.SAFETENSORS),
        OutputFile("student_arch_spec", spec_file, spec_file.name, "application/json", "spec"),
        *(OutputFile(f"student_{fmt}", path, path.name, "application/octet-stream", measure.runtime_of(fmt), fmt)
          for fmt, path in runnable.items()),
    ]
    result_model = OutputModel(file_kinds=("student_safetensors",), arch=student_spec.stored_arch(),
                               input_spec=student_spec.input.model_dump(mode="json"),
                               num_classes=student_spec.num_classes, param_count=metrics["student"]["param_count"],
                               label="student")
    return JobOutcome(files=files, metrics=metrics, model=result_model)


def _export(student: torch.nn.Module, student_spec: ArchSpec, example: torch.Tensor, folder: Path,
            on_step: Callable[[], None]) -> tuple[Path, Path, dict[str, Path]]:
    """The weights, their arch spec, and the files that run without condenser (by format)."""
    folder.mkdir(parents=True, exist_ok=True)
    weights, spec_file = folder / "student.safetensors", folder / "student.arch.json"
    export.save_safetensors(student, weights)
    export.save_json(export.arch_spec_document(student_spec), spec_file)
    runnable = {fmt: folder / f"student{measure.SUFFIXES[fmt]}" for fmt in measure.EXPORTERS}
    for fmt, exporter in measure.EXPORTERS.items():
        exporter(student, example, runnable[fmt])
        on_step()
    return weights, spec_file, runnable


def _measure(ctx: JobContext[DistillJobSpec], teacher: torch.nn.Module, student_spec: ArchSpec, weights: Path,
             runnable: dict[str, Path], evaluation: tuple[torch.Tensor, torch.Tensor],
             on_step: Callable[[], None]) -> dict[str, Any]:
    """Both models measured by measure.py: the student's downloaded files reloaded from disk, the teacher
    exported to TorchScript and reloaded the same way, all of them timed in the same rounds (the summary's latency
    figures are the TorchScript files'); every student file judged against the teacher (the weights file) or the
    student's weights (the others)."""
    held_out = measure.HeldOut.of(teacher, evaluation)
    teacher_summary = measure.float_model_summary(teacher, held_out)
    baseline, scripted_only = ctx.work_dir / "baseline", (measure.TORCHSCRIPT,)
    teacher_script = measure.input_baseline(teacher, held_out, baseline, scripted_only, on_step)
    student = models.load_model(weights, "safetensors", student_spec)
    student_summary = measure.float_model_summary(student, held_out)
    student_predictions = evaluate.predict(student, held_out.x)
    artifacts = {fmt: measure.measure_artifact(path, measure.runtime_of(fmt), held_out, student_predictions, on_step)
                 for fmt, path in runnable.items()}
    measure.add_latencies_({"teacher": teacher_script, "student": artifacts},
                           {"teacher": measure.baseline_paths(baseline, scripted_only), "student": runnable},
                           held_out.input_shape, on_step)
    student_script = artifacts[measure.TORCHSCRIPT]
    teacher_latency = {key: value for key, value in teacher_script[measure.TORCHSCRIPT].items() if "latency" in key}
    student_latency = {key: value for key, value in student_script.items() if "latency" in key}
    student_bytes = weights.stat().st_size
    return {
        "validation_samples": len(held_out.y),
        "teacher": {"accuracy": teacher_summary["accuracy"], "param_count": teacher_summary["params"],
                    "macs": teacher_summary["macs"], "file_bytes": ctx.teacher.bytes,
                    "torchscript_bytes": teacher_script[measure.TORCHSCRIPT]["file_bytes"], **teacher_latency},
        "student": {
            "accuracy": student_summary["accuracy"], "torchscript_accuracy": student_script["accuracy"],
            "agreement_with_teacher": student_summary["agreement_with_input"],
            "param_count": student_summary["params"], "macs": student_summary["macs"], "file_bytes": student_bytes,
            "torchscript_bytes": student_script["file_bytes"], **student_latency, "artifacts": artifacts,
        },
        "acceptance": measure.judge(held_out, ctx.spec.max_accuracy_drop_pts, "teacher", "output",
                                    student_summary["accuracy"], artifacts, weights=student_summary),
        "ratios": {"params": teacher_summary["params"] / student_summary["params"],
                   "macs": teacher_summary["macs"] / student_summary["macs"],
                   "file_bytes": ctx.teacher.bytes / student_bytes,
                   "cpu_latency_speedup": teacher_latency["cpu_latency_ms_batch1"]
                   / student_latency["cpu_latency_ms_batch1"],
                   "cpu_latency_speedup_batch32": teacher_latency["cpu_latency_ms_batch32"]
                   / student_latency["cpu_latency_ms_batch32"]},
    }


def _work(spec: DistillJobSpec, student_spec: ArchSpec, batchnorm: dict[str, Any] | None,
          evaluation_source: dict[str, Any]) -> dict[str, list[str]]:
    config, training = spec.distill, spec.distill.training
    done = [f"a {student_spec.arch} student trained for {training.epochs} epochs on the teacher's softened outputs "
            f"(Hinton KD, temperature {config.temperature:g}, alpha {config.alpha:g}; {training.optimizer}, lr "
            f"{training.lr:g}, batch {training.batch_size})", *measure.batchnorm_work(batchnorm)]
    not_done = ["no pruning and no quantization: float32 weights (a prune or quantize job can take the student)"]
    return measure.work_of(done, not_done, measure.common_work(spec, evaluation_source, "teacher"))
