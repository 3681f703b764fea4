"""The multi-task distillation job: several tasks, each with its dataset and teacher(s) -> one student with a shared
backbone and one head per task, exported with its outputs named by task, measured head by head.

Each head is judged on its own task's evaluation images against its own task's teachers (with the task's gate), and
a file is a result only if every head passes. The fused student's size and latency are set against the sum of all
teachers and against the separate single-task students it replaces (the same architecture once per task, timed in
the same rounds): the point of one model is one pass instead of N.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from statistics import fmean
from typing import Any

import torch
from torch import nn

from core.jobspec import DistillJobSpec, DistillTask
from worker.engine import evaluate, export, models
from worker.engine.config import ArchSpec, InputSpec, multitask_student_arch
from worker.engine.macs import count_macs
from worker.engine.multitask import TaskData, TaskTeacher, distill_tasks
from worker.jobs import acceptance, ensemble, inputs, measure
from worker.jobs.base import Checkpoints, Guard, JobContext, JobOutcome, OutputModel
from worker.jobs.ensemble import LoadedTeacher
from worker.jobs.student_files import export_student, loss_words, student_files


@dataclasses.dataclass(frozen=True)
class LoadedTask:
    spec: DistillTask
    images: inputs.SplitImages
    teachers: list[LoadedTeacher]

    @property
    def num_classes(self) -> int:
        return len(self.images.train.class_names)


def run_distill_tasks(ctx: JobContext[DistillJobSpec], guard: Guard, checkpoints: Checkpoints) -> JobOutcome:
    guard.stage("loading")
    spec = ctx.spec
    tasks = [_load_task(ctx, task) for task in spec.tasks or ()]
    student_input = spec.student.input or tasks[0].teachers[0].arch.input
    student_spec = multitask_student_arch(spec.student, {task.spec.name: task.num_classes for task in tasks},
                                          student_input)
    torch.manual_seed(spec.seed)
    student = models.build_model(student_spec)

    guard.stage("training")
    result = distill_tasks([_task_data(task) for task in tasks], student, student_input, spec.distill,
                           on_progress=guard.on_progress, on_checkpoint=guard.on_checkpoint,
                           resume=checkpoints.load(), seed=spec.seed, device=spec.device,
                           cross_task_soft_targets=spec.cross_task_soft_targets)

    guard.stage("exporting", steps=len(measure.EXPORTERS))
    example = inputs.tensors(tasks[0].images.val, student_input)[0][:1]
    weights, spec_file, runnable = export_student(student, student_spec, example, ctx.work_dir, guard.step)

    guard.stage("evaluating", steps=sum(len(task.teachers) for task in tasks) + len(tasks) + 1)
    metrics = _measure(ctx, tasks, student_spec, weights, runnable, guard.step)
    metrics.update(history=result.history, evaluation=_evaluation_source(tasks), batchnorm=result.batchnorm,
                   notes=measure.batchnorm_notes(result.batchnorm), work=_work(spec, tasks, student_spec))
    result_model = OutputModel(file_kinds=("student_safetensors",), arch=student_spec.stored_arch(),
                               input_spec=student_input.model_dump(mode="json"), num_classes=student_spec.num_classes,
                               param_count=metrics["student"]["param_count"], label="multi-task student")
    return JobOutcome(files=student_files(weights, spec_file, runnable), metrics=metrics, model=result_model)


def _load_task(ctx: JobContext[DistillJobSpec], task: DistillTask) -> LoadedTask:
    images = inputs.split_images(ctx, task.dataset, task.eval_dataset)
    return LoadedTask(spec=task, images=images,
                      teachers=[ensemble.load_teacher(ctx, ref, images.evaluation) for ref in task.teachers])


def _task_data(task: LoadedTask) -> TaskData:
    return TaskData(name=task.spec.name, class_names=list(task.images.train.class_names),
                    teachers=[TaskTeacher(model=teacher.model, input=teacher.arch.input, weight=teacher.ref.weight)
                              for teacher in task.teachers],
                    train=task.images.train, val=task.images.val)


def _measure(ctx: JobContext[DistillJobSpec], tasks: list[LoadedTask], student_spec: ArchSpec, weights: Path,
             runnable: dict[str, Path], on_step: Callable[[], None]) -> dict[str, Any]:
    """Every head of every student file on its task's evaluation images (files reloaded from disk as users load
    them), each task's teachers on theirs, then all of them timed: the student's files with the teachers and the
    separate single-task students in the same rounds."""
    student = models.load_model(weights, "safetensors", student_spec)
    loaded_files = {fmt: measure.load_artifact(path) for fmt, path in runnable.items()}
    measured = {task.spec.name: _measure_task(ctx.work_dir, task, student_spec.input, student, loaded_files,
                                              _gate(ctx.spec, task.spec), on_step)
                for task in tasks}
    members = [member for task in measured.values() for member in task.pop("members")]
    input_shape = (student_spec.input.channels, student_spec.input.image_size, student_spec.input.image_size)
    artifacts = {fmt: {"runtime": measure.runtime_of(fmt), "file_bytes": path.stat().st_size,
                       "accuracy": fmean(task["artifacts"][fmt]["accuracy"] for task in measured.values())}
                 for fmt, path in runnable.items()}
    separate = _separate_students(ctx.work_dir / "separate", student_spec, input_shape)
    ensemble.time_with_teachers(members, {"student": (artifacts, runnable),
                                          **{f"separate-{name}": (figures, paths)
                                             for name, (figures, paths) in separate.items()}}, input_shape, on_step)
    scripted = artifacts[measure.TORCHSCRIPT]
    latency = {key: value for key, value in scripted.items() if "latency" in key}
    student_side = {"accuracy": fmean(task["accuracy"] for task in measured.values()),
                    "param_count": models.param_count(student), "macs": count_macs(student, input_shape),
                    "file_bytes": weights.stat().st_size, "torchscript_bytes": scripted["file_bytes"], **latency,
                    "artifacts": artifacts}
    teacher_side = {"accuracy": fmean(task["teacher_accuracy"] for task in measured.values()),
                    **ensemble.sums(members)}
    separate_side = _separate_sums(separate)
    return {
        "validation_samples": sum(task["validation_samples"] for task in measured.values()),
        "teacher": teacher_side, "student": student_side, "teachers": members, "tasks": measured,
        "separate_students": separate_side,
        "acceptance": acceptance.combine({name: task["acceptance"] for name, task in measured.items()}),
        "ratios": {**_ratios(teacher_side, student_side),
                   "vs_separate_students": _ratios(separate_side, student_side)},
    }


def _gate(spec: DistillJobSpec, task: DistillTask) -> float | None:
    """A task's own max_accuracy_drop_pts, or the job's when the task gives none."""
    return task.max_accuracy_drop_pts if task.max_accuracy_drop_pts is not None else spec.max_accuracy_drop_pts


def _measure_task(folder: Path, task: LoadedTask, student_input: InputSpec, student: nn.Module,
                  loaded_files: dict[str, Any], max_drop_pts: float | None,
                  on_step: Callable[[], None]) -> dict[str, Any]:
    """One head: the weights file and every downloaded file on the task's evaluation images, judged against the
    task's teachers (who each see the images their own way)."""
    name = task.spec.name
    x, y = inputs.tensors(task.images.evaluation, student_input)
    held_out = measure.HeldOut(x=x, y=y, input_predictions=ensemble.ensemble_predictions(task.teachers),
                               num_classes=task.num_classes)
    members = [{**ensemble.measure_teacher(folder / f"teacher-{name}-{index}", teacher, y, on_step), "task": name}
               for index, teacher in enumerate(task.teachers)]
    engine_predictions = evaluate.head_logits(student, x)[name].argmax(dim=1)
    weights_scores = held_out.scores(engine_predictions)
    artifacts = {}
    for fmt, loaded in loaded_files.items():
        predictions = evaluate.head_logits(loaded, x)[name].argmax(dim=1)
        artifacts[fmt] = {**held_out.scores(predictions),
                          "agreement_with_engine_model": measure.fraction_equal(predictions, engine_predictions)}
    on_step()
    return {"accuracy": weights_scores["accuracy"], "teacher_accuracy": held_out.input_accuracy,
            "agreement_with_teachers": weights_scores["agreement_with_input"], "validation_samples": len(y),
            "evaluation": task.images.evaluation_source, "artifacts": artifacts, "members": members,
            "acceptance": measure.judge(held_out, max_drop_pts, f"{name} teachers", "output",
                                        weights_scores["accuracy"], artifacts, weights=weights_scores)}


