"""A job's events as Server-Sent Events, fed by one poller per API process.

Streams do not poll: they subscribe to an `EventHub`, whose single task reads, once per tick and in one short
session on the thread pool, the state, progress and newest event id of every job someone follows, then the
new events of those jobs that have any, and which followers' keys were revoked; it hands each stream what it
has not sent yet and wakes it. An idle stream is an asyncio wait: no thread, no session, no query of its own.
The task runs while there are subscribers and stops with the last one.

Stored events carry `id:` lines (their row ids) so that a reconnecting EventSource resumes with Last-Event-ID;
the live progress snapshot that the worker's heartbeat writes on the job row is sent, without an id, whenever
it changes. The stream ends after the event that recorded the job's final state.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse
from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session
from starlette.types import Receive, Scope, Send

from app.auth.service import Principal
from app.jobs.schemas import JobEventOut
from app.limits import Slots
from core.db.models import ApiKey, Job, JobEvent
from core.db.session import session_scope
from core.lifecycle import FINISHED
from core.settings import Settings
from core.views import JobProgress

log = logging.getLogger(__name__)

MEDIA_TYPE = "text/event-stream"
# Events read per tick, over all jobs; a longer backlog is read on the next tick, at once.
BATCH = 500
# Jobs named in one events query: each adds a term, and SQLite bounds an expression's depth.
JOBS_PER_EVENTS_QUERY = 200
# EventSource reconnects after this many milliseconds when the connection drops.
RETRY_MILLISECONDS = 2000
STREAM_RETRY_AFTER_SECONDS = 30
# While ticks keep failing (the database is down), one log line per this many seconds rather than a traceback
# per tick.
FAILURE_LOG_SECONDS = 30.0


def wants_stream(accept: str | None) -> bool:
    return MEDIA_TYPE in (accept or "")


def format_event(event: str, data: Any, event_id: int | None = None) -> str:
    # json.dumps without indent never writes a newline, so the data is one `data:` line.
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


@dataclass(eq=False)
class Subscription:
    """One open stream: where it is in its job's history, and what the hub has left for it to send."""

    principal: Principal
    job_id: str
    cursor: int  # the id of the last stored event handed to it
    chunks: list[str] = field(default_factory=list)
    last_snapshot: dict[str, Any] | None = None
    finished: bool = False  # its last chunk is queued: send what is left and close
    wake: asyncio.Event = field(default_factory=asyncio.Event)

    def push(self, chunks: Iterable[str], finished: bool = False) -> None:
        self.chunks.extend(chunks)
        self.finished = self.finished or finished
        if self.chunks or self.finished:
            self.wake.set()

    def take(self) -> str:
        self.wake.clear()
        text, self.chunks = "".join(self.chunks), []
        return text


@dataclass(frozen=True)
class JobState:
    status: str
    snapshot: dict[str, Any]
    last_event_id: int  # 0: none

    # Formatted at most once per job and tick, whatever the number of its followers, and only when one needs it.
    @cached_property
    def snapshot_event(self) -> str:
        return format_event("snapshot", self.snapshot)

    @cached_property
    def end_event(self) -> str:
        return format_event("end", {"status": self.status})


@dataclass(frozen=True)
class Tick:
    """What one read found: each followed job's state (absent: deleted), the new events of those that have
    any (oldest first, as (id, SSE text)), and which of the followers' keys still work."""

    jobs: dict[str, JobState]
    events: dict[str, list[tuple[int, str]]]
    live_keys: set[str]
    truncated: bool


