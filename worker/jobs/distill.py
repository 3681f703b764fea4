"""The distillation job: teacher(s) + dataset + student spec -> trained student, measured and exported.

One teacher, or an ensemble (`teachers`): each teacher sees the images preprocessed by its own input spec, and
the job's reference (the `teacher` side of its metrics, the gate, agreement) is the ensemble as it predicts,
the weighted mean of its members' probabilities. With `control`, the same student is also trained alone on the
labels (same data, budget and seed) and the report gives the KD gain. `tasks` (one student, several heads) is
worker/jobs/distill_tasks.py.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from core.jobspec import DistillJobSpec
from worker.engine import evaluate, models
from worker.engine.config import ArchSpec, student_arch
from worker.engine.distill import Teacher, distill
from worker.jobs import ensemble, inputs, measure
from worker.jobs.base import Checkpoints, Guard, JobContext, JobOutcome, OutputModel, job_kind
from worker.jobs.distill_tasks import run_distill_tasks
from worker.jobs.ensemble import LoadedTeacher
from worker.jobs.student_files import export_student, loss_words, student_files

TensorPair = tuple[torch.Tensor, torch.Tensor]


@dataclasses.dataclass(frozen=True)
class DistillInputs:
    teachers: list[LoadedTeacher]
    student_spec: ArchSpec
    engine_teachers: list[Teacher]  # as distill() takes them: each with its own view where its input differs
    train: TensorPair
    val: TensorPair
    evaluation: TensorPair  # the student's view
    evaluation_source: dict[str, Any]


@job_kind("distill")
def run_distill(ctx: JobContext[DistillJobSpec], guard: Guard, checkpoints: Checkpoints) -> JobOutcome:
    if ctx.spec.tasks is not None:
        return run_distill_tasks(ctx, guard, checkpoints)
    guard.stage("loading")
    spec = ctx.spec
    loaded = _load(ctx)
    student = _seeded_student(loaded.student_spec, spec.seed)

    guard.stage("training")
    result = distill(loaded.engine_teachers, student, loaded.train, loaded.val, spec.distill,
                     on_progress=guard.on_progress, on_checkpoint=guard.on_checkpoint, resume=checkpoints.load(),
                     seed=spec.seed, device=spec.device)
    control = _control_run(ctx, loaded, guard) if spec.control else None

    guard.stage("exporting", steps=len(measure.EXPORTERS))
    weights, spec_file, runnable = export_student(student, loaded.student_spec, loaded.val[0][:1], ctx.work_dir,
                                                  guard.step)

    # The teachers' TorchScript, each student file, then their latencies.
    guard.stage("evaluating", steps=len(runnable) + len(loaded.teachers) + 1)
    metrics = _measure(ctx, loaded, weights, runnable, guard.step)
    if control is not None:
        metrics["control"] = _control_metrics(control, metrics["student"]["accuracy"], loaded.evaluation)
    metrics.update(history=result.history, evaluation=loaded.evaluation_source, batchnorm=result.batchnorm,
                   notes=measure.batchnorm_notes(result.batchnorm),
                   work=_work(spec, loaded, result.batchnorm, control is not None))
    files = student_files(weights, spec_file, runnable)
    result_model = OutputModel(file_kinds=("student_safetensors",), arch=loaded.student_spec.stored_arch(),
                               input_spec=loaded.student_spec.input.model_dump(mode="json"),
                               num_classes=loaded.student_spec.num_classes,
                               param_count=metrics["student"]["param_count"], label="student")
    return JobOutcome(files=files, metrics=metrics, model=result_model)


def _seeded_student(student_spec: ArchSpec, seed: int) -> nn.Module:
    """The student, initialised from the job's seed: the control run starts from the very same weights."""
    torch.manual_seed(seed)
    return models.build_model(student_spec)


def _load(ctx: JobContext[DistillJobSpec]) -> DistillInputs:
    spec = ctx.spec
    images = inputs.split_images(ctx, spec.dataset, spec.eval_dataset)
    teachers = [ensemble.load_teacher(ctx, ref, images.evaluation) for ref in spec.teacher_refs]
    # The API stored the student with the teachers' classes; this rebuilds it over its input (the first teacher's
    # unless the spec gives one).
    student_spec = student_arch(spec.student, teachers[0].arch)
    train = inputs.tensors(images.train, student_spec.input)
    engine_teachers = [Teacher(model=teacher.model, weight=teacher.ref.weight,
                               view=ensemble.own_view(images.train, teacher.arch.input, student_spec.input))
                       for teacher in teachers]
    return DistillInputs(teachers=teachers, student_spec=student_spec, engine_teachers=engine_teachers, train=train,
                         val=inputs.tensors(images.val, student_spec.input),
                         evaluation=inputs.tensors(images.evaluation, student_spec.input),
                         evaluation_source=images.evaluation_source)


def _control_run(ctx: JobContext[DistillJobSpec], loaded: DistillInputs, guard: Guard) -> nn.Module:
    """The same student trained alone on the labels: same data, epochs, optimizer, augmentation and seed.

    Not checkpointed (an interrupted job resumes its distillation from its checkpoint and runs this again whole):
    its epochs are not the job's history.
    """
    guard.stage("control")
    control = _seeded_student(loaded.student_spec, ctx.spec.seed)

    def on_progress(progress: Any) -> None:
        guard.on_progress(dataclasses.replace(progress, stage="control"))

    # Without a teacher only the labels' term remains, whatever the loss; a hint would have no teacher to read.
    alone = ctx.spec.distill.replace(loss="kd", feature=None)
    distill(None, control, loaded.train, loaded.val, alone, on_progress=on_progress, seed=ctx.spec.seed,
            device=ctx.spec.device)
    return control


