"""What every job kind loads first: its config, the input model (a distillation's teacher, the model to
prune or quantize otherwise), and the dataset's stratified split."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from core.settings import get_settings
from worker.engine import data, models
from worker.engine.config import ArchSpec, InputSpec
from worker.jobs.base import JobContext

TensorPair = tuple[torch.Tensor, torch.Tensor]


SPLIT_NOTE = ("accuracies are measured on a held-out split of the uploaded dataset ({samples} images); the input "
              "model may have been trained on these images, which makes its accuracy, and drops measured against "
              "it, look better than on new images: give eval_dataset (images no model has seen) for unbiased figures")
EVAL_DATASET_NOTE = ("accuracies are measured on eval_dataset {name} ({samples} images), which the job neither trained "
                     "nor calibrated on; the held-out split of the training dataset only drove progress and choices "
                     "made during training")


@dataclass(frozen=True)
class JobInputs:
    arch: ArchSpec  # the input model's
    model: nn.Module
    train: TensorPair
    val: TensorPair  # held out from training: progress and the choices made while training
    evaluation: TensorPair  # what every reported accuracy is measured on: eval_dataset if given, else val
    evaluation_source: dict[str, Any]  # which of the two, in words, for the summary and the report


def load(ctx: JobContext[Any]) -> JobInputs:
    """Everything a job starts from: the input model, the dataset split by the spec's seed, the evaluation set."""
    arch, model = _load_input_model(ctx)
    train, val = _load_splits(ctx, arch.input)
    evaluation, source = _evaluation(ctx, arch.input, val)
    return JobInputs(arch=arch, model=model, train=train, val=val, evaluation=evaluation, evaluation_source=source)


def _evaluation(ctx: JobContext[Any], input_spec: InputSpec, val: TensorPair) -> tuple[TensorPair, dict[str, Any]]:
    name = ctx.spec.eval_dataset
    if name is None:
        return val, {"source": "split", "dataset": ctx.spec.dataset, "samples": len(val[1]),
                     "note": SPLIT_NOTE.format(samples=len(val[1]))}
    dataset = _dataset(ctx.eval_dataset_path, name)
    evaluation = data.to_model_input(dataset.x, input_spec), torch.from_numpy(dataset.y)
    return evaluation, {"source": "eval_dataset", "dataset": name, "samples": len(dataset.y),
                        "note": EVAL_DATASET_NOTE.format(name=name, samples=len(dataset.y))}


def _dataset(path: Path | None, builtin_name: str) -> data.ArrayDataset:
    return data.load_canonical(path) if path else data.load_builtin(builtin_name)


def _input_arch(ctx: JobContext[Any]) -> ArchSpec:
    return ArchSpec.from_stored(ctx.teacher.arch, ctx.teacher.input_spec)


def _load_input_model(ctx: JobContext[Any]) -> tuple[ArchSpec, nn.Module]:
    arch = _input_arch(ctx)
    # Read now, not at upload: a TorchScript model accepted while the setting was on stays unloadable once off.
    allow_code = get_settings().allow_code_checkpoints
    return arch, models.load_model(ctx.teacher.path, ctx.teacher.format, arch, allow_code=allow_code)


def _load_splits(ctx: JobContext[Any], input_spec: InputSpec) -> tuple[TensorPair, TensorPair]:
    """(train, val) by the job's seed and val_fraction; val is held out from training and calibration."""
    dataset = _dataset(ctx.dataset_path, ctx.spec.dataset)
    return data.train_val_tensors(dataset, input_spec, ctx.spec.val_fraction, ctx.spec.seed)


def calibration_subset(train: TensorPair, count: int, seed: int) -> TensorPair:
    """`count` training images drawn by `seed` (all of them if there are fewer), in a fixed order, so
    that a retried job calibrates, and ranks channels, on exactly the same batch."""
    x, y = train
    chosen = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:count].sort().values
    return x[chosen], y[chosen]
