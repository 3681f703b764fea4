"""Knowledge distillation (Hinton et al., 2015), and plain supervised training when there is no teacher.

Inputs are fixed preprocessed tensors (no augmentation), so the teacher's logits are the same every
epoch: they are computed once up front instead of once per step.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from worker.engine import evaluate
from worker.engine.config import DistillConfig
from worker.engine.errors import DataError, Interrupted, SpecError
from worker.engine.models import logits_of, pick_device

# Reading the loss forces a device sync, so the running value is refreshed only this often.
LOSS_REFRESH_STEPS = 20

TensorPair = tuple[torch.Tensor, torch.Tensor]


@dataclass
class Progress:
    stage: str  # "distill", or "train" when there is no teacher
    epoch: int  # 1-based, the epoch in progress
    epochs: int
    step: int  # over the whole run, 1..total_steps
    total_steps: int
    train_loss: float | None
    val_accuracy: float | None
    eta_seconds: float | None


@dataclass
class DistillResult:
    history: list[dict[str, float]]  # per epoch: epoch, train_loss, val_accuracy
    best_val_accuracy: float
    final_val_accuracy: float
    epochs_run: int  # epochs completed in total, including those before a resume


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    targets: torch.Tensor,
    temperature: float,
    alpha: float,
) -> torch.Tensor:
    """alpha * T² * KL(teacher_T || student_T) + (1 - alpha) * CE(student, targets).

    T² keeps the soft term's gradients on the same scale as the hard term's whatever T is.
    """
    soft = F.kl_div(
        F.log_softmax(student_logits / temperature, dim=1),
        F.log_softmax(teacher_logits / temperature, dim=1),
        reduction="batchmean",
        log_target=True,
    )
    hard = F.cross_entropy(student_logits, targets)
    return alpha * soft * temperature**2 + (1 - alpha) * hard


def distill(
    teacher: nn.Module | None,
    student: nn.Module,
    train: TensorPair,
    val: TensorPair,
    config: DistillConfig,
    on_progress: Callable[[Progress], None],
    on_checkpoint: Callable[[dict[str, Any]], None] | None = None,
    resume: dict[str, Any] | None = None,
) -> DistillResult:
    """Train `student` in place, from the teacher's soft targets, or from labels alone if teacher is None.

    `on_progress` runs after every step and may raise (e.g. Canceled) to stop between steps; if it
    raises Interrupted, a checkpoint of the position mid-epoch is taken first.
    `on_checkpoint` receives checkpoints (after every epoch, and on Interrupted) of plain tensors and
    primitives (safe for torch.load(weights_only=True)); passing one back as `resume` continues
    exactly where it stopped, mid-epoch included.
    Seed the global RNG before building the student for a reproducible initialisation.
    """
    if config.epochs < 1:
        # Subclassed configs (prune's recovery fine-tuning) allow 0 epochs: their caller skips training.
        raise SpecError("training needs at least one epoch")
    if len(train[0]) == 0 or len(val[0]) == 0:
        raise DataError("training needs at least one training and one validation image; add more images")
    run = _Run(teacher, student, train, config)
    if resume is not None:
        run.restore(resume)
    for epoch in range(run.completed_epochs, config.epochs):
        train_loss = run.train_epoch(epoch, on_progress, on_checkpoint)
        val_accuracy = evaluate.accuracy(student, *val)
        run.history.append({"epoch": epoch + 1, "train_loss": train_loss, "val_accuracy": val_accuracy})
        run.completed_epochs = epoch + 1
        on_progress(run.progress(epoch, run.steps_per_epoch * (epoch + 1), train_loss, val_accuracy))
        if on_checkpoint is not None:
            on_checkpoint(run.checkpoint())
    accuracies = [entry["val_accuracy"] for entry in run.history]
    return DistillResult(
        history=run.history,
        best_val_accuracy=max(accuracies),
        final_val_accuracy=accuracies[-1],
        epochs_run=len(run.history),
    )


class _Run:
    """Everything one training run owns, so that a checkpoint can capture and restore all of it."""

    def __init__(self, teacher: nn.Module | None, student: nn.Module, train: TensorPair, config: DistillConfig):
        self.config = config
        self.device = pick_device(config.device)
        self.on_cuda = self.device.type == "cuda"
        torch.manual_seed(config.seed)
        # A dedicated generator for the shuffling order, so that it can be checkpointed on its own.
        self.generator = torch.Generator().manual_seed(config.seed)
        self.x_train, self.y_train = train
        # Full batches only: a trailing batch of one would break BatchNorm in train mode.
        self.batch_size = min(config.batch_size, len(self.x_train))
        self.steps_per_epoch = len(self.x_train) // self.batch_size
        self.total_steps = self.steps_per_epoch * config.epochs
        self.memory_format = torch.channels_last if self.on_cuda else torch.contiguous_format
        self.student = student.to(self.device, memory_format=self.memory_format)
        self.teacher_logits = None if teacher is None else self._teacher_logits(teacher)
        self.stage = "train" if teacher is None else "distill"
        self.optimizer = _optimizer(student, config)
        self.scheduler = _scheduler(self.optimizer, config, self.total_steps)
        self.completed_epochs = 0
        # Position inside the epoch in progress, so that an interrupted epoch resumes at its next step:
        # the shuffling generator's state before this epoch's permutation, the steps done, their loss.
        self.epoch_generator_state = self.generator.get_state()
        self.step_in_epoch = 0
        self.epoch_loss_sum = torch.zeros((), device=self.device)
        self.history: list[dict[str, float]] = []
        self.started = time.monotonic()
        self.first_step = 0

    def _teacher_logits(self, teacher: nn.Module) -> torch.Tensor:
        teacher.to(self.device, memory_format=self.memory_format)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.on_cuda):
            return evaluate.logits(teacher, self.x_train)  # sets eval(): no dropout, frozen BN statistics

    def train_epoch(self, epoch: int, on_progress: Callable[[Progress], None],
                    on_checkpoint: Callable[[dict[str, Any]], None] | None) -> float:
        self.student.train()
        if self.step_in_epoch == 0:
            self.epoch_generator_state = self.generator.get_state()
            self.epoch_loss_sum = torch.zeros((), device=self.device)
        else:  # resumed mid-epoch: draw this epoch's permutation again, then skip the steps done
            self.generator.set_state(self.epoch_generator_state)
        order = torch.randperm(len(self.x_train), generator=self.generator)
        running_loss = None
        for index in range(self.step_in_epoch, self.steps_per_epoch):
            batch = order[index * self.batch_size : (index + 1) * self.batch_size]
            self.epoch_loss_sum += self._step(batch)
            self.step_in_epoch = index + 1
            if (index + 1) % LOSS_REFRESH_STEPS == 0:
                running_loss = (self.epoch_loss_sum / (index + 1)).item()
            step = epoch * self.steps_per_epoch + index + 1
            try:
                on_progress(self.progress(epoch, step, running_loss, None))
            except Interrupted:
                if on_checkpoint is not None:
                    on_checkpoint(self.checkpoint())
                raise
        self.step_in_epoch = 0
        return (self.epoch_loss_sum / self.steps_per_epoch).item()

    def _step(self, batch: torch.Tensor) -> torch.Tensor:
        inputs = self.x_train[batch].to(self.device, non_blocking=True)
        inputs = inputs.contiguous(memory_format=self.memory_format)
        targets = self.y_train[batch].to(self.device, non_blocking=True)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.on_cuda):
            student_logits = logits_of(self.student(inputs)).float()
        if self.teacher_logits is None:
            loss = F.cross_entropy(student_logits, targets)
        else:
            teacher_logits = self.teacher_logits[batch].to(self.device, non_blocking=True)
            loss = kd_loss(student_logits, teacher_logits, targets, self.config.temperature, self.config.alpha)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        return loss.detach()

    def progress(self, epoch: int, step: int, train_loss: float | None, val_accuracy: float | None) -> Progress:
        return Progress(
            stage=self.stage,
            epoch=epoch + 1,
            epochs=self.config.epochs,
            step=step,
            total_steps=self.total_steps,
            train_loss=train_loss,
            val_accuracy=val_accuracy,
            eta_seconds=self._eta(step),
        )

    def _eta(self, step: int) -> float | None:
        done_here = step - self.first_step
        if done_here <= 0:
            return None
        return (time.monotonic() - self.started) / done_here * (self.total_steps - step)

    def checkpoint(self) -> dict[str, Any]:
        return _detached_cpu_copy(
            {
                "epoch": self.completed_epochs,
                "step_in_epoch": self.step_in_epoch,
                "epoch_generator": self.epoch_generator_state,
                "epoch_loss_sum": self.epoch_loss_sum,
                "student": self.student.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "rng": {
                    "torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                    "generator": self.generator.get_state(),
                },
                "history": self.history,
            }
        )

    def restore(self, checkpoint: dict[str, Any]) -> None:
        self.student.load_state_dict(checkpoint["student"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.scheduler.load_state_dict(checkpoint["scheduler"])
        rng = checkpoint["rng"]
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        self.generator.set_state(rng["generator"])
        self.completed_epochs = checkpoint["epoch"]
        self.step_in_epoch = checkpoint["step_in_epoch"]
        self.epoch_generator_state = checkpoint["epoch_generator"]
        self.epoch_loss_sum = checkpoint["epoch_loss_sum"].to(self.device)
        self.history = [dict(entry) for entry in checkpoint["history"]]
        self.first_step = self.completed_epochs * self.steps_per_epoch + self.step_in_epoch


def _optimizer(model: nn.Module, config: DistillConfig) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            model.parameters(), lr=config.lr, momentum=0.9, nesterov=True, weight_decay=config.weight_decay
        )
    return torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)


def _scheduler(
    optimizer: torch.optim.Optimizer, config: DistillConfig, total_steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    if config.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
    if config.scheduler == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.lr, total_steps=total_steps)
    # A constant schedule keeps one code path (and one checkpoint layout) for "none".
    return torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)


def _detached_cpu_copy(value: Any) -> Any:
    """A snapshot: state_dict()s alias live tensors that the next step would overwrite."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {key: _detached_cpu_copy(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_detached_cpu_copy(item) for item in value)
    return value
