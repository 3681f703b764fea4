"""Specs for models, inputs and jobs. Torch-free: the API validates with these same classes.

Every model forbids unknown fields and bounds every number, so a typo or an absurd value is a
422 with the field's name rather than a job that fails an hour later.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Annotated, Any, Literal, Self

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictInt, field_validator, model_validator

from worker.engine.catalog import SMALL_CNN, TORCHVISION_CLASSIFIERS

BUILTIN_DATASETS = ("digits", "photo-patches", "shapes")

WeightsFormat = Literal["safetensors", "state_dict", "torchscript", "pt2"]
# Plain tensors: read without running anything from the file (safetensors, torch.load with weights_only).
TENSOR_FORMATS: tuple[str, ...] = ("safetensors", "state_dict")
# TorchScript programs and torch.export archives carry code: read only where a server setting allows it.
CODE_FORMATS: tuple[str, ...] = ("torchscript", "pt2")


class Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    def replace(self, **changes: Any) -> Self:
        """A validated copy with `changes` (flat fields of nested configs included), unlike model_copy."""
        return type(self).model_validate({**self.model_dump(), **changes})


# Constructor arguments are passed on to torchvision as they are: plain values only, and numbers small
# enough that no argument alone can ask for a model that fills the worker's memory (num_classes, checked
# on its own, may go higher).
_MAX_KWARGS = 32
_MAX_KWARG_NUMBER = 4096
_MAX_KWARG_TEXT = 200
_MAX_KWARG_LIST = 64


def _check_model_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    if len(kwargs) > _MAX_KWARGS:
        raise ValueError(f"at most {_MAX_KWARGS} kwargs")
    for name, value in kwargs.items():
        items = value if isinstance(value, list) else [value]
        if len(items) > _MAX_KWARG_LIST or not all(_plain_bounded(item, name) for item in items):
            raise ValueError(f"kwargs.{name} must be a number from -{_MAX_KWARG_NUMBER} to {_MAX_KWARG_NUMBER}, "
                             f"a boolean, null, a string of up to {_MAX_KWARG_TEXT} characters, or a list of up to "
                             f"{_MAX_KWARG_LIST} of those")
    return kwargs


def _plain_bounded(value: Any, name: str) -> bool:
    if value is None or isinstance(value, bool):
        return True
    if isinstance(value, int | float):
        return name == "num_classes" or abs(value) <= _MAX_KWARG_NUMBER
    return isinstance(value, str) and len(value) <= _MAX_KWARG_TEXT


ModelKwargs = Annotated[dict[str, Any], AfterValidator(_check_model_kwargs)]


# Normalization statistics of images scaled to [0, 1] (or 0-255 by some conventions): finite and modest.
_Statistic = Annotated[float, Field(ge=-1000, le=1000)]


class InputSpec(Spec):
    """The input the model was trained on; datasets are brought to exactly this."""

    image_size: int = Field(ge=8, le=1024, description="Square side in pixels fed to the model.")
    channels: Literal[1, 3] = 3
    mean: tuple[_Statistic, ...] = Field(default=(0.5,), max_length=3, description="Per channel, or one value for all.")
    std: tuple[_Statistic, ...] = Field(default=(0.5,), max_length=3)
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


# A structurally pruned model's record of resized layers (worker.engine.resize): bounded, so that a spec alone
# cannot name more layers than any catalog model has, nor ask for absurd channel counts.
MAX_PRUNED_LAYERS = 4096
MAX_PRUNED_CHANNELS = 100_000
PRUNED_SHAPES_FORMAT = ("Conv2d: [out_channels, in_channels, groups]; Linear: [out_features, in_features]; "
                        "BatchNorm2d: [num_features]")
LayerName = Annotated[str, Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9_.]+$")]
LayerShape = Annotated[list[Annotated[StrictInt, Field(ge=1, le=MAX_PRUNED_CHANNELS)]],
                       Field(min_length=1, max_length=3)]

# A multi-head model's tasks: each name is a key of its outputs (TorchScript dict, ONNX output names), so an
# identifier; core.jobspec names the tasks of a multi-task distillation with the same pattern and bound.
TASK_NAME_PATTERN = r"^[a-z][a-z0-9_]{0,31}$"
MAX_TASKS = 8
TaskName = Annotated[str, Field(pattern=TASK_NAME_PATTERN)]
HeadClasses = Annotated[StrictInt, Field(ge=2, le=100_000)]
MULTI_HEAD_UNSUPPORTED = ("pruning, quantizing and distilling from multi-head models are not supported: use a "
                          "single-task model")


def framework_of(arch: str) -> str:
    """Where the architecture's constructor lives, as the spec documents this service writes name it."""
    return "condenser.small_cnn" if arch == SMALL_CNN else "torchvision"


