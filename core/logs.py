"""Process-wide logging for the API and the worker: text for people, JSON (one object a line) for collectors.

CONDENSER_LOG_FORMAT=json|text and CONDENSER_LOG_LEVEL choose. Every record made while a job runs carries
its id (`job_id`): the runner sets it in a context variable that a filter copies onto each record, so a
log collector can show one job's lines across API, worker and retries.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime

from core.settings import Settings

current_job_id: ContextVar[str | None] = ContextVar("current_job_id", default=None)
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s%(job_suffix)s: %(message)s"
# Attributes every LogRecord has; anything else was passed with extra={...} and is kept in the JSON.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "job_suffix"}


@contextmanager
def job_context(job_id: str) -> Iterator[None]:
    token = current_job_id.set(job_id)
    try:
        yield
    finally:
        current_job_id.reset(token)


class JobIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        job_id = getattr(record, "job_id", None) or current_job_id.get()
        record.job_id = job_id
        record.job_suffix = f" [{job_id}]" if job_id else ""
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "process": record.process,
        }
        entry.update({name: value for name, value in vars(record).items()
                      if name not in _STANDARD and value is not None})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def make_handler(log_format: str) -> logging.Handler:
    handler = logging.StreamHandler()
    handler.addFilter(JobIdFilter())
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
    return handler


def configure_logging(settings: Settings, level: int | str | None = None) -> None:
    """Replace the root logger's handlers with one on stderr in the configured format."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.addHandler(make_handler(settings.log_format))
    chosen = level or settings.log_level
    root.setLevel(chosen.upper() if isinstance(chosen, str) else chosen)
