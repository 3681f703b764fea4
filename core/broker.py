"""The Celery application, shared by the worker and by the API (which only sends by task name).

Each setting below is there because a job runs for hours on hosts that get killed; the database
(job row + lease), not the broker, owns job state, so every setting errs towards redelivery and
the claim in worker.runner makes redelivery harmless.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from celery import Celery

from core.settings import Settings, get_settings

RUN_JOB_TASK = "condenser.run_job"
QUEUE = "condenser"


def broker_transport_options(settings: Settings) -> dict[str, Any]:
    if settings.is_embedded_broker:
        folder = settings.broker_folder
        for sub in ("queue", "control"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        # Polling at 50 ms: measured 50/50 messages delivered, p50 29 ms (DESIGN.md).
        return {
            "data_folder_in": str(folder / "queue"),
            "data_folder_out": str(folder / "queue"),
            "control_folder": str(folder / "control"),
            "polling_interval": 0.05,
        }
    # Redis redelivers an unacked message after visibility_timeout even while the first worker
    # still runs it, so it must exceed the hard time limit.
    return {"visibility_timeout": settings.visibility_timeout_seconds}


def make_celery(settings: Settings | None = None) -> Celery:
    settings = settings or get_settings()
    # kombu warns on every connection to a URL without a host; the filesystem transport ignores it.
    broker = "filesystem://localhost//" if settings.is_embedded_broker else settings.broker_url
    app = Celery("condenser", broker=broker, set_as_current=False)
    transport_options = broker_transport_options(settings)
    app.conf.update(
        broker_transport_options=transport_options,
        # Same value for the result backend's transport in case one is configured later.
        result_backend_transport_options=transport_options,
        # Ack only after the task returns: a worker that dies mid-job leaves the message to be
        # redelivered instead of silently dropping the job.
        task_acks_late=True,
        # A child killed by the OOM killer or kill -9 counts as "not done": requeue its message.
        task_reject_on_worker_lost=True,
        # Take one job at a time; a prefetched job would wait behind an hours-long one.
        worker_prefetch_multiplier=1,
        # By default a fresh child per job: no CUDA context, allocator state or leaked memory carries over.
        worker_max_tasks_per_child=settings.jobs_per_child or None,
        # JSON only: a pickled message could run code in the worker.
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        # Results live in the database; the broker carries only the job id.
        task_ignore_result=True,
        # Soft limit: the runner checkpoints and gives the job back; hard limit: the child is killed.
        task_soft_time_limit=settings.soft_time_limit_seconds,
        task_time_limit=settings.hard_time_limit_seconds,
        # On a lost broker connection, acks_late tasks will be redelivered anyway; cancel them
        # rather than finish work whose message someone else will also run (the lease stops it).
        worker_cancel_long_running_tasks_on_connection_loss=True,
        broker_connection_retry_on_startup=True,
        task_default_queue=QUEUE,
        task_create_missing_queues=True,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
    )
    return app


@lru_cache
def get_celery() -> Celery:
    """The process-wide app for the current settings (tests clear the cache with the settings)."""
    return make_celery()
