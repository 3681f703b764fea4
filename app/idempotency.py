"""Idempotency-Key support for the creating routes (POST /v1/jobs, /v1/models, /v1/datasets).

The first request with a key records which resource it created and a hash of what it asked for.
A retry with the same key and the same request gets that resource back; the same key with a
different request is a 409, because silently returning the first result would hide a client bug.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.repository import RowT, TenantRepository
from core.db.models import IdempotencyRecord
from core.errors import Conflict

T = TypeVar("T")

REPLAYED_HEADER = "Idempotent-Replayed"
# OpenAPI for the 201 of a creating route: how a client tells a replay from a first creation.
CREATED_RESPONSE: dict[int | str, dict[str, Any]] = {
    201: {"headers": {REPLAYED_HEADER: {
        "description": "'true' when an earlier request with the same Idempotency-Key created this resource.",
        "schema": {"type": "string", "enum": ["true"]},
    }}},
}


@dataclass(frozen=True)
class Outcome(Generic[T]):
    """What a creating service returns: the resource, and whether an earlier request created it."""

    resource: T
    replayed: bool = False


@dataclass(frozen=True)
class IdempotentRequest:
    tenant: str
    route: str
    key: str
    request_hash: str


def request_hash(payload: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of what the request asked for."""
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def idempotent_request(tenant: str, route: str, key: str | None,
                       payload: Mapping[str, Any]) -> IdempotentRequest | None:
    return None if key is None else IdempotentRequest(tenant, route, key, request_hash(payload))


def previous_resource(session: Session, request: IdempotentRequest | None) -> str | None:
    """The id an earlier request with this key created, or None; 409 if that request was different."""
    if request is None:
        return None
    record = session.scalar(
        select(IdempotencyRecord).where(
            IdempotencyRecord.tenant == request.tenant,
            IdempotencyRecord.route == request.route,
            IdempotencyRecord.key == request.key,
        )
    )
    if record is None:
        return None
    if record.request_hash != request.request_hash:
        raise Conflict(
            f"Idempotency-Key '{request.key}' was already used for a different request to {request.route}; "
            "use a new key for a new request"
        )
    return record.resource_id


def claim(session: Session, request: IdempotentRequest | None, resource_id: str) -> str | None:
    """Record that this request creates `resource_id`; call it as the transaction's first write.

    Returns None when the claim is ours, or the resource id of a concurrent request with the same key
    that committed first (then the caller must create nothing). No savepoint: with pysqlite a SAVEPOINT
    that opens the transaction commits on release. Only reads precede the claim, so rolling the whole
    transaction back on a lost race loses nothing of ours.
    """
    if request is None:
        return None
    session.add(IdempotencyRecord(tenant=request.tenant, route=request.route, key=request.key,
                                  request_hash=request.request_hash, resource_id=resource_id))
    try:
        session.flush()
    except IntegrityError:
        session.rollback()
        return previous_resource(session, request)
    return None


def replay(session: Session, rows: TenantRepository[RowT], tenant: str,
           request: IdempotentRequest | None) -> Outcome[RowT] | None:
    """The row an earlier request with this key created, as a replayed Outcome; None if there is none.

    A creating route whose checks are slow (a child process) asks this first, so that a retry skips them."""
    earlier = previous_resource(session, request)
    return None if earlier is None else Outcome(rows.require(session, tenant, earlier), replayed=True)


def create_once(session: Session, rows: TenantRepository[RowT], tenant: str, request: IdempotentRequest | None,
                prepare: Callable[[], Callable[[str], RowT]]) -> Outcome[RowT]:
    """Add a new row to `rows` for this request, or return the row an earlier request with its key created.

    `prepare` does what is the resource's own (checks, storing its file) and returns how to build the row from
    its new id. It runs before the claim, so it must only read the database: the claim is the transaction's
    first write, and slow work such as hashing and fsyncing a large file must not hold SQLite's write lock.
    """
    earlier = replay(session, rows, tenant, request)
    if earlier is not None:
        return earlier
    build = prepare()
    resource_id = rows.new_id()
    winner = claim(session, request, resource_id)
    if winner is not None:
        return Outcome(rows.require(session, tenant, winner), replayed=True)
    row = build(resource_id)
    rows.add(session, row)
    return Outcome(row)