class ArchSpec(Spec):
    """A torchvision classification model by name, or the project's small CNN family; structurally pruned when
    pruned_shapes resizes some of its layers."""

    arch: str = Field(description=f"'{SMALL_CNN}' or a torchvision classification model name.")
    kwargs: ModelKwargs = Field(default_factory=dict)
    input: InputSpec
    pruned_shapes: Annotated[dict[LayerName, LayerShape], Field(max_length=MAX_PRUNED_LAYERS)] | None = Field(
        default=None, description="Layers of a structurally pruned model, by module name, and their sizes "
        f"({PRUNED_SHAPES_FORMAT}): the architecture is built, then these layers are replaced by ones of these "
        "sizes. As a prune job's pruned.arch.json records them; null (or empty) for an unpruned model.")
    heads: Annotated[dict[TaskName, HeadClasses], Field(min_length=1, max_length=MAX_TASKS)] | None = Field(
        default=None, description="A multi-head model (multi-task distillation): task name -> classes. The "
        "architecture's final Linear layer is removed and what fed it (the shared backbone's features) feeds one "
        "Linear head per task, named heads.<task>; the model returns a dict of each task's logits, in this order. "
        "kwargs.num_classes is the first task's. Null for a model with one output.")

    @classmethod
    def from_stored(cls, arch: dict[str, Any], input_spec: dict[str, Any]) -> ArchSpec:
        """The spec of a stored model: its arch column (stored_arch()) and its input spec column."""
        return cls(arch=arch["arch"], kwargs=arch["kwargs"], pruned_shapes=arch.get("pruned_shapes"),
                   heads=arch.get("heads"), input=InputSpec.model_validate(input_spec))

    @classmethod
    def from_document(cls, document: Any) -> ArchSpec:
        """The spec in a document as users hold it, this service's own .arch.json files included (ArchSpecDocument)."""
        return ArchSpecDocument.model_validate(document).arch_spec()

    def stored_arch(self) -> dict[str, Any]:
        """What a model's arch column holds: the architecture, and a pruned one's resized layers."""
        stored: dict[str, Any] = {"arch": self.arch, "kwargs": self.kwargs}
        if self.pruned_shapes is not None:
            stored["pruned_shapes"] = self.pruned_shapes
        if self.heads is not None:
            stored["heads"] = self.heads
        return stored

    @field_validator("pruned_shapes")
    @classmethod
    def _none_when_empty(cls, shapes: dict[str, list[int]] | None) -> dict[str, list[int]] | None:
        # An unstructured prune's record is empty: the same model as no record at all, and stored the same.
        return shapes or None

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
        if self.heads is not None:
            self._check_heads(num_classes)
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

    def _check_heads(self, num_classes: int) -> None:
        first_task, first_classes = next(iter(self.heads.items()))
        if num_classes != first_classes:
            raise ValueError(f"kwargs.num_classes is {num_classes} but the first head, '{first_task}', has "
                             f"{first_classes} classes: a multi-head spec's num_classes is its first head's")
        if self.pruned_shapes is not None:
            raise ValueError(f"a multi-head model cannot have pruned_shapes: {MULTI_HEAD_UNSUPPORTED}")

    @property
    def num_classes(self) -> int:
        """Of the model's one output; a multi-head model's first head's (see heads)."""
        return int(self.kwargs["num_classes"])


