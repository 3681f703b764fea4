"""What every job kind loads first: its config, the input model (a distillation's teacher, the model to
prune or quantize otherwise), and the dataset's stratified split."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Generic, TypeVar

import torch
from pydantic import ValidationError
from torch import nn

from app.config import get_settings
from worker.engine import data, models
from worker.engine.config import ArchSpec, DistillConfig, InputSpec
from worker.engine.errors import SpecError

if TYPE_CHECKING:
    from worker.runner import JobContext

TensorPair = tuple[torch.Tensor, torch.Tensor]
ConfigT = TypeVar("ConfigT", bound=DistillConfig)


@dataclass(frozen=True)
class JobInputs(Generic[ConfigT]):
    config: ConfigT
    arch: ArchSpec  # the input model's
    model: nn.Module
    train: TensorPair
    val: TensorPair  # held out: evaluation only


def load(ctx: JobContext, config_type: type[ConfigT]) -> JobInputs[ConfigT]:
    """Everything a job starts from: its settings, the input model, the dataset split by its seed."""
    config = _job_config(ctx, config_type)
    arch, model = _load_input_model(ctx)
    train, val = _load_splits(ctx, config, arch.input)
    return JobInputs(config=config, arch=arch, model=model, train=train, val=val)


def _job_config(ctx: JobContext, config_type: type[ConfigT]) -> ConfigT:
    """The engine's view of the stored spec: only the fields `config_type` knows (the API stored more)."""
    try:
        return config_type(**{name: ctx.spec[name] for name in config_type.model_fields if name in ctx.spec})
    # The API validated this spec with the same class: only a version skew between API and worker gets here.
    except ValidationError as exc:
        raise SpecError(f"the job's stored settings do not validate: {models.describe_validation_error(exc)}") \
            from exc


def training_config(config: DistillConfig) -> DistillConfig:
    """The distill() settings inside a prune or quantize config (recovery fine-tuning, QAT)."""
    return DistillConfig(**config.model_dump(include=set(DistillConfig.model_fields)))


def _input_arch(ctx: JobContext) -> ArchSpec:
    return ArchSpec(arch=ctx.teacher.arch["arch"], kwargs=ctx.teacher.arch["kwargs"],
                    input=InputSpec(**ctx.teacher.input_spec))


def _load_input_model(ctx: JobContext) -> tuple[ArchSpec, nn.Module]:
    arch = _input_arch(ctx)
    # Read now, not at upload: a TorchScript model accepted while the setting was on stays unloadable once off.
    allow_code = get_settings().allow_code_checkpoints
    return arch, models.load_model(ctx.teacher.path, ctx.teacher.format, arch, allow_code=allow_code)


def _load_splits(ctx: JobContext, config: DistillConfig, input_spec: InputSpec) -> tuple[TensorPair, TensorPair]:
    """(train, val) by the job's seed and val_fraction; val is held out from training and calibration."""
    dataset = data.load_canonical(ctx.dataset_path) if ctx.dataset_path else data.load_builtin(ctx.spec["dataset"])
    return data.train_val_tensors(dataset, input_spec, config.val_fraction, config.seed)


def calibration_subset(train: TensorPair, count: int, seed: int) -> TensorPair:
    """`count` training images drawn by `seed` (all of them if there are fewer), in a fixed order, so
    that a retried job calibrates, and ranks channels, on exactly the same batch."""
    x, y = train
    chosen = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:count].sort().values
    return x[chosen], y[chosen]
