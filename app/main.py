"""The FastAPI application: `create_app()` for tests and embedding, `app` for uvicorn (app.main:app)."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from app import health, metrics
from app.artifacts.router import router as artifacts_router
from app.auth.router import router as auth_router
from app.dashboard.router import add_dashboard
from app.datasets.router import router as datasets_router
from app.jobs.router import router as jobs_router
from app.models.router import router as models_router
from app.pathguard import RefuseHostilePaths
from app.schemas import ErrorOut, field_problems, summarize
from app.webhooks.router import router as webhooks_router
from core.errors import DomainError
from core.orphans import collecting

log = logging.getLogger(__name__)

API_PREFIX = "/v1"

DESCRIPTION = """
Turn a trained PyTorch classifier into a smaller, faster one: knowledge distillation into a smaller student
architecture, structured channel pruning (or unstructured sparsity) with recovery fine-tuning, and int8
quantization (dynamic, static, quantization-aware training) to TorchScript and ONNX. Every size, accuracy and
latency figure is measured on the file you download, run as you will run it.

1. `POST /v1/models`: upload the model's weights (safetensors or a state_dict) with its architecture spec.
2. `POST /v1/datasets`: upload labelled images (.npz, or a zip/tar of class folders), or use a built-in
   (`digits`, `photo-patches`; `GET /v1/datasets/builtin` describes them).
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
                  description=DESCRIPTION, openapi_tags=TAGS, lifespan=collecting)
    app.add_exception_handler(DomainError, _domain_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(Exception, _unexpected_error)
    app.add_middleware(RefuseHostilePaths)
    app.include_router(health.router)
    app.include_router(metrics.router)
    for router in (models_router, datasets_router, jobs_router, artifacts_router, auth_router, webhooks_router):
        app.include_router(router, prefix=API_PREFIX)
    add_dashboard(app)
    return app


async def _domain_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, DomainError)
    return JSONResponse(ErrorOut(detail=exc.message).model_dump(exclude_none=True), status_code=exc.status_code,
                        headers=getattr(exc, "headers", None))


async def _validation_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    problems = field_problems(exc.errors())
    body = ErrorOut(detail=f"invalid request: {summarize(problems)}", errors=problems)
    return JSONResponse(body.model_dump(), status_code=422)


async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    # The traceback goes to the log, never to the client.
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return JSONResponse({"detail": "internal error"}, status_code=500)


app = create_app()
