"""Streaming multipart/form-data reader shared by the upload routes.

Starlette's request.form() spools each file to a temporary file of its own before a handler sees it,
so a 50 GB upload would fill a disk before any limit applied. Here the body is parsed as it arrives:
the one file part goes straight into a temp file in the blob store (same filesystem, so publishing is
a rename) with a running sha256 and a byte cap, text fields are bounded, and the temp file is removed
on every way out.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Collection
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from python_multipart import MultipartParser
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import parse_options_header
from starlette.requests import ClientDisconnect, Request

from app.filenames import MAX_NAME, safe_filename, stem
from app.limits import Slots
from app.metrics import UPLOADED_BYTES
from core.errors import DomainError, Invalid, TooLarge
from core.settings import Settings
from core.storage import BlobStore

FILE_FIELD = "file"
MAX_FIELD_BYTES = 64 * 1024
# Each part's header block is bounded, so a part that never ends its headers cannot keep the parser busy.
MAX_PART_HEADERS = 8
MAX_PART_HEADER_BYTES = 4096
# Room in the body for part headers, boundaries and text fields besides the file itself. The number of
# parts is bounded too: each must carry a known name, at most once.
MULTIPART_OVERHEAD_BYTES = 1 << 20
# An upload takes seconds to minutes: a client refused for want of a slot retries after this long.
UPLOAD_RETRY_AFTER_SECONDS = 10


class UnsupportedMediaType(DomainError):
    status_code = 415


@dataclass(frozen=True)
class Upload:
    """A received upload: its text fields and the file part, already on disk in the store's tmp dir."""

    fields: dict[str, str]
    path: Path
    filename: str | None
    sha256: str
    bytes: int

    def fingerprint(self) -> dict[str, Any]:
        """What the request asked for, for Idempotency-Key comparison: file content plus fields."""
        return {"sha256": self.sha256, "filename": self.filename, "fields": self.fields}

    def display_name(self, fallback: str) -> str:
        """The `name` field, else the file's name without extensions, else `fallback`."""
        name = self.fields.get("name", "").strip()
        if len(name) > MAX_NAME:
            raise Invalid(f"name is longer than {MAX_NAME} characters")
        return name or stem(safe_filename(self.filename, fallback=fallback))


@asynccontextmanager
async def receive_upload(request: Request, store: BlobStore, limit: int,
                         text_fields: Collection[str]) -> AsyncIterator[Upload]:
    """Parse the request body; yields the Upload and removes its temp file on exit."""
    boundary = _boundary(request)
    _refuse_declared_oversize(request, limit)
    # The slot covers what follows the receipt inside the caller's block too (validation, ingestion).
    with upload_slots(request).hold(request.state.principal.tenant), store.temp_path(".upload") as path:
        reader = _FormReader(boundary, path, limit, frozenset(text_fields))
        try:
            async for chunk in request.stream():
                reader.feed(chunk)
            upload = reader.finish()
        except ClientDisconnect as exc:
            raise DomainError("the client disconnected before the upload finished") from exc
        finally:
            reader.close()
        yield upload
        UPLOADED_BYTES.inc(upload.bytes)  # reached only when the route accepted the upload


def upload_slots(request: Request) -> Slots:
    return request.app.state.upload_slots


def new_upload_slots(settings: Settings) -> Slots:
    return Slots("uploads in progress", settings.max_uploads_in_flight, settings.max_uploads_in_flight_per_tenant,
                 retry_after_seconds=UPLOAD_RETRY_AFTER_SECONDS)


def _boundary(request: Request) -> bytes:
    content_type, options = parse_options_header(request.headers.get("content-type"))
    if content_type != b"multipart/form-data":
        raise UnsupportedMediaType("send the upload as multipart/form-data (for example curl -F file=@model.pt)")
    boundary = options.get(b"boundary")
    if not boundary:
        raise DomainError("the multipart/form-data Content-Type has no boundary parameter")
    return boundary


def _refuse_declared_oversize(request: Request, limit: int) -> None:
    # Said up front: refuse before reading a byte rather than after the client sent gigabytes.
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit + MULTIPART_OVERHEAD_BYTES:
        raise TooLarge(f"upload of {int(declared)} bytes exceeds the limit of {limit} bytes")


@dataclass
class _Part:
    name: str
    filename: str | None
    text: bytearray = field(default_factory=bytearray)


