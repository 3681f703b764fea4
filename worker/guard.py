"""The runner's side of a running job: the callback that publishes a kind's progress and checkpoints, and stops
it between steps when it must (cancel, lost lease, preemption, time limit)."""

from __future__ import annotations

import logging
from dataclasses import asdict
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import OperationalError

from core import lifecycle
from core.db.models import Job, JobEvent, utcnow
from core.db.session import session_scope
from worker.engine.errors import Canceled, EngineError, Interrupted
from worker.engine.training import Progress
from worker.heartbeat import Heartbeat
from worker.jobs.base import Checkpoints, JobContext
from worker.preemption import stop_requested

log = logging.getLogger(__name__)


class LeaseLost(Exception):
    """Another worker owns the job now; stop without touching it."""


class Preempted(Interrupted):
    """SIGTERM or the soft time limit: the engine checkpoints, then the job is given back."""


class TimeLimitExceeded(EngineError):
    """The job's own time_limit_seconds ran out: it fails (a retry would run out of time too)."""


def record_epochs(session: Any, ctx: JobContext, history: list[dict[str, Any]]) -> None:
    """Add a progress event for each finished epoch of `history` that the job's events lack.

    The checkpoint's history is the truth: epochs that ended while the database was unreachable, or in an
    attempt that died before recording them, are filled in by the next write that gets through, under the attempt
    that ran them (stamped on the entry when it was checkpointed)."""
    recorded = {event.data.get("epoch") for event in session.scalars(
        select(JobEvent).where(JobEvent.job_id == ctx.job_id, JobEvent.kind == "progress"))}
    job = session.get(Job, ctx.job_id)
    for entry in history:
        if entry["epoch"] not in recorded:
            lifecycle.record_event(session, job, "progress", ctx.owner,
                                   f"epoch {entry['epoch']} done; checkpoint written", entry,
                                   attempt=entry.get("attempt", ctx.attempt))


class JobGuard:
    """The engine's progress callback: publishes progress, stops the loop when it must."""

    def __init__(self, heartbeat: Heartbeat, checkpoints: Checkpoints, ctx: JobContext) -> None:
        self.heartbeat = heartbeat
        self.checkpoints = checkpoints
        self.ctx = ctx

    def stage(self, name: str, steps: int | None = None) -> None:
        """A new stage; one that is not training counts its `steps` (files exported, measured) with step()."""
        self.heartbeat.progress = {**(self.heartbeat.progress or {}), "stage": name,
                                   "stage_step": 0 if steps else None, "stage_steps": steps}
        self.check()

    def step(self) -> None:
        progress = self.heartbeat.progress or {}
        self.heartbeat.progress = {**progress, "stage_step": (progress.get("stage_step") or 0) + 1}
        self.check()

    def on_progress(self, progress: Progress) -> None:
        self.heartbeat.progress = asdict(progress)
        self.check()

    def on_checkpoint(self, state: dict[str, Any]) -> None:
        for entry in state.get("history", ()):
            # Which attempt ran each epoch travels with the checkpoint, so that a later attempt that records it
            # (the database was away, or this process died first) does not claim it.
            entry.setdefault("attempt", self.ctx.attempt)
        self.checkpoints.save(state)
        if state.get("step_in_epoch") or not state.get("history"):
            return  # a mid-epoch checkpoint on the way out: the give-back event says why
        try:
            with session_scope() as session:
                record_epochs(session, self.ctx, state["history"])
        except OperationalError:
            # The checkpoint (and its history) is on disk: the next checkpoint or the publish records the epoch.
            log.warning("job %s: could not record epoch %s yet", self.ctx.job_id, state["epoch"], exc_info=True)

    def check(self) -> None:
        if self.heartbeat.cancel_requested.is_set():
            raise Canceled("canceled by request")
        if self.heartbeat.lease_lost.is_set():
            raise LeaseLost(self.ctx.job_id)
        if request := stop_requested():
            raise Preempted(request.reason)
        if self.ctx.deadline is not None and utcnow() > self.ctx.deadline:
            limit = self.ctx.spec.time_limit_seconds
            raise TimeLimitExceeded(f"still running after its time_limit_seconds of {limit}; no artifact published")


