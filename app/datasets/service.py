"""Register datasets: ingest the (untrusted) upload into a canonical .npz, store it, record its shape.

Ingestion (archive reading, image decoding, canonicalisation) runs in a limited child process
(worker.engine.ingest_child under app.sandbox), synchronously within the request: the client still
gets its 201 or its 422 in one request, an upload never queues behind hours-long jobs, and the kernel
bounds the child's memory, CPU time and output. No database connection is held while it runs: the
quota is read first, the session gives its connection back, and the row is written afterwards.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import replace
from functools import lru_cache
from pathlib import Path

from sqlalchemy.orm import Session

from app import quotas
from app.datasets.repository import datasets
from app.datasets.schemas import DatasetShape
from app.deps import release_connection
from app.idempotency import Outcome, create_once, idempotent_request
from app.inputs import delete_input
from app.pagination import PageRequest
from app.sandbox import ChildLimits, run_child
from app.uploads import Upload
from core.db.models import Dataset
from core.errors import Invalid, NotFound, TooLarge, public_text
from core.settings import Settings, get_settings
from core.storage import BlobStore
from worker.engine.config import BUILTIN_DATASETS

ROUTE = "POST /v1/datasets"
TEXT_FIELDS = ("name",)
INGEST_MODULE = "worker.engine.ingest_child"
# The client's file name as the child repeats it in messages.
_FILENAME_LIMIT = 200
# RLIMIT_FSIZE above the quota the child checks itself: the canonical size it predicts is exact to the
# zip container's few hundred bytes, so only a bug in that prediction ever meets the kernel's limit.
_FILE_SIZE_SLACK = 1 << 20


def register_dataset(session: Session, tenant: str, upload: Upload, idempotency_key: str | None,
                     store: BlobStore, settings: Settings) -> Outcome[Dataset]:
    request = idempotent_request(tenant, ROUTE, idempotency_key, upload.fingerprint())
    return create_once(session, datasets, tenant, request,
                       lambda: _prepare(session, tenant, upload, store, settings))


def _prepare(session: Session, tenant: str, upload: Upload, store: BlobStore,
             settings: Settings) -> Callable[[str], Dataset]:
    """Ingest the upload and store its canonical .npz; returns how to build the row from its id."""
    allowed = quotas.check_storage(session, tenant, settings)
    # The child may run for minutes: a burst of uploads must not hold the pool's connections meanwhile.
    release_connection(session)
    name = upload.display_name(fallback="dataset")
    with store.temp_path(".npz") as canonical:
        verdict = _ingest(upload, canonical, allowed, settings)
        # Publish before the claim: hashing and fsyncing a large file must not hold SQLite's write lock.
        blob = store.put_file(canonical)
    shape = DatasetShape.model_validate(verdict)
    return lambda dataset_id: Dataset(
        id=dataset_id, tenant=tenant, name=name, sha256=upload.sha256, bytes=upload.bytes,
        canonical_sha256=blob.sha256, canonical_bytes=blob.bytes, **shape.model_dump())


def _ingest(upload: Upload, canonical: Path, allowed: int, settings: Settings) -> dict[str, object]:
    """Run the ingestion child; its verdict, TooLarge (413) over the quota, or Invalid (422)."""
    job = {"filename": (upload.filename or "upload")[:_FILENAME_LIMIT], "limits": {
        "max_entries": settings.max_archive_entries, "max_unpacked_bytes": settings.max_unpacked_bytes,
        "max_compression_ratio": settings.max_compression_ratio, "max_image_pixels": settings.max_image_pixels,
        "max_tar_header_bytes": settings.max_tar_header_bytes, "max_stored_bytes": allowed,
    }}
    limits = _child_limits(settings, file_size_bytes=allowed + _FILE_SIZE_SLACK)
    with _ingest_slots(settings.max_concurrent_ingests):
        verdict = run_child(INGEST_MODULE, ["--job-json", json.dumps(job), str(upload.path), str(canonical)],
                            limits, what="reading the dataset")
    if verdict.get("ok"):
        return verdict
    if "canonical_bytes" in verdict:
        raise TooLarge(f"storage quota exceeded: this dataset is stored as {verdict['canonical_bytes']} bytes "
                       f"(its canonical .npz of uint8 images), and this tenant may store only {allowed} more of "
                       f"its {settings.max_stored_bytes_per_tenant}; delete data or upload fewer or smaller images")
    raise Invalid(public_text(str(verdict.get("error", "the dataset could not be read"))))


def _child_limits(settings: Settings, file_size_bytes: int | None = None) -> ChildLimits:
    limits = ChildLimits(timeout_seconds=settings.ingest_timeout_seconds, cpu_seconds=settings.ingest_cpu_seconds,
                         address_space_bytes=settings.ingest_address_space_bytes)
    return limits if file_size_bytes is None else replace(limits, file_size_bytes=file_size_bytes)


@lru_cache
def _ingest_slots(count: int) -> threading.BoundedSemaphore:
    # Each child may use ingest_address_space_bytes: a burst of uploads queues here instead of exhausting memory.
    return threading.BoundedSemaphore(count)


def get_dataset(session: Session, tenant: str, dataset_id: str) -> Dataset:
    return datasets.require(session, tenant, dataset_id)


def list_datasets(session: Session, tenant: str, page: PageRequest,
                  include_deleted: bool = False) -> tuple[list[Dataset], str | None]:
    return datasets.page_live(session, tenant, page, include_deleted)


def delete_dataset(session: Session, tenant: str, dataset_id: str) -> Dataset:
    return delete_input(session, datasets, tenant, dataset_id)


@lru_cache
def builtin_summary(name: str) -> DatasetShape:
    """Built-ins never change while the server runs; describing one (a scikit-learn import) runs in a child."""
    if name not in BUILTIN_DATASETS:
        raise NotFound(f"no built-in dataset '{name}'; built-ins: {', '.join(BUILTIN_DATASETS)}")
    settings = get_settings()
    limits = _child_limits(settings)
    verdict = run_child(INGEST_MODULE, ["--builtin", name], limits, what="describing the built-in dataset")
    if not verdict.get("ok"):
        raise Invalid(public_text(str(verdict.get("error", "the built-in dataset could not be read"))))
    return DatasetShape.model_validate(verdict)
