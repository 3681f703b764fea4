"""Artifact metadata and the file behind it. Rows are written by the worker when a job succeeds."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.orm import Session

from app.artifacts import repository
from app.db.models import Artifact
from app.errors import NotFound
from app.filenames import safe_filename
from app.jobs import repository as jobs_repository
from app.storage import BlobStore


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
    artifact = repository.get(session, tenant, artifact_id)
    if artifact is None:
        raise NotFound(f"artifact {artifact_id} not found")
    return artifact


def artifacts_of_job(session: Session, tenant: str, job_id: str) -> list[Artifact]:
    if jobs_repository.get(session, tenant, job_id) is None:
        raise NotFound(f"job {job_id} not found")
    return repository.for_job(session, tenant, job_id)


def prepare_download(session: Session, tenant: str, artifact_id: str, store: BlobStore) -> Download:
    artifact = get_artifact(session, tenant, artifact_id)
    path = store.path_for(artifact.sha256)
    if not path.is_file():
        raise NotFound(f"the file of artifact {artifact_id} is missing from storage")
    return Download(path=path, filename=safe_filename(artifact.filename, fallback=f"{artifact.id}.bin"),
                    media_type=artifact.media_type, sha256=artifact.sha256)
