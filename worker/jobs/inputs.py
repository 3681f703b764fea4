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
from worker.jobs.base import JobContext, ModelSource

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
    arch, model = load_model(ctx.teacher)
    images = split_images(ctx, ctx.spec.dataset, ctx.spec.eval_dataset)
    return JobInputs(arch=arch, model=model, train=tensors(images.train, arch.input),
                     val=tensors(images.val, arch.input), evaluation=tensors(images.evaluation, arch.input),
                     evaluation_source=images.evaluation_source)


@dataclass(frozen=True)
class SplitImages:
    """A dataset's images split by the job's seed and val_fraction, before any model's preprocessing, so that
    models with different input specs each see them their own way."""

    train: data.ArrayDataset
    val: data.ArrayDataset  # held out from training: progress and the choices made while training
    evaluation: data.ArrayDataset  # what every reported accuracy is measured on: eval_dataset if given, else val
    evaluation_source: dict[str, Any]  # which of the two, in words, for the summary and the report


def split_images(ctx: JobContext[Any], dataset_name: str, eval_name: str | None) -> SplitImages:
    dataset = _dataset(ctx, dataset_name)
    train_idx, val_idx = data.stratified_split(dataset.y, ctx.spec.val_fraction, ctx.spec.seed)
    train, val = _subset(dataset, train_idx), _subset(dataset, val_idx)
    if eval_name is None:
        return SplitImages(train, val, val, {"source": "split", "dataset": dataset_name, "samples": len(val.y),
                                             "note": SPLIT_NOTE.format(samples=len(val.y))})
    evaluation = _dataset(ctx, eval_name)
    return SplitImages(train, val, evaluation, {
        "source": "eval_dataset", "dataset": eval_name, "samples": len(evaluation.y),
        "note": EVAL_DATASET_NOTE.format(name=eval_name, samples=len(evaluation.y))})


def tensors(images: data.ArrayDataset, input_spec: InputSpec) -> TensorPair:
    """Images as a model with `input_spec` takes them, with their labels."""
    return data.to_model_input(images.x, input_spec), torch.from_numpy(images.y)


def _subset(dataset: data.ArrayDataset, indices: Any) -> data.ArrayDataset:
    return data.ArrayDataset(dataset.x[indices], dataset.y[indices], dataset.class_names)


def _dataset(ctx: JobContext[Any], name: str) -> data.ArrayDataset:
    """The dataset the spec names `name` (the runner found its file; a built-in has none)."""
    path = ctx.dataset_paths.get(name, _legacy_path(ctx, name))
    return data.load_canonical(path) if path else data.load_builtin(name)


def _legacy_path(ctx: JobContext[Any], name: str) -> Path | None:
    # Contexts built without dataset_paths (engine-level callers such as bench/quality.py) name only these two.
    return ctx.dataset_path if name == ctx.spec.dataset else ctx.eval_dataset_path


def load_model(source: ModelSource) -> tuple[ArchSpec, nn.Module]:
    """A stored model, rebuilt from its spec."""
    arch = ArchSpec.from_stored(source.arch, source.input_spec)
    # Read now, not at upload: a TorchScript model accepted while the setting was on stays unloadable once off.
    allow_code = get_settings().allow_code_checkpoints
    return arch, models.load_model(source.path, source.format, arch, allow_code=allow_code)


def calibration_subset(train: TensorPair, count: int, seed: int) -> TensorPair:
    """`count` training images drawn by `seed` (all of them if there are fewer), in a fixed order, so
    that a retried job calibrates, and ranks channels, on exactly the same batch."""
    x, y = train
    chosen = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:count].sort().values
    return x[chosen], y[chosen]