def read_tick(cursors: dict[str, int], key_prefixes: set[str]) -> Tick:
    """cursors: job id -> the lowest event id any of its followers has been handed."""
    with session_scope() as session:
        jobs = _job_states(session, list(cursors))
        behind = {job_id: cursor for job_id, cursor in cursors.items()
                  if job_id in jobs and jobs[job_id].last_event_id > cursor}
        rows = _events_after(session, behind)
        # The key was checked when the stream opened; a stream can outlive that by hours.
        live = set(session.scalars(select(ApiKey.prefix).where(ApiKey.prefix.in_(key_prefixes),
                                                               ApiKey.revoked_at.is_(None))))
    events: dict[str, list[tuple[int, str]]] = defaultdict(list)
    for row in rows:
        event = JobEventOut.model_validate(row)
        events[row.job_id].append((event.id, format_event(event.kind, event.model_dump(mode="json"), event.id)))
    return Tick(jobs, events, live, truncated=len(rows) >= BATCH)


def _job_states(session: Session, job_ids: list[str]) -> dict[str, JobState]:
    # One statement, so the status and the newest event id come from the same snapshot: the final state
    # commits with its event, so a finished status means that event's id is at most last_event_id.
    last_event = select(func.max(JobEvent.id)).where(JobEvent.job_id == Job.id).scalar_subquery()
    rows = session.execute(select(Job.id, Job.status, Job.progress, last_event).where(Job.id.in_(job_ids)))
    return {job_id: JobState(status, {"status": status,
                                      "progress": JobProgress.model_validate(progress or {}).model_dump()},
                             last or 0)
            for job_id, status, progress, last in rows}


def _events_after(session: Session, cursors: dict[str, int]) -> list[JobEvent]:
    rows: list[JobEvent] = []
    items = list(cursors.items())
    for start in range(0, len(items), JOBS_PER_EVENTS_QUERY):
        if len(rows) >= BATCH:
            break
        chunk = items[start:start + JOBS_PER_EVENTS_QUERY]
        where = or_(*((JobEvent.job_id == job_id) & (JobEvent.id > cursor) for job_id, cursor in chunk))
        rows += session.scalars(select(JobEvent).where(where).order_by(JobEvent.id).limit(BATCH - len(rows)))
    return rows


class FailureLog:
    """The poller's failures, logged without flooding: the first with its traceback, then one line per
    `every_seconds` while they go on, and one when a tick works again."""

    def __init__(self, every_seconds: float = FAILURE_LOG_SECONDS) -> None:
        self.every_seconds = every_seconds
        self.in_a_row = 0
        self.logged_at = 0.0

    def failed(self, error: Exception, streams: int) -> None:
        self.in_a_row += 1
        now = time.monotonic()
        if self.in_a_row == 1:
            log.error("reading job events for %d streams failed; retrying every tick", streams, exc_info=error)
        elif now - self.logged_at >= self.every_seconds:
            log.error("reading job events for %d streams still fails (%d ticks in a row): %s: %s", streams,
                      self.in_a_row, type(error).__name__, str(error).splitlines()[0] if str(error) else "")
        else:
            return
        self.logged_at = now

    def succeeded(self) -> None:
        if self.in_a_row:
            log.warning("reading job events works again after %d failed ticks", self.in_a_row)
        self.in_a_row = 0


