"""Knowledge distillation (Hinton et al., 2015), and plain supervised training when there is no teacher: the
Distillation task, and distill(), which trains a student for it with training.fit().

The teacher is frozen: eval mode (no dropout, BatchNorm on its running statistics), no gradients. Without
augmentation every epoch feeds the same inputs, so its logits are computed once and reused; with augmentation
(done on the device) it runs on every augmented batch, so that it sees the images the student sees.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from worker.engine.batchnorm import recalibrate_batchnorm_
from worker.engine.config import DistillConfig
from worker.engine.models import logits_of
from worker.engine.training import DeviceData, Plan, Progress, TensorPair, TrainingResult, autocast, fit


class KDLoss(NamedTuple):
    """Hinton's loss and its parts, each a mean over the batch."""

    total: torch.Tensor  # alpha * T² * kd + (1 - alpha) * ce: what is minimised
    kd: torch.Tensor  # KL(softmax(teacher / T) || softmax(student / T)), before its weights
    ce: torch.Tensor  # cross-entropy of the student's logits against the labels


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    targets: torch.Tensor,
    temperature: float,
    alpha: float,
) -> KDLoss:
    """alpha * T² * KL(teacher_T || student_T) + (1 - alpha) * CE(student, targets), with its two parts.

    T² keeps the soft term's gradients on the same scale as the hard term's whatever T is.
    """
    soft = F.kl_div(
        F.log_softmax(student_logits / temperature, dim=1),
        F.log_softmax(teacher_logits / temperature, dim=1),
        reduction="batchmean",
        log_target=True,
    )
    hard = F.cross_entropy(student_logits, targets)
    return KDLoss(alpha * soft * temperature**2 + (1 - alpha) * hard, soft, hard)


class Distillation:
    """The task: Hinton's loss against a frozen teacher; with no teacher, its CE term alone (plain training)."""

    plan: Plan  # set by setup(), with data
    data: DeviceData

    def __init__(self, teacher: nn.Module | None, config: DistillConfig) -> None:
        self.teacher = teacher
        self.temperature = config.temperature
        self.alpha = config.alpha
        self.augmented = config.training.augment != "none"
        self.stage = "train" if teacher is None else "distill"
        self.parts = ("ce_loss",) if teacher is None else ("kd_loss", "ce_loss")
        # Every training image's teacher logits, in order, where the images are; None: no teacher, or augmenting.
        self.cached_logits: torch.Tensor | None = None

    def setup(self, run_plan: Plan, data: DeviceData, batch_size: int) -> None:
        self.plan = run_plan
        self.data = data
        if self.teacher is None:
            return
        self.teacher.to(run_plan.device, memory_format=run_plan.memory_format).eval()
        if not self.augmented:
            count, home = len(data.x), data.home
            self.cached_logits = torch.cat([
                self._teacher_logits(data.inputs(torch.arange(start, min(start + batch_size, count), device=home)))
                .to(home, run_plan.logits_dtype)
                for start in range(0, count, batch_size)
            ])

    def loss(self, logits: torch.Tensor, targets: torch.Tensor, batch: torch.Tensor,
             inputs: torch.Tensor) -> Sequence[torch.Tensor]:
        if self.teacher is None:
            ce = F.cross_entropy(logits, targets)
            return ce, ce
        return kd_loss(logits, self._soft_targets(batch, inputs), targets, self.temperature, self.alpha)

    def _teacher_logits(self, inputs: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), autocast(self.plan):
            return logits_of(self.teacher(inputs))

    def _soft_targets(self, batch: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        if self.cached_logits is None:  # augmented: the teacher must see the images the student sees
            return self._teacher_logits(inputs).float()
        return self.data.rows(self.cached_logits, batch).float()


def distill(
    teacher: nn.Module | None,
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
    """Train `student` in place, from the teacher's soft targets, or from labels alone if teacher is None.

    The loop is training.fit()'s, with config.training: see it for progress, checkpoints, resume, seed and device.
    Then, with `recalibrate_batchnorm`, the student's BatchNorm running statistics are re-estimated on training
    images and kept if they do better on `val` (batchnorm.recalibrate_batchnorm_; the result's `batchnorm` says
    what happened, and its final_val_accuracy is the kept model's). Pass False for models whose forward pass
    must not run outside training, such as fake-quantized ones (their observers record every forward pass).
    """
    result = fit(Distillation(teacher, config), student, train, val, config.training, on_progress, on_checkpoint,
                 resume, seed=seed, device=device)
    if not recalibrate_batchnorm:
        return result
    report = recalibrate_batchnorm_(student, train[0], val, seed=seed, batch_size=config.training.batch_size)
    if report is None or not report["recalibrated"]:
        return dataclasses.replace(result, batchnorm=report)
    final = report["val_accuracy_after"]
    return dataclasses.replace(result, batchnorm=report, final_val_accuracy=final,
                               best_val_accuracy=max(result.best_val_accuracy, final))
