"""Register datasets: ingest the (untrusted) upload into a canonical .npz, store it, record its shape."""

from __future__ import annotations

from functools import lru_cache

from sqlalchemy.orm import Session

from app import quotas
from app.config import Settings
from app.datasets import repository
from app.db.models import Dataset, new_id
from app.errors import Invalid, NotFound
from app.idempotency import Outcome, claim, idempotent_request, previous_resource
from app.pagination import PageRequest
from app.storage import BlobStore
from app.uploads import Upload
from worker.engine.config import BUILTIN_DATASETS
from worker.engine.errors import DataError
from worker.engine.ingest import DatasetSummary, IngestLimits, ingest_dataset, load_builtin_summary

ROUTE = "POST /v1/datasets"
TEXT_FIELDS = ("name",)


def register_dataset(session: Session, tenant: str, upload: Upload, idempotency_key: str | None,
                     store: BlobStore, settings: Settings) -> Outcome[Dataset]:
    request = idempotent_request(tenant, ROUTE, idempotency_key, upload.fingerprint())
    earlier = previous_resource(session, request)
    if earlier is not None:
        return Outcome(get_dataset(session, tenant, earlier), replayed=True)

    quotas.check_storage(session, tenant, settings, upload.bytes)
    name = upload.display_name(fallback="dataset")
    with store.temp_path(".npz") as canonical:
        try:
            summary = ingest_dataset(upload.path, upload.filename or "upload", canonical, _limits(settings))
        except DataError as exc:
            raise Invalid(str(exc)) from exc
        # Publish before the claim: hashing and fsyncing a large file must not hold SQLite's write lock.
        blob = store.put_file(canonical)
    dataset_id = new_id("dst")
    winner = claim(session, request, dataset_id)
    if winner is not None:
        return Outcome(get_dataset(session, tenant, winner), replayed=True)
    dataset = Dataset(id=dataset_id, tenant=tenant, name=name, format=summary.format, sha256=upload.sha256,
                      bytes=upload.bytes, canonical_sha256=blob.sha256, num_classes=summary.num_classes,
                      class_names=summary.class_names, num_samples=summary.num_samples,
                      class_counts=summary.class_counts, image_shape=summary.image_shape)
    repository.add(session, dataset)
    return Outcome(dataset)


def get_dataset(session: Session, tenant: str, dataset_id: str) -> Dataset:
    dataset = repository.get(session, tenant, dataset_id)
    if dataset is None:
        raise NotFound(f"dataset {dataset_id} not found")
    return dataset


def list_datasets(session: Session, tenant: str, page: PageRequest) -> tuple[list[Dataset], str | None]:
    return repository.page(session, tenant, page)


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
