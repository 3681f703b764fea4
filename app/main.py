"""The FastAPI application: `create_app()` for tests and embedding, `app` for uvicorn (app.main:app)."""

from __future__ import annotations

import logging
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from sqlalchemy.exc import OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from app import health, metrics
from app.artifacts.router import router as artifacts_router
from app.auth.router import router as auth_router
from app.dashboard.router import add_dashboard
from app.datasets.router import router as datasets_router
from app.docs.router import add_docs
from app.health import STORAGE_FULL_ERRNOS
from app.jobs.detail import RecentEvents
from app.jobs.router import router as jobs_router
from app.jobs.stream import EventHub
from app.limits import new_session_gate
from app.models.router import router as models_router
from app.models.schemas import list_accepted_formats
from app.pathguard import RefuseHostilePaths
from app.pipelines.router import router as pipelines_router
from app.schemas import ErrorOut, field_problems, summarize
from app.uploads import new_upload_slots
from app.webhooks.router import router as webhooks_router
from core.errors import DomainError, InsufficientStorage, Unavailable, public_text
from core.orphans import collecting
from core.settings import get_settings

log = logging.getLogger(__name__)

API_PREFIX = "/v1"
# How long a client should wait before retrying while the database is unreachable.
DATABASE_RETRY_AFTER_SECONDS = 5
HTTP_METHODS = ("DELETE", "GET", "HEAD", "PATCH", "POST", "PUT")
_PATH_PARAMETER = re.compile(r"\\\{[^/]*?\\\}")  # a "{name}" of an OpenAPI path, as re.escape writes it
SQLITE_FULL = "database or disk is full"
POSTGRES_DISK_FULL = "53100"  # SQLSTATE disk_full

DESCRIPTION = """
Turn a trained PyTorch classifier into a smaller, faster one: knowledge distillation into a smaller student
architecture, structured channel pruning (or unstructured sparsity) with recovery fine-tuning, and int8
quantization (dynamic, static, quantization-aware training) to TorchScript and ONNX. Every size, accuracy and
latency figure is measured on the file you download, run as you will run it.

1. `POST /v1/models`: upload the model's weights (safetensors or a state_dict) with its architecture spec.
2. `POST /v1/datasets`: upload labelled images (.npz, or a zip/tar of class folders), or use a built-in
   (`digits`, `photo-patches`, `shapes`; `GET /v1/datasets/builtin` describes them).
3. `POST /v1/jobs`: submit a job (`kind`: distill, prune or quantize); poll `GET /v1/jobs/{id}` for progress
   and metrics.
4. `GET /v1/artifacts/{id}/download`: download the result (resumable with Range; check the sha256).

Every route except `/healthz` and `/readyz` needs `Authorization: Bearer <API key>`. Errors are JSON:
`{"detail": "what went wrong and how to fix it"}`. Creating routes accept an `Idempotency-Key` header so that
retries are safe.
"""

TAGS = [
    {"name": "models", "description": "Input models (teachers): weights plus the architecture they load into."},
    {"name": "datasets", "description": "Labelled image datasets, uploaded or built in."},
    {"name": "jobs", "description": "Compression jobs: submit, follow, cancel."},
    {"name": "artifacts", "description": "Files produced by jobs, with checksums and resumable downloads."},
    {"name": "webhooks", "description": "Signed announcements of jobs' ends, sent to your URL."},
    {"name": "auth", "description": "Check an API key (keys are created on the server with the CLI)."},
    {"name": "health", "description": "Probes for load balancers; no key needed."},
    {"name": "operations", "description": "Prometheus metrics for the operator (see CONDENSER_METRICS_TOKEN)."},
]


def create_app() -> FastAPI:
    app = FastAPI(title="condenser", version="0.1.0", summary="Model compression as a service.",
                  description=DESCRIPTION, openapi_tags=TAGS, lifespan=collecting,
                  # FastAPI's pages load their scripts from a CDN; add_docs serves ours at the same paths.
                  docs_url=None, redoc_url=None)
    app.add_exception_handler(DomainError, _domain_error)
    app.add_exception_handler(OperationalError, _database_error)
    app.add_exception_handler(PoolTimeout, _database_error)
    app.add_exception_handler(OSError, _os_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(Exception, _unexpected_error)
    app.add_middleware(RefuseHostilePaths)
    app.include_router(health.router)
    app.include_router(metrics.router)
    # Routers are tried in this order: the route clients poll (GET /v1/jobs/{id}) is found first.
    for router in (jobs_router, models_router, datasets_router, artifacts_router, pipelines_router, auth_router,
                   webhooks_router):
        app.include_router(router, prefix=API_PREFIX)
    add_dashboard(app)
    add_docs(app)
    _narrow_openapi_to_settings(app)
    # Per process: the slots count what this process serves, and one poller feeds all its event streams.
    app.state.upload_slots = new_upload_slots(get_settings())
    app.state.event_hub = EventHub(get_settings())
    app.state.recent_events = RecentEvents()
    app.state.session_gate = new_session_gate(get_settings(), DATABASE_RETRY_AFTER_SECONDS)
    return app


def _narrow_openapi_to_settings(app: FastAPI) -> None:
    build_document = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            list_accepted_formats(build_document(), get_settings())
        return app.openapi_schema or {}

    app.openapi = openapi  # type: ignore[method-assign]


async def _domain_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, DomainError)
    # Messages may quote a library's text: no heap address, temp file or host path reaches the client.
    return JSONResponse(ErrorOut(detail=public_text(exc.message)).model_dump(exclude_none=True),
                        status_code=exc.status_code, headers=exc.headers)


