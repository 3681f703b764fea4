"""The training loop, generic over what it trains for: a `Task` gives the loss of a batch, `fit()` minimises it.

The loop is the one a person writes by hand, plus what lets it run at the speed of the hardware, decided once
per run by `plan()`:
- The training set is moved to the GPU once when it fits; otherwise each batch is gathered into pinned host
  memory and copied without blocking. On CPU the tensors stay where they are. Augmentation runs on the device.
- CUDA: bf16 autocast, channels_last, cuDNN autotuning, TF32 matmuls, a fused optimizer and, for long enough
  runs, a compiled model. CPU: fp32.
- Between steps the loop waits for the device once per epoch, after its first step, so that progress has a loss
  from the start; then the running loss (with its parts) is read every LOSS_REFRESH_STEPS steps, on CUDA through
  an asynchronous copy picked up once it has landed.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn

from worker.engine import evaluate
from worker.engine.augment import CropDraw, random_crop
from worker.engine.checkpoint import Checkpointer, detached_cpu_copy
from worker.engine.config import TrainingConfig
from worker.engine.errors import DataError, Interrupted
from worker.engine.evaluate import TensorPair
from worker.engine.hardware import configure_backends, pick_device
from worker.engine.models import logits_of

if TYPE_CHECKING:
    from worker.engine.batchnorm import BatchNormRecalibration

# Reading the loss forces a device sync, so on CUDA the running value is refreshed only this often.
LOSS_REFRESH_STEPS = 20
# torch.compile takes tens of seconds for a ResNet's forward and backward and saves about a tenth of each
# step, so under compile="auto" only runs at least this long are compiled.
COMPILE_AUTO_MIN_STEPS = 1000
# The data moves to the GPU only if it takes at most this share of the free memory: the rest is for the
# models, their activations, the optimizer state and the compiler's workspace.
DATA_GPU_MEMORY_SHARE = 0.5
# What a model returns: its logits, or a multi-head model's per task.
Logits = torch.Tensor | dict[str, torch.Tensor]



@dataclass
class Progress:
    stage: str  # the task's: "distill", or "train" when there is no teacher
    epoch: int  # 1-based, the epoch in progress
    epochs: int
    step: int  # over the whole run, 1..total_steps
    total_steps: int
    train_loss: float | None  # the epoch's mean loss so far (on CUDA, as of a recent step)
    val_accuracy: float | None  # the last completed epoch's; None during the first
    eta_seconds: float | None
    # A multi-task run's last completed epoch's accuracy per task (val_accuracy is their mean); None for one task.
    val_accuracy_by_task: dict[str, float] | None = None
    # The parts of train_loss that the task has, means over the same steps: Hinton's loss is
    # alpha * T² * kd_loss + (1 - alpha) * ce_loss; plain training has ce_loss alone.
    kd_loss: float | None = None
    ce_loss: float | None = None


@dataclass
class TrainingResult:
    # Per epoch, as measured at its end (and reported by progress): epoch, train_loss, the task's parts
    # (kd_loss...), val_accuracy and what else the task validates (Task.validate: a multi-task run's
    # val_accuracy_by_task). A BatchNorm recalibration after the last epoch does not rewrite it.
    history: list[dict[str, Any]]
    best_val_accuracy: float  # the highest of the epochs' and final_val_accuracy
    final_val_accuracy: float  # of the model as returned, its BatchNorm statistics recalibrated if they were
    epochs_run: int  # epochs completed in total, including those before a resume
    # What distill() did to the BatchNorm statistics after training; None where it did nothing (no BatchNorm
    # layer, or not asked to).
    batchnorm: BatchNormRecalibration | None = None
    # A multi-task run's final accuracy per task (final_val_accuracy is their mean); None for one task.
    by_task: dict[str, float] | None = None


@dataclass(frozen=True)
class Plan:
    """How a run uses its device, decided once before the first step."""

    device: torch.device
    autocast: bool  # bf16 on CUDA; CPUs train in fp32, where bf16 is slower on most and changes results
    memory_format: torch.memory_format  # channels_last on CUDA: the layout tensor cores convolve in
    fused_optimizer: bool  # one kernel per parameter group on CUDA
    compile: bool  # torch.compile the model (see COMPILE_AUTO_MIN_STEPS)
    # Logits a task keeps (a teacher's, cached): bf16 on CUDA, which loses nothing as they were computed under
    # bf16 autocast; fp32 on CPU, where they were computed in fp32 and a bf16 copy would cost a conversion per step.
    logits_dtype: torch.dtype


def plan(device: torch.device, config: TrainingConfig, total_steps: int) -> Plan:
    on_cuda = device.type == "cuda"
    long_enough = total_steps >= COMPILE_AUTO_MIN_STEPS
    return Plan(
        device=device,
        autocast=on_cuda,
        memory_format=torch.channels_last if on_cuda else torch.contiguous_format,
        fused_optimizer=on_cuda,
        compile=config.compile == "on" or (config.compile == "auto" and on_cuda and long_enough),
        logits_dtype=torch.bfloat16 if on_cuda else torch.float32,
    )


def autocast(run_plan: Plan) -> contextlib.AbstractContextManager[Any]:
    return torch.autocast(run_plan.device.type, dtype=torch.bfloat16, enabled=run_plan.autocast)


class DeviceData:
    """The training and validation sets where the loop reads them: on the device when they fit (on CPU, where
    they are); otherwise in host memory, each batch gathered into pinned memory and copied without blocking."""

    def __init__(self, train: TensorPair, val: TensorPair, run_plan: Plan) -> None:
        self.device = run_plan.device
        self.memory_format = run_plan.memory_format
        tensors = (*train, *val)
        if _fits_on_device(self.device, tensors):
            tensors = tuple(tensor.to(self.device, memory_format=self._format_of(tensor)) for tensor in tensors)
        self.x, self.y, self.x_val, self.y_val = tensors
        self.home = self.x.device
        # The latest augmented batch's crop (inputs()), which view_inputs() applies to other views of its images.
        self.crop: CropDraw | None = None

    def _format_of(self, tensor: torch.Tensor) -> torch.memory_format:
        return self.memory_format if tensor.dim() == 4 else torch.contiguous_format

    def place(self, tensor: torch.Tensor) -> torch.Tensor:
        """A tensor held row for row with the training images (another view of them), on the device if it fits."""
        if self.home == self.device and _fits_on_device(self.device, (tensor,)):
            return tensor.to(self.device, memory_format=self._format_of(tensor))
        return tensor

    def rows(self, tensor: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Rows `indices` (on self.home) of a tensor held here, on the device."""
        if tensor.device == self.device:
            return tensor[indices]
        # Pinned memory from PyTorch's caching host allocator is not reused before its copy has completed.
        staged = torch.empty((len(indices), *tensor.shape[1:]), dtype=tensor.dtype, pin_memory=True)
        # A view left in host memory while the training images are on the device is indexed from there.
        torch.index_select(tensor, 0, indices.to(tensor.device), out=staged)
        return staged.to(self.device, non_blocking=True)

    def inputs(self, indices: torch.Tensor, augment: str = "none") -> torch.Tensor:
        """Training images `indices` (on self.home) on the device, augmented as TrainingConfig.augment says, in
        the run's memory format ("auto" not made concrete for a dataset shifts only: the choice that is right for
        any images). The crop drawn is kept for view_inputs()."""
        self.crop = None if augment == "none" else CropDraw.sample(len(indices), augment == "crop_flip", self.device)
        return self.view_inputs(self.x, indices)

    def view_inputs(self, images: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Rows `indices` of `images` (the training images, or a view of them held by place()) on the device, in
        the run's memory format, cropped as the latest batch from inputs() was: a teacher that takes its own
        input sees the crop the student sees."""
        inputs = self.rows(images, indices)
        if self.crop is not None:
            inputs = random_crop(inputs, self.crop)
        return inputs.contiguous(memory_format=self.memory_format)


class Task(Protocol):
    """What a run trains for: the loss of a batch, and the parts of it that progress reports next to the total.

    A task may also have parameters of its own that training updates with the model's (a feature adapter): its
    attribute `extra_module` (an nn.Module, set by setup(); task_module() reads it, None where there is none).
    The optimizer trains them, and checkpoints carry and restore them.
    """

    stage: str  # Progress.stage while it trains
    parts: tuple[str, ...]  # the Progress fields that loss()'s parts fill, in the order loss() returns them

    def setup(self, run_plan: Plan, data: DeviceData, batch_size: int) -> None:
        """Once, before the first step, with the data where the loop reads it."""

    def loss(self, logits: Logits, targets: torch.Tensor, batch: torch.Tensor,
             inputs: torch.Tensor) -> Sequence[torch.Tensor]:
        """The loss to minimise, then its parts, for the model's fp32 `logits` of `inputs` (a multi-head model's
        dict of them): the training images `batch` (indices on data.home), augmented as the config says, labelled
        `targets`.

        A task may also have `validate(model, data) -> dict`, the end of an epoch's metrics on data.x_val and
        data.y_val, val_accuracy among them (a multi-head model's tasks); by default val_accuracy is
        evaluate.accuracy's."""


def task_module(task: Task) -> nn.Module | None:
    """The task's own trained parameters (Task.extra_module), if it has any."""
    return getattr(task, "extra_module", None)


def fit(task: Task, model: nn.Module, train: TensorPair, val: TensorPair, config: TrainingConfig,
        on_progress: Callable[[Progress], None], on_checkpoint: Callable[[dict[str, Any]], None] | None = None,
        resume: dict[str, Any] | None = None, *, seed: int = 0, device: str = "auto") -> TrainingResult:
    """Train `model` in place, minimising `task`'s loss.

    `on_progress` runs after every step and may raise (e.g. Canceled) to stop between steps; if it
    raises Interrupted, a checkpoint of the position mid-epoch is taken first.
    `on_checkpoint` receives checkpoints (after every epoch, and on Interrupted) of plain tensors and
    primitives (safe for torch.load(weights_only=True)); passing one back as `resume` continues
    exactly where it stopped, mid-epoch included. Epoch checkpoints are handed over on a background
    thread, in order, so that writing them overlaps the next epoch; all are handed over before fit
    returns or raises, and a failed one raises at the next checkpoint or at the end.
    `seed` fixes the shuffling order (and the global RNG); `device` is auto, cpu or cuda.
    Seed the global RNG before building the model for a reproducible initialisation.
    """
    if len(train[0]) == 0 or len(val[0]) == 0:
        raise DataError("training needs at least one training and one validation image; add more images")
    run = _Run(task, model, train, val, config, seed, device)
    if resume is not None:
        run.restore(resume)
    with Checkpointer(run.checkpoint, on_checkpoint) as checkpointer:
        for epoch in range(run.completed_epochs, config.epochs):
            losses = run.train_epoch(epoch, on_progress, checkpointer)
            validation = run.validate()
            run.history.append({"epoch": epoch + 1, **run.reported(losses), **validation})
            run.completed_epochs = epoch + 1
            on_progress(run.progress(epoch, run.steps_per_epoch * (epoch + 1), losses, validation))
            checkpointer.in_background()
    accuracies = [entry["val_accuracy"] for entry in run.history]
    return TrainingResult(
        history=run.history,
        best_val_accuracy=max(accuracies),
        final_val_accuracy=accuracies[-1],
        epochs_run=len(run.history),
    )


class _RunningLoss:
    """The epoch's mean loss and parts so far, for progress reports, read without making the loop wait but once.

    They are read at the first step that an epoch runs, so that even an epoch shorter than LOSS_REFRESH_STEPS
    reports a loss from its start: on CUDA that waits for the device once per epoch. Then they are refreshed
    every LOSS_REFRESH_STEPS steps: on CPU, where reading costs no wait, at once; on CUDA through a copy to pinned
    memory made asynchronously and picked up at the first step after it has landed.
    """

    def __init__(self, device: torch.device, size: int) -> None:
        self.value: list[float] | None = None
        self.on_cuda = device.type == "cuda"
        if self.on_cuda:
            self.landing = torch.empty(size, pin_memory=True)
            self.landed = torch.cuda.Event()
            self.steps_in_landing = 0  # 0: no copy waiting to be picked up

    def update(self, loss_sums: torch.Tensor, steps: int, *, first: bool) -> None:
        """After a step: `loss_sums` over the epoch's `steps` so far; `first`: the first step run this epoch."""
        refresh = steps % LOSS_REFRESH_STEPS == 0
        if first or (refresh and not self.on_cuda):
            self.value = (loss_sums / steps).tolist()
        elif self.on_cuda:
            if self.steps_in_landing and self.landed.query():
                self.value = [loss_sum / self.steps_in_landing for loss_sum in self.landing.tolist()]
                self.steps_in_landing = 0
            if refresh:
                self.landing.copy_(loss_sums, non_blocking=True)
                self.landed.record()
                self.steps_in_landing = steps


class _Run:
    """Everything one training run owns, so that a checkpoint can capture and restore all of it."""

    def __init__(
        self, task: Task, model: nn.Module, train: TensorPair, val: TensorPair, config: TrainingConfig, seed: int,
        device: str,
    ) -> None:
        self.task = task
        self.config = config
        torch.manual_seed(seed)
        # A dedicated generator for the shuffling order, so that it can be checkpointed on its own.
        self.generator = torch.Generator().manual_seed(seed)
        # Full batches only: a trailing batch of one would break BatchNorm in train mode.
        self.batch_size = min(config.batch_size, len(train[0]))
        self.steps_per_epoch = len(train[0]) // self.batch_size
        self.total_steps = self.steps_per_epoch * config.epochs
        self.plan = plan(pick_device(device), config, self.total_steps)
        configure_backends(self.plan.device)
        self.data = DeviceData(train, val, self.plan)
        self.model = model.to(self.plan.device, memory_format=self.plan.memory_format)
        # Checkpoints read self.model: a compiled module prefixes its state_dict keys with _orig_mod.
        self.forward = torch.compile(self.model) if self.plan.compile else self.model
        task.setup(self.plan, self.data, self.batch_size)
        self.extra_module = task_module(task)
        trained = [*model.parameters(), *(self.extra_module.parameters() if self.extra_module is not None else ())]
        self.optimizer = _optimizer(trained, config, self.plan.fused_optimizer)
        self.scheduler = _scheduler(self.optimizer, config, self.total_steps)
        self.completed_epochs = 0
        # Position inside the epoch in progress, so that an interrupted epoch resumes at its next step:
        # the shuffling generator's state before this epoch's permutation, the steps done, their loss summed
        # (the total, then the task's parts).
        self.epoch_generator_state = self.generator.get_state()
        self.step_in_epoch = 0
        self.epoch_loss_sums = self._no_loss()
        # False for the rest of an epoch resumed from a checkpoint written before the parts were summed.
        self.parts_known = True
        self.history: list[dict[str, float]] = []
        self.started = time.monotonic()
        self.first_step = 0

    def _no_loss(self) -> torch.Tensor:
        return torch.zeros(1 + len(self.task.parts), device=self.plan.device)

    def train_epoch(self, epoch: int, on_progress: Callable[[Progress], None],
                    checkpointer: Checkpointer) -> list[float]:
        """Runs the epoch's remaining steps; returns the epoch's mean loss, then the means of its parts."""
        self.model.train()
        if self.step_in_epoch == 0:
            self.epoch_generator_state = self.generator.get_state()
            self.epoch_loss_sums = self._no_loss()
            self.parts_known = True
        else:  # resumed mid-epoch: draw this epoch's permutation again, then skip the steps done
            self.generator.set_state(self.epoch_generator_state)
        # Indices live with the data, so that taking a batch copies nothing from the host.
        order = torch.randperm(len(self.data.x), generator=self.generator).to(self.data.home)
        running_loss = _RunningLoss(self.plan.device, len(self.epoch_loss_sums))
        first_index = self.step_in_epoch
        # Mid-epoch reports carry the last completed epoch's accuracy: the latest known.
        validation = self.history[-1] if self.history else None
        for index in range(first_index, self.steps_per_epoch):
            self.epoch_loss_sums += self._step(order[index * self.batch_size : (index + 1) * self.batch_size])
            self.step_in_epoch = index + 1
            running_loss.update(self.epoch_loss_sums, index + 1, first=index == first_index)
            step = epoch * self.steps_per_epoch + index + 1
            try:
                on_progress(self.progress(epoch, step, running_loss.value, validation))
            except Interrupted:
                checkpointer.before_stopping()
                raise
        self.step_in_epoch = 0
        return (self.epoch_loss_sums / self.steps_per_epoch).tolist()

    def _step(self, batch: torch.Tensor) -> torch.Tensor:
        """One optimizer step on the training images `batch`; returns the loss and its parts, on the device."""
        inputs = self.data.inputs(batch, self.config.augment)
        targets = self.data.rows(self.data.y, batch)
        with autocast(self.plan):
            logits = _float(logits_of(self.forward(inputs)))
        loss, *parts = self.task.loss(logits, targets, batch, inputs)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        return torch.stack([loss, *parts]).detach()

    def validate(self) -> dict[str, Any]:
        """The end of an epoch's validation metrics: val_accuracy, and whatever else the task's validate() has."""
        task_validate = getattr(self.task, "validate", None)
        with autocast(self.plan):
            if task_validate is not None:
                return task_validate(self.model, self.data)
            return {"val_accuracy": evaluate.accuracy(self.model, self.data.x_val, self.data.y_val)}

    def reported(self, losses: list[float] | None) -> dict[str, float | None]:
        """train_loss and the task's parts by their Progress names, from the means (loss, *parts)."""
        if losses is None:
            return {"train_loss": None}
        loss, *parts = losses
        return {"train_loss": loss, **(dict(zip(self.task.parts, parts, strict=True)) if self.parts_known else {})}

    def progress(self, epoch: int, step: int, losses: list[float] | None,
                 validation: dict[str, Any] | None) -> Progress:
        """Where the run is; `validation`: the last completed epoch's (None during the first)."""
        validation = validation or {}
        return Progress(
            stage=self.task.stage,
            epoch=epoch + 1,
            epochs=self.config.epochs,
            step=step,
            total_steps=self.total_steps,
            val_accuracy=validation.get("val_accuracy"),
            val_accuracy_by_task=validation.get("val_accuracy_by_task"),
            eta_seconds=self._eta(step),
            **self.reported(losses),
        )

    def _eta(self, step: int) -> float | None:
        done_here = step - self.first_step
        if done_here <= 0:
            return None
        return (time.monotonic() - self.started) / done_here * (self.total_steps - step)

    def checkpoint(self) -> dict[str, Any]:
        state = detached_cpu_copy(
            {
                "epoch": self.completed_epochs,
                "step_in_epoch": self.step_in_epoch,
                "epoch_generator": self.epoch_generator_state,
                "epoch_loss_sum": self.epoch_loss_sums[0],
                # Left out while unknown, so that a run resumed from this checkpoint does not report them either.
                **({"epoch_loss_parts_sum": self.epoch_loss_sums[1:]} if self.parts_known else {}),
                "student": self.model.state_dict(),  # the first task's name for the model, kept for old checkpoints
                **({"task_module": self.extra_module.state_dict()} if self.extra_module is not None else {}),
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
        if self.plan.device.type == "cuda":
            torch.cuda.synchronize()  # the copies to pinned memory were queued without waiting
        return state

    def restore(self, checkpoint: dict[str, Any]) -> None:
        self.model.load_state_dict(checkpoint["student"])
        if self.extra_module is not None:
            self.extra_module.load_state_dict(checkpoint["task_module"])
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
        self.epoch_loss_sums = self._no_loss()
        self.epoch_loss_sums[0] = checkpoint["epoch_loss_sum"]
        parts = checkpoint.get("epoch_loss_parts_sum")
        if parts is not None:
            self.epoch_loss_sums[1:] = parts
        # Mid-epoch, a checkpoint written before the parts were summed leaves that epoch with its total alone.
        self.parts_known = parts is not None or self.step_in_epoch == 0
        self.history = [dict(entry) for entry in checkpoint["history"]]
        self.first_step = self.completed_epochs * self.steps_per_epoch + self.step_in_epoch


def _optimizer(parameters: list[nn.Parameter], config: TrainingConfig, fused: bool) -> torch.optim.Optimizer:
    # None, not False: leaves PyTorch its own default (foreach) where fusing is not asked for.
    fused_or_default = True if fused else None
    if config.optimizer == "sgd":
        return torch.optim.SGD(parameters, lr=config.lr, momentum=0.9, nesterov=True,
                               weight_decay=config.weight_decay, fused=fused_or_default)
    return torch.optim.AdamW(parameters, lr=config.lr, weight_decay=config.weight_decay, fused=fused_or_default)


def _scheduler(
    optimizer: torch.optim.Optimizer, config: TrainingConfig, total_steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    if config.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
    if config.scheduler == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.lr, total_steps=total_steps)
    # A constant schedule keeps one code path (and one checkpoint layout) for "none".
    return torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)


def _fits_on_device(device: torch.device, tensors: tuple[torch.Tensor, ...]) -> bool:
    if device.type != "cuda":
        return True  # the CPU reads them where they are
    free, _total = torch.cuda.mem_get_info(device)
    return sum(tensor.nbytes for tensor in tensors) <= DATA_GPU_MEMORY_SHARE * free


def _float(logits: Logits) -> Logits:
    if isinstance(logits, dict):
        return {task: task_logits.float() for task, task_logits in logits.items()}
    return logits.float()
