"""The reaper: settles jobs whose worker vanished and (re)sends queued jobs.

It runs in every worker's main process, at start and then every reaper_interval_seconds. Several
reapers at once are safe: each transition is a conditional UPDATE and a duplicate message is
dropped by the claim.
"""

from __future__ import annotations

import logging
import shutil
import socket
from datetime import timedelta
from typing import Any

from celery import Celery

from core import lifecycle
from core.broker import get_celery
from core.db.models import utcnow
from core.db.session import session_scope
from core.dispatch import dispatch
from core.periodic import PeriodicThread
from core.settings import get_settings

log = logging.getLogger(__name__)

# A key the broker keeps for as long as it keeps our messages: if it is gone (Redis restarted
# without persistence, or flushed), every queued job's message may be gone too.
BROKER_MARKER = "condenser:broker-marker"


def broker_lost_messages(app: Celery) -> bool:
    """Whether the broker's marker is missing (see BROKER_MARKER); mark_broker sets it once the jobs are re-sent."""
    client = _redis_client(app)
    # The filesystem broker keeps messages on disk; only a killed worker's unacked message is lost, and its job's
    # lease expiry covers that.
    return client is not None and not client.exists(BROKER_MARKER)


def mark_broker(app: Celery) -> None:
    client = _redis_client(app)
    if client is not None:
        client.set(BROKER_MARKER, "1")


def _redis_client(app: Celery) -> Any:
    with app.connection_for_write() as connection:
        connection.ensure_connection(max_retries=1)
        client = getattr(connection.default_channel, "client", None)
        return client if client is not None and hasattr(client, "set") else None


def collect_work_dirs() -> list[str]:
    """Remove the work dirs (checkpoints, exports) of jobs finished longer ago than the retention."""
    settings = get_settings()
    root = settings.data_dir.resolve() / "jobs"
    if not root.is_dir():
        return []
    names = [entry.name for entry in root.iterdir() if entry.is_dir()]
    cutoff = utcnow() - timedelta(hours=settings.work_dir_retention_hours)
    with session_scope() as session:
        done = lifecycle.finished_before(session, names, cutoff)
    for job_id in done:
        shutil.rmtree(root / job_id, ignore_errors=True)
    return done


def reap_once() -> list[str]:
    actor = f"reaper@{socket.gethostname()}"
    settings = get_settings()
    app = get_celery()
    try:
        redispatch_all = broker_lost_messages(app)
    except Exception:
        log.warning("broker unreachable; reaper will retry", exc_info=True)
        return []
    if redispatch_all:
        log.info("broker marker missing: re-sending every queued job")
    with session_scope() as session:
        to_send = lifecycle.reap(session, actor, redispatch_all_queued=redispatch_all,
                                 message_grace=timedelta(seconds=settings.message_grace_seconds))
    sent = dispatch(to_send) if to_send else []
    if redispatch_all and len(sent) == len(to_send):
        # Only now: had the database or the broker failed above, the next pass must re-send them all again.
        mark_broker(app)
    return sent


def reap_and_collect() -> None:
    reap_once()
    collect_work_dirs()


def start_reaper() -> PeriodicThread:
    thread = PeriodicThread("condenser-reaper", get_settings().reaper_interval_seconds, reap_and_collect)
    thread.start()
    return thread
