"""Counted slots for long requests (uploads, event streams), per tenant and in all, per API process.

A request takes a slot before it costs anything and gives it back on every way out; past either bound it is
a 429 with Retry-After, so that one tenant cannot hold every slot and nobody can hold them all. Counters live
in the process (not the database): they count what this process is doing now, and vanish with it.
"""

from __future__ import annotations

import asyncio
import threading
import weakref
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager

from core.errors import TooManyRequests, Unavailable
from core.settings import Settings


class Slots:
    def __init__(self, what: str, total: int, per_tenant: int, retry_after_seconds: int) -> None:
        self.what = what  # how the refusal names them: "uploads in progress"
        self.total = total
        self.per_tenant = per_tenant
        self.retry_after_seconds = retry_after_seconds
        self.held: Counter[str] = Counter()
        # Sync routes take slots on the thread pool, async ones on the event loop.
        self.lock = threading.Lock()

    def acquire(self, tenant: str) -> None:
        with self.lock:
            self._take(tenant)

    def release(self, tenant: str) -> None:
        with self.lock:
            self.held[tenant] -= 1
            if self.held[tenant] <= 0:
                del self.held[tenant]

    def _take(self, tenant: str) -> None:
        if self.held[tenant] >= self.per_tenant:
            raise TooManyRequests(f"this tenant already has {self.held[tenant]} {self.what}, the most this server "
                                  f"allows per tenant; wait for one to finish (retry after "
                                  f"{self.retry_after_seconds} s)", self.retry_after_seconds)
        if self.held.total() >= self.total:
            raise TooManyRequests(f"the server already has {self.total} {self.what}, the most it allows; "
                                  f"retry after {self.retry_after_seconds} s", self.retry_after_seconds)
        self.held[tenant] += 1

    @contextmanager
    def hold(self, tenant: str) -> Iterator[None]:
        self.acquire(tenant)
        try:
            yield
        finally:
            self.release(tenant)


class SessionGate:
    """At most `places` requests hold a database session at once; the others wait on the event loop, up to the
    pool timeout, then get a 503 with Retry-After."""

    def __init__(self, places: int, timeout_seconds: float, retry_after_seconds: int) -> None:
        self.places = places
        self.timeout_seconds = timeout_seconds
        self.retry_after_seconds = retry_after_seconds
        # asyncio primitives belong to one loop; a process serves on one, tests start several.
        self.semaphores: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore] = (
            weakref.WeakKeyDictionary())

    @asynccontextmanager
    async def place(self) -> AsyncIterator[None]:
        semaphore = self.semaphores.setdefault(asyncio.get_running_loop(), asyncio.Semaphore(self.places))
        try:
            async with asyncio.timeout(self.timeout_seconds):
                await semaphore.acquire()
        except TimeoutError:
            raise Unavailable("the server is busy (every database connection is in use); retry after the "
                              "Retry-After delay", self.retry_after_seconds) from None
        try:
            yield
        finally:
            semaphore.release()


# Connections kept out of the gate's count: the event poller, health checks, webhook delivery.
CONNECTIONS_OUTSIDE_REQUESTS = 4


def new_session_gate(settings: Settings, retry_after_seconds: int) -> SessionGate:
    places = max(1, settings.database_pool_size + settings.database_max_overflow - CONNECTIONS_OUTSIDE_REQUESTS)
    return SessionGate(places, settings.database_pool_timeout_seconds, retry_after_seconds)
