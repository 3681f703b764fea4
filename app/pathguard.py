"""Refuse request paths no legitimate client sends, before any route sees them.

Path parameters are checked one by one (app.ids), but routes added later, static files and the 404
handler see raw paths too. A NUL byte (which PostgreSQL refuses in text, and C code reads as the end of a
string) or a `.`/`..` segment, literal or percent-encoded (the ASGI path is already decoded), is a 400 here,
whatever the route.
"""

from __future__ import annotations

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from app.schemas import ErrorOut

_DOT_SEGMENTS = frozenset({".", ".."})


class RefuseHostilePaths:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        problem = hostile_path_problem(scope) if scope["type"] == "http" else None
        if problem is None:
            await self.app(scope, receive, send)
            return
        refusal = JSONResponse(ErrorOut(detail=problem).model_dump(exclude_none=True), status_code=400)
        await refusal(scope, receive, send)


def hostile_path_problem(scope: Scope) -> str | None:
    path: str = scope["path"]
    query: bytes = scope.get("query_string", b"")
    if "\x00" in path or b"%00" in query or b"\x00" in query:
        return "the URL contains a NUL byte"
    if any(segment in _DOT_SEGMENTS for segment in path.split("/")):
        return "the URL path contains a '.' or '..' segment"
    return None
