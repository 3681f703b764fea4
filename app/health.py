"""Liveness and readiness probes (no API key: load balancers and orchestrators call them)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Literal

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from sqlalchemy import text

from core.db.session import get_engine
from core.settings import Settings, get_settings

log = logging.getLogger(__name__)
router = APIRouter(tags=["health"])
BROKER_TIMEOUT_SECONDS = 2.0

CheckResult = Literal["ok", "unavailable"]


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class Readiness(BaseModel):
    status: CheckResult
    checks: dict[str, CheckResult] = Field(examples=[{"database": "ok", "broker": "ok"}])


@router.get("/healthz", response_model=Health, summary="Liveness")
def healthz() -> Health:
    """200 while the process serves requests; checks nothing else."""
    return Health()


@router.get("/readyz", response_model=Readiness, summary="Readiness",
            responses={503: {"model": Readiness, "description": "The database or the broker is unreachable."}})
async def readyz() -> JSONResponse:
    """200 when the database answers and the broker accepts a connection; 503 otherwise. Details are logged,
    not returned, so that the probe stays unauthenticated without telling the world about the infrastructure."""
    settings = get_settings()
    checks = {
        "database": await run_in_threadpool(_check, "database", _ping_database),
        "broker": await run_in_threadpool(_check, "broker", lambda: _ping_broker(settings)),
    }
    ready = all(result == "ok" for result in checks.values())
    body = Readiness(status="ok" if ready else "unavailable", checks=checks)
    return JSONResponse(body.model_dump(), status_code=200 if ready else 503)


def _check(name: str, probe: Callable[[], None]) -> CheckResult:
    try:
        probe()
    except Exception:  # a probe reports; whatever broke is in the log
        log.warning("readiness check %s failed", name, exc_info=True)
        return "unavailable"
    return "ok"


def _ping_database() -> None:
    with get_engine().connect() as connection:
        connection.execute(text("SELECT 1"))


def _ping_broker(settings: Settings) -> None:
    if settings.is_embedded_broker:
        # The filesystem transport needs only its folder; the worker creates the subfolders.
        settings.broker_folder.mkdir(parents=True, exist_ok=True)
        return
    from kombu import Connection

    with Connection(settings.broker_url, connect_timeout=BROKER_TIMEOUT_SECONDS) as connection:
        connection.ensure_connection(max_retries=1, timeout=BROKER_TIMEOUT_SECONDS)
