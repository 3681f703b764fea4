"""The public JSON of a job and of its artifacts: what GET /v1/jobs/{id} answers and what a webhook delivery
carries, so that both say the same thing (the API's schemas and the webhook outbox share these classes).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from core.db.models import Artifact, Job
from core.jobspec import KINDS, MODEL_ID_EXAMPLE
from core.summary import summarize

JobStatus = Literal["queued", "running", "canceling", "succeeded", "failed", "canceled"]
JobKind = Literal[KINDS]  # type: ignore[valid-type]  # the kinds the typed job spec knows


def as_utc(value: datetime) -> datetime:
    # SQLite hands timestamps back without a zone; every timestamp we write is UTC.
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


UtcDatetime = Annotated[datetime, AfterValidator(as_utc)]


class OutModel(BaseModel):
    model_config = ConfigDict(from_attributes=True)


class JobProgress(BaseModel):
    """Where a running job is; fields are null until the worker reports them."""

    model_config = ConfigDict(extra="ignore")

    stage: str | None = Field(default=None, examples=["training"])
    stage_step: int | None = Field(default=None, description="In a stage that is not training (exporting, "
                                   "evaluating): files done so far.", examples=[2])
    stage_steps: int | None = Field(default=None, description="...and how many there are.", examples=[7])
    epoch: int | None = Field(default=None, examples=[3])
    epochs: int | None = Field(default=None, examples=[10])
    step: int | None = Field(default=None, description="Steps done in this job so far.", examples=[120])
    total_steps: int | None = Field(default=None, examples=[400])
    eta_seconds: float | None = Field(default=None, examples=[42.5])
    train_loss: float | None = Field(default=None, examples=[0.41])
    kd_loss: float | None = Field(
        default=None, description="Distillation only: the epoch's mean KL divergence of the student's softened "
        "outputs from the teacher's, before its weights: train_loss = alpha * T^2 * kd_loss + (1 - alpha) * ce_loss.",
        examples=[0.026])
    ce_loss: float | None = Field(
        default=None, description="The epoch's mean cross-entropy against the labels (the whole loss when "
        "training without a teacher).", examples=[0.35])
    val_accuracy: float | None = Field(default=None, examples=[0.93])
    val_accuracy_by_task: dict[str, float] | None = Field(
        default=None, description="A multi-task distillation's last completed epoch's accuracy per task (head); "
        "val_accuracy is their mean.", examples=[{"digits": 0.95, "shapes": 0.81}])


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
    """One model file's acceptance verdict: its accuracy, how it compares with the input model and with the float
    model it was made from, and whether it is a result."""

    format: str = Field(description="safetensors (rebuilt from its spec), torchscript, onnx, pt2.",
                        examples=["onnx"])
    accuracy: float = Field(examples=[0.97])
    agreement: float | None = Field(default=None, description="Share of images on which its top-1 equals that of "
                                    "`agreement_with`.", examples=[0.995])
    agreement_with: str | None = Field(default=None, description="The model agreement is measured against: the "
                                       "float model the file was made from (for the float weights file itself, "
                                       "the input model).", examples=["float input model"])
    drop_pts: float | None = Field(default=None, description="Points below the input model (the teacher of a "
                                   "distillation); negative: above it. What max_accuracy_drop_pts limits.",
                                   examples=[0.4])
    source_drop_pts: float | None = Field(default=None, description="Points below the float model it was made "
                                          "from.", examples=[0.2])
    dominant_class_share: float | None = Field(default=None, description="Share of the images given its most "
                                               "frequent prediction (near 1: collapsed onto one class).",
                                               examples=[0.11])
    passed: bool = Field(description="False when the file failed any acceptance check: not a result, kept only as "
                         "a diagnostic (REJECTED-*).")
    reasons: list[str] = Field(default_factory=list, description="Why it failed, in words.")


class Evaluation(BaseModel):
    """What the accuracies were measured on."""

    source: Literal["eval_dataset", "split"] = Field(description="eval_dataset: a separate dataset that nothing in "
                                                     "the job trained on; split: a held-out part of the training "
                                                     "dataset, which the input model may have seen.")
    dataset: str = Field(examples=["dst_9b1e4c7a2f0d8e6b3a5c1f7d"])
    samples: int = Field(examples=[360])
    note: str


class MeasuredOn(BaseModel):
    """The worker CPU the latencies and int8 accuracies were measured on."""

    model: str = Field(examples=["Intel(R) Xeon(R) Platinum 8375C CPU @ 2.90GHz"])
    machine: str = Field(examples=["x86_64"])
    features: list[str] = Field(description="Instruction-set extensions that decide the int8 / bf16 kernels.",
                                examples=[["avx2", "avx512f", "avx512_vnni"]])
    int8_dot_product: bool = Field(description="Whether the CPU has an int8 dot-product instruction (VNNI, AMX, "
                                   "ARM dotprod).")


class ControlRun(BaseModel):
    """A distillation's control: the same student trained alone on the labels (control: true)."""

    accuracy: float = Field(description="The control student's top-1 on the evaluation images.", examples=[0.884])
    kd_gain_pts: float = Field(description="The distilled student's accuracy minus the control's, in points.",
                               examples=[1.5])


