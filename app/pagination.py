"""Keyset pagination, newest first, with an opaque cursor.

A cursor names the last row a client saw (created_at, id); the next page is everything strictly
older. Unlike offsets, rows inserted meanwhile neither repeat nor vanish between pages.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, Protocol, TypeVar

from fastapi import Query, Request
from pydantic import WithJsonSchema
from sqlalchemy import Select, and_, or_
from sqlalchemy.orm import InstrumentedAttribute, Session

from core.errors import Invalid
from core.views import as_utc

DEFAULT_LIMIT = 20
MAX_LIMIT = 100

LimitQuery = Annotated[int, Query(ge=1, le=MAX_LIMIT, description="Items per page (1 to 100).")]
CURSOR_PATTERN = "^[A-Za-z0-9_-]*$"  # base64url, unpadded: what Cursor.encode writes
# Documented as a plain string: "str | None" would publish a null, which a query string can only send as "null".
CURSOR_DESCRIPTION = "The `next_cursor` of the previous page; omit for the first page."
CursorQuery = Annotated[
    str | None,
    WithJsonSchema({"type": "string", "maxLength": 200, "pattern": CURSOR_PATTERN, "description": CURSOR_DESCRIPTION}),
    Query(max_length=200, pattern=CURSOR_PATTERN, description=CURSOR_DESCRIPTION),
]

IncludeDeletedQuery = Annotated[bool, Query(description="Also list what was deleted (with its deleted_at set).")]


class Listable(Protocol):
    id: Any
    created_at: Any


RowT = TypeVar("RowT", bound=Listable)


@dataclass(frozen=True)
class PageRequest:
    limit: int = DEFAULT_LIMIT
    cursor: str | None = None


@dataclass(frozen=True)
class Cursor:
    created_at: datetime
    id: str

    def encode(self) -> str:
        raw = json.dumps([as_utc(self.created_at).isoformat(), self.id], separators=(",", ":"))
        return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")

    @classmethod
    def decode(cls, token: str) -> Cursor:
        try:
            padded = token + "=" * (-len(token) % 4)
            created_at, row_id = json.loads(base64.urlsafe_b64decode(padded))
            return cls(created_at=as_utc(datetime.fromisoformat(created_at)), id=str(row_id))
        # OverflowError: a time near year 1 or 9999 whose offset moves it out of range in UTC.
        except (binascii.Error, ValueError, TypeError, UnicodeDecodeError, OverflowError) as exc:
            raise Invalid("cursor is not valid: pass back the next_cursor of a previous page unchanged") from exc


def fetch_page(
    session: Session, statement: Select[tuple[RowT]], entity: type[RowT], page: PageRequest
) -> tuple[list[RowT], str | None]:
    """Run `statement` (already filtered by tenant) for one page; returns the rows and the next cursor."""
    created: InstrumentedAttribute[Any] = entity.created_at
    row_id: InstrumentedAttribute[Any] = entity.id
    if page.cursor is not None:
        after = Cursor.decode(page.cursor)
        statement = statement.where(
            or_(created < after.created_at, and_(created == after.created_at, row_id < after.id))
        )
    # One extra row tells whether a next page exists without a COUNT.
    rows = list(session.scalars(statement.order_by(created.desc(), row_id.desc()).limit(page.limit + 1)))
    if len(rows) <= page.limit:
        return rows, None
    rows = rows[: page.limit]
    return rows, Cursor(created_at=rows[-1].created_at, id=rows[-1].id).encode()


def next_link(request: Request, next_cursor: str | None) -> str | None:
    """The same listing (filters and limit kept) from the next cursor on, as a path with query."""
    if next_cursor is None:
        return None
    url = request.url.include_query_params(cursor=next_cursor)
    return f"{url.path}?{url.query}"
