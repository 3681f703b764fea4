"""Register teacher models: check the spec, check the weights load into it, then store both."""

from __future__ import annotations

import struct
import zipfile
from collections.abc import Callable
from pathlib import Path

from pydantic import ValidationError
from sqlalchemy.orm import Session

from app import quotas
from app.deps import release_connection
from app.idempotency import Outcome, create_once, idempotent_request, replay
from app.inputs import delete_input
from app.models import budget
from app.models.repository import models
from app.models.schemas import Lineage, LineageStep
from app.models.validator import WeightsReport, check_weights
from app.pagination import PageRequest
from app.schemas import invalid_from
from app.uploads import Upload
from core.db.models import Model
from core.errors import Invalid
from core.lineage import lineage
from core.settings import Settings
from core.storage import BlobStore
from worker.engine.config import CODE_FORMATS, TENSOR_FORMATS, ArchSpec, ArchSpecDocument

ROUTE = "POST /v1/models"
TEXT_FIELDS = ("spec", "name", "format")
_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_PROTOCOL_OPCODE = 0x80
_FORMATS = (*TENSOR_FORMATS, *CODE_FORMATS)
# Stored for TorchScript and .pt2 uploads, whose parameters only a worker counts (the API shows null).
_UNCOUNTED_PARAMS = 0


def register_model(session: Session, tenant: str, upload: Upload, idempotency_key: str | None,
                   store: BlobStore, settings: Settings) -> Outcome[Model]:
    request = idempotent_request(tenant, ROUTE, idempotency_key, upload.fingerprint())
    earlier = replay(session, models, tenant, request)
    if earlier is not None:
        return earlier
    quotas.check_storage(session, tenant, settings, upload.bytes)
    # The checks below wait for a validator slot and run a child for seconds or minutes: holding a pooled
    # connection meanwhile let a burst of uploads starve every other request of the database.
    release_connection(session)
    build = _prepare(tenant, upload, store, settings)
    return create_once(session, models, tenant, request, lambda: build)


def _prepare(tenant: str, upload: Upload, store: BlobStore, settings: Settings) -> Callable[[str], Model]:
    """Check the upload and store its weights, without the database; returns how to build the row from its id."""
    spec = parse_arch_spec(upload.fields.get("spec"))
    name = upload.display_name(fallback="model")
    weights_format = upload.fields.get("format") or detect_format(upload.path)
    if weights_format not in _FORMATS:
        raise Invalid(f"format must be one of {', '.join(_FORMATS)}, got '{weights_format}'")
    report = _check_weights(upload.path, weights_format, spec, settings)
    _check_budget(spec, report, settings)

    # Publish before the claim: hashing and fsyncing a large file must not hold SQLite's write lock.
    blob = store.put_file(upload.path, upload.sha256)
    return lambda model_id: Model(
        id=model_id, tenant=tenant, name=name, format=weights_format, sha256=blob.sha256, bytes=blob.bytes,
        arch=spec.stored_arch(), input_spec=spec.input.model_dump(mode="json"),
        num_classes=report.num_classes, param_count=report.param_count)


def get_model(session: Session, tenant: str, model_id: str) -> Model:
    return models.require(session, tenant, model_id)


def model_lineage(session: Session, tenant: str, model_id: str) -> Lineage:
    chain = lineage(session, get_model(session, tenant, model_id))
    return Lineage(model=model_id, chain=[LineageStep.model_validate(step) for step in chain],
                   root=chain[-1]["model"]["id"])


def list_models(session: Session, tenant: str, page: PageRequest,
                include_deleted: bool = False) -> tuple[list[Model], str | None]:
    return models.page_live(session, tenant, page, include_deleted)


def delete_model(session: Session, tenant: str, model_id: str) -> Model:
    return delete_input(session, models, tenant, model_id)


def parse_arch_spec(raw: str | None) -> ArchSpec:
    """The upload's spec: a plain ArchSpec, or this service's own student.arch.json or pruned.arch.json as it is."""
    if raw is None:
        raise Invalid("form field 'spec' is required: the architecture as JSON, e.g. "
                      '{"arch": "small_cnn", "kwargs": {"num_classes": 10}, "input": {"image_size": 8, "channels": 1}}'
                      ", or a distill or prune job's .arch.json as it is")
    try:
        return ArchSpecDocument.model_validate_json(raw).arch_spec()
    except ValidationError as exc:
        if any(error["type"] == "json_invalid" for error in exc.errors()):
            raise Invalid(f"form field 'spec' is not valid JSON: {exc.errors()[0]['msg']}") from exc
        raise invalid_from(exc, "spec") from exc


def _check_weights(path: Path, weights_format: str, spec: ArchSpec, settings: Settings) -> WeightsReport:
    """Tensors are loaded into the spec's model (in a child process); code formats are never loaded here."""
    if weights_format in TENSOR_FORMATS:
        return check_weights(path, weights_format, spec, settings.model_validation_timeout_seconds)
    if not settings.allow_code_checkpoints:
        raise Invalid(f"{weights_format} files carry code, and this server does not accept them (setting "
                      "CONDENSER_ALLOW_CODE_CHECKPOINTS is off): upload the weights as safetensors or a state_dict")
    # Only the archive's table of contents is read; whether the tensors fit the spec shows when a worker loads them.
    if _torch_archive_format(path) != weights_format:
        raise Invalid(f"the file is not a {weights_format} archive")
    return WeightsReport(param_count=_UNCOUNTED_PARAMS, num_classes=spec.num_classes)


def _check_budget(spec: ArchSpec, report: WeightsReport, settings: Settings) -> None:
    """A model too large to train even one sample at a time is refused now, not by every job that names it."""
    if report.activations_per_sample is not None:
        # What the weights check measured is what a job's check would estimate: it need not run a child again.
        budget.remember(spec, budget.ModelCost(report.param_count, report.activations_per_sample))
    budget.check_models([budget.ModelUse("model", spec, batch_size=1, trains=True)], settings)


def detect_format(path: Path) -> str:
    """safetensors: 8-byte little-endian header length, then the JSON header; torch.save: zip or pickle."""
    with open(path, "rb") as handle:
        head = handle.read(9)
    if len(head) == 9 and head[8:9] == b"{":
        (header_length,) = struct.unpack("<Q", head[:8])
        if 0 < header_length < path.stat().st_size:
            return "safetensors"
    if head.startswith(_ZIP_MAGIC):
        return _torch_archive_format(path) or "state_dict"
    if head[:1] == bytes([_PICKLE_PROTOCOL_OPCODE]):
        return "state_dict"
    raise Invalid("could not tell the weights format from the file's first bytes: send format=safetensors "
                  "or format=state_dict, or upload a file saved by safetensors or torch.save")



def _torch_archive_format(path: Path) -> str | None:
    """Which kind of torch zip archive `path` is, from its member names alone (nothing in it is unpickled)."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError):
        return None
    if any(name.endswith("/constants.pkl") for name in names) and any("/code/" in name for name in names):
        return "torchscript"
    if any(name.endswith("/archive_format") for name in names):
        return "pt2"
    return None
