"""End to end: a teacher uploaded over HTTP, distilled by a real Celery worker process, the
artifact downloaded and loaded with plain torch + safetensors, its accuracy checked on the
held-out split. On PostgreSQL + Redis, and on the embedded default."""

from __future__ import annotations

import hashlib
import io
import json
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import safetensors.torch
import torch

from tests.harness import Service
from tests.support import wait_for
from worker.engine import data, evaluate, export, models
from worker.engine.config import ADAMW_LOOP, ArchSpec, DistillConfig
from worker.engine.distill import distill

pytestmark = pytest.mark.slow

TEACHER_SPEC: dict[str, Any] = {"arch": "small_cnn", "kwargs": {"num_classes": 10, "width": 32, "depth": 2},
                                "input": {"image_size": 8, "channels": 1, "mean": [0.5], "std": [0.5]}}
SEED, VAL_FRACTION = 3, 0.25


@pytest.fixture(scope="module")
def trained_teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real teacher: trained on the training part of the same split the job will use."""
    arch = ArchSpec.model_validate(TEACHER_SPEC)
    digits = data.load_builtin("digits")
    train_idx, val_idx = data.stratified_split(digits.y, VAL_FRACTION, SEED)

    def part(idx: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return data.to_model_input(digits.x[idx], arch.input), torch.from_numpy(digits.y[idx]).long()

    torch.manual_seed(0)
    teacher = models.build_model(arch)
    config = DistillConfig(epochs=6, batch_size=32, lr=3e-3, **ADAMW_LOOP)
    distill(None, teacher, part(train_idx), part(val_idx), config, on_progress=lambda _: None)
    path = tmp_path_factory.mktemp("teacher") / "teacher.safetensors"
    export.save_safetensors(teacher, path)
    return path


def download(service: Service, artifact: dict[str, Any]) -> bytes:
    response = service.client.get(artifact["download_url"], headers=service.headers)
    assert response.status_code == 200, response.text
    assert response.headers["x-content-sha256"] == artifact["sha256"]
    assert hashlib.sha256(response.content).hexdigest() == artifact["sha256"]
    return response.content


def check_report(service: Service, job: dict[str, Any]) -> dict[str, Any]:
    """The job's report artifacts download and parse, and describe the job: its spec, its input's sha256,
    the sha256 of every other artifact, and (when it trained) one curve point per epoch. Returns report.json."""
    by_kind = {a["kind"]: a for a in job["artifacts"]}
    report = json.loads(download(service, by_kind["report_json"]))
    assert report["job"]["id"] == job["id"] and report["job"]["spec"] == job["spec"]
    assert report["metrics"] == job["metrics"] and report["summary"] == job["summary"]
    assert report["environment"]["libraries"]["torch"] and report["environment"]["python"]
    assert len(report["inputs"]["model"]["sha256"]) == 64
    outputs = {a["kind"]: a["sha256"] for a in job["artifacts"] if not a["kind"].startswith("report_")}
    assert {a["kind"]: a["sha256"] for a in report["artifacts"]} == outputs
    card = download(service, by_kind["report_model_card"]).decode()
    assert report["inputs"]["model"]["sha256"] in card and all(sha256 in card for sha256 in outputs.values())
    # Every published format passed its accuracy check, and the CPU the figures come from is named.
    summary = job["summary"]
    assert summary["formats"] and summary["failed_formats"] == [], summary["formats"]
    assert summary["measured_on"] == job["metrics"]["measured_on"] == report["environment"]["cpu"]
    assert f"Measured on {summary['measured_on']['model']}" in card
    ET.fromstring(download(service, by_kind["report_comparison_svg"]))
    history = job["metrics"].get("history") or []
    if history:
        curves = ET.fromstring(download(service, by_kind["report_curves_svg"]))
        points = [c for c in curves.iter("{http://www.w3.org/2000/svg}circle") if c.get("data-series") == "train_loss"]
        assert len(points) == len(history)
    return report


@pytest.mark.parametrize("backend", ["distributed", pytest.param("embedded", marks=pytest.mark.embedded)])
def test_distill_over_http_and_load_the_artifact_independently(service_factory: Any, backend: str,
                                                                trained_teacher: Path) -> None:
    service = service_factory(backend)
    service.start_worker()
    teacher_id = service.upload_teacher(trained_teacher, TEACHER_SPEC)
    job_id = service.submit({
        "kind": "distill", "teacher": teacher_id, "dataset": "digits", "epochs": 8, "batch_size": 32,
        "lr": 5e-3, "optimizer": "adamw", "scheduler": "cosine", "augment": "none", "temperature": 4, "alpha": 0.9,
        "seed": SEED, "val_fraction": VAL_FRACTION,
        "student": {"arch": "small_cnn", "kwargs": {"width": 8, "depth": 2}},
    })

    seen: list[dict[str, Any]] = []

    def finished() -> bool:
        job = service.api_job(job_id)
        seen.append(job.get("progress") or {})
        return job["status"] in ("succeeded", "failed", "canceled")

    try:
        wait_for(finished, timeout=300, interval=0.2, what="the job to finish")
    except AssertionError:
        raise AssertionError(service.worker_logs()) from None
    job = service.api_job(job_id)
    assert job["status"] == "succeeded", job.get("error")
    assert any(p.get("epoch") and p.get("total_steps") and p.get("eta_seconds") is not None for p in seen), seen

    by_kind = {a["kind"]: a for a in job["artifacts"]}
    weights = safetensors.torch.load(download(service, by_kind["student_safetensors"]))
    scripted = torch.jit.load(io.BytesIO(download(service, by_kind["student_torchscript"])))
    assert all(torch.equal(weights[name], scripted.state_dict()[name]) for name in weights)

    digits = data.load_builtin("digits")
    _, val_idx = data.stratified_split(digits.y, VAL_FRACTION, SEED)
    x_val = data.to_model_input(digits.x[val_idx], ArchSpec.model_validate(TEACHER_SPEC).input)
    with torch.inference_mode():
        predictions = scripted(x_val).argmax(1).numpy()
    accuracy = float((predictions == digits.y[val_idx]).mean())
    metrics = job["metrics"]
    assert accuracy >= 0.85
    assert accuracy == pytest.approx(metrics["student"]["accuracy"], abs=1e-9)
    assert metrics["teacher"]["accuracy"] >= 0.9
    assert metrics["student"]["param_count"] * 10 <= metrics["teacher"]["param_count"]
    assert metrics["student"]["cpu_latency_ms_batch1"] > 0 and metrics["teacher"]["cpu_latency_ms_batch1"] > 0
    assert job["attempt"] == 1
    # Without an eval_dataset the figures say that they come from a split the teacher may have seen.
    assert job["summary"]["evaluation"]["source"] == "split" and "may have" in job["summary"]["evaluation"]["note"]
    check_report(service, job)


def npz_of(x: Any, y: Any) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, x=x, y=y)
    return buffer.getvalue()


def test_accuracies_come_from_the_eval_dataset_when_one_is_given(service_factory: Any, trained_teacher: Path) -> None:
    """Two uploads cut from digits: the job trains on one and reports every accuracy on the other."""
    service = service_factory("distributed")
    service.start_worker()
    digits = data.load_builtin("digits")
    train_idx, eval_idx = data.stratified_split(digits.y, 0.3, seed=11)
    train_id = service.upload_dataset(npz_of(digits.x[train_idx][..., 0], digits.y[train_idx]), "train.npz")
    eval_id = service.upload_dataset(npz_of(digits.x[eval_idx][..., 0], digits.y[eval_idx]), "eval.npz")
    teacher_id = service.upload_teacher(trained_teacher, TEACHER_SPEC)
    job_id = service.submit({"kind": "distill", "teacher": teacher_id, "dataset": train_id, "eval_dataset": eval_id,
                             "epochs": 2, "batch_size": 32, "student": {"arch": "small_cnn",
                                                                        "kwargs": {"width": 8, "depth": 2}}})
    job = service.api_job(service.wait_status(job_id, ("succeeded", "failed"), timeout=240).id)
    assert job["status"] == "succeeded", job["error"]

    x_eval = data.to_model_input(digits.x[eval_idx], ArchSpec.model_validate(TEACHER_SPEC).input)
    teacher = models.load_model(trained_teacher, "safetensors", ArchSpec.model_validate(TEACHER_SPEC))
    # Batched as the worker batches, so that no borderline image flips between batch shapes.
    expected = evaluate.accuracy(teacher, x_eval, torch.from_numpy(digits.y[eval_idx]))
    metrics, summary = job["metrics"], job["summary"]
    assert metrics["teacher"]["accuracy"] == pytest.approx(expected, abs=1e-9)
    assert metrics["validation_samples"] == len(eval_idx)
    assert summary["evaluation"]["source"] == "eval_dataset" and summary["evaluation"]["dataset"] == eval_id
    report = check_report(service, job)
    assert report["inputs"]["eval_dataset"]["id"] == eval_id
    card = download(service, {a["kind"]: a for a in job["artifacts"]}["report_model_card"]).decode()
    assert f"images of the evaluation dataset `{eval_id}`, which the job neither trained nor calibrated on" in card
