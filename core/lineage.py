"""Where a model came from: the inputs each job read (fixed at submission) and the chain of jobs from a model back
to the upload it started from. Torch-free: the API and the worker both use it."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from core.db.models import Dataset, Job, Model
from core.jobspec import DistillJobSpec, JobSpecBase
from worker.engine.config import BUILTIN_DATASETS

# Far more than any chain a user builds; a bound keeps a corrupted row from looping the walk.
MAX_CHAIN = 256


def job_inputs(session: Session, spec: JobSpecBase, model: Model) -> dict[str, Any]:
    """What the job reads, by id and content hash: {"model", "dataset", "eval_dataset"?: {"id", "sha256"}} (a
    built-in dataset: {"builtin": name}); a distillation with `teachers` or `tasks` also every teacher in order
    ("teachers": [{"id", "sha256"}], the first being "model") and with tasks each task's datasets ("tasks": {name:
    {"dataset", "eval_dataset"?}}, the first task's being "dataset"). Stored with the job when it is created."""
    inputs: dict[str, Any] = {"model": _model_input(model), "dataset": _dataset_input(session, spec.dataset)}
    if spec.eval_dataset is not None:
        inputs["eval_dataset"] = _dataset_input(session, spec.eval_dataset)
    if not isinstance(spec, DistillJobSpec) or (spec.teachers is None and spec.tasks is None):
        return inputs
    # A model teaching two tasks is read once.
    teacher_ids = dict.fromkeys(ref.model for ref in spec.teacher_refs)
    inputs["teachers"] = [_model_input(model if teacher_id == model.id else session.get_one(Model, teacher_id))
                          for teacher_id in teacher_ids]
    if spec.tasks is not None:
        inputs["tasks"] = {task.name: {"dataset": _dataset_input(session, task.dataset)}
                           | ({} if task.eval_dataset is None
                              else {"eval_dataset": _dataset_input(session, task.eval_dataset)})
                           for task in spec.tasks}
    return inputs


def _model_input(model: Model) -> dict[str, Any]:
    return {"id": model.id, "sha256": model.sha256}


def _dataset_input(session: Session, name_or_id: str) -> dict[str, Any]:
    if name_or_id in BUILTIN_DATASETS:
        return {"builtin": name_or_id}
    dataset = session.get(Dataset, name_or_id)
    # The canonical .npz is what a job reads: its hash says whether the images are the same.
    return {"id": name_or_id, "sha256": dataset.canonical_sha256 if dataset else None}


def output_model(session: Session, job_id: str) -> Model | None:
    """The model a succeeded job registered as its result (None: the job made none, or has not ended)."""
    return session.scalar(select(Model).where(Model.source_job_id == job_id))


def lineage(session: Session, model: Model) -> list[dict[str, Any]]:
    """The chain from `model` back to its uploaded root: each entry a model and the job that made it (None for the
    upload), newest first."""
    chain: list[dict[str, Any]] = []
    current: Model | None = model
    while current is not None and len(chain) < MAX_CHAIN:
        job = session.get(Job, current.source_job_id) if current.source_job_id else None
        chain.append({"model": model_entry(current), "made_by": None if job is None else job_entry(job)})
        current = session.get(Model, job.teacher_id) if job is not None else None
    return chain


def model_entry(model: Model) -> dict[str, Any]:
    return {"id": model.id, "name": model.name, "format": model.format, "precision": model.precision,
            "sha256": model.sha256, "bytes": model.bytes, "arch": model.arch, "input": model.input_spec,
            "num_classes": model.num_classes, "origin": "job" if model.source_job_id else "upload",
            "created_at": model.created_at.isoformat() if model.created_at else None,
            "deleted": model.deleted_at is not None}


def job_entry(job: Job) -> dict[str, Any]:
    metrics = job.metrics or {}
    return {"id": job.id, "kind": job.kind, "status": job.status, "pipeline_id": job.pipeline_id,
            "stage": job.stage, "replay_of": job.replay_of, "spec": job.spec,
            "inputs": recorded_inputs(job), "engine": metrics.get("environment"),
            "measured_on": metrics.get("measured_on"),
            "finished_at": job.finished_at.isoformat() if job.finished_at else None}


def recorded_inputs(job: Job) -> dict[str, Any]:
    """What the job read, as job_inputs recorded it; for jobs from before inputs were recorded, their ids alone
    (no hashes)."""
    if job.inputs is not None:
        return job.inputs
    dataset = {"id": job.dataset_id} if job.dataset_id else {"builtin": job.spec.get("dataset")}
    inputs: dict[str, Any] = {"model": {"id": job.teacher_id}, "dataset": dataset}
    eval_dataset = job.spec.get("eval_dataset")
    if eval_dataset is not None:
        inputs["eval_dataset"] = {"builtin": eval_dataset} if eval_dataset in BUILTIN_DATASETS else {"id": eval_dataset}
    return inputs
