"""Knowledge distillation (Hinton et al., 2015), and plain supervised training when there is no teacher.

The loop is the one a person writes by hand, plus what lets it run at the speed of the hardware, decided once
per run by `plan()`:
- Without augmentation every epoch feeds the same inputs, so the teacher's logits are computed once and
  reused; with augmentation (done on the device) the teacher runs on every augmented batch.
- The training set is moved to the GPU once when it fits; otherwise each batch is gathered into pinned host
  memory and copied without blocking. On CPU the tensors stay where they are.
- CUDA: bf16 autocast, channels_last, cuDNN autotuning, TF32 matmuls, a fused optimizer and, for long enough
  runs, a compiled student. CPU: fp32, with no more threads than the host gives this process.
- Nothing waits for the device between steps: the running loss is read every LOSS_REFRESH_STEPS steps, on
  CUDA through an asynchronous copy picked up one refresh later.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import math
import os
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from worker.engine import augment, evaluate
from worker.engine.config import DistillConfig
from worker.engine.errors import DataError, Interrupted, SpecError
from worker.engine.models import logits_of, pick_device

log = logging.getLogger(__name__)

# Reading the loss forces a device sync, so the running value is refreshed only this often.
LOSS_REFRESH_STEPS = 20
# torch.compile takes tens of seconds for a ResNet's forward and backward and saves about a tenth of each
# step, so under compile="auto" only runs at least this long are compiled.
COMPILE_AUTO_MIN_STEPS = 1000
# The data moves to the GPU only if it takes at most this share of the free memory: the rest is for the
# models, their activations, the optimizer state and the compiler's workspace.
DATA_GPU_MEMORY_SHARE = 0.5
CGROUP_CPU_QUOTA = Path("/sys/fs/cgroup/cpu.max")

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


@dataclass(frozen=True)
class Plan:
    """How a run uses its device, decided once before the first step."""

    device: torch.device
    autocast: bool  # bf16 on CUDA; CPUs train in fp32, where bf16 is slower on most and changes results
    memory_format: torch.memory_format  # channels_last on CUDA: the layout tensor cores convolve in
    fused_optimizer: bool  # one kernel per parameter group on CUDA
    compile: bool  # torch.compile the student (see COMPILE_AUTO_MIN_STEPS)
    # Cached teacher logits: bf16 on CUDA, which loses nothing as the teacher computed them under bf16
    # autocast; fp32 on CPU, where the teacher ran in fp32 and a bf16 copy would cost a conversion per step.
    logits_dtype: torch.dtype


def plan(device: torch.device, config: DistillConfig, total_steps: int) -> Plan:
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
    exactly where it stopped, mid-epoch included. Epoch checkpoints are handed over on a background
    thread, in order, so that writing them overlaps the next epoch; all are handed over before distill
    returns or raises, and a failed one raises at the next checkpoint or at the end.
    Seed the global RNG before building the student for a reproducible initialisation.
    """
    if config.epochs < 1:
        # Subclassed configs (prune's recovery fine-tuning) allow 0 epochs: their caller skips training.
        raise SpecError("training needs at least one epoch")
    if len(train[0]) == 0 or len(val[0]) == 0:
        raise DataError("training needs at least one training and one validation image; add more images")
    run = _Run(teacher, student, train, val, config)
    if resume is not None:
        run.restore(resume)
    with _Checkpointer(run, on_checkpoint) as checkpointer:
        for epoch in range(run.completed_epochs, config.epochs):
            train_loss = run.train_epoch(epoch, on_progress, checkpointer)
            val_accuracy = run.validate()
            run.history.append({"epoch": epoch + 1, "train_loss": train_loss, "val_accuracy": val_accuracy})
            run.completed_epochs = epoch + 1
            on_progress(run.progress(epoch, run.steps_per_epoch * (epoch + 1), train_loss, val_accuracy))
            checkpointer.in_background()
    accuracies = [entry["val_accuracy"] for entry in run.history]
    return DistillResult(
        history=run.history,
        best_val_accuracy=max(accuracies),
        final_val_accuracy=accuracies[-1],
        epochs_run=len(run.history),
    )


