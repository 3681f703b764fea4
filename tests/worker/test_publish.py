"""What the runner publishes once a job's files were judged (worker/jobs/acceptance.py): a file that failed is kept
only as a REJECTED diagnostic, the verdicts are a job event, and a job with no passing file fails with what to try.
On the real databases (SQLite and PostgreSQL), with the real blob store."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import select

from core import lifecycle
from core.db.models import Artifact, Job, JobEvent
from core.db.session import session_scope
from core.jobspec import load_stored
from core.storage import get_store
from tests.conftest import AppEnv
from worker.jobs import acceptance
from worker.jobs.base import JobContext, JobOutcome, ModelSource, OutputFile
from worker.runner import _publish

SPEC = {"kind": "quantize", "model": "mdl_1", "dataset": "digits"}


def verdicts(torchscript: float, onnx: float) -> dict[str, Any]:
    gate = acceptance.Gate(reference="input model", reference_accuracy=0.97, max_drop_pts=2.0,
                           float_source="float input model", float_source_accuracy=0.97, num_classes=10,
                           label_counts=[36] * 10)

    def entry(accuracy: float) -> dict[str, Any]:
        return {"accuracy": accuracy, "agreement": accuracy, "agreement_with": "float input model",
                "dominant_class_share": 0.12}

    return acceptance.check(gate, {"torchscript": entry(torchscript), "onnx": entry(onnx)})


def claimed_job(model_id: str, tenant: str, owner: str) -> str:
    with session_scope() as session:
        job = Job(tenant=tenant, kind="quantize", spec=SPEC, teacher_id=model_id, max_attempts=1)
        session.add(job)
        session.flush()
        job_id = job.id
    with session_scope() as session:
        assert lifecycle.claim(session, job_id, owner, lease_seconds=60) is not None
    return job_id


def publish(job_id: str, owner: str, folder: Path, metrics: dict[str, Any]) -> None:
    folder.mkdir()
    files = []
    for kind, name, fmt in (("quantized_torchscript", "quantized.torchscript.pt", "torchscript"),
                            ("quantized_onnx", "quantized.onnx", "onnx"), ("quantized_info", "quantized.json", None)):
        (folder / name).write_bytes(f"{kind} bytes".encode())
        files.append(OutputFile(kind, folder / name, name, "application/octet-stream", "runtime", fmt))
    ctx = JobContext(job_id=job_id, kind="quantize", owner=owner, attempt=1, max_attempts=1, spec=load_stored(SPEC),
                     teacher=ModelSource(folder, "safetensors", {}, {}, 0), dataset_path=None, work_dir=folder,
                     provenance={"model": {"id": "mdl_1", "name": "m", "format": "safetensors", "sha256": "0" * 64,
                                           "bytes": 1, "arch": {}, "input_spec": {}},
                                 "dataset": {"builtin": "digits"}})
    _publish(ctx, JobOutcome(files=files, metrics=metrics), get_store())


def outcome(job_id: str) -> tuple[Job, dict[str, Artifact], list[JobEvent]]:
    with session_scope() as session:
        job = session.get(Job, job_id)
        artifacts = {a.kind: a for a in session.scalars(select(Artifact).where(Artifact.job_id == job_id))}
        events = list(session.scalars(select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.kind == "acceptance")))
        session.expunge_all()
        return job, artifacts, events


def test_a_broken_format_is_kept_only_as_a_diagnostic(app_env: AppEnv, insert_model: Callable[..., str],
                                                      tenant: str, tmp_path: Path) -> None:
    job_id = claimed_job(insert_model(tenant), tenant, "worker-a")
    # The case: the int8 TorchScript file is fine, the int8 ONNX file scores 43%.
    publish(job_id, "worker-a", tmp_path / "work", {"acceptance": verdicts(0.972, 0.4301)})
    job, artifacts, (event,) = outcome(job_id)
    assert job.status == "succeeded" and job.error is None
    assert "quantized_onnx" not in artifacts and "quantized_torchscript" in artifacts
    rejected = artifacts["quantized_onnx_rejected"]
    assert rejected.filename == "REJECTED-quantized.onnx" and rejected.runtime == "REJECTED: runtime"
    assert job.metrics["notes"][0].startswith("NOT A RESULT: the onnx file scores 43.01%")
    assert event.message == "acceptance checks: torchscript 97.20% passed, onnx 43.01% FAILED"
    assert event.data["formats"]["onnx"]["passed"] is False
    assert "report_model_card" in artifacts  # the report describes the diagnostic too


def test_a_job_whose_every_file_fails_ends_failed_and_says_what_to_try(
        app_env: AppEnv, insert_model: Callable[..., str], tenant: str, tmp_path: Path) -> None:
    job_id = claimed_job(insert_model(tenant), tenant, "worker-b")
    publish(job_id, "worker-b", tmp_path / "work", {"acceptance": verdicts(0.10, 0.10)})
    job, artifacts, _ = outcome(job_id)
    assert job.status == "failed" and job.error is not None
    assert job.error.startswith("no file passed its acceptance checks: the torchscript file scores 10.00%, no "
                                "better than chance") and "What to try: try method 'qat'" in job.error
    assert {"quantized_torchscript_rejected", "quantized_onnx_rejected", "report_json"} <= set(artifacts)
    assert job.metrics["acceptance"]["failed_formats"] == ["torchscript", "onnx"]
