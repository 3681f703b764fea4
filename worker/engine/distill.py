"""Knowledge distillation from one teacher or an ensemble, and plain supervised training when there is none: the
Distillation task, and distill(), which trains a student for it with training.fit().

The losses are in worker.engine.losses (kd, dkd, kd_ls); loss "feature" adds a FitNets hint (Hint). Teachers are
frozen: eval mode (no dropout, BatchNorm on its running statistics), no gradients. Without augmentation every
epoch feeds the same inputs, so each teacher's logits are computed once and reused; with augmentation (done on
the device), or a hint, whose teacher features are not cached, they run on every batch, on the images the student
sees: a teacher with its own input (Teacher.view) gets the same crop of its own view of them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from worker.engine.batchnorm import recalibrate_batchnorm_
from worker.engine.config import DistillConfig, FeatureHint
from worker.engine.errors import SpecError
from worker.engine.losses import KDLoss, distillation_loss, teacher_probabilities
from worker.engine.models import logits_of
from worker.engine.training import DeviceData, Plan, Progress, TensorPair, TrainingResult, autocast, fit

__all__ = ["Distillation", "Hint", "KDLoss", "Teacher", "check_feature_layers", "distill"]

# How many module names a SpecError about a layer name suggests.
SUGGESTED_LAYERS = 12


@dataclasses.dataclass(frozen=True)
class Teacher:
    """One teacher of an ensemble: its model, its weight in the average of the teachers' probabilities, and its
    view of the training images when its input spec is not the student's (data.to_model_input(images, its input
    spec), row for row with the student's training images); None: it takes the student's input."""

    model: nn.Module
    weight: float = 1.0
    view: torch.Tensor | None = None


def _as_teachers(teachers: nn.Module | Sequence[Teacher] | None, train_count: int) -> list[Teacher]:
    if teachers is None:
        return []
    if isinstance(teachers, nn.Module):
        return [Teacher(teachers)]
    teachers = list(teachers)
    if any(teacher.weight < 0 for teacher in teachers) or (teachers and sum(t.weight for t in teachers) <= 0):
        raise SpecError("teacher weights must be at least 0, and one of them above 0")
    for teacher in teachers:
        if teacher.view is not None and len(teacher.view) != train_count:
            raise ValueError(f"a teacher's view has {len(teacher.view)} images, the training set {train_count}")
    return teachers


def _layer_suggestions(model: nn.Module) -> str:
    """A few module names of `model` worth hinting from: the shallowest of those holding a convolution (feature
    maps), in order; the shallowest of all where none does."""
    named = [(name, module) for name, module in model.named_modules() if name]
    convolutional = [(name, module) for name, module in named
                     if any(isinstance(inner, nn.Conv2d) for inner in module.modules())]
    names = [name for name, _ in sorted(convolutional or named, key=lambda item: item[0].count("."))]
    return ", ".join(names[:SUGGESTED_LAYERS])


def _named_layer(model: nn.Module, name: str, role: str) -> nn.Module:
    layer = dict(model.named_modules()).get(name) if name else None
    if layer is None:
        raise SpecError(f"feature.{role}_layer '{name}' is not a module of the {role}; module names "
                        f"(model.named_modules()) include: {_layer_suggestions(model)}")
    return layer


def check_feature_layers(teacher: nn.Module, student: nn.Module, hint: FeatureHint) -> None:
    """Raise SpecError naming the layer if hint.teacher_layer or hint.student_layer is not a module of its model."""
    _named_layer(teacher, hint.teacher_layer, "teacher")
    _named_layer(student, hint.student_layer, "student")


class Hint:
    """FitNets' hint term (Romero et al. 2015): weight * MSE(adapter(student layer's output), teacher layer's).

    The outputs are caught by forward hooks. The adapter is learned: a 1x1 convolution from the student's channels
    to the teacher's, after the student's map is resized (bilinear) to the teacher's height and width; a Linear
    for 2-D outputs. It is built by build_adapter(), from one forward pass of each model.
    """

    def __init__(self, teacher: nn.Module, student: nn.Module, hint: FeatureHint) -> None:
        check_feature_layers(teacher, student, hint)
        self.hint = hint
        self.outputs: dict[str, Any] = {}
        self.handles = [
            _named_layer(teacher, hint.teacher_layer, "teacher").register_forward_hook(self._catcher("teacher")),
            _named_layer(student, hint.student_layer, "student").register_forward_hook(self._catcher("student")),
        ]
        self.adapter: nn.Module | None = None

    def _catcher(self, role: str) -> Callable[[nn.Module, Any, Any], None]:
        def catch(_module: nn.Module, _inputs: Any, output: Any) -> None:
            self.outputs[role] = output
        return catch

    def _caught(self, role: str) -> torch.Tensor:
        output = self.outputs.pop(role, None)
        if not isinstance(output, torch.Tensor) or output.dim() not in (2, 4):
            what = (f"a {output.dim()}-D tensor" if isinstance(output, torch.Tensor)
                    else "nothing (it does not run in the forward pass)" if output is None
                    else f"a {type(output).__name__}")
            raise SpecError(f"feature.{role}_layer '{getattr(self.hint, f'{role}_layer')}' outputs {what}; choose a "
                            "layer whose output is a feature map (N x C x H x W) or a N x D tensor")
        return output

    def build_adapter(self, run_plan: Plan) -> nn.Module:
        """The adapter, on the run's device, sized by the outputs the hooks caught in one forward pass of each model."""
        teacher, student = self._caught("teacher"), self._caught("student")
        if teacher.dim() != student.dim():
            raise SpecError(f"feature layers must output tensors of the same rank: the teacher's "
                            f"'{self.hint.teacher_layer}' is {teacher.dim()}-D, the student's "
                            f"'{self.hint.student_layer}' {student.dim()}-D")
        if student.dim() == 4:
            adapter: nn.Module = nn.Conv2d(student.shape[1], teacher.shape[1], kernel_size=1)
        else:
            adapter = nn.Linear(student.shape[1], teacher.shape[1])
        self.adapter = adapter.to(run_plan.device, memory_format=run_plan.memory_format)
        return self.adapter

    def loss(self) -> torch.Tensor:
        """The weighted hint term of the latest forward passes of the two models."""
        assert self.adapter is not None, "build_adapter() first"
        teacher, student = self._caught("teacher").float(), self._caught("student").float()
        if student.dim() == 4 and student.shape[2:] != teacher.shape[2:]:
            student = F.interpolate(student, size=teacher.shape[2:], mode="bilinear", align_corners=False)
        return self.hint.weight * F.mse_loss(self.adapter(student), teacher)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.outputs.clear()


