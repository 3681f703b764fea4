"""GET /v1/jobs/{id}, the read clients poll: the key, the job and the size of its history in one query, the
latest events read again only when they changed, the JSON made once.

Each API process keeps the latest events of the jobs read recently (`RecentEvents`). Events are only ever added
(a row is never updated, and goes only with its job), so a job whose count and newest id of events are those of
the cached list has exactly those latest events. Artifacts are read only when the job has some.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

from sqlalchemy import and_, bindparam, func, select
from sqlalchemy.orm import Session

from app.auth.service import key_prefix, verify_key
from app.jobs.repository import jobs, latest_events
from app.jobs.schemas import JobDetail, JobEventOut
from app.jobs.service import EVENTS_SHOWN
from core.db.models import ApiKey, Artifact, Job, JobEvent
from core.db.repository import job_artifacts
from core.views import ArtifactOut, job_fields

# Jobs whose latest events a process keeps: those being polled now (up to EVENTS_SHOWN events each).
CACHED_JOBS = 256

_KEY_AND_JOB = select(
    ApiKey,
    Job,
    select(func.count()).where(JobEvent.job_id == Job.id).scalar_subquery().label("event_count"),
    select(func.max(JobEvent.id)).where(JobEvent.job_id == Job.id).scalar_subquery().label("last_event_id"),
    select(func.count()).where(Artifact.job_id == Job.id).scalar_subquery().label("artifact_count"),
).outerjoin(
    # The job only if it is the key's tenant's: another tenant's job reads as missing.
    Job, and_(Job.id == bindparam("job_id"), Job.tenant == ApiKey.tenant),
).where(ApiKey.prefix == bindparam("prefix"))


@dataclass(frozen=True)
class _History:
    count: int
    last_id: int | None
    events: list[JobEventOut]


class RecentEvents:
    """The latest events of the jobs read most recently (least recently read dropped first), per process."""

    def __init__(self, jobs_kept: int = CACHED_JOBS) -> None:
        self.jobs_kept = jobs_kept
        self.histories: OrderedDict[str, _History] = OrderedDict()
        self.lock = threading.Lock()  # reads run on the thread pool

    def latest(self, session: Session, job_id: str, count: int, last_id: int | None) -> list[JobEventOut]:
        with self.lock:
            kept = self.histories.get(job_id)
            if kept is not None and (kept.count, kept.last_id) == (count, last_id):
                self.histories.move_to_end(job_id)
                return kept.events
        events = [JobEventOut.model_validate(row) for row in latest_events(session, job_id, EVENTS_SHOWN)]
        with self.lock:
            self.histories[job_id] = _History(count, last_id, events)
            self.histories.move_to_end(job_id)
            while len(self.histories) > self.jobs_kept:
                self.histories.popitem(last=False)
        return events


def job_detail_json(session: Session, recent: RecentEvents, plaintext_key: str, job_id: str) -> bytes:
    """The body of GET /v1/jobs/{id} for the holder of `plaintext_key`: 401 for a bad key, 404 for a job that is
    not their tenant's."""
    row = session.execute(_KEY_AND_JOB, {"prefix": key_prefix(plaintext_key), "job_id": job_id}).one_or_none()
    principal = verify_key(row.ApiKey if row is not None else None, plaintext_key)
    if row is None or row.Job is None:
        raise jobs.not_found(job_id)
    job: Job = row.Job
    artifacts = ([ArtifactOut.from_row(artifact) for artifact in job_artifacts(session, principal.tenant, job.id)]
                 if row.artifact_count else [])
    events = recent.latest(session, job.id, row.event_count, row.last_event_id)
    return JobDetail(**job_fields(job), artifacts=artifacts, events=events).model_dump_json().encode()
