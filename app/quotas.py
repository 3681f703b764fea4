"""Per-tenant limits: unfinished jobs (429) and stored bytes (413).

Stored bytes are what the tenant's blobs take: model weights, each dataset's canonical .npz (which a
zip of blank PNGs can make a thousand times larger than the upload), and artifacts.

Both are counted from the rows on every check rather than kept in counters, so nothing can drift out of
step with what is really there (no schema, no bookkeeping on each write). The price is a small overshoot
under concurrency: two requests checked at the same moment may both pass.
"""

from __future__ import annotations

from sqlalchemy import and_, func, select, true
from sqlalchemy.orm import Session

from core.db.models import Artifact, Dataset, Job, Model
from core.errors import TooLarge, TooManyRequests
from core.lifecycle import FINISHED
from core.settings import Settings

# The size of the blob each row holds, and which rows hold one of their own. Datasets recorded before
# canonical_bytes existed count their upload; a job's result model shares its artifact's file, counted there; a
# deleted model or dataset holds none (the blob collector removes its file when no live row names it).
_STORED_BYTES = ((Model, Model.bytes, and_(Model.source_job_id.is_(None), Model.deleted_at.is_(None))),
                 (Dataset, func.coalesce(Dataset.canonical_bytes, Dataset.bytes), Dataset.deleted_at.is_(None)),
                 (Artifact, Artifact.bytes, true()))


def check_job_slot(session: Session, tenant: str, settings: Settings) -> None:
    """429 when the tenant already has as many queued or running jobs as the server allows."""
    limit = settings.max_active_jobs_per_tenant
    unfinished = session.scalar(select(func.count()).select_from(Job).where(
        Job.tenant == tenant, Job.status.not_in(FINISHED))) or 0
    if unfinished >= limit:
        raise TooManyRequests(f"this tenant already has {unfinished} unfinished jobs, the most this server allows "
                              f"at once ({limit}); submit again when one finishes, or cancel one")


def check_storage(session: Session, tenant: str, settings: Settings, incoming: int | None = None) -> int:
    """413 when an upload of `incoming` bytes (None: not yet known, at least one) would take the tenant past
    its storage quota; otherwise the bytes the tenant may still store."""
    limit = settings.max_stored_bytes_per_tenant
    used = stored_bytes(session, tenant)
    if used + (incoming or 1) > limit:
        upload = "this upload" if incoming is None else f"an upload of {incoming} bytes"
        raise TooLarge(f"storage quota exceeded: this tenant stores {used} bytes of the {limit} it may; "
                       f"{upload} does not fit")
    return limit - used


def stored_bytes(session: Session, tenant: str) -> int:
    # int(): PostgreSQL sums BIGINT as NUMERIC, which arrives as a Decimal.
    return sum(int(session.scalar(select(func.coalesce(func.sum(size), 0)).where(entity.tenant == tenant, own))
                   or 0) for entity, size, own in _STORED_BYTES)
