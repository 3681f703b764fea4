"""Background threads: the worker's reaper and webhook sender, the collector of orphan files (worker and API)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)


class PeriodicThread(threading.Thread):
    """Runs `tick` at once and then every `interval` seconds until stopped. A failing tick (the database or
    the network briefly away) is logged and tried again at the next one: it must not end the thread."""

    def __init__(self, name: str, interval: float, tick: Callable[[], object]) -> None:
        super().__init__(name=name, daemon=True)
        self.interval = interval
        self.tick = tick
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set():
            try:
                self.tick()
            except Exception:
                log.warning("%s pass failed", self.name, exc_info=True)
            self.stopped.wait(self.interval)
