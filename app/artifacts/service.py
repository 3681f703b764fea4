"""Artifact metadata and the file behind it. Rows are written by the worker when a job succeeds."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.orm import Session

from app.artifacts.repository import artifacts
from app.filenames import safe_filename
from app.jobs.repository import jobs
from core.db.models import Artifact
from core.db.repository import job_artifacts
from core.errors import NotFound
from core.storage import BlobStore


@dataclass(frozen=True)
class Download:
    path: Path
    filename: str
    media_type: str
    sha256: str

    @property
    def etag(self) -> str:
        # Content-addressed, so the sha256 is a strong validator that never changes for this URL.
        return f'"{self.sha256}"'


def get_artifact(session: Session, tenant: str, artifact_id: str) -> Artifact:
    return artifacts.require(session, tenant, artifact_id)


def artifacts_of_job(session: Session, tenant: str, job_id: str) -> list[Artifact]:
    jobs.require(session, tenant, job_id)
    return job_artifacts(session, tenant, job_id)


def prepare_download(session: Session, tenant: str, artifact_id: str, store: BlobStore) -> Download:
    artifact = get_artifact(session, tenant, artifact_id)
    path = store.path_for(artifact.sha256)
    if not path.is_file():
        raise NotFound(f"the file of artifact {artifact_id} is missing from storage")
    return Download(path=path, filename=safe_filename(artifact.filename, fallback=f"{artifact.id}.bin"),
                    media_type=artifact.media_type, sha256=artifact.sha256)