def _control_metrics(control: nn.Module, student_accuracy: float, evaluation: TensorPair) -> dict[str, Any]:
    accuracy = evaluate.accuracy(control.cpu(), *evaluation)
    return {"accuracy": accuracy, "kd_gain_pts": (student_accuracy - accuracy) * 100,
            "what": "the same student trained alone on the labels (cross-entropy only), same data, budget and seed"}


def _measure(ctx: JobContext[DistillJobSpec], loaded: DistillInputs, weights: Path, runnable: dict[str, Path],
             on_step: Callable[[], None]) -> dict[str, Any]:
    """The teachers and the student measured by measure.py: the student's downloaded files reloaded from disk, each
    teacher exported to TorchScript and reloaded the same way, all of them timed in the same rounds (the summary's
    latency figures are the TorchScript files'); every student file judged against the teachers (the weights file)
    or the student's weights (the others). The `teacher` side is the ensemble: its accuracy as it predicts, and
    the sums of its members' sizes and latencies (an ensemble runs every member)."""
    x_eval, y_eval = loaded.evaluation
    reference = ensemble.ensemble_predictions(loaded.teachers)
    held_out = measure.HeldOut(x=x_eval, y=y_eval.cpu(), input_predictions=reference,
                               num_classes=loaded.student_spec.num_classes)
    members = [ensemble.measure_teacher(ctx.work_dir / f"teacher-{index}", teacher, y_eval, on_step)
               for index, teacher in enumerate(loaded.teachers)]
    student = models.load_model(weights, "safetensors", loaded.student_spec)
    student_summary = measure.float_model_summary(student, held_out)
    student_predictions = evaluate.predict(student, held_out.x)
    artifacts = {fmt: measure.measure_artifact(path, measure.runtime_of(fmt), held_out, student_predictions, on_step)
                 for fmt, path in runnable.items()}
    ensemble.time_with_teachers(members, {"student": (artifacts, runnable)}, held_out.input_shape, on_step)
    student_script = artifacts[measure.TORCHSCRIPT]
    student_latency = {key: value for key, value in student_script.items() if "latency" in key}
    teacher_side = {"accuracy": held_out.input_accuracy, **ensemble.sums(members)}
    student_bytes = weights.stat().st_size
    metrics = {
        "validation_samples": len(held_out.y),
        "teacher": teacher_side,
        "student": {
            "accuracy": student_summary["accuracy"], "torchscript_accuracy": student_script["accuracy"],
            "agreement_with_teacher": student_summary["agreement_with_input"],
            "param_count": student_summary["params"], "macs": student_summary["macs"], "file_bytes": student_bytes,
            "torchscript_bytes": student_script["file_bytes"], **student_latency, "artifacts": artifacts,
        },
        "acceptance": measure.judge(held_out, ctx.spec.max_accuracy_drop_pts, _reference_name(loaded), "output",
                                    student_summary["accuracy"], artifacts, weights=student_summary),
        "ratios": _ratios(teacher_side, student_summary, student_bytes, student_latency),
    }
    if len(members) > 1:
        metrics["teachers"] = members
    return metrics


def _reference_name(loaded: DistillInputs) -> str:
    return "teacher" if len(loaded.teachers) == 1 else "teacher ensemble"


def _ratios(teacher: dict[str, Any], student: dict[str, Any], student_bytes: int,
            student_latency: dict[str, Any]) -> dict[str, float]:
    return {"params": teacher["param_count"] / student["params"], "macs": teacher["macs"] / student["macs"],
            "file_bytes": teacher["file_bytes"] / student_bytes,
            "cpu_latency_speedup": teacher["cpu_latency_ms_batch1"] / student_latency["cpu_latency_ms_batch1"],
            "cpu_latency_speedup_batch32": teacher["cpu_latency_ms_batch32"]
            / student_latency["cpu_latency_ms_batch32"]}


def _work(spec: DistillJobSpec, loaded: DistillInputs, batchnorm: dict[str, Any] | None,
          controlled: bool) -> dict[str, list[str]]:
    config, training = spec.distill, spec.distill.training
    teachers = "the teacher's" if len(loaded.teachers) == 1 else (
        f"the {len(loaded.teachers)} teachers' ({config.teacher_weighting} weighting of their tempered "
        "probabilities, each teacher on the images preprocessed its own way)")
    done = [f"a {loaded.student_spec.arch} student trained for {training.epochs} epochs on {teachers} softened "
            f"outputs ({loss_words(spec)}, temperature {config.temperature:g}, alpha {config.alpha:g}; "
            f"{training.optimizer}, lr {training.lr:g}, {training.scheduler} schedule, batch {training.batch_size}, "
            f"augmentation {training.augment})", *measure.batchnorm_work(batchnorm)]
    if controlled:
        done.append("a control: the same student trained alone on the labels with the same data, budget and seed "
                    "(metrics.control: its accuracy and the KD gain)")
    not_done = ["no pruning and no quantization: float32 weights (a prune or quantize job can take the student)"]
    if not controlled:
        not_done.append("no control run (control: true trains the same student alone and reports the KD gain)")
    return measure.work_of(done, not_done, measure.common_work(spec, loaded.evaluation_source,
                                                               _reference_name(loaded)))