class EventHub:
    """Every open stream of this process, and the one task that feeds them."""

    def __init__(self, settings: Settings) -> None:
        self.poll_seconds = settings.events_poll_seconds
        self.slots = Slots("open event streams", settings.max_event_streams, settings.max_event_streams_per_tenant,
                           retry_after_seconds=STREAM_RETRY_AFTER_SECONDS)
        self.subscriptions: set[Subscription] = set()
        self.task: asyncio.Task[None] | None = None
        self.poke = asyncio.Event()  # a new subscriber: read now rather than at the next tick
        self.failures = FailureLog()

    def subscribe(self, principal: Principal, job_id: str, after_id: int) -> Subscription:
        """Raises Busy (429) past the caps. Called on the event loop, which the poller then runs on."""
        self.slots.acquire(principal.tenant)
        subscription = Subscription(principal, job_id, after_id)
        self.subscriptions.add(subscription)
        if self.task is None or self.task.done() or self.task.get_loop() is not asyncio.get_running_loop():
            self.poke = asyncio.Event()
            self.task = asyncio.create_task(self._run(), name="event-hub")
        self.poke.set()
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        if subscription in self.subscriptions:
            self.subscriptions.remove(subscription)
            self.slots.release(subscription.principal.tenant)
        if not self.subscriptions:
            self.poke.set()  # the poller ends now, not a tick later

    async def _run(self) -> None:
        while self.subscriptions:
            self.poke.clear()
            truncated = False
            try:
                truncated = await self._tick()
                self.failures.succeeded()
            except Exception as error:  # a database hiccup must not end every stream: log it and read again
                self.failures.failed(error, len(self.subscriptions))
            if not truncated:
                try:
                    async with asyncio.timeout(self.poll_seconds):
                        await self.poke.wait()
                except TimeoutError:
                    pass

    async def _tick(self) -> bool:
        followers = list(self.subscriptions)
        cursors: dict[str, int] = {}
        for subscription in followers:
            cursors[subscription.job_id] = min(cursors.get(subscription.job_id, subscription.cursor),
                                               subscription.cursor)
        prefixes = {subscription.principal.key_prefix for subscription in followers}
        tick = await run_in_threadpool(read_tick, cursors, prefixes)
        for subscription in followers:
            if subscription in self.subscriptions and not subscription.finished:
                _deliver(subscription, tick)
        return tick.truncated


def _deliver(subscription: Subscription, tick: Tick) -> None:
    principal = subscription.principal
    if principal.key_prefix not in tick.live_keys:
        subscription.push([format_event("error", {"detail": f"API key cnd_{principal.key_prefix} was revoked"})],
                          finished=True)
        return
    state = tick.jobs.get(subscription.job_id)
    if state is None:
        subscription.push([], finished=True)  # deleted meanwhile: nothing more will happen to it
        return
    chunks = [text for event_id, text in tick.events.get(subscription.job_id, []) if event_id > subscription.cursor]
    for event_id, _ in tick.events.get(subscription.job_id, []):
        subscription.cursor = max(subscription.cursor, event_id)
    if state.snapshot != subscription.last_snapshot:
        chunks.append(state.snapshot_event)
        subscription.last_snapshot = state.snapshot
    done = state.status in FINISHED and subscription.cursor >= state.last_event_id
    if done:
        chunks.append(state.end_event)
    subscription.push(chunks, finished=done)


async def event_stream(subscription: Subscription, settings: Settings) -> AsyncIterator[str]:
    """`state`, `progress`, `log` and `webhook` events (stored, with ids), `snapshot` events (live progress),
    keep-alive comments, and a final `end` event; or an `error` event, and the end, once the key is revoked."""
    yield f"retry: {RETRY_MILLISECONDS}\n\n"
    # Streams opened together would send their keep-alives together, a thousand writes in one instant that stall
    # every other request of the process: each stream's first one comes at a random point of the interval.
    quiet_seconds = settings.events_keepalive_seconds * (1.0 - random.random())
    while True:
        try:
            async with asyncio.timeout(quiet_seconds):
                await subscription.wake.wait()
        except TimeoutError:
            yield ": keep-alive\n\n"
            quiet_seconds = settings.events_keepalive_seconds
            continue
        text = subscription.take()
        if text:
            yield text
        if subscription.finished:
            return


class EventStreamResponse(StreamingResponse):
    """Subscribes when the response starts (a 429 then is still an error response) and unsubscribes however
    it ends: finished, disconnected, or failed."""

    def __init__(self, hub: EventHub, principal: Principal, job_id: str, after_id: int, settings: Settings) -> None:
        super().__init__(iter(()), media_type=MEDIA_TYPE,
                         # no-transform and X-Accel-Buffering: proxies must pass events on at once.
                         headers={"Cache-Control": "no-cache, no-transform", "X-Accel-Buffering": "no"})
        self.hub = hub
        self.follow = (principal, job_id, after_id)
        self.settings = settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        subscription = self.hub.subscribe(*self.follow)
        try:
            self.body_iterator = event_stream(subscription, self.settings)
            await super().__call__(scope, receive, send)
        finally:
            self.hub.unsubscribe(subscription)