class _DeviceData:
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

    def _format_of(self, tensor: torch.Tensor) -> torch.memory_format:
        return self.memory_format if tensor.dim() == 4 else torch.contiguous_format

    def rows(self, tensor: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Rows `indices` (on self.home) of a tensor held here, on the device."""
        if tensor.device == self.device:
            return tensor[indices]
        # Pinned memory from PyTorch's caching host allocator is not reused before its copy has completed.
        staged = torch.empty((len(indices), *tensor.shape[1:]), dtype=tensor.dtype, pin_memory=True)
        torch.index_select(tensor, 0, indices, out=staged)
        return staged.to(self.device, non_blocking=True)


class _RunningLoss:
    """The epoch's mean loss so far, for progress reports, read without making the loop wait for the device.

    On CUDA the sum is copied to pinned memory asynchronously and read one refresh later, once the copy has
    landed; on CPU reading costs no wait, so it is read at once.
    """

    def __init__(self, device: torch.device) -> None:
        self.value: float | None = None
        self.on_cuda = device.type == "cuda"
        if self.on_cuda:
            self.landing = torch.empty((), pin_memory=True)
            self.landed = torch.cuda.Event()
            self.steps_in_landing = 0

    def refresh(self, loss_sum: torch.Tensor, steps: int) -> None:
        if not self.on_cuda:
            self.value = (loss_sum / steps).item()
            return
        if self.steps_in_landing and self.landed.query():
            self.value = self.landing.item() / self.steps_in_landing
        self.landing.copy_(loss_sum, non_blocking=True)
        self.landed.record()
        self.steps_in_landing = steps


class _Checkpointer:
    """Hands checkpoints to `on_checkpoint`: after an epoch on one background thread, so that writing them (a
    file and a database event, for a job) overlaps the next epoch; on an interruption at once. In order."""

    def __init__(self, run: _Run, on_checkpoint: Callable[[dict[str, Any]], None] | None) -> None:
        self.run = run
        self.on_checkpoint = on_checkpoint
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint")
        self.in_flight: Future[None] | None = None

    def in_background(self) -> None:
        if self.on_checkpoint is not None:
            state = self.run.checkpoint()
            self.wait()
            # In the caller's context, so that what the callback logs still carries, say, the job's id.
            self.in_flight = self.pool.submit(contextvars.copy_context().run, self.on_checkpoint, state)

    def before_stopping(self) -> None:
        """A checkpoint at once, on an interruption. Never raises: the interruption (a cancel, a preemption)
        must reach the caller, not an earlier checkpoint's failure or this one's."""
        if self.on_checkpoint is None:
            return
        try:
            with contextlib.suppress(Exception):
                self.wait()  # the epoch checkpoint before this one; this one supersedes it anyway
            self.on_checkpoint(self.run.checkpoint())
        except Exception:
            log.warning("could not write the checkpoint before stopping; a resume starts from an earlier one",
                        exc_info=True)

    def wait(self) -> None:
        """Until the checkpoint in flight is handed over; raises what its handing over raised."""
        in_flight, self.in_flight = self.in_flight, None
        if in_flight is not None:
            in_flight.result()

    def __enter__(self) -> _Checkpointer:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        try:
            self.wait()
        except Exception:
            if exc_type is None:
                raise
            # The run already stops with an error of its own (Canceled, say): that one says why.
        finally:
            self.pool.shutdown()


class _Run:
    """Everything one training run owns, so that a checkpoint can capture and restore all of it."""

    def __init__(
        self, teacher: nn.Module | None, student: nn.Module, train: TensorPair, val: TensorPair, config: DistillConfig
    ) -> None:
        self.config = config
        torch.manual_seed(config.seed)
        # A dedicated generator for the shuffling order, so that it can be checkpointed on its own.
        self.generator = torch.Generator().manual_seed(config.seed)
        # Full batches only: a trailing batch of one would break BatchNorm in train mode.
        self.batch_size = min(config.batch_size, len(train[0]))
        self.steps_per_epoch = len(train[0]) // self.batch_size
        self.total_steps = self.steps_per_epoch * config.epochs
        self.plan = plan(pick_device(config.device), config, self.total_steps)
        _configure_backends(self.plan.device)
        self.data = _DeviceData(train, val, self.plan)
        self.student = student.to(self.plan.device, memory_format=self.plan.memory_format)
        # Checkpoints read self.student: a compiled module prefixes its state_dict keys with _orig_mod.
        self.forward = torch.compile(self.student) if self.plan.compile else self.student
        self.teacher = teacher
        self.cached_logits = None
        if teacher is not None:
            teacher.to(self.plan.device, memory_format=self.plan.memory_format).eval()  # no dropout, frozen BN
            if config.augment == "none":
                self.cached_logits = self._teacher_logits_of_all()
        self.stage = "train" if teacher is None else "distill"
        self.optimizer = _optimizer(student, config, self.plan.fused_optimizer)
        self.scheduler = _scheduler(self.optimizer, config, self.total_steps)
        self.completed_epochs = 0
        # Position inside the epoch in progress, so that an interrupted epoch resumes at its next step:
        # the shuffling generator's state before this epoch's permutation, the steps done, their loss.
        self.epoch_generator_state = self.generator.get_state()
        self.step_in_epoch = 0
        self.epoch_loss_sum = torch.zeros((), device=self.plan.device)
        self.history: list[dict[str, float]] = []
        self.started = time.monotonic()
        self.first_step = 0

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        return torch.autocast(self.plan.device.type, dtype=torch.bfloat16, enabled=self.plan.autocast)

    def _teacher_logits(self, inputs: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), self._autocast():
            return logits_of(self.teacher(inputs))

    def _teacher_logits_of_all(self) -> torch.Tensor:
        """Every training image's teacher logits, in order, kept where the images are."""
        count, home = len(self.data.x), self.data.home
        return torch.cat([
            self._teacher_logits(self._inputs(torch.arange(start, min(start + self.batch_size, count), device=home)))
            .to(home, self.plan.logits_dtype)
            for start in range(0, count, self.batch_size)
        ])

    def _inputs(self, indices: torch.Tensor) -> torch.Tensor:
        inputs = self.data.rows(self.data.x, indices)
        if self.config.augment != "none":
            inputs = augment.random_crop(inputs, flip=self.config.augment == "crop_flip")
        return inputs.contiguous(memory_format=self.plan.memory_format)

    def train_epoch(self, epoch: int, on_progress: Callable[[Progress], None],
                    checkpointer: _Checkpointer) -> float:
        self.student.train()
        if self.step_in_epoch == 0:
            self.epoch_generator_state = self.generator.get_state()
            self.epoch_loss_sum = torch.zeros((), device=self.plan.device)
        else:  # resumed mid-epoch: draw this epoch's permutation again, then skip the steps done
            self.generator.set_state(self.epoch_generator_state)
        # Indices live with the data, so that taking a batch copies nothing from the host.
        order = torch.randperm(len(self.data.x), generator=self.generator).to(self.data.home)
        running_loss = _RunningLoss(self.plan.device)
        for index in range(self.step_in_epoch, self.steps_per_epoch):
            self.epoch_loss_sum += self._step(order[index * self.batch_size : (index + 1) * self.batch_size])
            self.step_in_epoch = index + 1
            if (index + 1) % LOSS_REFRESH_STEPS == 0:
                running_loss.refresh(self.epoch_loss_sum, index + 1)
            step = epoch * self.steps_per_epoch + index + 1
            try:
                on_progress(self.progress(epoch, step, running_loss.value, None))
            except Interrupted:
                checkpointer.before_stopping()
                raise
        self.step_in_epoch = 0
        return (self.epoch_loss_sum / self.steps_per_epoch).item()

    def _step(self, batch: torch.Tensor) -> torch.Tensor:
        inputs = self._inputs(batch)
        targets = self.data.rows(self.data.y, batch)
        with self._autocast():
            student_logits = logits_of(self.forward(inputs)).float()
        if self.teacher is None:
            loss = F.cross_entropy(student_logits, targets)
        else:
            loss = kd_loss(student_logits, self._soft_targets(batch, inputs), targets, self.config.temperature,
                           self.config.alpha)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        return loss.detach()

    def _soft_targets(self, batch: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        if self.cached_logits is None:  # augmented: the teacher must see the images the student sees
            return self._teacher_logits(inputs).float()
        return self.data.rows(self.cached_logits, batch).float()

    def validate(self) -> float:
        with self._autocast():
            return evaluate.accuracy(self.student, self.data.x_val, self.data.y_val)

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
        state = _detached_cpu_copy(
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
        if self.plan.device.type == "cuda":
            torch.cuda.synchronize()  # the copies to pinned memory were queued without waiting
        return state

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
        self.epoch_loss_sum = checkpoint["epoch_loss_sum"].to(self.plan.device)
        self.history = [dict(entry) for entry in checkpoint["history"]]
        self.first_step = self.completed_epochs * self.steps_per_epoch + self.step_in_epoch


def _optimizer(model: nn.Module, config: DistillConfig, fused: bool) -> torch.optim.Optimizer:
    # None, not False: leaves PyTorch its own default (foreach) where fusing is not asked for.
    fused_or_default = True if fused else None
    if config.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=config.lr, momentum=0.9, nesterov=True,
                               weight_decay=config.weight_decay, fused=fused_or_default)
    return torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay,
                             fused=fused_or_default)


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
    """A snapshot: state_dict()s alias live tensors that the next step would overwrite.

    GPU tensors are copied to pinned memory without blocking, so that hundreds of copies cost one wait.
    """
    if isinstance(value, torch.Tensor):
        if value.is_cuda:
            return torch.empty_like(value, device="cpu", pin_memory=True).copy_(value.detach(), non_blocking=True)
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {key: _detached_cpu_copy(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_detached_cpu_copy(item) for item in value)
    return value


def _configure_backends(device: torch.device) -> None:
    """Process-wide settings; a worker process runs one job at a time, so they are this run's own."""
    # Only ever fewer threads: more than the CPUs the host grants makes every parallel region wait for a
    # descheduled thread, while fewer may be an operator's choice (OMP_NUM_THREADS, a busy shared host).
    threads = host_cpus()
    if torch.get_num_threads() > threads:
        torch.set_num_threads(threads)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # input shapes are fixed: autotune each convolution once
        torch.set_float32_matmul_precision("high")  # TF32 for whatever autocast leaves in fp32


def host_cpus() -> int:
    """CPUs this process may use: its affinity mask, capped by a cgroup (container) quota.

    PyTorch's default counts the machine's cores, which oversubscribes a container given a few of them.
    """
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        quota, period = CGROUP_CPU_QUOTA.read_text().split()
        if quota != "max":
            cpus = min(cpus, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass  # no cgroup v2 quota here
    return cpus


def _fits_on_device(device: torch.device, tensors: tuple[torch.Tensor, ...]) -> bool:
    if device.type != "cuda":
        return True  # the CPU reads them where they are
    free, _total = torch.cuda.mem_get_info(device)
    return sum(tensor.nbytes for tensor in tensors) <= DATA_GPU_MEMORY_SHARE * free
