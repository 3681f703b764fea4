"""Liveness and readiness probes (no API key: load balancers and orchestrators call them)."""

from __future__ import annotations

import errno
import logging
import shutil
import tempfile
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
STORAGE_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}

CheckResult = Literal["ok", "unavailable"]


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class Readiness(BaseModel):
    status: CheckResult
    checks: dict[str, CheckResult] = Field(examples=[{"database": "ok", "broker": "ok", "storage": "ok"}])
    reasons: dict[str, str] = Field(default_factory=dict, description="Why a check is unavailable, where telling "
                                    "it reveals nothing of the infrastructure (the data directory's state).",
                                    examples=[{"storage": "the data directory is not writable"}])


@router.get("/healthz", response_model=Health, summary="Liveness")
def healthz() -> Health:
    """200 while the process serves requests; checks nothing else."""
    return Health()


@router.get("/readyz", response_model=Readiness, summary="Readiness",
            responses={503: {"model": Readiness, "description": "The database or the broker is unreachable, or the "
                             "data directory is not writable or short of free space."}})
async def readyz() -> JSONResponse:
    """200 when the database answers, the broker accepts a connection and the data directory takes a write with
    free space above CONDENSER_READINESS_MIN_FREE_BYTES; 503 otherwise. Connection details are logged, not
    returned, so that the probe stays unauthenticated without telling the world about the infrastructure."""
    settings = get_settings()
    storage_problem = await run_in_threadpool(_storage_problem, settings)
    checks: dict[str, CheckResult] = {
        "database": await run_in_threadpool(_check, "database", _ping_database),
        "broker": await run_in_threadpool(_check, "broker", lambda: _ping_broker(settings)),
        "storage": "unavailable" if storage_problem else "ok",
    }
    ready = all(result == "ok" for result in checks.values())
    body = Readiness(status="ok" if ready else "unavailable", checks=checks,
                     reasons={"storage": storage_problem} if storage_problem else {})
    return JSONResponse(body.model_dump(), status_code=200 if ready else 503)


def _storage_problem(settings: Settings) -> str | None:
    """Why uploads and results could not be stored now, or None."""
    folder = settings.storage_dir
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".readyz-") as probe:
            probe.write(b"1")
            probe.flush()
        free = shutil.disk_usage(folder).free
    except OSError as exc:
        log.warning("readiness check storage failed", exc_info=True)
        full = exc.errno in STORAGE_FULL_ERRNOS
        return "the data directory is full" if full else "the data directory is not writable"
    if free < settings.readiness_min_free_bytes:
        log.warning("readiness check storage: %d bytes free in %s", free, folder)
        return (f"the data directory has {free >> 20} MiB free, below the minimum of "
                f"{settings.readiness_min_free_bytes >> 20} MiB (CONDENSER_READINESS_MIN_FREE_BYTES)")
    return None


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
