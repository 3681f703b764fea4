"""A route class that caps request bodies FastAPI would otherwise read whole into memory.

FastAPI reads a declared JSON body before it runs any dependency, authentication included, so without
a cap anyone could make the server buffer gigabytes. Upload routes declare no body (they stream it
themselves, with their own cap) and are left alone. The body's text may not hold NUL characters either:
PostgreSQL refuses them in text columns, which would make a hostile body a 500 instead of a 422.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute
from starlette.types import Message

from core.errors import Invalid, TooLarge

MAX_JSON_BODY_BYTES = 1 << 20


class BoundedBodyRoute(APIRoute):
    def get_route_handler(self) -> Callable[[Request], Awaitable[Response]]:
        handler = super().get_route_handler()
        if self.body_field is None:
            return handler

        async def bounded(request: Request) -> Response:
            body = await _read_bounded(request, MAX_JSON_BODY_BYTES)
            _refuse_nul_characters(body)

            async def replay() -> Message:
                return {"type": "http.request", "body": body, "more_body": False}

            return await handler(Request(request.scope, replay))

        return bounded


async def _read_bounded(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise TooLarge(f"request body of {int(declared)} bytes exceeds the limit of {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise TooLarge(f"request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _refuse_nul_characters(body: bytes) -> None:
    # JSON can carry a NUL only as the escape \u0000, so the parse is paid only by bodies that have one.
    if b"\\u0000" not in body:
        return
    try:
        holds_nul = _holds_nul(json.loads(body))
    except (ValueError, RecursionError):
        return  # FastAPI answers malformed (or absurdly nested) JSON itself
    if holds_nul:
        raise Invalid("text in the request body must not contain NUL characters (\\u0000)")


def _holds_nul(value: Any) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(_holds_nul(key) or _holds_nul(item) for key, item in value.items())
    if isinstance(value, list):
        return any(_holds_nul(item) for item in value)
    return False
