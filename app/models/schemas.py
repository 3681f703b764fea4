"""Schemas of uploaded teacher models."""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, Field

from app.schemas import DELETED_AT_DESCRIPTION, Page
from app.uploads import multipart_openapi
from core.db.models import Model
from core.settings import Settings
from core.views import OutModel, UtcDatetime
from worker.engine.config import CODE_FORMATS, PRUNED_SHAPES_FORMAT, TENSOR_FORMATS, WeightsFormat

SPEC_EXAMPLE: dict[str, Any] = {
    "arch": "small_cnn",
    "kwargs": {"num_classes": 10, "width": 16, "depth": 3},
    "input": {"image_size": 8, "channels": 1, "mean": [0.5], "std": [0.5], "resize": "resize"},
}


class ModelOut(OutModel):
    """A teacher model: its weights (content-addressed by sha256) and the architecture they fit."""

    id: str = Field(examples=["mdl_4f0c2a9e1b7d3c5a6e8f0b1d"])
    name: str = Field(examples=["digits-teacher"])
    format: WeightsFormat | Literal["onnx"] = Field(description="The weights' format; onnx for an int8 model (a "
                                                   "quantize job's result, whose ONNX Runtime file holds it).")
    sha256: str = Field(description="sha256 of the weights file as uploaded.")
    bytes: int = Field(description="Size of the weights file.")
    arch: str = Field(examples=["small_cnn"], description="'small_cnn' or a torchvision classification model.")
    kwargs: dict[str, Any] = Field(examples=[SPEC_EXAMPLE["kwargs"]], description="Constructor arguments.")
    input: dict[str, Any] = Field(examples=[SPEC_EXAMPLE["input"]],
                                  description="The input the model expects (InputSpec); students inherit it.")
    pruned_shapes: dict[str, list[int]] | None = Field(
        default=None, examples=[None, {"features.0": [8, 1, 1], "features.1": [8]}],
        description=f"A structurally pruned model's resized layers ({PRUNED_SHAPES_FORMAT}), as its spec gave them; "
        "null for an unpruned model.")
    num_classes: int = Field(examples=[10])
    param_count: int | None = Field(examples=[23466], description="null for TorchScript and .pt2 uploads, "
                                    "which only workers load (the API never runs their code).")
    precision: Literal["float32", "int8"] = Field(description="int8: a quantize job's result, which runs on int8 "
                                                  "kernels; no job takes it as its input.")
    source_job_id: str | None = Field(description="The job whose result this model is (its files are that job's "
                                      "artifacts); null for an upload. GET /v1/models/{id}/lineage follows the chain.",
                                      examples=[None])
    created_at: UtcDatetime
    deleted_at: UtcDatetime | None = Field(default=None, description=DELETED_AT_DESCRIPTION)

    @classmethod
    def from_row(cls, row: Model) -> ModelOut:
        return cls(id=row.id, name=row.name, format=row.format, sha256=row.sha256, bytes=row.bytes,
                   arch=row.arch["arch"], kwargs=row.arch["kwargs"], input=row.input_spec,
                   pruned_shapes=row.arch.get("pruned_shapes"),
                   num_classes=row.num_classes, param_count=None if row.format in CODE_FORMATS else row.param_count,
                   precision=row.precision, source_job_id=row.source_job_id, created_at=row.created_at,
                   deleted_at=row.deleted_at)


class LineageJob(BaseModel):
    """A job in a model's lineage: what it ran, on what, with which engine."""

    id: str
    kind: str
    status: str
    pipeline_id: str | None
    stage: str | None
    replay_of: str | None
    spec: dict[str, Any] = Field(description="Its stored spec, every default filled in.")
    inputs: dict[str, Any] = Field(description="What it read: model, dataset, eval_dataset, each with its id and "
                                   "sha256 (a built-in dataset by name).")
    engine: dict[str, Any] | None = Field(description="Python, platform, device and library versions it ran with.")
    measured_on: dict[str, Any] | None
    finished_at: str | None


class LineageModel(BaseModel):
    id: str
    name: str
    format: str
    precision: str
    sha256: str
    bytes: int
    arch: dict[str, Any]
    input: dict[str, Any]
    num_classes: int
    origin: Literal["upload", "job"]
    created_at: str | None
    deleted: bool


class LineageStep(BaseModel):
    model: LineageModel
    made_by: LineageJob | None = Field(description="The job that made the model; null for the uploaded root.")


class Lineage(BaseModel):
    """Where a model came from: itself, the job that made it, that job's input model, ... back to an upload."""

    model: str
    chain: list[LineageStep] = Field(description="Newest first; the last entry is the uploaded root.")
    root: str = Field(description="The uploaded model the chain starts from.")


class ModelPage(Page[ModelOut]):
    """One page of models, newest first."""

UPLOAD_OPENAPI = multipart_openapi(
    {
        "spec": {
            "type": "string",
            "contentMediaType": "application/json",
            "description": "The architecture as a JSON string: {\"arch\", \"kwargs\" (num_classes required), "
            "\"input\": {\"image_size\", \"channels\" (1 or 3), \"mean\", \"std\", \"resize\" "
            "(resize | resize_center_crop | pad)}, \"pruned_shapes\" (optional: a structurally pruned model's "
            "resized layers)}. A distill or prune job's student.arch.json or pruned.arch.json is accepted as it is. "
            "The weights must load into exactly this model.",
            "examples": [json.dumps(SPEC_EXAMPLE)],
        },
        "name": {"type": "string", "maxLength": 200, "description": "Display name; defaults to the file name."},
        "format": {
            "type": "string",
            "enum": [*TENSOR_FORMATS, *CODE_FORMATS],
            "description": "safetensors, or a plain state_dict saved with torch.save (loaded with weights_only). "
            "torchscript and pt2 (torch.export) carry code: refused unless the server allows them, and then loaded "
            "only by workers, which keep their tensors for the spec's architecture. Detected from the file when "
            "omitted.",
        },
    },
    required=["spec"],
)


def list_accepted_formats(document: dict[str, Any], settings: Settings) -> None:
    """Narrow the OpenAPI document's upload formats to what this server accepts: the code formats only where
    CONDENSER_ALLOW_CODE_CHECKPOINTS is on, so that a client (or a fuzzer) is not offered a value refused anyway."""
    if settings.allow_code_checkpoints:
        return
    upload = document["paths"]["/v1/models"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    upload["properties"]["format"]["enum"] = list(TENSOR_FORMATS)
