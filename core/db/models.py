"""ORM models. Every resource row carries its tenant; queries always filter on it."""

from __future__ import annotations

import secrets
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_id(prefix: str) -> str:
    """Ids carry their kind (mdl_, dst_, job_, art_) so a wrong-kind id is caught with a clear message."""
    return f"{prefix}_{secrets.token_hex(12)}"


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON, datetime: DateTime(timezone=True)}


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("key"))
    tenant: Mapped[str] = mapped_column(String(64), index=True)
    prefix: Mapped[str] = mapped_column(String(16), unique=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(default=None)


class Model(Base):
    __tablename__ = "models"

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("mdl"))
    tenant: Mapped[str] = mapped_column(String(64), index=True)
    name: Mapped[str] = mapped_column(String(200))
    format: Mapped[str] = mapped_column(String(32))
    sha256: Mapped[str] = mapped_column(String(64))
    bytes: Mapped[int] = mapped_column(BigInteger)
    arch: Mapped[dict[str, Any]] = mapped_column()
    input_spec: Mapped[dict[str, Any]] = mapped_column()
    num_classes: Mapped[int] = mapped_column(Integer)
    param_count: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # "float32", or "int8" for a quantize job's result (which runs on int8 kernels and cannot be trained further).
    precision: Mapped[str] = mapped_column(String(16), default="float32")
    # The job whose result this is; NULL for an upload. No foreign key: jobs already point at models (teacher_id),
    # and a cycle of keys would need deferred constraints on every dialect for nothing the code does not check.
    source_job_id: Mapped[str | None] = mapped_column(String(40), index=True, default=None)
    # Set when the tenant deleted it: the row stays for lineage and history, its file goes (if nothing else has it).
    deleted_at: Mapped[datetime | None] = mapped_column(default=None)


