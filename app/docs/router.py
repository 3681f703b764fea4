"""The API's documentation: Swagger UI at /docs and ReDoc at /redoc, every file served by this server.

FastAPI's own pages load both viewers from a CDN (blank offline) and send no Content-Security-Policy. These load
the copies of the upstream bundles that the fastapi-offline wheel ships (only its files: its FastAPI wrapper would
render FastAPI's pages again, inline script included), under the dashboard's headers: no other origin, no inline
script. The pages and their start-up script are ours; the OpenAPI document stays at FastAPI's /openapi.json.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse

from app.dashboard.router import CONTENT_SECURITY_POLICY, HEADERS, DashboardFiles

PAGES_DIR = Path(__file__).resolve().parent
STATIC_DIR = PAGES_DIR / "static"
ASSETS_PATH = "/docs-assets"
# swagger-ui-bundle.js, swagger-ui.css and redoc.standalone.js, as the package's static folder holds them.
VENDOR_ASSETS = ("fastapi_offline", "static")


def allow_inline_styles(policy: str) -> str:
    """The policy with inline styles allowed, and only them: scripts stay limited to this origin's files."""
    directives = policy.split("; ")
    assert any(directive.startswith("style-src ") for directive in directives), policy
    return "; ".join(f"{directive} 'unsafe-inline'" if directive.startswith("style-src ") else directive
                     for directive in directives)


# ReDoc styles itself with styled-components, which writes <style> elements at run time; a policy without
# 'unsafe-inline' in style-src leaves the page unstyled. Styles cannot run code, so only /redoc gets that.
REDOC_HEADERS = {**HEADERS, "Content-Security-Policy": allow_inline_styles(CONTENT_SECURITY_POLICY)}

router = APIRouter(include_in_schema=False)


@router.get("/docs")
def swagger_ui() -> FileResponse:
    return FileResponse(PAGES_DIR / "swagger.html", media_type="text/html", headers=HEADERS)


@router.get("/redoc")
def redoc() -> FileResponse:
    return FileResponse(PAGES_DIR / "redoc.html", media_type="text/html", headers=REDOC_HEADERS)


def add_docs(app: FastAPI) -> None:
    """Serve the pages; the app must be created with docs_url=None and redoc_url=None, FastAPI's CDN pages."""
    app.include_router(router)
    app.mount(ASSETS_PATH, DashboardFiles(directory=STATIC_DIR, packages=[VENDOR_ASSETS]), name="docs-assets")
