"""The collector of files that nothing references: blobs no row names, temp files a crash left behind.

Runs in the API at start-up and in every process (API and worker) every orphan_collect_interval_seconds. Several
at once are safe: a blob is removed only once moved aside and found unnamed and old (core.storage.remove_blobs).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from core.db.repository import named_blobs
from core.db.session import session_scope
from core.periodic import PeriodicThread
from core.settings import get_settings
from core.storage import get_store

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Collected:
    blobs: list[str]
    temp_files: int


def _named(sha256s: list[str]) -> set[str]:
    with session_scope() as session:
        return named_blobs(session, sha256s)


def collect_orphans() -> Collected:
    grace = get_settings().orphan_file_grace_hours * 3600
    store = get_store()
    old = store.blobs_older_than(grace)
    unnamed = set(old) - _named(old) if old else set()
    blobs = store.remove_blobs(unnamed, _named, grace) if unnamed else []
    temp_files = store.remove_temp_files_older_than(grace)
    if blobs or temp_files:
        log.info("removed %d blob(s) that no row names and %d abandoned temp file(s)", len(blobs), len(temp_files))
    return Collected(blobs=blobs, temp_files=len(temp_files))


def start_collector() -> PeriodicThread:
    """The collector, at once and then periodically, in a daemon thread (a failed pass is retried at the next)."""
    thread = PeriodicThread("condenser-collector", get_settings().orphan_collect_interval_seconds, collect_orphans)
    thread.start()
    return thread


@asynccontextmanager
async def collecting(_: object) -> AsyncIterator[None]:
    """An ASGI lifespan: the collector runs while the API serves."""
    thread = start_collector()
    try:
        yield
    finally:
        thread.stopped.set()
