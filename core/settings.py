"""Server settings, read from CONDENSER_* environment variables (and a .env file).

The embedded default needs no server: SQLite in WAL mode, kombu's filesystem transport as the
Celery broker and files under a local data directory. Point CONDENSER_DATABASE_URL at PostgreSQL
and CONDENSER_BROKER_URL at Redis and the same code runs distributed.
"""

from __future__ import annotations

from functools import lru_cache
from ipaddress import IPv4Network, IPv6Network, ip_network
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CONDENSER_", env_file=".env", extra="ignore")

    data_dir: Path = Path(".condenser")
    database_url: str = ""
    broker_url: str = ""
    # The database pool per process (SQLAlchemy's QueuePool): size it to the threads that hold sessions (the
    # API's thread pool runs at most 40 requests at once). A request that waits longer than the timeout for a
    # connection is a 503.
    database_pool_size: int = Field(default=20, gt=0)
    database_max_overflow: int = Field(default=20, ge=0)
    database_pool_timeout_seconds: float = Field(default=10.0, gt=0)

    max_upload_bytes: int = Field(default=1 << 30, gt=0)
    # Archives are unpacked with these bounds so that a bomb is refused before it fills memory or disk.
    max_archive_entries: int = Field(default=200_000, gt=0)
    max_unpacked_bytes: int = Field(default=4 << 30, gt=0)
    max_compression_ratio: int = Field(default=200, gt=0)
    max_image_pixels: int = Field(default=4096 * 4096, gt=0)
    # A tar's GNU long name or PAX record (a path and a few attributes when honest): tarfile reads it whole,
    # and parses PAX in quadratic time on this interpreter (CVE-2024-6232), so larger ones are refused unread.
    max_tar_header_bytes: int = Field(default=16 << 10, gt=0)
    # Dataset ingestion runs in a child process (app.sandbox) bounded by these; past them the upload is a 422.
    # The address space covers the decoded images (max_unpacked_bytes) once, plus the interpreter and numpy.
    ingest_timeout_seconds: float = Field(default=300.0, gt=0)
    ingest_cpu_seconds: int = Field(default=300, gt=0)
    ingest_address_space_bytes: int = Field(default=6 << 30, gt=0)
    # Children ingesting at once (each may use ingest_address_space_bytes); further uploads wait their turn.
    max_concurrent_ingests: int = Field(default=2, gt=0)
    # Per tenant, counted from the rows (no counters to drift): jobs queued or running, and bytes stored
    # (model weights, datasets' canonical .npz, artifacts). Checked on each request, so concurrent requests
    # may overshoot by what they carry.
    max_active_jobs_per_tenant: int = Field(default=16, gt=0)
    max_stored_bytes_per_tenant: int = Field(default=100 << 30, gt=0)
    # TorchScript and .pt2 files carry code (TorchScript programs, pickled graph modules). Off: they are
    # refused at upload. On: accepted from any key holder and run, without any check by the API, inside
    # worker processes, which then trust every tenant's model code as much as their own.
    allow_code_checkpoints: bool = False

    max_attempts: int = Field(default=3, ge=1)
    lease_seconds: int = Field(default=60, ge=2)
    heartbeat_seconds: float = Field(default=10.0, gt=0)
    reaper_interval_seconds: float = Field(default=15.0, gt=0)
    # A queued job whose message was sent this long ago is sent again: the message may be gone (taken by a worker
    # while the database was down, or held by one that died). A duplicate only makes a free worker start the next
    # queued job sooner, or do nothing; each costs a worker one process start.
    message_grace_seconds: float = Field(default=900.0, gt=0)
    # A finishing job retries its last database write (artifacts, final state) this long through an outage before
    # the attempt counts as failed.
    publish_retry_seconds: float = Field(default=120.0, ge=0)
    # Memory (private, writable: heap, tensors, stacks; not mapped files or reserved GPU address space) that one
    # job's process may take, in GiB; 0: the host's memory divided by the worker's concurrency. Past it, the job
    # fails with an error that says so instead of taking the host or the worker down.
    job_memory_limit_gib: float = Field(default=0.0, ge=0)
    # Files that nothing references are removed once older than this: blobs no row names (written by a transaction
    # that never committed) and temp files (uploads cut off by a crash). Far above the longest upload and the
    # longest time from a blob's write to its row's commit.
    orphan_file_grace_hours: float = Field(default=24.0, gt=0)
    orphan_collect_interval_seconds: float = Field(default=3600.0, gt=0)
    # A failed job's work dir (its last checkpoint) is kept this long for inspection.
    work_dir_retention_hours: float = Field(default=24.0, ge=0)
    soft_time_limit_seconds: int = Field(default=6 * 3600, gt=0)
    hard_time_limit_seconds: int = Field(default=6 * 3600 + 300, gt=0)
    # Model validation runs in a short-lived child process so that the API never imports torch.
    model_validation_timeout_seconds: float = Field(default=120.0, gt=0)
    # What one model may cost (teacher, student or upload), estimated from its constructor before it is accepted:
    # parameters, and the memory one training step needs at the job's batch size (app.models.budget).
    max_model_parameters: int = Field(default=2_000_000_000, gt=0)
    max_training_memory_bytes: int = Field(default=256 << 30, gt=0)

    # Live job events (SSE): how often the process's one poller looks for new events of every followed job, and
    # how often an idle stream proves it is alive.
    events_poll_seconds: float = Field(default=0.5, gt=0)
    events_keepalive_seconds: float = Field(default=15.0, gt=0)
    # Open event streams per API process, per tenant and in all; past them a new stream is a 429. An idle
    # stream costs a socket and a little memory, no thread and no database session.
    max_event_streams: int = Field(default=2000, gt=0)
    max_event_streams_per_tenant: int = Field(default=200, gt=0)
    # Uploads being received per API process, per tenant and in all (each holds a temp file of up to
    # max_upload_bytes and, once received, a validation); past them a new upload is a 429.
    max_uploads_in_flight: int = Field(default=16, gt=0)
    max_uploads_in_flight_per_tenant: int = Field(default=4, gt=0)

    # HTTP server limits (`condenser serve`): connections served at once (beyond: 503), seconds an idle
    # keep-alive connection is kept, and the largest request head accepted. Room for every stream and upload.
    http_max_connections: int = Field(default=2500, gt=0)
    http_keepalive_seconds: int = Field(default=5, gt=0)
    http_max_header_bytes: int = Field(default=64 * 1024, gt=0)

    # /readyz says 503 when the data directory has less free space than this (uploads would fail with 507).
    readiness_min_free_bytes: int = Field(default=256 << 20, ge=0)

    # Operations. An empty metrics token leaves /metrics open (bind it privately); set, it is a bearer token.
    metrics_token: str = ""
    log_format: Literal["text", "json"] = "text"
    log_level: str = "INFO"

    # Webhooks: https only unless allow_http; a target resolving to a private, loopback, link-local, multicast
    # or reserved address is refused unless it lies in one of allowed_networks (comma-separated CIDRs).
    webhook_allow_http: bool = False
    webhook_allowed_networks: str = ""
    webhook_max_attempts: int = Field(default=8, ge=1)
    # The first retry waits this long, each further one twice as long, up to the cap.
    webhook_backoff_seconds: float = Field(default=5.0, gt=0)
    webhook_backoff_max_seconds: float = Field(default=3600.0, gt=0)
    webhook_timeout_seconds: float = Field(default=10.0, gt=0)
    webhook_poll_seconds: float = Field(default=1.0, gt=0)

    device: str = "auto"
    # Torch threads per job process; 0: the host's cores divided by the worker's concurrency.
    torch_threads: int = Field(default=0, ge=0, le=512)
    # Jobs a worker child process runs before a fresh one replaces it; 0: no limit. 1 (the default) lets no
    # CUDA context, allocator state or leaked memory carry over from one job to the next, at about a second
    # of process start per job, which only a stream of short jobs notices.
    jobs_per_child: int = Field(default=1, ge=0)

    @model_validator(mode="after")
    def _fill_embedded_defaults(self) -> Settings:
        if self.hard_time_limit_seconds <= self.soft_time_limit_seconds:
            raise ValueError("hard_time_limit_seconds must be above soft_time_limit_seconds")
        if not self.database_url:
            self.database_url = f"sqlite:///{(self.data_dir / 'condenser.db').resolve()}"
        if not self.broker_url:
            self.broker_url = "filesystem://"
        _ = self.webhook_networks  # an unparsable CIDR stops the start, not the first delivery
        return self

    @property
    def broker_folder(self) -> Path:
        return (self.data_dir / "broker").resolve()

    @property
    def storage_dir(self) -> Path:
        return (self.data_dir / "storage").resolve()

    @property
    def is_embedded_broker(self) -> bool:
        return self.broker_url.startswith("filesystem://")

    @property
    def webhook_networks(self) -> list[IPv4Network | IPv6Network]:
        return [ip_network(cidr.strip()) for cidr in self.webhook_allowed_networks.split(",") if cidr.strip()]

    @property
    def visibility_timeout_seconds(self) -> int:
        # Above the hard limit, or Redis would redeliver a job that is still legitimately running.
        return self.hard_time_limit_seconds + 600


@lru_cache
def get_settings() -> Settings:
    return Settings()
