"""Request-scoped dependencies: one database session per request, the caller's identity, settings, store."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Annotated, TypeVar

import anyio
from fastapi import Depends, Header, Request, Response, Security
from fastapi.concurrency import run_in_threadpool
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from app.auth.service import Principal, authenticate, key_prefix
from app.idempotency import REPLAYED_HEADER
from core.db.session import session_scope
from core.settings import Settings, get_settings
from core.storage import BlobStore, get_store

T = TypeVar("T")


async def get_session(request: Request) -> AsyncIterator[Session]:
    """The request's unit of work: committed after the handler returns, rolled back if it raises.

    A request takes one of the gate's places first, waiting on the event loop rather than on a thread: a
    session keeps its connection between the handler's hops onto the thread pool, so without the gate more
    requests than connections would each hold one and leave the pool's remaining waiters, on every thread,
    blocked until the pool timeout (a deadlock under load, then 500s)."""
    async with request.app.state.session_gate.place():
        scope = session_scope()
        session = scope.__enter__()
        try:
            yield session
        except BaseException as exc:
            with anyio.CancelScope(shield=True):  # a disconnect must not skip the rollback and the close
                await run_in_threadpool(scope.__exit__, type(exc), exc, exc.__traceback__)
            raise
        with anyio.CancelScope(shield=True):
            await run_in_threadpool(scope.__exit__, None, None, None)


# scope="function": commit before the response is sent, so a failed commit is an error response
# rather than a 201 for a row that does not exist.
DbSession = Annotated[Session, Depends(get_session, scope="function")]
SettingsDep = Annotated[Settings, Depends(get_settings)]
StoreDep = Annotated[BlobStore, Depends(get_store)]

_bearer = HTTPBearer(
    auto_error=False,
    scheme_name="ApiKey",
    bearerFormat="cnd_<prefix>_<secret>",
    description="An API key created on the server with `condenser keys create --tenant NAME`.",
)


def require_principal(
    request: Request, session: DbSession, credentials: HTTPAuthorizationCredentials | None = Security(_bearer)
) -> Principal:
    principal = authenticate(session, credentials.credentials if credentials else None)
    # For code below the route that counts per tenant (upload slots) without its own dependency.
    request.state.principal = principal
    return principal


CurrentPrincipal = Annotated[Principal, Depends(require_principal)]


async def bearer_key(credentials: HTTPAuthorizationCredentials | None = Security(_bearer)) -> str:
    """The API key sent, checked for its shape only (async: no hop, no query), for a route that finds the key in
    its own query (see in_one_hop). Documented in the OpenAPI schema like CurrentPrincipal."""
    plaintext = credentials.credentials if credentials else None
    key_prefix(plaintext)
    return plaintext or ""


BearerKey = Annotated[str, Depends(bearer_key)]


async def in_one_hop(request: Request, work: Callable[[Session], T]) -> T:
    """Run `work` in a session of its own on ONE hop onto the thread pool, committed and closed there.

    For hot reads: a sync route with CurrentPrincipal and DbSession costs a hop per sync dependency, one for the
    route, one to validate its response_model and one for the session's end, each a round trip through the event
    loop (most of a status read's time under load). The session gate is taken first, as get_session does."""
    async with request.app.state.session_gate.place():
        return await run_in_threadpool(_in_session, work)


def _in_session(work: Callable[[Session], T]) -> T:
    with session_scope() as session:
        return work(session)


IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        min_length=1,
        max_length=200,
        description="Any unique string (a UUID). Retrying with the same key and the same request returns the "
        "first result (with header Idempotent-Replayed: true) instead of creating a second resource; "
        "the same key with a different request is a 409.",
        examples=["5f2b7c1e-8d4a-4e0b-9a57-0c6f3e2d1b9a"],
    ),
]


def release_connection(session: Session) -> None:
    """End the (read-only) transaction so far and return its pooled connection; the session opens a new
    one on next use. Called before streaming an upload, which may take minutes."""
    session.close()


def mark_replayed(response: Response, replayed: bool) -> None:
    if replayed:
        response.headers[REPLAYED_HEADER] = "true"