class TeacherFigures(BaseModel):
    """One member of a distillation's teacher ensemble, on its own view of the evaluation images."""

    id: str = Field(examples=[MODEL_ID_EXAMPLE])
    arch: str = Field(examples=["resnet18"])
    weight: float = Field(examples=[1.0])
    task: str | None = Field(default=None, description="The task it teaches (multi-task distillation).")
    accuracy: float = Field(examples=[0.97])
    params: int | None = Field(default=None, examples=[11_000_000])
    cpu_latency_ms_batch1: float | None = Field(default=None, examples=[2.1])


class TaskFigures(BaseModel):
    """One head of a multi-task student: its accuracy beside its task's teachers'."""

    name: str = Field(examples=["digits"])
    accuracy: float = Field(description="The head's top-1 on the task's evaluation images (the weights file).",
                            examples=[0.95])
    teacher_accuracy: float = Field(description="The task's teachers together, on the same images.",
                                    examples=[0.97])
    evaluation_samples: int = Field(examples=[360])
    passed: bool = Field(description="Whether every file passed this task's checks.")


class JobSummary(BaseModel):
    """The input model and the result side by side, in the same shape for every kind of job."""

    before: ModelFigures
    after: ModelFigures
    validation_samples: int | None = Field(description="Images the accuracies are measured on.")
    evaluation: Evaluation | None = Field(default=None, description="Which images those are (absent for jobs "
                                          "measured before this was recorded).")
    formats: list[FormatCheck] = Field(default_factory=list, description="Every model file's acceptance verdict.")
    failed_formats: list[str] = Field(default_factory=list, description="Formats that failed their acceptance "
                                      "checks: not published as results.")
    measured_on: MeasuredOn | None = Field(default=None, description="The CPU the figures were measured on.")
    control: ControlRun | None = Field(default=None, description="A distillation with control: true: the same "
                                       "student trained alone, and the KD gain.")
    teachers: list[TeacherFigures] | None = Field(default=None, description="A distillation with several teachers: "
                                                  "each member (`before` is the ensemble as a whole).")
    tasks: list[TaskFigures] | None = Field(default=None, description="A multi-task distillation: each head.")


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
    replay_of: str | None = Field(default=None, description="The job this one replays (POST /v1/jobs/{id}/replay): "
                                  "same spec, same inputs.", examples=[None])
    pipeline_id: str | None = Field(default=None, description="The pipeline this job is a stage of, if any.")
    stage: str | None = Field(default=None, description="Its stage's name in that pipeline.")
    created_at: UtcDatetime
    started_at: UtcDatetime | None
    finished_at: UtcDatetime | None
    updated_at: UtcDatetime

    @classmethod
    def from_row(cls, job: Job) -> JobOut:
        return cls(**job_fields(job))


def job_fields(job: Job) -> dict[str, Any]:
    return {
        "id": job.id, "kind": job.kind, "status": job.status, "attempt": job.attempt,
        "max_attempts": job.max_attempts, "cancel_requested": job.cancel_requested, "model": job.teacher_id,
        "teacher": job.teacher_id,
        "dataset": job.dataset_id or job.spec.get("dataset"), "spec": job.spec,
        "progress": JobProgress.model_validate(job.progress or {}), "metrics": job.metrics or {},
        "summary": summarize(job.kind, job.metrics or {}),
        "error": job.error, "webhook_url": job.webhook_url, "replay_of": job.replay_of,
        "pipeline_id": job.pipeline_id, "stage": job.stage, "created_at": job.created_at, "started_at": job.started_at,
        "finished_at": job.finished_at, "updated_at": job.updated_at,
    }




class ArtifactOut(OutModel):
    """A file a job produced. Download it from `download_url`; check it against `sha256`."""

    id: str = Field(examples=["art_0b1c2d3e4f5a6b7c8d9e0f1a"])
    job_id: str = Field(examples=["job_5e6f7a8b9c0d1e2f3a4b5c6d"])
    kind: str = Field(description="What the file is, e.g. student_safetensors, student_torchscript, student_onnx.",
                      examples=["student_safetensors"])
    filename: str = Field(examples=["student.safetensors"])
    media_type: str = Field(examples=["application/octet-stream"])
    runtime: str = Field(description="What loads it: safetensors, torchscript, onnxruntime, ...",
                         examples=["safetensors"])
    sha256: str = Field(description="sha256 of the file; also sent as X-Content-SHA256 and the ETag on download.")
    bytes: int
    created_at: UtcDatetime
    download_url: str = Field(examples=["/v1/artifacts/art_0b1c2d3e4f5a6b7c8d9e0f1a/download"])

    @classmethod
    def from_row(cls, row: Artifact) -> ArtifactOut:
        return cls(id=row.id, job_id=row.job_id, kind=row.kind, filename=row.filename, media_type=row.media_type,
                   runtime=row.runtime, sha256=row.sha256, bytes=row.bytes, created_at=row.created_at,
                   download_url=f"/v1/artifacts/{row.id}/download")
