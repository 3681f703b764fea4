"""Register teacher models: check the spec, check the weights load into it, then store both."""

from __future__ import annotations

import struct
from pathlib import Path

from pydantic import ValidationError
from sqlalchemy.orm import Session

from app.config import Settings
from app.db.models import Model, new_id
from app.errors import Invalid, NotFound
from app.idempotency import Outcome, claim, idempotent_request, previous_resource
from app.models import repository
from app.models.schemas import WEIGHTS_FORMATS
from app.models.validator import check_weights
from app.pagination import PageRequest
from app.schemas import invalid_from
from app.storage import BlobStore
from app.uploads import Upload
from worker.engine.config import ArchSpec

ROUTE = "POST /v1/models"
TEXT_FIELDS = ("spec", "name", "format")
_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_PROTOCOL_OPCODE = 0x80


def register_model(session: Session, tenant: str, upload: Upload, idempotency_key: str | None,
                   store: BlobStore, settings: Settings) -> Outcome[Model]:
    request = idempotent_request(tenant, ROUTE, idempotency_key, upload.fingerprint())
    earlier = previous_resource(session, request)
    if earlier is not None:
        return Outcome(get_model(session, tenant, earlier), replayed=True)

    spec = parse_arch_spec(upload.fields.get("spec"))
    name = upload.display_name(fallback="model")
    weights_format = upload.fields.get("format") or detect_format(upload.path)
    if weights_format not in WEIGHTS_FORMATS:
        raise Invalid(f"format must be one of {', '.join(WEIGHTS_FORMATS)}, got '{weights_format}'")
    report = check_weights(upload.path, weights_format, spec, settings.model_validation_timeout_seconds)

    # Publish before the claim: hashing and fsyncing a large file must not hold SQLite's write lock.
    blob = store.put_file(upload.path)
    model_id = new_id("mdl")
    winner = claim(session, request, model_id)
    if winner is not None:
        return Outcome(get_model(session, tenant, winner), replayed=True)
    model = Model(id=model_id, tenant=tenant, name=name, format=weights_format,
                  sha256=blob.sha256, bytes=blob.bytes, arch={"arch": spec.arch, "kwargs": spec.kwargs},
                  input_spec=spec.input.model_dump(mode="json"), num_classes=report.num_classes,
                  param_count=report.param_count)
    repository.add(session, model)
    return Outcome(model)


def get_model(session: Session, tenant: str, model_id: str) -> Model:
    model = repository.get(session, tenant, model_id)
    if model is None:
        raise NotFound(f"model {model_id} not found")
    return model


def list_models(session: Session, tenant: str, page: PageRequest) -> tuple[list[Model], str | None]:
    return repository.page(session, tenant, page)


def parse_arch_spec(raw: str | None) -> ArchSpec:
    if raw is None:
        raise Invalid("form field 'spec' is required: the architecture as JSON, e.g. "
                      '{"arch": "small_cnn", "kwargs": {"num_classes": 10}, "input": {"image_size": 8, "channels": 1}}')
    try:
        return ArchSpec.model_validate_json(raw)
    except ValidationError as exc:
        if any(error["type"] == "json_invalid" for error in exc.errors()):
            raise Invalid(f"form field 'spec' is not valid JSON: {exc.errors()[0]['msg']}") from exc
        raise invalid_from(exc, "spec") from exc


def detect_format(path: Path) -> str:
    """safetensors: 8-byte little-endian header length, then the JSON header; torch.save: zip or pickle."""
    with open(path, "rb") as handle:
        head = handle.read(9)
    if len(head) == 9 and head[8:9] == b"{":
        (header_length,) = struct.unpack("<Q", head[:8])
        if 0 < header_length < path.stat().st_size:
            return "safetensors"
    if head.startswith(_ZIP_MAGIC) or head[:1] == bytes([_PICKLE_PROTOCOL_OPCODE]):
        return "state_dict"
    raise Invalid("could not tell the weights format from the file's first bytes: send format=safetensors "
                  "or format=state_dict, or upload a file saved by safetensors or torch.save")

