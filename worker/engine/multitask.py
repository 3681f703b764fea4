"""Multi-task distillation: one student with a shared backbone and one head per task (models.MultiHeadModel),
trained with training.fit() on the union of the tasks' training images.

Each image's loss is its own task's: its head against the soft targets of its task's teachers, mixed with the
cross-entropy on its label (losses.distillation_loss). With cross-task soft targets, every other task's teachers
also label it softly for their heads (losses.soft_term: no label, so no CE), which carries what each teacher
makes of the other tasks' images into the shared backbone. Batches mix the tasks in proportion to their images.

Every teacher sees each image preprocessed to its own input spec: those views are computed once, before
training, for the images it labels (teachers that share an input spec share them). Without augmentation the
teachers' logits are computed once too; with it, each teacher runs every step on its view cropped as the
student's image was (one crop drawn per image: augment.CropDraw).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from worker.engine import evaluate
from worker.engine.augment import CropDraw, random_crop
from worker.engine.batchnorm import recalibrate_batchnorm_
from worker.engine.config import DistillConfig, InputSpec, multi_head_refusal
from worker.engine.data import ArrayDataset, to_model_input
from worker.engine.errors import SpecError
from worker.engine.evaluate import TensorPair
from worker.engine.losses import distillation_loss, soft_term, teacher_probabilities
from worker.engine.models import MultiHeadModel, logits_of
from worker.engine.training import DeviceData, Plan, Progress, TrainingResult, autocast, fit


@dataclass(frozen=True)
class TaskTeacher:
    """A teacher of one task: a model predicting that task's classes from images preprocessed as `input` says."""

    model: nn.Module
    input: InputSpec
    weight: float = 1.0


@dataclass(frozen=True)
class TaskData:
    """One task: its head's name on the student, its classes, its teachers and its labelled images."""

    name: str
    class_names: list[str]
    teachers: Sequence[TaskTeacher]
    train: ArrayDataset
    val: ArrayDataset


@dataclass
class _Head:
    """One task's head while it trains: its teachers, and the training images they give soft targets for."""

    index: int  # the task's, in the tasks' order
    name: str
    classes: int
    teachers: list[TaskTeacher]
    rows: torch.Tensor  # the training images the teachers label (indices into the union): the task's, or all
    local: torch.Tensor  # per training image, its position in rows; -1 for those the teachers do not label
    views: list[torch.Tensor | None]  # per teacher, its input for `rows`; None: the student's input
    cached_logits: list[torch.Tensor] | None = None  # per teacher, the logits of `rows`; None: run them each step

    @property
    def weights(self) -> list[float]:
        return [teacher.weight for teacher in self.teachers]


