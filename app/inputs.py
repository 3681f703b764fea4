"""The models and datasets that jobs read, seen from the jobs: one that an unfinished job or pipeline needs is not
deleted, and a replay runs only on the very inputs its original read.

Deletion and submission are checked, not locked, against each other (as the quotas are): a job submitted at the
instant its model is deleted may still be queued on it. The deleted row stays, and its file stays for the blob
collector's grace period (orphan_file_grace_hours), in which such a job normally starts.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from sqlalchemy.orm import Session

from app.datasets.repository import datasets
from app.jobs import repository as job_queries
from app.models.repository import models
from app.repository import DeletableRepository, DeletableT, deletion_date
from core.db.models import Dataset, Job, Model
from core.errors import Conflict
from core.storage import BlobStore

# How many of the jobs and pipelines that use an input a refusal names.
USERS_NAMED = 3
# The roles a job's recorded inputs (core.lineage.job_inputs) give each model and dataset it read.
_ROLES: dict[str, DeletableRepository[Any]] = {"model": models, "dataset": datasets, "eval_dataset": datasets}


def delete_input(session: Session, rows: DeletableRepository[DeletableT], tenant: str, row_id: str) -> DeletableT:
    """Soft-delete a model or dataset of the tenant's: 404 if it is not theirs, 409 while an unfinished job or
    pipeline uses it. Deleting it again changes nothing (the answer is the same, for retries)."""
    row = rows.require(session, tenant, row_id)
    if row.deleted_at is None:
        _check_unused(session, tenant, rows.noun, row_id)
        rows.soft_delete(row)
    return row


def _check_unused(session: Session, tenant: str, noun: str, row_id: str) -> None:
    users = [f"job {job.id} ({job.status})" for job in job_queries.unfinished(session, tenant)
             if row_id in _job_names(job)]
    users += [f"pipeline {pipeline.id} ({pipeline.status})"
              for pipeline in job_queries.unfinished_pipelines(session, tenant) if _mentions(pipeline.spec, row_id)]
    if not users:
        return
    more = f" and {len(users) - USERS_NAMED} more" if len(users) > USERS_NAMED else ""
    raise Conflict(f"{noun} {row_id} is in use by {', '.join(users[:USERS_NAMED])}{more}; delete it once they have "
                   "ended (or cancel them)")


def _job_names(job: Job) -> set[str | None]:
    # The spec names every teacher and dataset of an ensemble or of every task.
    return {job.teacher_id, job.dataset_id, *_strings(job.spec)}


def _mentions(document: Any, value: str) -> bool:
    """Whether `value` is one of the strings anywhere in a stored JSON document (a pipeline's spec names its input
    model and datasets, and each stage's job spec its own)."""
    return value in _strings(document)


def _strings(document: Any) -> Iterator[str]:
    if isinstance(document, str):
        yield document
    elif isinstance(document, dict):
        for item in document.values():
            yield from _strings(item)
    elif isinstance(document, list):
        for item in document:
            yield from _strings(item)


def check_recorded_inputs(session: Session, tenant: str, inputs: dict[str, Any], store: BlobStore,
                          what: str) -> None:
    """409 unless every model and dataset in `inputs` ({"model"|"dataset"|"eval_dataset": {"id", "sha256"} or
    {"builtin": name}}, and a distillation's "teachers" and "tasks", as core.lineage records them) is still the
    tenant's, not deleted, holds the content it held then (when a sha256 was recorded) and has its file in the
    store. `what` names whose inputs they are in the message ("job job_..." or "pipeline pip_...")."""
    for role, rows, recorded in _recorded_rows(inputs):
        if "builtin" in recorded:
            continue
        row = rows.require(session, tenant, recorded["id"])
        problem = _input_problem(row, recorded.get("sha256"), store)
        if problem is not None:
            raise Conflict(f"cannot replay {what}: its {role} {row.id} {problem}; a replay reads exactly the "
                           f"inputs its original read (submit a new job to use other ones)")


def _recorded_rows(inputs: dict[str, Any]) -> Iterator[tuple[str, DeletableRepository[Any], dict[str, Any]]]:
    """(role, where its rows are, what was recorded) for each input."""
    for role, recorded in inputs.items():
        if role in _ROLES:
            yield role, _ROLES[role], recorded
    for recorded in inputs.get("teachers", []):
        yield "teacher", models, recorded
    for task, task_inputs in inputs.get("tasks", {}).items():
        for role, recorded in task_inputs.items():
            yield f"task '{task}' {role}", _ROLES[role], recorded


def _input_problem(row: Model | Dataset, recorded_sha256: str | None, store: BlobStore) -> str | None:
    if row.deleted_at is not None:
        return f"was deleted on {deletion_date(row.deleted_at)}"
    # A dataset's jobs read its canonical .npz, which is what its recorded sha256 names.
    current = row.sha256 if isinstance(row, Model) else row.canonical_sha256
    if recorded_sha256 is not None and current != recorded_sha256:
        return (f"is not what it was: it was read with sha256 {recorded_sha256[:16]}..., the stored one is now "
                f"{current[:16]}...")
    if not store.exists(current):
        return f"has lost its stored file (sha256 {current[:16]}...)"
    return None