def _separate_students(folder: Path, student_spec: ArchSpec,
                       input_shape: tuple[int, ...]) -> dict[str, tuple[dict[str, Any], dict[str, Path]]]:
    """The single-task students the fused one replaces: the same architecture with each task's classes, exported to
    TorchScript (their weights do not matter to their size and speed)."""
    folder.mkdir(parents=True, exist_ok=True)
    separate = {}
    for name, classes in (student_spec.heads or {}).items():
        single = models.build_model(ArchSpec(arch=student_spec.arch, input=student_spec.input,
                                             kwargs={**student_spec.kwargs, "num_classes": classes}))
        path = folder / f"{name}{measure.SUFFIXES[measure.TORCHSCRIPT]}"
        export.export_torchscript(single, torch.zeros((1, *input_shape)), path)
        figures = {"param_count": models.param_count(single), "macs": count_macs(single, input_shape),
                   "torchscript_bytes": path.stat().st_size}
        separate[name] = ({measure.TORCHSCRIPT: figures}, {measure.TORCHSCRIPT: path})
    return separate


def _separate_sums(separate: dict[str, tuple[dict[str, Any], dict[str, Path]]]) -> dict[str, Any]:
    figures = [side[measure.TORCHSCRIPT] for side, _ in separate.values()]
    keys = ("param_count", "macs", "torchscript_bytes", "cpu_latency_ms_batch1", "cpu_latency_ms_batch32")
    return {"what": "one student of the same architecture per task, run one after another",
            **{key: sum(entry[key] for entry in figures) for key in keys}}


