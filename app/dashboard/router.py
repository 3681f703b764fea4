"""The dashboard: a static page at `/` (HTML, JS and CSS under /dashboard/) that calls the /v1 API.

The files hold no data, so they are served without a key; the page asks for one and sends it with every API
call. Everything loads from this server: the Content-Security-Policy allows no other origin, no inline
script and no inline style, so neither a CDN nor injected markup can run in it.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse
from starlette.responses import Response
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

STATIC_DIR = Path(__file__).resolve().parent / "static"
MOUNT_PATH = "/dashboard"
CONTENT_SECURITY_POLICY = "; ".join([
    "default-src 'self'",
    "script-src 'self'",
    "style-src 'self'",
    "img-src 'self' blob: data:",
    "connect-src 'self'",
    "object-src 'none'",
    "base-uri 'none'",
    "form-action 'none'",
    "frame-ancestors 'none'",
])
HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # Revalidated on every load (the ETag makes that cheap), so an upgraded server never runs stale scripts.
    "Cache-Control": "no-cache",
}

router = APIRouter(include_in_schema=False)


class DashboardFiles(StaticFiles):
    async def get_response(self, path: str, scope: Scope) -> Response:
        response = await super().get_response(path, scope)
        response.headers.update(HEADERS)
        return response


@router.get("/")
def index() -> FileResponse:
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html", headers=HEADERS)


def add_dashboard(app: FastAPI) -> None:
    app.include_router(router)
    app.mount(MOUNT_PATH, DashboardFiles(directory=STATIC_DIR), name="dashboard")