class _FormReader:
    """Callbacks for python-multipart's push parser; errors raised in them abort the parse."""

    def __init__(self, boundary: bytes, path: Path, limit: int, text_fields: frozenset[str]) -> None:
        self.path = path
        self.limit = limit
        self.text_fields = text_fields
        self.body_limit = limit + MULTIPART_OVERHEAD_BYTES
        self.body_bytes = 0
        self.complete = False
        self.fields: dict[str, str] = {}
        self.file: BinaryIO | None = None
        self.file_seen = False
        self.filename: str | None = None
        self.file_bytes = 0
        self.digest = hashlib.sha256()
        self.part: _Part | None = None
        self.header_name = bytearray()
        self.header_value = bytearray()
        self.headers: dict[str, bytes] = {}
        self.parser = MultipartParser(boundary, {
            "on_part_begin": self._part_begin,
            "on_header_field": lambda data, start, end: self.header_name.extend(data[start:end]),
            "on_header_value": lambda data, start, end: self.header_value.extend(data[start:end]),
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
            "on_end": self._end,
        }, max_header_count=MAX_PART_HEADERS, max_header_size=MAX_PART_HEADER_BYTES)

    def feed(self, chunk: bytes) -> None:
        self.body_bytes += len(chunk)
        if self.body_bytes > self.body_limit:
            raise TooLarge(f"upload exceeds the limit of {self.limit} bytes")
        try:
            self.parser.write(chunk)
        except MultipartParseError as exc:
            raise DomainError(f"malformed multipart body: {exc}") from exc

    def finish(self) -> Upload:
        self.parser.finalize()
        if not self.complete:
            raise DomainError("the multipart body ended before its closing boundary (truncated upload?)")
        if not self.file_seen:
            raise Invalid(f"form field '{FILE_FIELD}' is required: the file to upload")
        return Upload(fields=self.fields, path=self.path, filename=self.filename,
                      sha256=self.digest.hexdigest(), bytes=self.file_bytes)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None

    def _part_begin(self) -> None:
        self.headers = {}

    def _header_end(self) -> None:
        self.headers[self.header_name.decode("latin-1").strip().lower()] = bytes(self.header_value)
        self.header_name.clear()
        self.header_value.clear()

    def _headers_finished(self) -> None:
        disposition, options = parse_options_header(self.headers.get("content-disposition"))
        name = options.get(b"name", b"").decode("utf-8", "replace")
        if disposition != b"form-data" or not name:
            raise DomainError("each multipart part needs 'Content-Disposition: form-data; name=...'")
        filename = options.get(b"filename")
        self.part = _Part(name=name, filename=filename.decode("utf-8", "replace") if filename is not None else None)
        if name == FILE_FIELD:
            self._start_file()
        elif name not in self.text_fields:
            expected = ", ".join(sorted({FILE_FIELD, *self.text_fields}))
            raise Invalid(f"unknown form field '{name}'; expected: {expected}")
        elif name in self.fields:
            raise Invalid(f"form field '{name}' was sent twice")

    def _start_file(self) -> None:
        if self.file_seen:
            raise Invalid(f"form field '{FILE_FIELD}' was sent twice; upload one file per request")
        assert self.part is not None
        self.file_seen = True
        self.filename = self.part.filename
        self.file = open(self.path, "wb")  # noqa: SIM115 -- closed in close(), whatever happens

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        assert self.part is not None
        if self.file is not None:
            self.file_bytes += end - start
            if self.file_bytes > self.limit:
                raise TooLarge(f"upload exceeds the limit of {self.limit} bytes")
            piece = data[start:end]
            self.digest.update(piece)
            self.file.write(piece)
            return
        self.part.text.extend(data[start:end])
        if len(self.part.text) > MAX_FIELD_BYTES:
            raise Invalid(f"form field '{self.part.name}' is longer than {MAX_FIELD_BYTES // 1024} KiB")

    def _part_end(self) -> None:
        assert self.part is not None
        if self.file is not None:
            # No fsync here: BlobStore.put_file syncs what it publishes, and an unpublished temp is discarded.
            self.close()
        elif self.part.name != FILE_FIELD:
            try:
                text = self.part.text.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise Invalid(f"form field '{self.part.name}' is not valid UTF-8 text") from exc
            # PostgreSQL refuses NUL in text columns: a 422 here rather than a 500 at the insert.
            if "\x00" in text:
                raise Invalid(f"form field '{self.part.name}' must not contain NUL characters")
            self.fields[self.part.name] = text
        self.part = None

    def _end(self) -> None:
        self.complete = True


def multipart_openapi(properties: dict[str, dict[str, Any]], required: list[str]) -> dict[str, Any]:
    """`openapi_extra` describing a multipart body that the route reads itself (so FastAPI cannot infer it)."""
    file_schema = {"type": "string", "format": "binary", "description": "The file's bytes."}
    return {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "properties": {FILE_FIELD: file_schema, **properties},
                        "required": [FILE_FIELD, *required],
                        "additionalProperties": False,  # other fields are refused (422)
                    }
                }
            },
        }
    }
