"""GET /metrics in the Prometheus text format.

Job counts and durations are read from the database at each scrape, so they are the same whichever API
process answers and include what the workers did; the broker's queue length is asked of the broker. Bytes
uploaded and served are counted by this process (sum them over API processes). No API key: the operator's
scraper is not a tenant. Set CONDENSER_METRICS_TOKEN to require `Authorization: Bearer <token>`; without
it, keep /metrics on a private network.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Iterator
from typing import Any

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import Float, case, func, select
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.functions import FunctionElement

from core.db.models import Job
from core.db.session import session_scope
from core.errors import Unauthorized
from core.settings import get_settings
from core.views import JobStatus

log = logging.getLogger(__name__)
router = APIRouter(tags=["operations"])
REGISTRY = CollectorRegistry()
BROKER_TIMEOUT_SECONDS = 2.0
DURATION_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600)

UPLOADED_BYTES = Counter("condenser_uploaded_bytes", "Bytes of files received by accepted uploads.",
                         registry=REGISTRY)
SERVED_BYTES = Counter("condenser_served_bytes", "Bytes of artifact files sent to clients.", registry=REGISTRY)


class seconds_between(FunctionElement[float]):
    """end - start in seconds; each database spells it its own way."""

    type = Float()
    inherit_cache = True
    name = "seconds_between"


@compiles(seconds_between)
def _seconds_between_default(element: seconds_between, compiler: Any, **kw: Any) -> str:
    start, end = (compiler.process(clause, **kw) for clause in element.clauses)
    return f"EXTRACT(EPOCH FROM ({end} - {start}))"


@compiles(seconds_between, "sqlite")
def _seconds_between_sqlite(element: seconds_between, compiler: Any, **kw: Any) -> str:
    start, end = (compiler.process(clause, **kw) for clause in element.clauses)
    return f"((julianday({end}) - julianday({start})) * 86400.0)"


class DatabaseCollector(Collector):
    def collect(self) -> Iterator[Metric]:
        with session_scope() as session:
            counts = dict(session.execute(select(Job.status, func.count()).group_by(Job.status)).all())
            durations = session.execute(_durations_query()).all()
        jobs = GaugeMetricFamily("condenser_jobs", "Jobs by state.", labels=["state"])
        for state in JobStatus.__args__:
            jobs.add_metric([state], counts.get(state, 0))
        yield jobs
        yield _duration_histogram(durations)
        yield from _broker_queue()


def _durations_query() -> Any:
    seconds = seconds_between(Job.started_at, Job.finished_at)
    buckets = [func.sum(case((seconds <= bound, 1), else_=0)) for bound in DURATION_BUCKETS]
    return (select(Job.kind, Job.status, func.count(), func.coalesce(func.sum(seconds), 0.0), *buckets)
            .where(Job.started_at.is_not(None), Job.finished_at.is_not(None)).group_by(Job.kind, Job.status))


def _duration_histogram(rows: list[Any]) -> Metric:
    histogram = HistogramMetricFamily("condenser_job_duration_seconds",
                                      "From a job's first start to its end, by kind and final state.",
                                      labels=["kind", "status"])
    for kind, status, count, total, *in_buckets in rows:
        buckets = [(str(float(bound)), int(n or 0)) for bound, n in zip(DURATION_BUCKETS, in_buckets, strict=True)]
        histogram.add_metric([kind, status], buckets=[*buckets, ("+Inf", int(count))], sum_value=float(total))
    return histogram


def _broker_queue() -> Iterator[Metric]:
    up = GaugeMetricFamily("condenser_broker_up", "1 when the broker answered this scrape.")
    try:
        depth = broker_queue_depth()
    except Exception:  # a metric reports; the log says what broke
        log.warning("metrics: broker unreachable", exc_info=True)
        up.add_metric([], 0)
        yield up
        return
    up.add_metric([], 1)
    yield up
    yield GaugeMetricFamily("condenser_broker_queue_messages",
                            "Job messages waiting in the broker (condenser_jobs{state=\"queued\"} counts the jobs).",
                            value=depth)


def broker_queue_depth() -> int:
    from core.broker import QUEUE, get_celery

    with get_celery().connection_for_read() as connection:
        connection.ensure_connection(max_retries=1, timeout=BROKER_TIMEOUT_SECONDS)
        # Declaring an existing queue changes nothing and answers its length, on Redis and on the filesystem.
        return int(connection.default_channel.queue_declare(queue=QUEUE).message_count)


REGISTRY.register(DatabaseCollector())


class MetricsUnauthorized(Unauthorized):
    headers = {"WWW-Authenticate": 'Bearer realm="condenser-metrics"'}


@router.get("/metrics", summary="Prometheus metrics", response_class=Response,
            responses={200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text format."},
                       401: {"description": "CONDENSER_METRICS_TOKEN is set and the request lacks it."}})
def metrics(request: Request) -> Response:
    """Jobs by state (`condenser_jobs`), job durations (`condenser_job_duration_seconds`, a histogram by kind
    and final state), the broker's queue length (`condenser_broker_queue_messages`, `condenser_broker_up`), and
    bytes uploaded and served (`condenser_uploaded_bytes_total`, `condenser_served_bytes_total`).
    Open unless the server sets CONDENSER_METRICS_TOKEN; then send `Authorization: Bearer <that token>`."""
    _check_token(request.headers.get("authorization", ""))
    return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)


def _check_token(header: str) -> None:
    token = get_settings().metrics_token
    if not token:
        return
    scheme, _, sent = header.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(sent.strip().encode(), token.encode()):
        raise MetricsUnauthorized("/metrics needs 'Authorization: Bearer <CONDENSER_METRICS_TOKEN>'")
