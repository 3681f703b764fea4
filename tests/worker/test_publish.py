"""What the runner publishes once a job's files were judged (worker/jobs/acceptance.py): a file that failed is kept
only as a REJECTED diagnostic, the verdicts are a job event, and a job with no passing file fails with what to try.
On the real databases (SQLite and PostgreSQL), with the real blob store."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import select

from core import lifecycle
from core.db.models import Artifact, Job, JobEvent, Model, utcnow
from core.db.session import session_scope
from core.jobspec import load_stored
from core.lineage import output_model
from core.settings import get_settings
from core.storage import get_store
from tests.conftest import AppEnv
from worker.jobs import acceptance
from worker.jobs.base import JobContext, JobOutcome, ModelSource, OutputFile, OutputModel
from worker.runner import _prepare, _publish

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


def output_files(folder: Path) -> list[OutputFile]:
    """What a quantize job leaves in its work folder (placeholder bytes: publishing does not read them)."""
    folder.mkdir(parents=True)
    files = []
    for kind, name, fmt in (("quantized_torchscript", "quantized.torchscript.pt", "torchscript"),
                            ("quantized_onnx", "quantized.onnx", "onnx"), ("quantized_info", "quantized.json", None)):
        (folder / name).write_bytes(f"{kind} bytes".encode())
        files.append(OutputFile(kind, folder / name, name, "application/octet-stream", "runtime", fmt))
    return files


def publish(job_id: str, owner: str, folder: Path, metrics: dict[str, Any]) -> None:
    files = output_files(folder)
    ctx = JobContext(job_id=job_id, kind="quantize", owner=owner, attempt=1, max_attempts=1, spec=load_stored(SPEC),
                     teacher=ModelSource(folder, "safetensors", {}, {}, 0), dataset_path=None, work_dir=folder,
                     provenance={"model": {"id": "mdl_1", "name": "m", "format": "safetensors", "sha256": "0" * 64,
                                           "bytes": 1, "arch": {}, "input_spec": {}},
                                 "dataset": {"builtin": "digits"}})
    result = OutputModel(file_kinds=("quantized_onnx", "quantized_torchscript"),
                         arch={"arch": "small_cnn", "kwargs": {"num_classes": 10}},
                         input_spec={"image_size": 8, "channels": 1}, num_classes=10, param_count=5,
                         precision="int8", label="int8")
    _publish(ctx, JobOutcome(files=files, metrics=metrics, model=result), get_store())


def registered(job_id: str) -> Model | None:
    with session_scope() as session:
        model = output_model(session, job_id)
        session.expunge_all()
        return model


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
    # The job's result model is its first candidate still published: the TorchScript file, the ONNX one rejected.
    model = registered(job_id)
    assert model is not None and (model.format, model.precision) == ("torchscript", "int8")
    assert model.sha256 == artifacts["quantized_torchscript"].sha256 and model.tenant == tenant


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
    assert registered(job_id) is None, "a job with no passing file makes no model"


def test_a_replays_report_holds_the_originals_figures(app_env: AppEnv, insert_model: Callable[..., str],
                                                      tenant: str) -> None:
    model_id = insert_model(tenant)
    figures = {"accuracy": 0.97, "params": 4000, "macs": 40000,
               "artifacts": {"torchscript": {"file_bytes": 9000, "cpu_latency_ms_batch1": 0.2}}}
    original_metrics = {"input": figures, "output": {**figures, "accuracy": 0.96}, "acceptance": verdicts(0.96, 0.95),
                        "environment": {"python": "3.11.0", "device": "cpu", "libraries": {"torch": "2.0.0"}}}
    with session_scope() as session:
        original = Job(tenant=tenant, kind="quantize", spec=SPEC, teacher_id=model_id, max_attempts=1,
                       status="succeeded", metrics=original_metrics, finished_at=utcnow())
        session.add(original)
        session.flush()
        replay = Job(tenant=tenant, kind="quantize", spec=SPEC, teacher_id=model_id, max_attempts=1,
                     replay_of=original.id)
        session.add(replay)
        session.flush()
        original_id, replay_id = original.id, replay.id
    with session_scope() as session:
        job = lifecycle.claim(session, replay_id, "worker-r", lease_seconds=60)
        assert job is not None
        ctx = _prepare(session, job, "worker-r", get_settings())
    assert ctx is not None and ctx.original is not None
    assert (ctx.original["id"], ctx.original["status"]) == (original_id, "succeeded")
    assert ctx.original["metrics"] == original_metrics and ctx.original["environment"]["libraries"]["torch"] == "2.0.0"

    metrics = {"input": figures, "output": {**figures, "accuracy": 0.97}, "acceptance": verdicts(0.97, 0.97)}
    _publish(ctx, JobOutcome(files=output_files(ctx.work_dir), metrics=metrics), get_store())
    _, artifacts, _ = outcome(replay_id)
    document = json.loads(get_store().path_for(artifacts["report_json"].sha256).read_text())
    assert document["replay_of"]["job"] == original_id
    rows = {row["title"]: row for row in document["replay_of"]["comparison"]}
    assert (rows["Top-1 accuracy (int8)"]["original"], rows["Top-1 accuracy (int8)"]["replay"]) == (0.96, 0.97)
    assert document["replay_of"]["changed"]["torch"][0] == "2.0.0"
    card = get_store().path_for(artifacts["report_model_card"].sha256).read_text()
    assert f"## Replay of `{original_id}`: original vs this run" in card
