"""Register datasets: ingest the (untrusted) upload into a canonical .npz, store it, record its shape."""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache

from sqlalchemy.orm import Session

from app import quotas
from app.datasets.repository import datasets
from app.idempotency import Outcome, create_once, idempotent_request
from app.pagination import PageRequest
from app.uploads import Upload
from core.db.models import Dataset
from core.errors import Invalid, NotFound
from core.settings import Settings
from core.storage import BlobStore
from worker.engine.config import BUILTIN_DATASETS
from worker.engine.errors import DataError
from worker.engine.ingest import DatasetSummary, IngestLimits, ingest_dataset, load_builtin_summary

ROUTE = "POST /v1/datasets"
TEXT_FIELDS = ("name",)


def register_dataset(session: Session, tenant: str, upload: Upload, idempotency_key: str | None,
                     store: BlobStore, settings: Settings) -> Outcome[Dataset]:
    request = idempotent_request(tenant, ROUTE, idempotency_key, upload.fingerprint())
    return create_once(session, datasets, tenant, request,
                       lambda: _prepare(session, tenant, upload, store, settings))


def _prepare(session: Session, tenant: str, upload: Upload, store: BlobStore,
             settings: Settings) -> Callable[[str], Dataset]:
    """Ingest the upload and store its canonical .npz; returns how to build the row from its id."""
    quotas.check_storage(session, tenant, settings, upload.bytes)
    name = upload.display_name(fallback="dataset")
    with store.temp_path(".npz") as canonical:
        try:
            summary = ingest_dataset(upload.path, upload.filename or "upload", canonical, _limits(settings))
        except DataError as exc:
            raise Invalid(str(exc)) from exc
        # Publish before the claim: hashing and fsyncing a large file must not hold SQLite's write lock.
        blob = store.put_file(canonical)
    return lambda dataset_id: Dataset(
        id=dataset_id, tenant=tenant, name=name, format=summary.format, sha256=upload.sha256, bytes=upload.bytes,
        canonical_sha256=blob.sha256, num_classes=summary.num_classes, class_names=summary.class_names,
        num_samples=summary.num_samples, class_counts=summary.class_counts, image_shape=summary.image_shape)


def get_dataset(session: Session, tenant: str, dataset_id: str) -> Dataset:
    return datasets.require(session, tenant, dataset_id)


def list_datasets(session: Session, tenant: str, page: PageRequest) -> tuple[list[Dataset], str | None]:
    return datasets.page(session, tenant, page)


@lru_cache
def builtin_summary(name: str) -> DatasetSummary:
    """Built-ins never change while the server runs; loading one costs a scikit-learn import."""
    if name not in BUILTIN_DATASETS:
        raise NotFound(f"no built-in dataset '{name}'; built-ins: {', '.join(BUILTIN_DATASETS)}")
    return load_builtin_summary(name)


def _limits(settings: Settings) -> IngestLimits:
    return IngestLimits(max_entries=settings.max_archive_entries, max_unpacked_bytes=settings.max_unpacked_bytes,
                        max_compression_ratio=settings.max_compression_ratio,
                        max_image_pixels=settings.max_image_pixels)