# Keys of the spec documents this service writes (export.arch_spec_document) that only explain the file to a
# reader: accepted in an uploaded spec, and dropped.
DOCUMENT_ONLY_KEYS = ("framework", "how_to_load", "pruned_shapes_format")
QUANTIZED_SPEC_REFUSAL = (
    "this is a quantize job's quantized.json (it has a 'quantization' key): int8 files cannot be uploaded as a "
    "model; upload the float model's safetensors with its arch spec (the spec of the quantize job's input model, or "
    "a distill or prune job's student.arch.json / pruned.arch.json)")


class ArchSpecDocument(ArchSpec):
    """An architecture spec as users hold it: a plain ArchSpec, or one of this service's own spec documents as it
    is (student.arch.json, pruned.arch.json), whose documentation-only keys are checked and dropped. ArchSpec
    itself stays strict: a job spec with an unexpected key is a typo."""

    framework: Literal["condenser.small_cnn", "torchvision"] | None = None
    how_to_load: str | None = Field(default=None, max_length=20_000)
    pruned_shapes_format: str | None = Field(default=None, max_length=1000)

    @model_validator(mode="before")
    @classmethod
    def _refuse_quantized(cls, data: Any) -> Any:
        if isinstance(data, dict) and "quantization" in data:
            raise ValueError(QUANTIZED_SPEC_REFUSAL)
        return data

    @model_validator(mode="after")
    def _check_framework(self) -> ArchSpecDocument:
        expected = framework_of(self.arch)
        if self.framework is not None and self.framework != expected:
            raise ValueError(f"framework '{self.framework}' does not match arch '{self.arch}', whose framework is "
                             f"'{expected}'; correct one of them, or leave framework out")
        return self

    def arch_spec(self) -> ArchSpec:
        return ArchSpec.model_validate(self.model_dump(exclude=set(DOCUMENT_ONLY_KEYS)))


class StudentSpec(Spec):
    """The student: an architecture; its input spec is the (first) teacher's unless given."""

    arch: str = Field(max_length=100)
    kwargs: ModelKwargs = Field(default_factory=dict)
    input: InputSpec | None = Field(
        default=None, description="How the student sees images; by default the (first) teacher's input spec. With "
        "several teachers each teacher still sees every image preprocessed its own way.")


def flat_field_names(config_type: type[Spec]) -> set[str]:
    """The names a config's fields may be given by at the top level: its own, and those of its nested configs."""
    names = set(config_type.model_fields)
    for field in config_type.model_fields.values():
        for candidate in (field.annotation, *getattr(field.annotation, "__args__", ())):
            if isinstance(candidate, type) and issubclass(candidate, Spec):
                names |= flat_field_names(candidate)
    return names


def nest_flat_fields(data: Any, name: str, config_type: type[Spec],
                     defaults: dict[str, Any] | None = None) -> tuple[Any, list[str]]:
    """`data` with the fields of its nested config `name` that were given at the top level (`{"epochs": 3}` for
    `{"training": {"epochs": 3}}`) moved into it, over what was given nested, over `defaults` (this use's own
    defaults of the nested config): the flat form that API bodies, the stored specs of earlier versions and engine
    callers use. Returns (data, the names moved)."""
    if not isinstance(data, dict):
        return data, []
    lifted = dict(data)
    moved = {field: lifted.pop(field) for field in flat_field_names(config_type) - {name} if field in lifted}
    inner = lifted.get(name, ...)
    if isinstance(inner, Spec):  # an engine caller's config object: its fields, under the flat ones
        inner = inner.model_dump()
    if inner is None and moved:
        raise ValueError(f"{name} is null, which skips it, but {', '.join(sorted(moved))} configure it; remove one")
    if isinstance(inner, dict) or (inner is ... and (moved or defaults)):
        base = config_type.model_validate(defaults).model_dump() if defaults else {}
        lifted[name] = {**_merged(base, {} if inner is ... else inner), **moved}
    return lifted, sorted(moved)


