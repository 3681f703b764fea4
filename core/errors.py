"""Domain errors carry their HTTP status; one handler in app.main turns them into JSON."""

from __future__ import annotations

import re

# What a client may see of a message built from its own input or a library's text.
PUBLIC_TEXT_LIMIT = 500
_HEAP_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")
# Absolute paths (temp files, the data directory, site-packages) say how the host is laid out; the API's own
# routes (/v1/...), which messages name to say what to call instead, are not host paths.
_ABSOLUTE_PATH = re.compile(r"(?<![\w.:/])/(?!v1/)(?:[\w.+-]+/)+[\w.+-]*")


def public_text(text: str, limit: int = PUBLIC_TEXT_LIMIT) -> str:
    """`text` fit for a client: no heap addresses, no absolute paths, at most `limit` characters."""
    cleaned = _ABSOLUTE_PATH.sub("<path>", _HEAP_ADDRESS.sub("", text))
    return cleaned if len(cleaned) <= limit else cleaned[: limit - 1] + "\u2026"


class DomainError(Exception):
    status_code = 400
    headers: dict[str, str] | None = None  # sent with every error of the class (a 401's WWW-Authenticate)

    def __init__(self, message: str, retry_after_seconds: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        # Refusals of an overloaded or unavailable server say when to come back (429, 503).
        retry = {} if retry_after_seconds is None else {"Retry-After": str(retry_after_seconds)}
        self.headers = {**(type(self).headers or {}), **retry} or None


class NotFound(DomainError):
    status_code = 404


class Conflict(DomainError):
    status_code = 409


class Invalid(DomainError):
    status_code = 422


class TooLarge(DomainError):
    status_code = 413


class Unauthorized(DomainError):
    status_code = 401


class TooManyRequests(DomainError):
    status_code = 429


class Unavailable(DomainError):
    status_code = 503


class InsufficientStorage(DomainError):
    """The server's disk (or its database's) is full: nothing the client can fix, nor retry at once."""

    status_code = 507
