"""Schemas of pipelines: the submission (stages with their gates), its state stage by stage, and its report."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from app.schemas import Page
from core.jobspec import KINDS, MODEL_ID_EXAMPLE, JobSpecBase
from core.views import JobProgress, JobSummary, OutModel, UtcDatetime

PipelineStatus = Literal["queued", "running", "canceling", "succeeded", "failed", "canceled"]
StageStatus = Literal["waiting", "queued", "running", "canceling", "succeeded", "failed", "canceled", "skipped"]
STAGE_NAME_PATTERN = "^[a-z0-9][a-z0-9_-]{0,47}$"
# Set once for the whole pipeline, so that every stage is measured on the same images and its gate compares.
PIPELINE_LEVEL_FIELDS = ("model", "teacher", "dataset", "eval_dataset", "val_fraction", "seed", "webhook_url")
_JOB_FIELDS = JobSpecBase.model_fields

PIPELINE_EXAMPLE: dict[str, Any] = {
    "name": "digits-small-int8",
    "model": MODEL_ID_EXAMPLE,
    "dataset": "digits",
    "stages": [
        {"kind": "distill", "student": {"arch": "small_cnn", "kwargs": {"width": 8, "depth": 2}}, "epochs": 10,
         "gate": {"max_accuracy_drop_pts": 3, "against": "input"}},
        {"kind": "prune", "channel_ratio": 0.5, "epochs": 3, "gate": {"max_accuracy_drop_pts": 1,
                                                                      "against": "previous"}},
        {"kind": "quantize", "method": "static"},
        {"name": "quantize-qat", "kind": "quantize", "after": "prune", "method": "qat", "epochs": 2},
    ],
}


class StageGate(BaseModel):
    """The quality gate between this stage and the next: its published files may score at most this many points of
    top-1 accuracy below the reference, measured on the pipeline's evaluation images."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_accuracy_drop_pts: float = Field(ge=0, le=100, examples=[1.0])
    against: Literal["input", "previous"] = Field(
        default="input", description="input: the pipeline's input model; previous: the model this stage started "
        "from (the output of the stage it comes after).")


class StageCreate(BaseModel):
    """One stage: a job of `kind`, given as POST /v1/jobs takes it (flat or nested settings) but without its input
    model, dataset, eval_dataset, val_fraction or seed, which the pipeline sets for every stage."""

    model_config = ConfigDict(extra="allow", frozen=True)

    name: str | None = Field(default=None, pattern=STAGE_NAME_PATTERN, description="Unique in the pipeline; "
                             "defaults to the kind (distill, prune-2, ...).", examples=["prune"])
    kind: Literal[KINDS] = Field(examples=["prune"])  # type: ignore[valid-type]
    after: str | None = Field(default=None, max_length=48, description="The stage whose model this stage takes, "
                              "or 'input' for the pipeline's input model. Default: the stage listed before it (the "
                              "input for the first). Stages after the same stage run at once, on separate workers.",
                              examples=["distill"])
    gate: StageGate | None = Field(default=None, description="Stop the pipeline here unless this stage's files pass.")


class PipelineCreate(BaseModel):
    """A pipeline: an input model, the data every stage uses, and the stages in order."""

    model_config = ConfigDict(extra="forbid", frozen=True, json_schema_extra={"examples": [PIPELINE_EXAMPLE]})

    name: str | None = Field(default=None, max_length=200, description="Display name; defaults to the stages' kinds.")
    model: str | None = Field(default=None, min_length=1, max_length=64, description="The input model (mdl_...). "
                              "`teacher` is accepted instead, for a pipeline that starts with a distillation.",
                              examples=[MODEL_ID_EXAMPLE])
    teacher: str | None = Field(default=None, min_length=1, max_length=64, description="Same as model.")
    dataset: str = _JOB_FIELDS["dataset"]
    eval_dataset: str | None = _JOB_FIELDS["eval_dataset"]
    val_fraction: float = _JOB_FIELDS["val_fraction"]
    seed: int = _JOB_FIELDS["seed"]
    stages: list[StageCreate] = Field(min_length=1, max_length=16)

    @property
    def input_model(self) -> str | None:
        return self.model or self.teacher


class StageOut(BaseModel):
    """One stage: what it runs, where it is, and what it made."""

    name: str
    kind: str
    after: str
    gate: StageGate | None
    status: StageStatus = Field(description="Its job's status; waiting: not started yet; skipped: the pipeline "
                                "ended before it started.")
    job_id: str | None = Field(description="Its job (an ordinary job: GET /v1/jobs/{id} for events, artifacts).")
    model_id: str | None = Field(description="The model it made (usable in any job), once it succeeded.")
    progress: JobProgress | None
    summary: JobSummary | None = Field(description="Its before/after, once it succeeded.")
    gate_result: str | None = Field(default=None, description="Why it missed its gate, if it did.")
    error: str | None


class PipelineOut(OutModel):
    id: str = Field(examples=["pip_5e6f7a8b9c0d1e2f3a4b5c6d"])
    name: str
    status: PipelineStatus
    current_stages: list[str] = Field(description="The stages queued or running now.")
    error: str | None = Field(description="Why it failed or was canceled.")
    model: str = Field(description="The input model.", examples=[MODEL_ID_EXAMPLE])
    dataset: str
    eval_dataset: str | None
    input_accuracy: float | None = Field(description="The input model's accuracy on the evaluation images, once a "
                                         "stage measured it.")
    final_model: str | None = Field(description="The last stage's model, once the pipeline succeeded.")
    stages: list[StageOut]
    spec: dict[str, Any] = Field(description="The pipeline as stored: each stage's job spec with every default.")
    replay_of: str | None = None
    created_at: UtcDatetime
    started_at: UtcDatetime | None
    finished_at: UtcDatetime | None
    updated_at: UtcDatetime


class PipelinePage(Page[PipelineOut]):
    """One page of pipelines, newest first."""


class PipelineReport(BaseModel):
    """Every stage side by side, and where the final model came from."""

    pipeline: PipelineOut
    rows: list[dict[str, Any]] = Field(description="The input model, then one row per stage that succeeded: "
                                       "accuracy per format, parameters, MACs, sizes, latency.")
    table_markdown: str = Field(description="The same rows as a Markdown table.")
    final_model_lineage: list[dict[str, Any]] = Field(description="GET /v1/models/{id}/lineage of the final model.")
    original_rows: list[dict[str, Any]] | None = Field(default=None, description="A replay's original pipeline's "
                                                       "rows, to compare with its own.")
    original_table_markdown: str | None = None