class MultiTaskDistillation:
    """The training.Task of distill_tasks(): each image's loss on its task's head; validation per task."""

    stage = "distill"
    # Means over the batch of each image's own task's terms; cross-task soft terms are in the total alone.
    parts = ("kd_loss", "ce_loss")
    plan: Plan  # set by setup(), with data
    data: DeviceData

    def __init__(self, heads: list[_Head], task_of: torch.Tensor, val_task_of: torch.Tensor, config: DistillConfig,
                 cross_task: bool) -> None:
        self.heads = heads
        self.task_of = task_of  # per training image, its task's index
        self.val_task_of = val_task_of  # per validation image, on the CPU (where evaluate's logits land)
        self.config = config
        self.cross_task = cross_task

    def setup(self, run_plan: Plan, data: DeviceData, batch_size: int) -> None:
        self.plan = run_plan
        self.data = data
        self.task_of = self.task_of.to(data.home)
        for head in self.heads:
            head.rows, head.local = head.rows.to(data.home), head.local.to(data.home)
            head.views = [None if view is None else data.place(view) for view in head.views]
            for teacher in head.teachers:
                teacher.model.to(run_plan.device, memory_format=run_plan.memory_format).eval()
            if self.config.training.augment == "none":
                head.cached_logits = self._all_logits(head, batch_size)

    def _all_logits(self, head: _Head, batch_size: int) -> list[torch.Tensor]:
        """Each teacher's logits of the images it labels, in the run's logits dtype, where the data is."""
        chunks: list[list[torch.Tensor]] = [[] for _ in head.teachers]
        home = self.data.home
        for start in range(0, len(head.rows), batch_size):
            rows = torch.arange(start, min(start + batch_size, len(head.rows)), device=home)
            inputs = self.data.inputs(head.rows[rows])
            everyone = torch.ones(len(rows), dtype=torch.bool, device=inputs.device)
            for logits, chunk in zip(self._teacher_logits(head, rows, inputs, everyone), chunks, strict=True):
                chunk.append(logits.to(home, self.plan.logits_dtype))
        return [torch.cat(chunk) for chunk in chunks]

    def _teacher_logits(self, head: _Head, rows: torch.Tensor, inputs: torch.Tensor,
                        selected: torch.Tensor) -> list[torch.Tensor]:
        """The head's teachers' logits of their images `rows` (positions in head.rows), which are the batch's
        images `selected` (a mask over the batch the student sees as `inputs`)."""
        logits = []
        with torch.no_grad(), autocast(self.plan):
            for number, (teacher, view) in enumerate(zip(head.teachers, head.views, strict=True), start=1):
                output = logits_of(teacher.model(self._teacher_input(view, rows, inputs, selected)))
                if isinstance(output, dict):
                    raise SpecError(multi_head_refusal(output, f"task '{head.name}': teacher {number}"))
                if output.shape[1] != head.classes:
                    raise SpecError(f"task '{head.name}': teacher {number} predicts {output.shape[1]} classes but "
                                    f"the task's dataset has {head.classes}")
                logits.append(output)
        return logits

    def _teacher_input(self, view: torch.Tensor | None, rows: torch.Tensor, inputs: torch.Tensor,
                       selected: torch.Tensor) -> torch.Tensor:
        if view is None:
            return inputs[selected]
        images = self.data.rows(view, rows)
        if self.data.crop is not None:  # augmented: the crop the student's images got
            images = random_crop(images, _selected_draw(self.data.crop, selected))
        return images.contiguous(memory_format=self.data.memory_format)

    def loss(self, logits: dict[str, torch.Tensor], targets: torch.Tensor, batch: torch.Tensor,
             inputs: torch.Tensor) -> Sequence[torch.Tensor]:
        task_of = self.data.rows(self.task_of, batch)
        # Summed over the batch's images, then divided by their number: each image weighs the same.
        total = kd = ce = torch.zeros((), device=targets.device)
        for head in self.heads:
            local = self.data.rows(head.local, batch)
            labelled = local >= 0
            teacher_logits = self._soft_logits(head, local[labelled], inputs, labelled)
            own = task_of == head.index
            own_among_labelled = own[labelled]
            count = int(own.sum())
            if count:
                soft_targets = teacher_probabilities([z[own_among_labelled] for z in teacher_logits], head.weights,
                                                     self.config, targets[own])
                own_loss = distillation_loss(logits[head.name][own], soft_targets, targets[own], self.config)
                total, kd, ce = total + count * own_loss.total, kd + count * own_loss.kd, ce + count * own_loss.ce
            if not self.cross_task:
                continue
            others = labelled & ~own
            count = int(others.sum())
            if count:
                soft_targets = teacher_probabilities([z[~own_among_labelled] for z in teacher_logits], head.weights,
                                                     self.config)
                total = total + count * soft_term(logits[head.name][others], soft_targets, self.config, None)
        return total / len(batch), kd / len(batch), ce / len(batch)

    def _soft_logits(self, head: _Head, rows: torch.Tensor, inputs: torch.Tensor,
                     selected: torch.Tensor) -> list[torch.Tensor]:
        """The teachers' fp32 logits of their images `rows`, the batch's images `selected`."""
        if head.cached_logits is None:
            return [logits.float() for logits in self._teacher_logits(head, rows, inputs, selected)]
        return [self.data.rows(cached, rows).float() for cached in head.cached_logits]

    def validate(self, model: nn.Module, data: DeviceData) -> dict[str, Any]:
        """training.Task.validate: the mean of the tasks' accuracies, and each task's."""
        by_task = task_accuracies(model, (data.x_val, data.y_val), self.val_task_of, [h.name for h in self.heads])
        return {"val_accuracy": _mean(by_task), "val_accuracy_by_task": by_task}


def _selected_draw(draw: CropDraw, selected: torch.Tensor) -> CropDraw:
    """The crops drawn for the images `selected` (a mask over the batch the draw is for)."""
    return CropDraw(draw.rows[selected], draw.columns[selected],
                    None if draw.mirrored is None else draw.mirrored[selected])


def task_accuracies(model: nn.Module, val: TensorPair, task_of: torch.Tensor, names: Sequence[str]) -> (
        dict[str, float]):
    """Each task's accuracy on its own validation images: val's images whose task_of is its index."""
    logits = evaluate.head_logits(model, val[0])
    labels = val[1].cpu()
    return {name: (logits[name][task_of == index].argmax(dim=1) == labels[task_of == index]).sum().item()
            / int((task_of == index).sum()) for index, name in enumerate(names)}


def _mean(by_task: dict[str, float]) -> float:
    return sum(by_task.values()) / len(by_task)


