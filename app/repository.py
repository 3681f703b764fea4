"""The queries every tenant-owned resource (models, datasets, jobs, artifacts) shares; each is filtered by tenant."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Generic, Protocol, TypeVar

from sqlalchemy import ColumnElement, Select, select
from sqlalchemy.orm import Session

from app.pagination import Listable, PageRequest, fetch_page
from core.db.models import new_id, utcnow
from core.errors import Conflict, NotFound
from core.views import as_utc


class TenantOwned(Listable, Protocol):
    tenant: Any


RowT = TypeVar("RowT", bound=TenantOwned)


class TenantRepository(Generic[RowT]):
    """Add, get and page the rows of one ORM class, never seeing another tenant's."""

    def __init__(self, entity: type[RowT], noun: str, id_prefix: str) -> None:
        self.entity = entity
        self.noun = noun  # how an error names a row: "model mdl_... not found"
        self.id_prefix = id_prefix

    def new_id(self) -> str:
        return new_id(self.id_prefix)

    def add(self, session: Session, row: RowT) -> None:
        session.add(row)
        # Flush now: defaults (created_at) are filled in for the response, constraint errors surface here, and rows
        # that reference this one (a job's events) can be written next.
        session.flush()

    def get(self, session: Session, tenant: str, row_id: str) -> RowT | None:
        return session.scalar(self._of(tenant).where(self.entity.id == row_id))

    def require(self, session: Session, tenant: str, row_id: str) -> RowT:
        """The row, or a 404: another tenant's row is reported exactly like a missing one."""
        row = self.get(session, tenant, row_id)
        if row is None:
            raise self.not_found(row_id)
        return row

    def not_found(self, row_id: str) -> NotFound:
        return NotFound(f"{self.noun} {row_id} not found")

    def page(self, session: Session, tenant: str, request: PageRequest,
             *where: ColumnElement[bool]) -> tuple[list[RowT], str | None]:
        """One page, newest first, of the tenant's rows that match every `where` criterion."""
        return fetch_page(session, self._of(tenant).where(*where), self.entity, request)

    def _of(self, tenant: str) -> Select[tuple[RowT]]:
        return select(self.entity).where(self.entity.tenant == tenant)


class Deletable(TenantOwned, Protocol):
    deleted_at: Any


DeletableT = TypeVar("DeletableT", bound=Deletable)


class DeletableRepository(TenantRepository[DeletableT]):
    """Rows a tenant deletes softly (models, datasets): the row stays, for the jobs and lineage that name it, and
    GET still shows it; listings leave it out, and nothing new may use it."""

    def require_live(self, session: Session, tenant: str, row_id: str) -> DeletableT:
        """The row, a 404 as `require`, or a 409 if it was deleted: a new job must not name it."""
        row = self.require(session, tenant, row_id)
        if row.deleted_at is not None:
            raise self.deleted(row_id, row.deleted_at)
        return row

    def deleted(self, row_id: str, deleted_at: datetime) -> Conflict:
        return Conflict(f"{self.noun} {row_id} was deleted on {deletion_date(deleted_at)}; upload it again (the "
                        "upload gets a new id)")

    def page_live(self, session: Session, tenant: str, request: PageRequest,
                  include_deleted: bool) -> tuple[list[DeletableT], str | None]:
        if include_deleted:
            return self.page(session, tenant, request)
        return self.page(session, tenant, request, self.entity.deleted_at.is_(None))

    def soft_delete(self, row: DeletableT) -> None:
        """Mark the row deleted (once: deleting it again leaves the first date). Its file is not removed here:
        the blob collector (core.orphans) removes it once no live row names it (core.db.repository.named_blobs)."""
        if row.deleted_at is None:
            row.deleted_at = utcnow()


def deletion_date(deleted_at: datetime) -> str:
    """When a row was deleted, as refusals name it."""
    return f"{as_utc(deleted_at):%Y-%m-%d %H:%M} UTC"