async def _database_error(request: Request, exc: Exception) -> JSONResponse:
    """An unreachable database (refused, dropped, pool exhausted) is a 503 to retry; a full one is a 507."""
    if isinstance(exc, PoolTimeout):
        # Every database connection of this process is busy: the server is overloaded, not broken.
        log.warning("no database connection free within the pool timeout on %s %s", request.method, request.url.path)
        return await _domain_error(request, Unavailable(
            "the server is busy (no database connection free); retry after the Retry-After delay",
            DATABASE_RETRY_AFTER_SECONDS))
    log.error("database error on %s %s", request.method, request.url.path, exc_info=exc)
    original = getattr(exc, "orig", None)
    if SQLITE_FULL in str(original) or getattr(original, "sqlstate", None) == POSTGRES_DISK_FULL:
        return await _domain_error(request, InsufficientStorage("the server's database is out of disk space; "
                                                                "the operator must free some before writes succeed"))
    return await _domain_error(request, Unavailable(
        "the database is unavailable; retry after the Retry-After delay", DATABASE_RETRY_AFTER_SECONDS))


async def _os_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, OSError)
    if exc.errno not in STORAGE_FULL_ERRNOS:
        return await _unexpected_error(request, exc)
    log.error("storage full on %s %s", request.method, request.url.path, exc_info=exc)
    return await _domain_error(request, InsufficientStorage(
        "the server is out of disk space and stored nothing of this request; retry once the operator has freed some"))


async def _http_error(request: Request, exc: Exception) -> JSONResponse | Response:
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 405:
        # Starlette's Allow names the methods of the first route on the path; a path has one route per method.
        exc.headers = {**(exc.headers or {}), "Allow": ", ".join(_methods_of(request))}
    return await http_exception_handler(request, exc)


def _methods_of(request: Request) -> list[str]:
    # Asked of each route through its public matches(): FastAPI nests included routers' routes out of reach.
    routes = request.app.router.routes
    methods = [method for method in HTTP_METHODS
               if any(route.matches({**request.scope, "method": method})[0] is Match.FULL for route in routes)]
    documented = _documented_methods(request.app, request.url.path)
    return methods if documented is None else [method for method in methods if method in documented]


def _documented_methods(app: FastAPI, path: str) -> set[str] | None:
    """The methods the OpenAPI document gives `path`, None if it does not document it. A concrete path has its own
    (GET /v1/datasets/builtin), not those of a templated one that also matches it (DELETE /v1/datasets/{id}): the
    router would take the request there, but only to refuse the id."""
    paths: dict[str, dict[str, Any]] = app.openapi().get("paths", {})
    matching = [template for template in paths
                if re.fullmatch(_PATH_PARAMETER.sub("[^/]+", re.escape(template)), path)]
    if not matching:
        return None
    concrete = min(matching, key=lambda template: template.count("{"))
    return {method.upper() for method in paths[concrete]}


async def _validation_error(request: Request, exc: Exception) -> JSONResponse | Response:
    assert isinstance(exc, RequestValidationError)
    documented = _documented_methods(request.app, request.url.path)
    if documented is not None and request.method not in documented:
        # The router took the request to a templated path that refused the id (DELETE /v1/datasets/{id} for
        # DELETE /v1/datasets/builtin); the OpenAPI document gives the path to a concrete one without the method.
        return await _http_error(request, StarletteHTTPException(405))
    problems = field_problems(exc.errors())
    body = ErrorOut(detail=f"invalid request: {summarize(problems)}", errors=problems)
    return JSONResponse(body.model_dump(), status_code=422)


async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    # The traceback goes to the log, never to the client.
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return JSONResponse({"detail": "internal error"}, status_code=500)


app = create_app()
