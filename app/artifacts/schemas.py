"""Schemas of job outputs (artifacts)."""

from __future__ import annotations

from pydantic import Field

from app.db.models import Artifact
from app.schemas import OutModel, UtcDatetime


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
