"""Schemas of compression jobs: the submission, its state, progress, outputs and history."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag

from app.artifacts.schemas import ArtifactOut
from app.db.models import Job, JobEvent
from app.schemas import OutModel, Page, UtcDatetime
from worker.engine.config import BUILTIN_DATASETS, DistillConfig, PruneConfig, QuantizeConfig, StudentSpec
from worker.summary import summarize

JobStatus = Literal["queued", "running", "canceling", "succeeded", "failed", "canceled"]

JobKind = Literal["distill", "prune", "quantize"]
KINDS: tuple[str, ...] = JobKind.__args__
MODEL_ID_EXAMPLE = "mdl_4f0c2a9e1b7d3c5a6e8f0b1d"

JOB_EXAMPLE: dict[str, Any] = {
    "kind": "distill",
    "teacher": MODEL_ID_EXAMPLE,
    "dataset": "digits",
    "student": {"arch": "small_cnn", "kwargs": {"width": 8, "depth": 2}},
    "epochs": 10,
    "batch_size": 64,
    "lr": 0.003,
    "temperature": 4.0,
    "alpha": 0.9,
}


PRUNE_EXAMPLE: dict[str, Any] = {
    "kind": "prune", "model": MODEL_ID_EXAMPLE, "dataset": "digits", "method": "structured",
    "channel_ratio": 0.5, "importance": "taylor", "epochs": 3,
}
QUANTIZE_EXAMPLE: dict[str, Any] = {
    "kind": "quantize", "model": MODEL_ID_EXAMPLE, "dataset": "digits", "method": "static", "backend": "x86",
    "calibration_samples": 256,
}


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


class JobDelivery(BaseModel):
    """What every kind of job takes besides its settings."""

    webhook_url: str | None = Field(
        default=None, max_length=2048,
        description="Announce the job's end here (a signed POST; see PUT /v1/webhook) instead of at the tenant's "
        "default webhook. https, public addresses only.",
        examples=["https://ci.example.com/hooks/condenser"],
    )


class JobCreate(DistillConfig, JobDelivery):
    """A distillation job: teacher, data, student architecture, and the training settings (all optional)."""

    model_config = ConfigDict(extra="forbid", frozen=True, json_schema_extra={"examples": [JOB_EXAMPLE]})

    kind: Literal["distill"] = Field(default="distill", description="The job type: distill (the default), prune "
                                     "or quantize.")
    teacher: str = _model_field("the teacher")
    dataset: str = _dataset_field("distillation")
    student: StudentSpec = Field(
        description="The student architecture. Its input is the teacher's; kwargs.num_classes defaults to the "
        "teacher's and must equal it.",
        examples=[JOB_EXAMPLE["student"]],
    )


class PruneJobCreate(PruneConfig, JobDelivery):
    """A pruning job: structured channel pruning (or unstructured sparsity) of the model, then recovery
    fine-tuning with the unpruned model as the distillation teacher."""

    model_config = ConfigDict(extra="forbid", frozen=True, json_schema_extra={"examples": [PRUNE_EXAMPLE]})

    kind: Literal["prune"]
    model: str = _model_field("the model to prune, and the teacher of its recovery fine-tuning")
    dataset: str = _dataset_field("ranking channels (calibration_samples) and recovery fine-tuning")


class QuantizeJobCreate(QuantizeConfig, JobDelivery):
    """An int8 quantization job: TorchScript and ONNX Runtime artifacts, measured as they will run."""

    model_config = ConfigDict(extra="forbid", frozen=True, json_schema_extra={"examples": [QUANTIZE_EXAMPLE]})

    kind: Literal["quantize"]
    model: str = _model_field("the model to quantize (and the teacher of quantization-aware training)")
    dataset: str = _dataset_field("calibration (calibration_samples training images) and quantization-aware "
                                  "training")


def _kind_of(body: Any) -> str | None:
    """The body's kind, 'distill' when absent (as before prune and quantize existed)."""
    kind = body.get("kind", "distill") if isinstance(body, dict) else getattr(body, "kind", None)
    return kind if kind in KINDS else None


# One body, three shapes: each kind forbids the others' fields, so a misplaced field is a 422 naming it.
JobSubmission = Annotated[
    Annotated[JobCreate, Tag("distill")] | Annotated[PruneJobCreate, Tag("prune")]
    | Annotated[QuantizeJobCreate, Tag("quantize")],
    Discriminator(_kind_of, custom_error_type="invalid_kind",
                  custom_error_message="kind: Input should be 'distill', 'prune' or 'quantize'"),
]
AnyJobCreate = JobCreate | PruneJobCreate | QuantizeJobCreate


class JobProgress(BaseModel):
    """Where a running job is; fields are null until the worker reports them."""

    model_config = ConfigDict(extra="ignore")

    stage: str | None = Field(default=None, examples=["train"])
    epoch: int | None = Field(default=None, examples=[3])
    epochs: int | None = Field(default=None, examples=[10])
    step: int | None = Field(default=None, description="Steps done in this job so far.", examples=[120])
    total_steps: int | None = Field(default=None, examples=[400])
    eta_seconds: float | None = Field(default=None, examples=[42.5])
    train_loss: float | None = Field(default=None, examples=[0.41])
    val_accuracy: float | None = Field(default=None, examples=[0.93])