def _merged(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """`override` over `base`, nested dicts merged key by key."""
    merged = dict(base)
    for key, value in override.items():
        both_dicts = isinstance(value, dict) and isinstance(merged.get(key), dict)
        merged[key] = _merged(merged[key], value) if both_dicts else value
    return merged


def multi_head_refusal(tasks: Any, use: str) -> str:
    """Why `use` (say "cannot prune") refuses a model with one head per task in `tasks`."""
    return f"{use}: the model has one head per task ({', '.join(tasks)}); {MULTI_HEAD_UNSUPPORTED}"


def refuse_multi_head(arch: ArchSpec, use: str) -> None:
    """Raise SpecError when `arch` is a multi-head model, which `use` (e.g. "cannot prune", "teacher 2") cannot
    take: what a job's input model is checked with, at the API (a 422) and on the worker."""
    from worker.engine.errors import SpecError

    if arch.heads is not None:
        raise SpecError(multi_head_refusal(arch.heads, use))


def multitask_student_arch(student: StudentSpec, heads: dict[str, int], input: InputSpec) -> ArchSpec:
    """A multi-task student's full spec: its own architecture and kwargs, one head per task (task name -> the
    task's classes, in the tasks' order) and `input` (its own, or its first teacher's). Raises SpecError when it
    declares num_classes, which each task's dataset decides, ValidationError when the rest does not validate."""
    from worker.engine.errors import SpecError

    if "num_classes" in student.kwargs:
        raise SpecError("student.kwargs.num_classes does not apply to a multi-task student: each task's head has "
                        "the classes of its dataset; omit it")
    first_classes = next(iter(heads.values()), None)
    return ArchSpec(arch=student.arch, kwargs={**student.kwargs, "num_classes": first_classes}, input=input,
                    heads=heads)


def student_arch(student: StudentSpec, teacher: ArchSpec, teacher_name: str = "the teacher") -> ArchSpec:
    """The student's full spec: its own architecture, kwargs and input (the teacher's unless it gives one), the
    teacher's classes. Raises SpecError
    when it declares other classes, ValidationError when the rest does not validate."""
    from worker.engine.errors import SpecError

    declared = student.kwargs.get("num_classes", teacher.num_classes)
    if declared != teacher.num_classes:
        raise SpecError(f"student.kwargs.num_classes is {declared} but {teacher_name} predicts "
                        f"{teacher.num_classes} classes; omit it to use the teacher's")
    return ArchSpec(arch=student.arch, kwargs={**student.kwargs, "num_classes": teacher.num_classes},
                    input=student.input or teacher.input)


# Each optimizer's lr and weight decay where they are not given: a good lr for one is far off for the other.
OPTIMIZER_DEFAULTS: dict[str, dict[str, float]] = {
    "sgd": {"lr": 0.05, "weight_decay": 5e-4},
    "adamw": {"lr": 3e-3, "weight_decay": 1e-4},
}


class TrainingConfig(Spec):
    """The training loop: optimizer, schedule, batches, augmentation. (The seed and the device belong to the
    run, not the recipe: distill() takes them as arguments.) The defaults are those under which distillation
    beat training the student alone on photo-patches (README, "Why these defaults")."""

    epochs: int = Field(default=20, ge=1, le=1000)
    batch_size: int = Field(default=64, ge=1, le=4096)
    lr: float = Field(default=OPTIMIZER_DEFAULTS["sgd"]["lr"], gt=0, le=10, description="Peak learning rate; "
                      f"by default {OPTIMIZER_DEFAULTS['sgd']['lr']:g} with sgd, "
                      f"{OPTIMIZER_DEFAULTS['adamw']['lr']:g} with adamw.")
    weight_decay: float = Field(default=OPTIMIZER_DEFAULTS["sgd"]["weight_decay"], ge=0, le=1,
                                description=f"By default {OPTIMIZER_DEFAULTS['sgd']['weight_decay']:g} with sgd, "
                                f"{OPTIMIZER_DEFAULTS['adamw']['weight_decay']:g} with adamw.")
    optimizer: Literal["adamw", "sgd"] = Field(default="sgd", description="sgd: Nesterov momentum 0.9.")
    scheduler: Literal["cosine", "onecycle", "none"] = "onecycle"
    augment: Literal["auto", "none", "crop", "crop_flip"] = Field(
        default="auto", description="Random augmentation on the device, per step: crop shifts each image by up to "
        "1/8 of its side (reflect padding), crop_flip also mirrors half of them left-right (not for digits or "
        "text). auto: crop_flip on the built-ins whose images mean the same mirrored (photo-patches, shapes), "
        "crop on any other dataset (digits, and uploads, which may hold text: give crop_flip for photographs); a "
        "job's stored spec says which ran. With augmentation the teacher runs every step; without it its logits "
        "are computed once.")
    compile: Literal["auto", "on", "off"] = Field(
        default="auto", description="torch.compile the student. auto: on CUDA for runs of at least 1000 steps "
        "(compiling takes tens of seconds, then each step is faster); never on CPU, where the warm-up dominates.")

    @model_validator(mode="before")
    @classmethod
    def _optimizer_defaults(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        optimizer = data.get("optimizer", cls.model_fields["optimizer"].default)
        # Not a name (such as {} or a list): no defaults to add; the field's own validation says what is wrong.
        defaults = OPTIMIZER_DEFAULTS.get(optimizer, {}) if isinstance(optimizer, str) else {}
        return {**defaults, **data}


# Built-ins whose images mean the same mirrored left-right (photographs, drawn shapes): augment "auto" flips them.
MIRRORABLE_BUILTINS = ("photo-patches", "shapes")


def auto_augment(datasets: Iterable[str]) -> Literal["crop", "crop_flip"]:
    """What augment "auto" means for training on these datasets (built-in names or upload ids): crop_flip when
    every one is a mirrorable built-in; crop otherwise, since a mirrored digit or letter may change class."""
    return "crop_flip" if all(name in MIRRORABLE_BUILTINS for name in datasets) else "crop"


def resolved_training(training: TrainingConfig, datasets: Iterable[str]) -> TrainingConfig:
    """`training` with augment "auto" made what it means for these datasets (auto_augment)."""
    return training.replace(augment=auto_augment(datasets)) if training.augment == "auto" else training


class FeatureHint(Spec):
    """A feature-based distillation term (FitNets hints): a student layer's output, through a learned 1x1
    adapter, regresses a teacher layer's output."""

    teacher_layer: str = Field(min_length=1, max_length=200, description="Module name in the (first) teacher, "
                               "as named by model.named_modules(), e.g. 'features.2' or 'layer3'.")
    student_layer: str = Field(min_length=1, max_length=200, description="Module name in the student.")
    weight: float = Field(default=1.0, ge=0, le=1000, description="Weight of the hint term, added to the KD loss.")


class DistillConfig(Spec):
    """Distillation: by default Hinton's loss, alpha * KL(softmax(t/T) || softmax(s/T)) * T^2 + (1 - alpha) * CE,
    minimised by a training loop. Training fields may also be given flat (`DistillConfig(epochs=3)`)."""

    temperature: float = Field(default=4.0, gt=0, le=100)
    alpha: Annotated[float, Field(ge=0, le=1, description="Weight of the KD term; 1-alpha weights CE (half by "
                                  "default: the student learns from the labels where the teacher is wrong).")] = 0.5
    loss: Literal["kd", "dkd", "kd_ls", "feature"] = Field(
        default="kd", description="kd: Hinton et al. 2015. dkd: decoupled KD (Zhao et al. 2022), target and "
        "non-target terms weighted by dkd_alpha and dkd_beta. kd_ls: KD on z-score standardised logits (Sun et al. "
        "2024). feature: kd plus a FitNets hint (Romero et al. 2015) from `feature`.")
    dkd_alpha: float = Field(default=1.0, ge=0, le=100, description="DKD: weight of the target-class term (TCKD).")
    dkd_beta: float = Field(default=8.0, ge=0, le=100, description="DKD: weight of the non-target term (NCKD).")
    feature: FeatureHint | None = Field(default=None, description="The layers of loss 'feature'.")
    teacher_weighting: Literal["fixed", "confidence", "label_loss"] = Field(
        default="fixed", description="With several teachers, how their tempered probabilities are averaged: fixed "
        "(each teacher's weight), confidence (per image, weight x the teacher's top probability), label_loss (per "
        "image, weight x softmax over teachers of minus their cross-entropy on the true label).")
    training: TrainingConfig = Field(default_factory=TrainingConfig)

    @model_validator(mode="before")
    @classmethod
    def _nest_training(cls, data: Any) -> Any:
        return nest_flat_fields(data, "training", TrainingConfig)[0]

    @model_validator(mode="after")
    def _feature_with_its_loss(self) -> DistillConfig:
        if (self.loss == "feature") != (self.feature is not None):
            raise ValueError("loss 'feature' needs `feature` (teacher_layer, student_layer), and `feature` needs "
                             "loss 'feature'; set both or neither")
        return self


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


# The training loop's defaults before they were measured for distillation (README, "Why these defaults"): AdamW,
# cosine decay, the images as they are. Fine-tuning a model that starts trained (prune recovery, QAT: a few epochs
# at a low lr) keeps it, and alpha 0.9, as do the recipes and tests whose numbers were measured with it.
ADAMW_LOOP: dict[str, Any] = {"optimizer": "adamw", "scheduler": "cosine", "augment": "none"}
RECOVERY_DEFAULTS: dict[str, Any] = {**ADAMW_LOOP, "alpha": 0.9, "epochs": 3, "lr": 1e-3}
QAT_DEFAULTS: dict[str, Any] = {**ADAMW_LOOP, "alpha": 0.9, "epochs": 2, "lr": 1e-4}
_STRUCTURED_DEFAULTS: dict[str, Any] = {"importance": "magnitude", "iterative_steps": 1, "global_pruning": False}


class PruneConfig(Spec):
    """Pruning, then recovery fine-tuning (`recovery`) with the unpruned model as the distillation teacher.

    structured: whole channels removed with Torch-Pruning (the model gets really smaller and faster);
    unstructured: single weights zeroed by global magnitude (sparsity only: dense latency does not change).
    """

    method: Literal["structured", "unstructured"] = "structured"
    importance: Literal["magnitude", "taylor", "lamp"] | None = Field(
        default=None, description="How channels are ranked (structured; default magnitude): L2 magnitude, "
        "first-order Taylor (gradient x weight on the calibration batch) or LAMP.")
    channel_ratio: float | None = Field(
        default=None, gt=0, le=0.9, description="Fraction of each layer's channels removed (structured).")
    target_macs_reduction: float | None = Field(
        default=None, gt=1, le=50, description="Prune until the model needs this many times fewer MACs, "
        "e.g. 2.0 (structured; instead of channel_ratio).")
    sparsity: float | None = Field(
        default=None, gt=0, le=0.99, description="Fraction of the weights zeroed (unstructured).")
    iterative_steps: int | None = Field(
        default=None, ge=1, le=32, description="Prune in this many equal steps (structured; default 1).")
    global_pruning: bool | None = Field(
        default=None, description="Rank channels across layers instead of removing channel_ratio of each "
        "(structured; default false).")
    round_to: int | None = Field(
        default=None, ge=2, le=128, description="Keep channel counts multiples of this (faster kernels).")
    keep_layers: tuple[Annotated[str, Field(min_length=1, max_length=200)], ...] = Field(
        default=(), max_length=512, description="Module names whose output channels are never pruned; the "
        "classifier is always kept.")
    calibration_samples: int = Field(
        default=128, ge=1, le=4096, description="Training images used to rank channels (taylor needs gradients).")
    recovery: DistillConfig | None = Field(
        default_factory=lambda: DistillConfig(**RECOVERY_DEFAULTS), description="Recovery fine-tuning, distilled "
        f"from the unpruned model (defaults {RECOVERY_DEFAULTS}: a lower lr than a distillation's, since the pruned "
        "weights start trained); null, or epochs 0, skips it. Its fields may be given flat.")

    @model_validator(mode="before")
    @classmethod
    def _nest_and_default(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        if data.get("epochs") == 0:
            # The flat way of saying "no fine-tuning", which has always let the other training fields be (unused).
            ignored = flat_field_names(DistillConfig)
            data = {**{name: value for name, value in data.items() if name not in ignored}, "recovery": None}
        data = nest_flat_fields(data, "recovery", DistillConfig, RECOVERY_DEFAULTS)[0]
        if data.get("method", "structured") == "structured":
            # Filled here, so that the stored spec says what ran; unstructured refuses them (below).
            data = {**data, **{name: default for name, default in _STRUCTURED_DEFAULTS.items()
                               if data.get(name) is None}}
        return data

    @model_validator(mode="after")
    def _check_method(self) -> PruneConfig:
        if self.method == "structured":
            if (self.channel_ratio is None) == (self.target_macs_reduction is None):
                raise ValueError("structured pruning needs exactly one of channel_ratio (e.g. 0.5: half of each "
                                 "layer's channels removed) or target_macs_reduction (e.g. 2.0)")
            _refuse_given(self, ("sparsity",), "method 'unstructured'")
        else:
            if self.sparsity is None:
                raise ValueError("unstructured pruning needs sparsity, e.g. 0.5: half of the weights zeroed")
            _refuse_given(self, ("channel_ratio", "target_macs_reduction", "importance", "global_pruning",
                                 "round_to", "iterative_steps"), "method 'structured'")
        return self


class QuantizeConfig(Spec):
    """int8 quantization: dynamic (Linear layers), static post-training (calibrated), or quantization-aware
    training (distilled from the float model, with the settings in `qat`)."""

    method: Literal["dynamic", "static", "qat"] = Field(
        default="static", description="dynamic: Linear weights int8, activations quantized on the fly; static: "
        "weights and activations int8, calibrated on training images; qat: static, fine-tuned with fake "
        "quantization.")
    backend: Literal["x86", "qnnpack"] = Field(
        default="x86", description="The CPU the model will run on: x86 (fbgemm/oneDNN) or ARM (qnnpack).")
    calibration_samples: int | None = Field(
        default=None, ge=1, le=10_000, description="Training images used to calibrate activation ranges (static "
        "and qat; default 256).")
    qat: DistillConfig | None = Field(
        default=None, description=f"Quantization-aware training (method qat only; defaults {QAT_DEFAULTS}): "
        "fake-quantized fine-tuning distilled from the float model. Its fields may be given flat.")

    @model_validator(mode="before")
    @classmethod
    def _nest_and_default(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        method = data.get("method", "static")
        lifted, moved = nest_flat_fields(data, "qat", DistillConfig, QAT_DEFAULTS if method == "qat" else None)
        if moved and method != "qat":
            raise ValueError(f"{', '.join(moved)} only apply to method 'qat'; remove them or change method")
        if method != "dynamic" and lifted.get("calibration_samples") is None:
            lifted = {**lifted, "calibration_samples": 256}
        return lifted

    @model_validator(mode="after")
    def _check_method(self) -> QuantizeConfig:
        if self.method == "dynamic":
            _refuse_given(self, ("calibration_samples",), "methods 'static' and 'qat'")
        if self.method != "qat":
            _refuse_given(self, ("qat",), "method 'qat'")
        elif self.qat is not None and self.qat.training.compile == "on":
            raise ValueError("compile 'on' is not available with method 'qat': fake quantization trains eagerly")
        return self


def _refuse_given(config: Spec, fields: tuple[str, ...], applies_to: str) -> None:
    """A field set for a method that ignores it is a misunderstanding worth a 422, not a silent no-op."""
    given = [name for name in fields if getattr(config, name) is not None]
    if given:
        raise ValueError(f"{', '.join(given)} only apply to {applies_to}; remove them or change method")
