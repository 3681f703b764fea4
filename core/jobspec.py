"""The typed job spec: one class per kind, parsed once at the API, stored with every default filled in, and read
back by the worker into the same class.

Each spec *contains* the engine's config for its kind (DistillConfig, PruneConfig, QuantizeConfig) next to what
every job has (its data split, seed, device and time limit). Request bodies may give the configs' fields flat, at
the top level (`{"kind": "prune", "channel_ratio": 0.5, "epochs": 2}`), as the API has always taken them; the
stored spec is nested. Specs stored by earlier versions (flat, with every field filled in) load through
`load_stored`.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field, TypeAdapter, model_validator

from worker.engine.config import (
    BUILTIN_DATASETS,
    MAX_TASKS,
    TASK_NAME_PATTERN,
    DistillConfig,
    PruneConfig,
    QuantizeConfig,
    Spec,
    StudentSpec,
    auto_augment,
    flat_field_names,
    nest_flat_fields,
)

MODEL_ID_EXAMPLE = "mdl_4f0c2a9e1b7d3c5a6e8f0b1d"


def _dataset_field(purpose: str) -> Any:
    return Field(
        min_length=1, max_length=64,
        description=f"Id of an uploaded dataset (dst_...) or a built-in name ({', '.join(BUILTIN_DATASETS)}), "
        f"for {purpose}. Its classes must be the model's classes; the held-out part (val_fraction, seed) is "
        "used only for evaluation.",
        examples=["digits"],
    )


def _model_field(role: str) -> Any:
    return Field(min_length=1, max_length=64, description=f"Id of an uploaded model (mdl_...): {role}.",
                 examples=[MODEL_ID_EXAMPLE])


class JobSpecBase(Spec):
    """What every kind of job has: its dataset and the split it evaluates on, its seed, device and time limit."""

    dataset: str = _dataset_field("the job")
    val_fraction: float = Field(default=0.2, ge=0.05, le=0.5, description="Share of the dataset held out "
                                "(stratified, by seed) for evaluation only.")
    seed: int = Field(default=0, ge=0, le=2**31 - 1, description="Fixes the split, the calibration images and "
                      "the training order.")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    time_limit_seconds: int | None = Field(
        default=None, ge=60, le=7 * 24 * 3600, description="Fail the job if it is still running this long after it "
        "first started (retries included); the server's own time limits apply as well.")
    eval_dataset: str | None = Field(
        default=None, min_length=1, max_length=64,
        description="Id of another uploaded dataset (dst_...) or a built-in name, with the same classes, that "
        "nothing in the job trains or calibrates on: when given, every reported accuracy (the input model's and "
        "every file's) is measured on it, and the held-out split of `dataset` only drives progress and "
        "choices made during training. Without it, accuracies come from that split, which the input model "
        "may have been trained on.", examples=["dst_9b1e4c7a2f0d8e6b3a5c1f7d"])
    max_accuracy_drop_pts: float | None = Field(
        default=2.0, ge=0, le=100, description="Acceptance gate: a published file may score at most this many "
        "points of top-1 accuracy below the input model (a distillation's teacher). A file that misses it is "
        "kept only as a diagnostic; a job whose every result misses it fails. null turns the gate off; the "
        "floor (no result at chance level or predicting one class) always applies.")

    # The field that holds this kind's engine config, whose fields may also be given flat.
    config_field: ClassVar[str] = ""
    # The field that names the input model: a distillation's "teacher", the "model" of the other kinds.
    input_field: ClassVar[str] = "model"

    @model_validator(mode="before")
    @classmethod
    def _nest_config(cls, data: Any) -> Any:
        name = cls.config_field
        if not name or not isinstance(data, dict):
            return data
        nested = nest_flat_fields(data, name, cls.model_fields[name].annotation)[0]
        # Nothing given: the config validates its defaults, and says what it needs if they are not enough.
        return cls._filled_for_data({name: {}, **nested})

    @classmethod
    def _filled_for_data(cls, data: dict[str, Any]) -> dict[str, Any]:
        """The request with its config nested: what depends on the job's datasets made concrete, so that the
        stored spec says what ran."""
        return data

    @property
    def input_model(self) -> str:
        """The id of the model the job starts from (a distillation's teacher)."""
        return str(getattr(self, self.input_field))


MAX_TEACHERS = 8


class TeacherRef(Spec):
    """One teacher of an ensemble: a model and its weight in the mean of the tempered probabilities."""

    model: str = _model_field("a teacher")
    weight: float = Field(default=1.0, gt=0, le=1000, description="Relative weight of this teacher's tempered "
                          "probabilities in the soft targets (normalised over the teachers).")


class DistillTask(Spec):
    """One task of a multi-task distillation: its own labels (dataset), teacher(s) and head on the student."""

    name: str = Field(pattern=TASK_NAME_PATTERN, description="The task's head: the key of its logits in the "
                      "TorchScript output dict and its ONNX output name.", examples=["digits"])
    teachers: list[TeacherRef] = Field(min_length=1, max_length=MAX_TEACHERS, description="The task's teacher(s); "
                                       "each predicts the classes of this task's dataset.")
    dataset: str = _dataset_field("this task")
    eval_dataset: str | None = Field(default=None, min_length=1, max_length=64, description="As a job's "
                                     "eval_dataset, for this task's accuracy.")
    max_accuracy_drop_pts: float | None = Field(
        default=None, ge=0, le=100, description="Gate for this task's head: at most this many points below the "
        "task's teachers as they predict together; by default the job's max_accuracy_drop_pts (off unless set).")


class DistillJobSpec(JobSpecBase):
    """A distillation job: teacher, data, student architecture, and how to distill (all optional)."""

    config_field: ClassVar[str] = "distill"
    input_field: ClassVar[str] = "teacher"
    kind: Literal["distill"] = Field(default="distill", description="The job type: distill (the default), prune "
                                     "or quantize.")
    teacher: str = _model_field("the teacher; with `teachers` or `tasks`, filled in with the first teacher")
    dataset: str = _dataset_field("distillation; with `tasks`, filled in with the first task's")
    teachers: list[TeacherRef] | None = Field(
        default=None, min_length=1, max_length=MAX_TEACHERS, description="Ensemble distillation: several teachers "
        "of the same classes (any architectures and input specs); the soft targets are the weighted mean of their "
        "tempered probabilities (see distill.teacher_weighting). Give `teacher` or `teachers`, not both.")
    tasks: list[DistillTask] | None = Field(
        default=None, min_length=2, max_length=MAX_TASKS, description="Multi-task distillation: one student with "
        "a shared backbone and one head per task, trained on the union of the tasks' datasets, each image "
        "distilled by its own task's teachers. Replaces teacher, teachers and dataset.")
    cross_task_soft_targets: bool = Field(
        default=False, description="Multi-task: every task's teachers also give soft targets for their head on the "
        "other tasks' images (which have no labels for it).")
    control: bool = Field(
        default=False, description="Also train the same student alone (labels only, same budget, seed and data) "
        "and report the KD gain: the student's accuracy minus the control's.")
    student: StudentSpec = Field(
        description="The student architecture. Its input is the teacher's; kwargs.num_classes defaults to the "
        "teacher's and must equal it (the stored spec holds it).",
        examples=[{"arch": "small_cnn", "kwargs": {"width": 8, "depth": 2}}])
    distill: DistillConfig = Field(default_factory=DistillConfig, description="The loss and the training loop; "
                                   "its fields (temperature, alpha, epochs, lr, ...) may be given flat.")
    # A student is meant to be smaller than its teacher, so how far below it may land is the user's call: off.
    max_accuracy_drop_pts: float | None = Field(
        default=None, ge=0, le=100, description="Acceptance gate against the teacher, off by default (a student "
        "smaller than its teacher is expected to score lower): when set, a student file more than this many points "
        "below the teacher is kept only as a diagnostic. The floor (no result at chance level or predicting one "
        "class) always applies.")

    @model_validator(mode="before")
    @classmethod
    def _first_teacher(cls, data: Any) -> Any:
        """`teacher` (and with tasks `dataset`) from `teachers` or `tasks`, so that every distillation has the
        input model and dataset every job has; a stored spec holds both forms, and they must agree."""
        if not isinstance(data, dict):
            return data
        given = [name for name in ("teachers", "tasks") if data.get(name) is not None]
        if len(given) > 1:
            raise ValueError("give `teachers` (one task, several teachers) or `tasks` (several tasks), not both")
        if not given:
            return data
        first = data["teachers"][0] if given == ["teachers"] else _first_of_tasks(data["tasks"])
        if not isinstance(first, dict) or "model" not in first:
            return data  # the field's own validation says what is wrong
        if data.get("teacher") not in (None, first["model"]):
            raise ValueError(f"give `teacher` or `{given[0]}`, not both")
        filled = {**data, "teacher": first["model"]}
        if given == ["tasks"] and isinstance(data["tasks"][0], dict):
            first_dataset = data["tasks"][0].get("dataset")
            if data.get("dataset") not in (None, first_dataset):
                raise ValueError("with `tasks`, each task names its dataset; leave the top-level `dataset` out")
            filled["dataset"] = first_dataset
        return filled

    @classmethod
    def _filled_for_data(cls, data: dict[str, Any]) -> dict[str, Any]:
        """augment "auto" made crop_flip or crop by the datasets trained on (config.auto_augment)."""
        config = data["distill"]
        if not isinstance(config, dict):
            return data  # the field's own validation says what is wrong
        training = config.get("training")
        nested = training.model_dump() if isinstance(training, Spec) else training
        given = config.get("augment", nested.get("augment") if isinstance(nested, dict) else None)
        if given not in (None, "auto"):
            return data
        tasks = data.get("tasks")
        datasets = ([task.get("dataset") for task in tasks if isinstance(task, dict)] if isinstance(tasks, list)
                    else [data.get("dataset")])
        # Given flat, it lands in `training` over what is nested there.
        return {**data, "distill": {**config, "augment": auto_augment(datasets)}}

    @model_validator(mode="after")
    def _distinct_tasks(self) -> DistillJobSpec:
        if self.tasks is not None and len({task.name for task in self.tasks}) < len(self.tasks):
            raise ValueError("task names must differ: each names one head of the student")
        if self.cross_task_soft_targets and self.tasks is None:
            raise ValueError("cross_task_soft_targets applies to `tasks` only")
        return self

    @property
    def teacher_refs(self) -> list[TeacherRef]:
        """Every teacher of the job in order, task by task: the one-teacher form as a list of one."""
        if self.tasks is not None:
            return [ref for task in self.tasks for ref in task.teachers]
        return self.teachers if self.teachers is not None else [TeacherRef(model=self.teacher)]


def _first_of_tasks(tasks: Any) -> Any:
    try:
        return tasks[0]["teachers"][0]
    except (TypeError, KeyError, IndexError):
        return None


class PruneJobSpec(JobSpecBase):
    """A pruning job: structured channel pruning (or unstructured sparsity) of the model, then recovery
    fine-tuning with the unpruned model as the distillation teacher."""

    config_field: ClassVar[str] = "prune"
    kind: Literal["prune"]
    model: str = _model_field("the model to prune, and the teacher of its recovery fine-tuning")
    dataset: str = _dataset_field("ranking channels (calibration_samples) and recovery fine-tuning")
    prune: PruneConfig = Field(description="How to prune; its fields (channel_ratio, method, epochs, ...) may be "
                               "given flat.")


class QuantizeJobSpec(JobSpecBase):
    """An int8 quantization job: TorchScript and ONNX Runtime artifacts, measured as they will run."""

    config_field: ClassVar[str] = "quantize"
    kind: Literal["quantize"]
    model: str = _model_field("the model to quantize (and the teacher of quantization-aware training)")
    dataset: str = _dataset_field("calibration (calibration_samples training images) and quantization-aware "
                                  "training")
    quantize: QuantizeConfig = Field(default_factory=QuantizeConfig, description="How to quantize; its fields "
                                     "(method, backend, calibration_samples, and for qat epochs, lr, ...) may be "
                                     "given flat.")


JobSpec = Annotated[DistillJobSpec | PruneJobSpec | QuantizeJobSpec, Field(discriminator="kind")]
SPEC_CLASSES: dict[str, type[JobSpecBase]] = {
    cls.model_fields["kind"].annotation.__args__[0]: cls for cls in (DistillJobSpec, PruneJobSpec, QuantizeJobSpec)
}
KINDS: tuple[str, ...] = tuple(SPEC_CLASSES)
_JOB_SPEC = TypeAdapter(JobSpec)


def stored_form(spec: JobSpecBase) -> dict[str, Any]:
    """What the jobs table holds: JSON with every default filled in."""
    return spec.model_dump(mode="json")


def load_stored(stored: dict[str, Any]) -> JobSpecBase:
    """A job's stored spec as its typed spec, whichever version of condenser stored it."""
    return _JOB_SPEC.validate_python(_upgraded(stored))


# Fields that only matter when a job trains, which specs stored before the nested configs hold even when it did not.
_TRAINING_FIELDS = frozenset(flat_field_names(DistillConfig) - {"training"})
# Defaults of structured-only fields that earlier versions stored for unstructured pruning too.
_OLD_STRUCTURED_DEFAULTS = {"importance": "magnitude", "iterative_steps": 1, "global_pruning": False}


def _upgraded(stored: dict[str, Any]) -> dict[str, Any]:
    """Specs stored before the configs were nested are flat and hold every field of every method; the fields the
    job's method ignored are dropped, so that the flat form's checks pass on them as they did then."""
    kind = stored.get("kind", "distill")
    if kind not in SPEC_CLASSES or SPEC_CLASSES[kind].config_field in stored:
        return stored
    ignored: set[str] = set()
    if kind == "prune" and stored.get("method") == "unstructured":
        ignored |= {name for name, value in _OLD_STRUCTURED_DEFAULTS.items() if stored.get(name) == value}
    if kind == "quantize" and stored.get("method", "static") != "qat":
        ignored |= _TRAINING_FIELDS
    if kind == "quantize" and stored.get("method") == "dynamic":
        ignored.add("calibration_samples")
    return {name: value for name, value in stored.items() if name not in ignored}