class ModelFigures(BaseModel):
    """One side of a job's before/after: the input model, or what the job made of it."""

    label: str = Field(description="teacher / student, or input / pruned / int8.", examples=["student"])
    accuracy: float | None = Field(description="Top-1 on the held-out split.", examples=[0.953])
    params: int | None = Field(examples=[5321])
    macs: int | None = Field(description="Multiply-accumulates per image.", examples=[100000])
    file_bytes: int | None = Field(description="Size of the weights file (safetensors or state_dict); none for "
                                   "int8.", examples=[22000])
    torchscript_bytes: int | None = Field(description="Size of the TorchScript file, which every kind exports: "
                                          "the size to compare across jobs.", examples=[30000])
    cpu_latency_ms_batch1: float | None = Field(description="TorchScript on the worker's CPU.", examples=[0.3])
    cpu_latency_ms_batch32: float | None = Field(examples=[1.5])


class FormatCheck(BaseModel):
    """One published file's accuracy against the float model it was made from."""

    format: str = Field(examples=["onnx"])
    accuracy: float = Field(examples=[0.97])
    drop_pts: float = Field(description="Points below the float source (negative: above it).", examples=[0.2])
    passed: bool = Field(description="False when the file scores more than the tolerance below its float source: "
                         "not a usable result.")


class MeasuredOn(BaseModel):
    """The worker CPU the latencies and int8 accuracies were measured on."""

    model: str = Field(examples=["Intel(R) Xeon(R) Platinum 8375C CPU @ 2.90GHz"])
    machine: str = Field(examples=["x86_64"])
    features: list[str] = Field(description="Instruction-set extensions that decide the int8 / bf16 kernels.",
                                examples=[["avx2", "avx512f", "avx512_vnni"]])
    int8_dot_product: bool = Field(description="Whether the CPU has an int8 dot-product instruction (VNNI, AMX, "
                                   "ARM dotprod).")


class JobSummary(BaseModel):
    """The input model and the result side by side, in the same shape for every kind of job."""

    before: ModelFigures
    after: ModelFigures
    validation_samples: int | None = Field(description="Held-out images the accuracies are measured on.")
    formats: list[FormatCheck] = Field(default_factory=list, description="Every published format's accuracy, "
                                       "checked against its float source.")
    failed_formats: list[str] = Field(default_factory=list, description="Formats that failed that check.")
    measured_on: MeasuredOn | None = Field(default=None, description="The CPU the figures were measured on.")


class JobEventOut(OutModel):
    """One entry of a job's history: who did what, when and why."""

    id: int = Field(description="Increases with every event; resume a listing or stream after it.",
                    examples=[42])
    at: UtcDatetime
    kind: str = Field(description="state (a transition), progress (an epoch ended), log, or webhook (a "
                      "delivery attempt).", examples=["state"])
    status: str | None = Field(description="The job's status after the event.", examples=["queued"])
    attempt: int
    actor: str = Field(description="api-key:<prefix> for API calls, the worker or reaper otherwise.",
                       examples=["api-key:3f9a1c0b"])
    message: str = Field(examples=["submitted"])
    data: dict[str, Any]


class JobOut(OutModel):
    id: str = Field(examples=["job_5e6f7a8b9c0d1e2f3a4b5c6d"])
    kind: JobKind = Field(examples=["distill"])
    status: JobStatus
    attempt: int = Field(description="Attempts started so far (a job is retried after a lost worker).")
    max_attempts: int
    cancel_requested: bool
    model: str = Field(description="The input model: the teacher of a distillation, the model pruned or "
                       "quantized otherwise.", examples=[MODEL_ID_EXAMPLE])
    teacher: str = Field(description="The same id as model (named for distillation, kept for compatibility).",
                         examples=[MODEL_ID_EXAMPLE])
    dataset: str | None = Field(description="Dataset id, or the built-in's name.", examples=["digits"])
    spec: dict[str, Any] = Field(description="The submission as stored, with every default filled in.")
    progress: JobProgress
    metrics: dict[str, Any] = Field(description="Measured results (accuracy, size, latency) once finished.")
    summary: JobSummary | None = Field(description="The metrics' before/after at a glance, once succeeded.")
    error: str | None = Field(description="Why the job failed, when it did.")
    webhook_url: str | None = Field(default=None, description="Where its end is announced, if not at the tenant's "
                                    "default webhook.")
    created_at: UtcDatetime
    started_at: UtcDatetime | None
    finished_at: UtcDatetime | None
    updated_at: UtcDatetime

    @classmethod
    def from_row(cls, job: Job) -> JobOut:
        return cls(**_job_fields(job))


class JobDetail(JobOut):
    """A job with its outputs and its most recent history."""

    artifacts: list[ArtifactOut]
    events: list[JobEventOut] = Field(description="The latest events, oldest first.")

    @classmethod
    def build(cls, job: Job, artifacts: list[ArtifactOut], events: list[JobEvent]) -> JobDetail:
        return cls(**_job_fields(job), artifacts=artifacts,
                   events=[JobEventOut.model_validate(event) for event in events])


def _job_fields(job: Job) -> dict[str, Any]:
    return {
        "id": job.id, "kind": job.kind, "status": job.status, "attempt": job.attempt,
        "max_attempts": job.max_attempts, "cancel_requested": job.cancel_requested, "model": job.teacher_id,
        "teacher": job.teacher_id,
        "dataset": job.dataset_id or job.spec.get("dataset"), "spec": job.spec,
        "progress": JobProgress.model_validate(job.progress or {}), "metrics": job.metrics or {},
        "summary": summarize(job.kind, job.metrics or {}),
        "error": job.error, "webhook_url": job.webhook_url, "created_at": job.created_at, "started_at": job.started_at,
        "finished_at": job.finished_at, "updated_at": job.updated_at,
    }



class JobPage(Page[JobOut]):
    """One page of jobs, newest first (without events and artifacts: GET the job for those)."""
