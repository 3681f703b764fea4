"""Celery tasks (thin: take an id, hand it to the runner) and the worker's process hooks."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from typing import Any

from celery import signals
from sqlalchemy.exc import OperationalError

from core.broker import RUN_JOB_TASK, get_celery
from core.db.session import get_engine
from core.logs import configure_logging
from core.settings import get_settings
from core.threads import host_cpus
from worker.memory import limit_job_memory
from worker.preemption import install_stop_handlers

log = logging.getLogger(__name__)
celery_app = get_celery()
_worker: Any = None


# A database error (PostgreSQL away, SQLite locked past its timeout) must not ack the message as done: the job
# would stay queued with its message gone. Retried with backoff (1 s doubling to 60 s) for as long as it lasts;
# each retry is a new message, so that the original is acked only once its successor is in the broker.
@celery_app.task(name=RUN_JOB_TASK, autoretry_for=(OperationalError,), max_retries=None, retry_backoff=1,
                 retry_backoff_max=60, retry_jitter=True)
def run_job(job_id: str) -> None:
    from worker.runner import run

    run(job_id)


@signals.setup_logging.connect
def _setup_logging(loglevel: int | str | None = None, **_: Any) -> None:
    # A receiver here tells Celery to leave logging alone: API and worker log the same way (core.logs).
    configure_logging(get_settings(), loglevel)


@signals.worker_init.connect
def _preload(sender: Any = None, **_: Any) -> None:
    global _worker
    _worker = sender
    # Import torch once in the parent so each fresh child (one per job) forks with it loaded.
    # Importing starts no thread pools, so forking afterwards is safe.
    import worker.runner  # noqa: F401


@signals.worker_ready.connect
def _start_reaper(**_: Any) -> None:
    from core.orphans import start_collector
    from worker.reaper import start_reaper

    start_reaper()
    start_collector()


@signals.worker_ready.connect
def _start_webhook_sender(**_: Any) -> None:
    from core.periodic import PeriodicThread
    from core.webhooks.delivery import deliver_due

    PeriodicThread("condenser-webhooks", get_settings().webhook_poll_seconds, deliver_due).start()


@signals.worker_process_init.connect
def _child_init(**_: Any) -> None:
    # Connections inherited from the parent must not be shared with it.
    get_engine().dispose(close=False)


@signals.task_prerun.connect
def _prepare_job_process(**_: Any) -> None:
    # Installed here, not at process init: billiard resets the handlers after its initializer runs.
    settings = get_settings()
    install_stop_handlers(settings.soft_time_limit_seconds)
    import torch

    # One job per child and `concurrency` children per host: more threads than the CPUs this process may use
    # (its affinity and container quota, not the machine's cores) makes OpenMP spin against itself (measured
    # 20-50x slower on 2 cores).
    concurrency = _worker.concurrency if _worker is not None else 1
    torch.set_num_threads(settings.torch_threads or max(1, host_cpus() // concurrency))
    limit_job_memory(settings.job_memory_limit_gib, concurrency)


@signals.worker_shutting_down.connect
def _preempt_children(**_: Any) -> None:
    """On warm shutdown Celery would wait for hours-long jobs; ask them to checkpoint instead."""
    if _worker is None or _worker.pool is None:
        return
    with contextlib.suppress(Exception):
        for pid in _worker.pool.info.get("processes", []):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