class Distillation:
    """The task: config.loss against frozen teachers' soft targets; with none, its CE term alone (plain training).

    extra_module (training.Task): the hint's adapter, with loss "feature".
    """

    plan: Plan  # set by setup(), with data
    data: DeviceData

    def __init__(self, teachers: Sequence[Teacher], student: nn.Module, config: DistillConfig) -> None:
        self.teachers = list(teachers)
        self.weights = [teacher.weight for teacher in self.teachers]
        self.config = config
        self.stage = "distill" if self.teachers else "train"
        self.parts = ("kd_loss", "ce_loss") if self.teachers else ("ce_loss",)
        if config.feature is not None and not self.teachers:
            raise SpecError("loss 'feature' needs a teacher")
        # With several teachers, the hint is the first one's.
        self.hint = Hint(self.teachers[0].model, student, config.feature) if config.feature is not None else None
        self.student = student
        self.extra_module: nn.Module | None = None
        # Each teacher's view of the training images, where the data is (DeviceData.place); None: the student's.
        self.views: list[torch.Tensor | None] = []
        # Every training image's logits per teacher, in order, where the images are; None: run them every step.
        self.cached_logits: list[torch.Tensor] | None = None

    def setup(self, run_plan: Plan, data: DeviceData, batch_size: int) -> None:
        self.plan = run_plan
        self.data = data
        for teacher in self.teachers:
            teacher.model.to(run_plan.device, memory_format=run_plan.memory_format).eval()
        self.views = [None if teacher.view is None else data.place(teacher.view) for teacher in self.teachers]
        if self.hint is not None:
            self._build_adapter()
        elif self.teachers and self.config.training.augment == "none":
            self.cached_logits = self._all_logits(batch_size)

    def _build_adapter(self) -> None:
        assert self.hint is not None
        first = torch.arange(min(2, len(self.data.x)), device=self.data.home)
        was_training = self.student.training
        self.student.eval()  # not to move BatchNorm's running statistics
        with torch.no_grad(), autocast(self.plan):
            inputs = self.data.inputs(first)
            self.student(inputs)
            self.teachers[0].model(self._input_of(0, first, inputs))
        self.student.train(was_training)
        self.extra_module = self.hint.build_adapter(self.plan)

    def _all_logits(self, batch_size: int) -> list[torch.Tensor]:
        """Every teacher's logits of every training image, in order, in the run's logits dtype, where the data is."""
        count, home = len(self.data.x), self.data.home
        chunks: list[list[torch.Tensor]] = [[] for _ in self.teachers]
        for start in range(0, count, batch_size):
            batch = torch.arange(start, min(start + batch_size, count), device=home)
            for logits, chunk in zip(self._teacher_logits(batch, self.data.inputs(batch)), chunks, strict=True):
                chunk.append(logits.to(home, self.plan.logits_dtype))
        return [torch.cat(chunk) for chunk in chunks]

    def _input_of(self, index: int, batch: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        """Teacher `index`'s input for the training images `batch`, whose student input is `inputs`."""
        view = self.views[index]
        return inputs if view is None else self.data.view_inputs(view, batch)

    def _teacher_logits(self, batch: torch.Tensor, inputs: torch.Tensor) -> list[torch.Tensor]:
        with torch.no_grad(), autocast(self.plan):
            return [logits_of(teacher.model(self._input_of(index, batch, inputs)))
                    for index, teacher in enumerate(self.teachers)]

    def soft_targets(self, batch: torch.Tensor, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The teachers' soft targets for the training images `batch`, seen as `inputs` by the student."""
        if self.cached_logits is None:
            logits = self._teacher_logits(batch, inputs)
        else:
            logits = [self.data.rows(cached, batch) for cached in self.cached_logits]
        return teacher_probabilities(logits, self.weights, self.config, targets)

    def loss(self, logits: torch.Tensor, targets: torch.Tensor, batch: torch.Tensor,
             inputs: torch.Tensor) -> Sequence[torch.Tensor]:
        if not self.teachers:
            ce = F.cross_entropy(logits, targets)
            return ce, ce
        loss = distillation_loss(logits, self.soft_targets(batch, inputs, targets), targets, self.config)
        if self.hint is None:
            return loss
        # The hint adds to what is minimised; progress reports the kd and ce parts as they are.
        return loss.total + self.hint.loss(), loss.kd, loss.ce

    def close(self) -> None:
        """Remove the hint's hooks from the models."""
        if self.hint is not None:
            self.hint.remove()


def distill(
    teachers: nn.Module | Sequence[Teacher] | None,
    student: nn.Module,
    train: TensorPair,
    val: TensorPair,
    config: DistillConfig,
    on_progress: Callable[[Progress], None],
    on_checkpoint: Callable[[dict[str, Any]], None] | None = None,
    resume: dict[str, Any] | None = None,
    *,
    seed: int = 0,
    device: str = "auto",
    recalibrate_batchnorm: bool = True,
) -> TrainingResult:
    """Train `student` in place, from the teachers' soft targets (one nn.Module: a teacher of weight 1 that takes
    the student's input), or from labels alone if teachers is None (or empty).

    The loop is training.fit()'s, with config.training: see it for progress, checkpoints, resume, seed and device.
    Then, with `recalibrate_batchnorm`, the student's BatchNorm running statistics are re-estimated on training
    images and kept if they do better on `val` (batchnorm.recalibrate_batchnorm_; the result's `batchnorm` says
    what happened, and its final_val_accuracy is the kept model's). Pass False for models whose forward pass
    must not run outside training, such as fake-quantized ones (their observers record every forward pass).
    """
    task = Distillation(_as_teachers(teachers, len(train[0])), student, config)
    try:
        result = fit(task, student, train, val, config.training, on_progress, on_checkpoint, resume, seed=seed,
                     device=device)
    finally:
        task.close()
    if not recalibrate_batchnorm:
        return result
    report = recalibrate_batchnorm_(student, train[0], val, seed=seed, batch_size=config.training.batch_size)
    if report is None or not report["recalibrated"]:
        return dataclasses.replace(result, batchnorm=report)
    final = report["val_accuracy_after"]
    return dataclasses.replace(result, batchnorm=report, final_val_accuracy=final,
                               best_val_accuracy=max(result.best_val_accuracy, final))