class Dataset(Base):
    __tablename__ = "datasets"

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("dst"))
    tenant: Mapped[str] = mapped_column(String(64), index=True)
    name: Mapped[str] = mapped_column(String(200))
    format: Mapped[str] = mapped_column(String(32))
    # sha256 of the upload as sent, and the content address of the canonical .npz the worker reads.
    sha256: Mapped[str] = mapped_column(String(64))
    bytes: Mapped[int] = mapped_column(BigInteger)
    canonical_sha256: Mapped[str] = mapped_column(String(64))
    # What the canonical .npz takes in storage, which the quota counts; NULL for rows from before revision 0003.
    canonical_bytes: Mapped[int | None] = mapped_column(BigInteger, default=None)
    num_classes: Mapped[int] = mapped_column(Integer)
    class_names: Mapped[list[Any]] = mapped_column()
    num_samples: Mapped[int] = mapped_column(Integer)
    class_counts: Mapped[list[Any]] = mapped_column()
    image_shape: Mapped[list[Any]] = mapped_column()
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    deleted_at: Mapped[datetime | None] = mapped_column(default=None)  # as Model.deleted_at


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        Index("ix_jobs_tenant_created", "tenant", "created_at"),
        Index("ix_jobs_status_lease", "status", "lease_expires_at"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("job"))
    tenant: Mapped[str] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(32))
    spec: Mapped[dict[str, Any]] = mapped_column()
    teacher_id: Mapped[str] = mapped_column(ForeignKey("models.id"))
    # NULL for a built-in dataset (named in spec["dataset"]).
    dataset_id: Mapped[str | None] = mapped_column(ForeignKey("datasets.id"), default=None)
    status: Mapped[str] = mapped_column(String(16), default="queued")
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer)
    lease_owner: Mapped[str | None] = mapped_column(String(200), default=None)
    lease_expires_at: Mapped[datetime | None] = mapped_column(default=None)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    # Outbox: NULL until the broker accepted the message; the reaper sends what is still NULL.
    enqueued_at: Mapped[datetime | None] = mapped_column(default=None)
    progress: Mapped[dict[str, Any]] = mapped_column(default=dict)
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    error: Mapped[str | None] = mapped_column(Text, default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(default=None)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    # Where to announce the job's end; NULL: the tenant's default webhook, if it has one.
    webhook_url: Mapped[str | None] = mapped_column(String(2048), default=None)
    # A pipeline's stage: the pipeline and the stage's name in its spec.
    pipeline_id: Mapped[str | None] = mapped_column(ForeignKey("pipelines.id"), index=True, default=None)
    stage: Mapped[str | None] = mapped_column(String(64), default=None)
    # What the job read, fixed at submission ({"model"|"dataset"|"eval_dataset": {"id", "sha256"}}): lineage shows it
    # and a replay refuses inputs that changed since. NULL for jobs from before revision 0004.
    inputs: Mapped[dict[str, Any] | None] = mapped_column(default=None)
    # The job this one replays (POST /v1/jobs/{id}/replay).
    replay_of: Mapped[str | None] = mapped_column(String(40), default=None)


class Pipeline(Base):
    """Stages run as ordinary jobs, each started when the stage it takes its model from has succeeded and passed
    its gate. The stages' state lives in their jobs (Job.pipeline_id, Job.stage); a stage without a job has not
    started (or never will: the pipeline ended first)."""

    __tablename__ = "pipelines"
    __table_args__ = (Index("ix_pipelines_tenant_created", "tenant", "created_at"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("pip"))
    tenant: Mapped[str] = mapped_column(String(64))
    name: Mapped[str] = mapped_column(String(200))
    # The stored spec: input model, datasets, and each stage's name, input, gate and fully-defaulted job spec.
    spec: Mapped[dict[str, Any]] = mapped_column()
    status: Mapped[str] = mapped_column(String(16), default="queued")
    error: Mapped[str | None] = mapped_column(Text, default=None)
    # The pipeline input's accuracy on the evaluation images, once a stage has measured it (gates "against input").
    input_accuracy: Mapped[float | None] = mapped_column(default=None)
    replay_of: Mapped[str | None] = mapped_column(String(40), default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(default=None)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class JobEvent(Base):
    """Append-only: a row is never updated, and is deleted only with its job. GET /v1/jobs/{id} relies on it (each
    API process keeps a job's latest events while their count and newest id stay the same)."""

    __tablename__ = "job_events"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True,
                                    autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    at: Mapped[datetime] = mapped_column(default=utcnow)
    kind: Mapped[str] = mapped_column(String(32))  # state | progress | log
    status: Mapped[str | None] = mapped_column(String(16), default=None)
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    actor: Mapped[str] = mapped_column(String(200))
    message: Mapped[str] = mapped_column(Text, default="")
    data: Mapped[dict[str, Any]] = mapped_column(default=dict)


class Artifact(Base):
    __tablename__ = "artifacts"
    # One artifact of each kind per job: a retried job publishes once, never twice.
    __table_args__ = (UniqueConstraint("job_id", "kind", name="uq_artifacts_job_kind"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("art"))
    tenant: Mapped[str] = mapped_column(String(64), index=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(32))
    filename: Mapped[str] = mapped_column(String(200))
    media_type: Mapped[str] = mapped_column(String(100))
    runtime: Mapped[str] = mapped_column(String(64))
    sha256: Mapped[str] = mapped_column(String(64))
    bytes: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class IdempotencyRecord(Base):
    __tablename__ = "idempotency_records"
    __table_args__ = (UniqueConstraint("tenant", "route", "key", name="uq_idempotency"),)

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True,
                                    autoincrement=True)
    tenant: Mapped[str] = mapped_column(String(64))
    route: Mapped[str] = mapped_column(String(100))
    key: Mapped[str] = mapped_column(String(200))
    request_hash: Mapped[str] = mapped_column(String(64))
    resource_id: Mapped[str] = mapped_column(String(40))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class TenantWebhook(Base):
    """A tenant's default webhook URL and the secret that signs every delivery to it or to a job's own URL.
    The secret is stored as is: signing needs it (it is shown to the tenant once, when created)."""

    __tablename__ = "tenant_webhooks"

    tenant: Mapped[str] = mapped_column(String(64), primary_key=True)
    url: Mapped[str | None] = mapped_column(String(2048), default=None)
    secret: Mapped[str] = mapped_column(String(100))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class WebhookDelivery(Base):
    """One announcement of a job's end (an outbox row written with the final state). Senders claim due rows
    by moving next_attempt_at forward, so a sender that dies mid-attempt only delays the next one."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (Index("ix_webhook_deliveries_due", "state", "next_attempt_at"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("whd"))
    tenant: Mapped[str] = mapped_column(String(64))
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    url: Mapped[str] = mapped_column(String(2048))
    event: Mapped[str] = mapped_column(String(32))
    # The body, fixed when the job ended: every retry sends the same bytes (receivers dedupe on its id).
    payload: Mapped[dict[str, Any]] = mapped_column()
    state: Mapped[str] = mapped_column(String(16), default="pending")  # pending | delivered | failed
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_status_code: Mapped[int | None] = mapped_column(Integer, default=None)
    last_error: Mapped[str | None] = mapped_column(Text, default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    delivered_at: Mapped[datetime | None] = mapped_column(default=None)