def distill_tasks(
    tasks: Sequence[TaskData],
    student: nn.Module,
    student_input: InputSpec,
    config: DistillConfig,
    on_progress: Callable[[Progress], None],
    on_checkpoint: Callable[[dict[str, Any]], None] | None = None,
    resume: dict[str, Any] | None = None,
    *,
    seed: int = 0,
    device: str = "auto",
    cross_task_soft_targets: bool = False,
) -> TrainingResult:
    """Train the multi-head `student` (models.build_model of a spec with heads: one per task, in the tasks' order)
    in place on every task's training images, preprocessed to `student_input`, each distilled from its task's
    teachers as config says (loss, temperature, alpha, teacher_weighting; loss 'feature' is for one task); with
    `cross_task_soft_targets`, also from every other task's teachers (their soft term alone: label_loss weighting
    needs a label, so those targets weigh the teachers as given).

    The loop is training.fit()'s (progress, checkpoints, resume, seed and device as there); each epoch's history
    entry holds val_accuracy, the mean of the tasks' accuracies, and val_accuracy_by_task. Then the student's
    BatchNorm statistics are re-estimated and kept if the mean accuracy improves, as distill() does. The result's
    by_task holds each task's final accuracy; its final_val_accuracy is their mean.
    """
    _check(tasks, student, config)
    train_x = torch.cat([to_model_input(task.train.x, student_input) for task in tasks])
    train_y = torch.cat([torch.from_numpy(task.train.y) for task in tasks])
    task_of = _task_indices([len(task.train.y) for task in tasks])
    val = (torch.cat([to_model_input(task.val.x, student_input) for task in tasks]),
           torch.cat([torch.from_numpy(task.val.y) for task in tasks]))
    val_task_of = _task_indices([len(task.val.y) for task in tasks])
    views: dict[tuple[InputSpec, tuple[int, ...]], torch.Tensor] = {}
    heads = [_head(tasks, index, task_of, student_input, cross_task_soft_targets, views) for index in range(len(tasks))]
    names = [task.name for task in tasks]
    result = fit(MultiTaskDistillation(heads, task_of, val_task_of, config, cross_task_soft_targets), student,
                 (train_x, train_y), val, config.training, on_progress, on_checkpoint, resume, seed=seed,
                 device=device)
    by_task = result.history[-1]["val_accuracy_by_task"]
    def mean_accuracy(model: nn.Module) -> float:
        return _mean(task_accuracies(model, val, val_task_of, names))

    report = recalibrate_batchnorm_(student, train_x, mean_accuracy, seed=seed, batch_size=config.training.batch_size)
    if report is None or not report["recalibrated"]:
        return dataclasses.replace(result, batchnorm=report, by_task=by_task)
    by_task = task_accuracies(student, val, val_task_of, names)
    final = _mean(by_task)
    return dataclasses.replace(result, batchnorm=report, by_task=by_task, final_val_accuracy=final,
                               best_val_accuracy=max(result.best_val_accuracy, final))


def _check(tasks: Sequence[TaskData], student: nn.Module, config: DistillConfig) -> None:
    if config.loss == "feature":
        raise SpecError("loss 'feature' (a hint from one teacher's layer) is for one task; choose kd, dkd or kd_ls")
    expected = {task.name: len(task.class_names) for task in tasks}
    heads = ({name: head.out_features for name, head in student.heads.items()}
             if isinstance(student, MultiHeadModel) else None)
    if heads is None or list(heads.items()) != list(expected.items()):
        raise SpecError(f"the student needs one head per task, in order, with each task's classes: {expected}; it "
                        f"has {heads}")
    for task in tasks:
        if not task.teachers:
            raise SpecError(f"task '{task.name}' has no teacher")
        if len(task.train.y) == 0 or len(task.val.y) == 0:
            raise SpecError(f"task '{task.name}' needs training and validation images")


def _task_indices(counts: list[int]) -> torch.Tensor:
    return torch.cat([torch.full((count,), index) for index, count in enumerate(counts)])


def _head(tasks: Sequence[TaskData], index: int, task_of: torch.Tensor, student_input: InputSpec, cross_task: bool,
          views: dict[tuple[InputSpec, tuple[int, ...]], torch.Tensor]) -> _Head:
    """Task `index`'s head, its teachers labelling its own images or, cross-task, every task's. `views` holds the
    views made so far, by input spec and tasks, to share them between teachers."""
    labelled = tuple(range(len(tasks))) if cross_task else (index,)
    rows = torch.cat([torch.nonzero(task_of == labelled_task).flatten() for labelled_task in labelled])
    local = torch.full((len(task_of),), -1)
    local[rows] = torch.arange(len(rows))
    task = tasks[index]
    head_views: list[torch.Tensor | None] = []
    for teacher in task.teachers:
        key = (teacher.input, labelled)
        if teacher.input != student_input and key not in views:
            views[key] = torch.cat([to_model_input(tasks[other].train.x, teacher.input) for other in labelled])
        head_views.append(views.get(key) if teacher.input != student_input else None)
    return _Head(index=index, name=task.name, classes=len(task.class_names), teachers=list(task.teachers), rows=rows,
                 local=local, views=head_views)
