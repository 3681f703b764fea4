"""A job's events as Server-Sent Events, read from the database.

Each poll opens a short session, reads the job's state and the events after the last one sent, and closes
it before sleeping, so a thousand open streams hold no database connections. Stored events carry `id:`
lines (their row ids) so that a reconnecting EventSource resumes with Last-Event-ID; the live progress
snapshot that the worker's heartbeat writes on the job row is sent, without an id, whenever it changes.
The stream ends after the event that recorded the job's final state.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi.concurrency import run_in_threadpool

from app.auth.service import Principal, revoked
from app.jobs import repository, service
from app.jobs.schemas import JobEventOut
from core.db.session import session_scope
from core.errors import NotFound
from core.lifecycle import FINISHED
from core.settings import Settings
from core.views import JobProgress

MEDIA_TYPE = "text/event-stream"
BATCH = 200
# EventSource reconnects after this many milliseconds when the connection drops.
RETRY_MILLISECONDS = 2000


@dataclass(frozen=True)
class Poll:
    key_revoked: bool
    status: str
    snapshot: dict[str, Any]
    events: list[JobEventOut]

    @property
    def caught_up_on_final_state(self) -> bool:
        # The status is read before the events and the final state commits with its event, so a finished
        # status means that event is in this batch or an earlier one, unless the batch was cut short.
        return self.status in FINISHED and len(self.events) < BATCH


def wants_stream(accept: str | None) -> bool:
    return MEDIA_TYPE in (accept or "")


def format_event(event: str, data: Any, event_id: int | None = None) -> str:
    # json.dumps without indent never writes a newline, so the data is one `data:` line.
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


def poll(principal: Principal, job_id: str, after_id: int) -> Poll:
    with session_scope() as session:
        job = service.get_job(session, principal.tenant, job_id)
        snapshot = {"status": job.status, "progress": JobProgress.model_validate(job.progress or {}).model_dump()}
        rows = repository.events_after(session, job.id, after_id, BATCH)
        # The key was checked when the stream opened; a stream can outlive that by hours.
        events = [JobEventOut.model_validate(row) for row in rows]
        return Poll(revoked(session, principal), job.status, snapshot, events)


async def event_stream(principal: Principal, job_id: str, after_id: int, settings: Settings) -> AsyncIterator[str]:
    """`state`, `progress`, `log` and `webhook` events (stored, with ids), `snapshot` events (live progress),
    keep-alive comments, and a final `end` event; or an `error` event, and the end, once the key is revoked."""
    yield f"retry: {RETRY_MILLISECONDS}\n\n"
    last_snapshot: dict[str, Any] | None = None
    last_write = time.monotonic()
    while True:
        try:
            current = await run_in_threadpool(poll, principal, job_id, after_id)
        except NotFound:
            return  # deleted meanwhile: nothing more will happen to it
        if current.key_revoked:
            yield format_event("error", {"detail": f"API key cnd_{principal.key_prefix} was revoked"})
            return
        chunks = [format_event(event.kind, event.model_dump(mode="json"), event.id) for event in current.events]
        if current.events:
            after_id = current.events[-1].id
        if current.snapshot != last_snapshot:
            chunks.append(format_event("snapshot", current.snapshot))
            last_snapshot = current.snapshot
        if current.caught_up_on_final_state:
            yield "".join(chunks) + format_event("end", {"status": current.status})
            return
        if not chunks and time.monotonic() - last_write >= settings.events_keepalive_seconds:
            chunks.append(": keep-alive\n\n")
        if chunks:
            yield "".join(chunks)
            last_write = time.monotonic()
        if len(current.events) < BATCH:
            await asyncio.sleep(settings.events_poll_seconds)
