"""Lease renewal in a background thread of the job's process.

The training loop never touches the database: the heartbeat stores the latest progress snapshot
with each renewal and turns the answers (lease lost, cancel requested) into flags that the
engine's progress callback checks between steps.
"""

from __future__ import annotations

import contextvars
import logging
import threading
from typing import Any

from core import lifecycle
from core.db.session import session_scope

log = logging.getLogger(__name__)


class Heartbeat(threading.Thread):
    def __init__(self, job_id: str, owner: str, lease_seconds: int, interval: float) -> None:
        super().__init__(name=f"heartbeat-{job_id}", daemon=True)
        self.job_id = job_id
        self.owner = owner
        self.lease_seconds = lease_seconds
        self.interval = interval
        self.progress: dict[str, Any] | None = None
        self.lease_lost = threading.Event()
        self.cancel_requested = threading.Event()
        self._stop_event = threading.Event()
        self._context = contextvars.copy_context()

    def run(self) -> None:
        # In the starting thread's context, so that its log records carry the job id too.
        self._context.run(self._beat_until_stopped)

    def _beat_until_stopped(self) -> None:
        while not self._stop_event.wait(self.interval):
            self.beat()

    def beat(self) -> None:
        try:
            with session_scope() as session:
                ours, cancel = lifecycle.renew_lease(session, self.job_id, self.owner,
                                                     self.lease_seconds, self.progress)
        except Exception:
            # The database may be briefly away; the lease outlives a few missed beats.
            log.warning("heartbeat for %s failed; retrying", self.job_id, exc_info=True)
            return
        if not ours:
            self.lease_lost.set()
        if cancel:
            self.cancel_requested.set()

    def stop(self) -> None:
        self._stop_event.set()
