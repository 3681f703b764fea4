"""What every job kind loads first: its config, the input model (a distillation's teacher, the model to
prune or quantize otherwise), and the dataset's stratified split."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from core.settings import get_settings
from worker.engine import data, models
from worker.engine.config import ArchSpec, InputSpec
from worker.jobs.base import JobContext

TensorPair = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class JobInputs:
    arch: ArchSpec  # the input model's
    model: nn.Module
    train: TensorPair
    val: TensorPair  # held out: evaluation only


def load(ctx: JobContext[Any]) -> JobInputs:
    """Everything a job starts from: the input model, the dataset split by the spec's seed."""
    arch, model = _load_input_model(ctx)
    train, val = _load_splits(ctx, arch.input)
    return JobInputs(arch=arch, model=model, train=train, val=val)


def _input_arch(ctx: JobContext[Any]) -> ArchSpec:
    return ArchSpec(arch=ctx.teacher.arch["arch"], kwargs=ctx.teacher.arch["kwargs"],
                    input=InputSpec(**ctx.teacher.input_spec))


def _load_input_model(ctx: JobContext[Any]) -> tuple[ArchSpec, nn.Module]:
    arch = _input_arch(ctx)
    # Read now, not at upload: a TorchScript model accepted while the setting was on stays unloadable once off.
    allow_code = get_settings().allow_code_checkpoints
    return arch, models.load_model(ctx.teacher.path, ctx.teacher.format, arch, allow_code=allow_code)


def _load_splits(ctx: JobContext[Any], input_spec: InputSpec) -> tuple[TensorPair, TensorPair]:
    """(train, val) by the job's seed and val_fraction; val is held out from training and calibration."""
    dataset = data.load_canonical(ctx.dataset_path) if ctx.dataset_path else data.load_builtin(ctx.spec.dataset)
    return data.train_val_tensors(dataset, input_spec, ctx.spec.val_fraction, ctx.spec.seed)


def calibration_subset(train: TensorPair, count: int, seed: int) -> TensorPair:
    """`count` training images drawn by `seed` (all of them if there are fewer), in a fixed order, so
    that a retried job calibrates, and ranks channels, on exactly the same batch."""
    x, y = train
    chosen = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:count].sort().values
    return x[chosen], y[chosen]
