"""A job's own time_limit_seconds: checked between steps, counted from its first start, and fatal (an
EngineError, so the runner fails the job instead of retrying it into the same wall)."""

from __future__ import annotations

import threading
from datetime import timedelta
from types import SimpleNamespace

import pytest

from core.db.models import Job, utcnow
from core.jobspec import load_stored
from worker.engine.errors import EngineError
from worker.guard import JobGuard, TimeLimitExceeded
from worker.runner import _deadline


def test_the_deadline_counts_from_the_first_start() -> None:
    started = utcnow() - timedelta(minutes=5)
    spec = {"kind": "quantize", "model": "mdl_1", "dataset": "digits", "time_limit_seconds": 600}
    job = Job(spec=spec, started_at=started)
    assert _deadline(job, load_stored(spec)) == started + timedelta(seconds=600)
    without = {**spec, "time_limit_seconds": None}
    assert _deadline(Job(spec=without, started_at=started), load_stored(without)) is None


def test_a_job_past_its_deadline_fails_at_its_next_step() -> None:
    heartbeat = SimpleNamespace(cancel_requested=threading.Event(), lease_lost=threading.Event(), progress=None)
    spec = SimpleNamespace(time_limit_seconds=60)
    ctx = SimpleNamespace(job_id="job_1", spec=spec, deadline=utcnow() + timedelta(hours=1))
    guard = JobGuard(heartbeat, checkpoints=None, ctx=ctx)  # type: ignore[arg-type]
    guard.check()
    ctx.deadline = utcnow() - timedelta(seconds=1)
    with pytest.raises(TimeLimitExceeded, match="time_limit_seconds of 60") as refused:
        guard.check()
    assert isinstance(refused.value, EngineError)
