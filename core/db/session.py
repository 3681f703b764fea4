"""Engine and session factories shared by the API and the worker."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import TypeVar

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from core.settings import get_settings

log = logging.getLogger(__name__)
T = TypeVar("T")


def make_engine(url: str, pool_size: int = 5, max_overflow: int = 10, pool_timeout: float = 30.0) -> Engine:
    pool = {"pool_size": pool_size, "max_overflow": max_overflow, "pool_timeout": pool_timeout}
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        in_memory = not path or path == ":memory:"  # one shared connection (SingletonThreadPool): no queue to size
        if not in_memory:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False},
                               **({} if in_memory else pool))
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    # pre_ping so that a restarted PostgreSQL costs one retry, not a failed job.
    return create_engine(url, pool_pre_ping=True, **pool)


def _sqlite_pragmas(dbapi_connection, _record) -> None:  # type: ignore[no-untyped-def]
    cursor = dbapi_connection.cursor()
    # WAL lets the API read while a worker writes; busy_timeout waits on the writer lock
    # instead of failing at once.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


@lru_cache
def get_engine() -> Engine:
    settings = get_settings()
    return make_engine(settings.database_url, settings.database_pool_size, settings.database_max_overflow,
                       settings.database_pool_timeout_seconds)


@lru_cache
def get_sessionmaker() -> sessionmaker[Session]:
    return sessionmaker(bind=get_engine(), expire_on_commit=False)


@contextmanager
def session_scope() -> Iterator[Session]:
    """One unit of work: commit on success, roll back on error. Services never commit."""
    session = get_sessionmaker()()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def through_outage(transaction: Callable[[], T], seconds: float, what: str) -> T:
    """Run `transaction` (which opens its own session scope); while the database is unreachable, run it again
    with backoff (0.5 s, doubling up to 10 s) until `seconds` have passed, then let the error through."""
    deadline = time.monotonic() + seconds
    delay = 0.5
    while True:
        try:
            return transaction()
        except OperationalError:
            if time.monotonic() + delay > deadline:
                raise
            log.warning("%s: database unavailable; trying again in %.1f s", what, delay, exc_info=True)
            time.sleep(delay)
            delay = min(delay * 2, 10.0)


def after_commit(session: Session, action: Callable[[], None]) -> None:
    """Run `action` once the session's transaction commits (not when a savepoint is released): a message that
    names a row must not reach a worker before the row exists."""
    pending = [action]

    def run(committed: Session) -> None:
        if pending and not committed.in_nested_transaction():
            pending.pop()()

    event.listen(session, "after_commit", run)
