"""The queries every tenant-owned resource (models, datasets, jobs, artifacts) shares; each is filtered by tenant."""

from __future__ import annotations

from typing import Any, Generic, Protocol, TypeVar

from sqlalchemy import ColumnElement, Select, select
from sqlalchemy.orm import Session

from app.pagination import Listable, PageRequest, fetch_page
from core.db.models import new_id
from core.errors import NotFound


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
