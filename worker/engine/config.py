"""Specs for models, inputs and jobs. Torch-free: the API validates with these same classes.

Every model forbids unknown fields and bounds every number, so a typo or an absurd value is a
422 with the field's name rather than a job that fails an hour later.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from worker.engine.catalog import SMALL_CNN, TORCHVISION_CLASSIFIERS

BUILTIN_DATASETS = ("digits",)


class Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class InputSpec(Spec):
    """The input the model was trained on; datasets are brought to exactly this."""

    image_size: int = Field(ge=8, le=1024, description="Square side in pixels fed to the model.")
    channels: Literal[1, 3] = 3
    mean: tuple[float, ...] = Field(default=(0.5,), description="Per channel, or one value for all.")
    std: tuple[float, ...] = Field(default=(0.5,))
    resize: Literal["resize", "resize_center_crop", "pad"] = Field(
        default="resize",
        description="resize: stretch to image_size; resize_center_crop: shorter side to image_size "
        "then center crop; pad: zero-pad to image_size (images must not be larger).",
    )

    @model_validator(mode="after")
    def _check_stats(self) -> InputSpec:
        for name in ("mean", "std"):
            values = getattr(self, name)
            if len(values) not in (1, self.channels):
                raise ValueError(f"{name} needs 1 or {self.channels} values, got {len(values)}")
        if any(s <= 0 for s in self.std):
            raise ValueError("std values must be positive")
        return self


class ArchSpec(Spec):
    """A torchvision classification model by name, or the project's small CNN family."""

    arch: str = Field(description=f"'{SMALL_CNN}' or a torchvision classification model name.")
    kwargs: dict[str, Any] = Field(default_factory=dict)
    input: InputSpec

    @field_validator("arch")
    @classmethod
    def _known(cls, arch: str) -> str:
        if arch != SMALL_CNN and arch not in TORCHVISION_CLASSIFIERS:
            raise ValueError(
                f"unknown architecture '{arch}': use '{SMALL_CNN}' or a torchvision classification "
                f"model such as resnet18, mobilenet_v3_small, efficientnet_b0"
            )
        return arch

    @model_validator(mode="after")
    def _check_kwargs(self) -> ArchSpec:
        num_classes = self.kwargs.get("num_classes")
        valid_int = isinstance(num_classes, int) and not isinstance(num_classes, bool)
        if not valid_int or not 2 <= num_classes <= 100_000:
            raise ValueError("kwargs.num_classes is required: an integer from 2 to 100000")
        if self.arch == SMALL_CNN:
            allowed = {"num_classes", "width", "depth", "in_channels", "dropout"}
            unknown = set(self.kwargs) - allowed
            if unknown:
                raise ValueError(f"unknown small_cnn kwargs {sorted(unknown)}; allowed: {sorted(allowed)}")
            width = self.kwargs.get("width", 16)
            if not isinstance(width, int) or not 1 <= width <= 512:
                raise ValueError("small_cnn width must be an integer from 1 to 512")
            depth = self.kwargs.get("depth", 3)
            if not isinstance(depth, int) or not 1 <= depth <= 6:
                raise ValueError("small_cnn depth must be an integer from 1 to 6")
            if self.kwargs.get("in_channels", self.input.channels) != self.input.channels:
                raise ValueError("small_cnn in_channels must equal input.channels")
        elif self.input.channels != 3:
            raise ValueError("torchvision models take 3-channel input: set input.channels to 3")
        return self

    @property
    def num_classes(self) -> int:
        return int(self.kwargs["num_classes"])


class StudentSpec(Spec):
    """The student: an architecture; its input spec is always the teacher's."""

    arch: str
    kwargs: dict[str, Any] = Field(default_factory=dict)


class DistillConfig(Spec):
    """Hyper-parameters of a distillation run (the engine's view; no ids, no tenants)."""

    epochs: int = Field(default=10, ge=1, le=1000)
    batch_size: int = Field(default=64, ge=1, le=4096)
    lr: float = Field(default=3e-3, gt=0, le=10)
    weight_decay: float = Field(default=1e-4, ge=0, le=1)
    temperature: float = Field(default=4.0, gt=0, le=100)
    alpha: Annotated[float, Field(ge=0, le=1, description="Weight of the KD term; 1-alpha weights CE.")] = 0.9
    optimizer: Literal["adamw", "sgd"] = "adamw"
    scheduler: Literal["cosine", "onecycle", "none"] = "cosine"
    val_fraction: float = Field(default=0.2, ge=0.05, le=0.5)
    seed: int = Field(default=0, ge=0, le=2**31 - 1)
    device: Literal["auto", "cpu", "cuda"] = "auto"


def check_dataset_fits(image_shape: list[int] | tuple[int, ...], input_spec: InputSpec) -> None:
    """Raise SpecError when images of shape (H, W, C) cannot be brought to the model's input."""
    from worker.engine.errors import SpecError

    height, width, channels = image_shape
    if channels != input_spec.channels and not (channels == 1 and input_spec.channels == 3):
        raise SpecError(
            f"the dataset has {channels}-channel images but the model takes {input_spec.channels} "
            f"channels; only grayscale to RGB is converted (by repeating the channel)"
        )
    if input_spec.resize == "pad" and max(height, width) > input_spec.image_size:
        raise SpecError(
            f"images are {height}x{width} but resize policy 'pad' cannot shrink them to "
            f"{input_spec.image_size}; use 'resize' or 'resize_center_crop'"
        )