def _ratios(side: dict[str, Any], student: dict[str, Any]) -> dict[str, float]:
    """How many times larger / slower `side` (all teachers, or the separate students) is than the fused student."""
    return {"params": side["param_count"] / student["param_count"], "macs": side["macs"] / student["macs"],
            "torchscript_bytes": side["torchscript_bytes"] / student["torchscript_bytes"],
            "cpu_latency_speedup": side["cpu_latency_ms_batch1"] / student["cpu_latency_ms_batch1"],
            "cpu_latency_speedup_batch32": side["cpu_latency_ms_batch32"] / student["cpu_latency_ms_batch32"]}


def _evaluation_source(tasks: list[LoadedTask]) -> dict[str, Any]:
    sources = [task.images.evaluation_source for task in tasks]
    every_eval_dataset = all(source["source"] == "eval_dataset" for source in sources)
    return {"source": "eval_dataset" if every_eval_dataset else "split",
            "dataset": ", ".join(source["dataset"] for source in sources),
            "samples": sum(source["samples"] for source in sources),
            "note": " ".join(f"{task.spec.name}: {source['note']}."
                             for task, source in zip(tasks, sources, strict=True))}


def _work(spec: DistillJobSpec, tasks: list[LoadedTask], student_spec: ArchSpec) -> dict[str, list[str]]:
    config, training = spec.distill, spec.distill.training
    heads = ", ".join(f"{task.spec.name} ({task.num_classes} classes, {len(task.teachers)} teacher(s))"
                      for task in tasks)
    targets = ("every task's teachers on every image (cross_task_soft_targets)" if spec.cross_task_soft_targets
               else "each image's own task's teachers")
    done = [f"one {student_spec.arch} student with a shared backbone and one head per task ({heads}), trained for "
            f"{training.epochs} epochs on the union of the tasks' datasets with soft targets from {targets} "
            f"({loss_words(spec)}, temperature {config.temperature:g}, alpha {config.alpha:g}; {training.optimizer}, "
            f"lr {training.lr:g}, augmentation {training.augment})",
            "each head judged on its own task's held-out images against that task's teachers; a file is a result "
            "only if every head passes",
            "size and latency set against all the teachers together and against one student per task"]
    not_done = ["no pruning and no quantization: float32 weights (multi-head models cannot be pruned or quantized "
                "by this service yet)"]
    gates = [task.spec.name for task in tasks if _gate(spec, task.spec) is None]
    if gates:
        not_done.append(f"no accuracy gate against the teachers of {', '.join(gates)} (the task's "
                        "max_accuracy_drop_pts unset)")
    return {"done": done, "not_done": not_done}
