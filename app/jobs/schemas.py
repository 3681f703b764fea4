"""Schemas of compression jobs: the submission, its state, progress, outputs and history."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag

from app.schemas import Page
from core.db.models import Job
from core.jobspec import KINDS, MODEL_ID_EXAMPLE, DistillJobSpec, PruneJobSpec, QuantizeJobSpec
from core.views import ArtifactOut, JobOut, OutModel, UtcDatetime, job_fields

JOB_EXAMPLE: dict[str, Any] = {
    "kind": "distill",
    "teacher": MODEL_ID_EXAMPLE,
    "dataset": "digits",
    "student": {"arch": "small_cnn", "kwargs": {"width": 8, "depth": 2}},
    "epochs": 10,
    "batch_size": 64,
    "lr": 0.05,
    "temperature": 4.0,
    "alpha": 0.5,
}


PRUNE_EXAMPLE: dict[str, Any] = {
    "kind": "prune", "model": MODEL_ID_EXAMPLE, "dataset": "digits", "method": "structured",
    "channel_ratio": 0.5, "importance": "taylor", "epochs": 3,
}
QUANTIZE_EXAMPLE: dict[str, Any] = {
    "kind": "quantize", "model": MODEL_ID_EXAMPLE, "dataset": "digits", "method": "static", "backend": "x86",
    "calibration_samples": 256,
}


class JobDelivery(BaseModel):
    """What every kind of job takes besides its spec."""

    webhook_url: str | None = Field(
        default=None, max_length=2048,
        description="Announce the job's end here (a signed POST; see PUT /v1/webhook) instead of at the tenant's "
        "default webhook. https, public addresses only.",
        examples=["https://ci.example.com/hooks/condenser"],
    )


class JobCreate(DistillJobSpec, JobDelivery):
    """A distillation job: teacher, data, student architecture, and the training settings (all optional)."""

    model_config = ConfigDict(extra="forbid", frozen=True, json_schema_extra={"examples": [JOB_EXAMPLE]})


class PruneJobCreate(PruneJobSpec, JobDelivery):
    """A pruning job: structured channel pruning (or unstructured sparsity) of the model, then recovery
    fine-tuning with the unpruned model as the distillation teacher."""

    model_config = ConfigDict(extra="forbid", frozen=True, json_schema_extra={"examples": [PRUNE_EXAMPLE]})


class QuantizeJobCreate(QuantizeJobSpec, JobDelivery):
    """An int8 quantization job: TorchScript and ONNX Runtime artifacts, measured as they will run."""

    model_config = ConfigDict(extra="forbid", frozen=True, json_schema_extra={"examples": [QUANTIZE_EXAMPLE]})


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


class JobEventOut(OutModel):
    """One entry of a job's history: who did what, when and why."""

    id: int = Field(description="Increases with every event; resume a listing or stream after it.",
                    examples=[42])
    at: UtcDatetime
    kind: str = Field(description="state (a transition), progress (an epoch ended), acceptance (each file's "
                      "verdict, in data.formats), log, or webhook (a delivery attempt).", examples=["state"])
    status: str | None = Field(description="The job's status after the event.", examples=["queued"])
    attempt: int
    actor: str = Field(description="api-key:<prefix> for API calls, the worker or reaper otherwise.",
                       examples=["api-key:3f9a1c0b"])
    message: str = Field(examples=["submitted"])
    data: dict[str, Any]


class JobDetail(JobOut):
    """A job with its outputs and its most recent history."""

    artifacts: list[ArtifactOut]
    events: list[JobEventOut] = Field(description="The latest events, oldest first.")

    @classmethod
    def build(cls, job: Job, artifacts: list[ArtifactOut], events: Sequence[Any]) -> JobDetail:
        """events: JobEvent rows, or rows with their attributes."""
        return cls(**job_fields(job), artifacts=artifacts,
                   events=[JobEventOut.model_validate(event) for event in events])


class JobPage(Page[JobOut]):
    """One page of jobs, newest first (without events and artifacts: GET the job for those)."""
