"""Many teachers, one student, end to end on a real worker process, PostgreSQL and Redis.

- Ensemble: two small_cnn teachers of digits, on 8x8 grayscale and on 16x16 RGB, distil one student; each
  teacher sees the images preprocessed its own way, and the job reports each member and the ensemble.
- Multi-task: the same digits teachers and a teacher of the second built-in task distil one student with two
  heads; each head's accuracy is reported, measured on the downloaded files as plain torch / ONNX Runtime load
  them (a dict of outputs, named ONNX outputs), and is within a few points of a single-task student of the same
  architecture distilled on its task alone by the same teachers (the digits one is the ensemble job above, with
  its control run: the same student trained without a teacher).

Teachers train here on the training part of the split every job uses (val_fraction 0.2, seed 0), so the jobs judge
on images no teacher saw. Training is a few epochs of tiny models: what is under test is the plumbing and the honesty
of the figures, not the last point of accuracy."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime
import pytest
import torch

from tests.e2e.test_distill_e2e import download
from tests.harness import Service, running_service
from worker.engine import data, export, models
from worker.engine.config import ArchSpec, DistillConfig, InputSpec
from worker.engine.distill import distill

pytestmark = pytest.mark.slow

SECOND_TASK = "shapes"
SEED, VAL_FRACTION = 0, 0.2
RGB32 = {"image_size": 32, "channels": 3, "mean": [0.5], "std": [0.25]}
TEACHERS: dict[str, tuple[str, dict[str, Any]]] = {
    "digits": ("digits", {"arch": "small_cnn", "kwargs": {"num_classes": 10, "width": 32, "depth": 2},
                          "input": {"image_size": 8, "channels": 1, "mean": [0.5], "std": [0.5]}}),
    # Another architecture, on another view of the same digits (16x16 RGB). (tests/engine/test_ensemble_and_hints.py
    # distils from a resnet18 with its own view; here a cheaper second teacher keeps the module fast.)
    "digits_rgb": ("digits", {"arch": "small_cnn", "kwargs": {"num_classes": 10, "width": 16, "depth": 3},
                              "input": {"image_size": 16, "channels": 3, "mean": [0.5], "std": [0.5]}}),
    SECOND_TASK: (SECOND_TASK, {"arch": "small_cnn", "kwargs": {"num_classes": None, "width": 32, "depth": 4},
                                "input": RGB32}),
}
# Depth 4: at 32 px, fewer blocks see too little of the image to tell shapes (or upscaled digits) apart.
STUDENT = {"arch": "small_cnn", "kwargs": {"width": 16, "depth": 4}, "input": RGB32}
TRAINING = {"epochs": 5, "batch_size": 32}
ENDED = ("succeeded", "failed", "canceled")
# How far a fused head may land below the single-task student of its task: a few points, on a few hundred images.
HEAD_TOLERANCE_PTS = 6.0


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    with running_service(tmp_path_factory.mktemp("many-teachers"), "distributed") as running:
        running.start_worker(OMP_NUM_THREADS="1")
        yield running


@pytest.fixture(scope="module")
def teachers(service: Service, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Each teacher trained on its dataset's training part and uploaded: name -> model id."""
    folder = tmp_path_factory.mktemp("teachers")
    return {name: service.upload_teacher(*_trained(folder, name, dataset, spec))
            for name, (dataset, spec) in TEACHERS.items()}


def _trained(folder: Path, name: str, dataset_name: str, spec: dict[str, Any]) -> tuple[Path, dict[str, Any]]:
    dataset = data.load_builtin(dataset_name)
    spec = {**spec, "kwargs": {**spec["kwargs"], "num_classes": len(dataset.class_names)}}
    arch = ArchSpec.model_validate(spec)
    train, val = data.train_val_tensors(dataset, arch.input, VAL_FRACTION, SEED)
    torch.manual_seed(0)
    model = models.build_model(arch)
    distill(None, model, train, val, DistillConfig(epochs=6, batch_size=32, lr=3e-3, augment="none"),
            on_progress=lambda _: None)
    path = folder / f"{name}.safetensors"
    export.save_safetensors(model, path)
    return path, spec


def run_job(service: Service, body: dict[str, Any], timeout: float = 600) -> dict[str, Any]:
    job_id = service.submit({"seed": SEED, "val_fraction": VAL_FRACTION, **TRAINING, **body})
    service.wait_status(job_id, ENDED, timeout)
    job = service.api_job(job_id)
    assert job["status"] == "succeeded", f"{job['error']}\n{service.worker_logs()}"
    return job


DIGITS_TEACHERS = ("digits", "digits_rgb")


def _teacher_refs(teachers: dict[str, str], task: str) -> list[dict[str, Any]]:
    """The digits task's two teachers (weights 1 and 2), or the second task's one."""
    names = DIGITS_TEACHERS if task == "digits" else (task,)
    return [{"model": teachers[name], "weight": float(index + 1)} for index, name in enumerate(names)]


@pytest.fixture(scope="module")
def fused_job(service: Service, teachers: dict[str, str]) -> dict[str, Any]:
    tasks = [{"name": task, "dataset": task, "teachers": _teacher_refs(teachers, task)}
             for task in ("digits", SECOND_TASK)]
    return run_job(service, {"student": STUDENT, "tasks": tasks})


@pytest.fixture(scope="module")
def single_task_jobs(service: Service, teachers: dict[str, str]) -> dict[str, dict[str, Any]]:
    """One student of the fused student's architecture per task, distilled on that task alone by the same teachers:
    digits by the ensemble of two (with its control run), the second task by its one teacher."""
    return {task: run_job(service, {"dataset": task, "teachers": _teacher_refs(teachers, task), "student": STUDENT,
                                    "control": task == "digits"})
            for task in ("digits", SECOND_TASK)}


def test_ensemble_reports_each_teacher_seeing_its_own_view(single_task_jobs: dict[str, dict[str, Any]]) -> None:
    ensemble_job = single_task_jobs["digits"]
    metrics, summary = ensemble_job["metrics"], ensemble_job["summary"]
    members = metrics["teachers"]
    assert [member["input_shape"] for member in members] == [[1, 8, 8], [3, 16, 16]]
    assert [member["weight"] for member in members] == [1.0, 2.0]
    # The before column is the ensemble: its size and latency are its members' together.
    assert metrics["teacher"]["param_count"] == sum(member["param_count"] for member in members)
    assert metrics["teacher"]["cpu_latency_ms_batch1"] == pytest.approx(
        sum(member["cpu_latency_ms_batch1"] for member in members))
    assert metrics["acceptance"]["reference"] == "teacher ensemble"
    assert [entry["id"] for entry in summary["teachers"]] == [member["id"] for member in members]
    # Every student file passed the floor: well above chance on ten classes.
    assert summary["failed_formats"] == [] and metrics["student"]["accuracy"] > 0.5
    assert "teachers" not in single_task_jobs[SECOND_TASK]["metrics"]  # one teacher: no members listed


def test_fused_student_has_one_named_output_per_task(fused_job: dict[str, Any], service: Service,
                                                     tmp_path: Path) -> None:
    artifacts = {artifact["kind"]: artifact for artifact in fused_job["artifacts"]}
    spec = json.loads(download(service, artifacts["student_arch_spec"]))
    assert spec["heads"] == {"digits": 10, SECOND_TASK: len(data.load_builtin(SECOND_TASK).class_names)}
    tasks = fused_job["metrics"]["tasks"]
    for task, (x, y) in _held_out(STUDENT["input"]).items():
        scripted = torch.jit.load(io.BytesIO(download(service, artifacts["student_torchscript"])))
        with torch.no_grad():
            outputs = scripted(x)
        assert list(outputs) == ["digits", SECOND_TASK]
        scripted_accuracy = (outputs[task].argmax(1) == y).float().mean().item()
        assert scripted_accuracy == pytest.approx(tasks[task]["artifacts"]["torchscript"]["accuracy"], abs=1e-6)
        path = tmp_path / "student.onnx"
        path.write_bytes(download(service, artifacts["student_onnx"]))
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        assert [output.name for output in session.get_outputs()] == ["digits", SECOND_TASK]
        (logits,) = session.run([task], {session.get_inputs()[0].name: x.numpy()})
        onnx_accuracy = float((np.argmax(logits, axis=1) == y.numpy()).mean())
        assert onnx_accuracy == pytest.approx(tasks[task]["artifacts"]["onnx"]["accuracy"], abs=1e-6)


def _held_out(student_input: dict[str, Any]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Each task's held-out split, as the jobs cut it, brought to the student's input."""
    spec = InputSpec.model_validate(student_input)
    held_out = {}
    for task in ("digits", SECOND_TASK):
        dataset = data.load_builtin(task)
        _, val_idx = data.stratified_split(dataset.y, VAL_FRACTION, SEED)
        held_out[task] = data.to_model_input(dataset.x[val_idx], spec), torch.from_numpy(dataset.y[val_idx])
    return held_out


def test_each_head_is_within_a_few_points_of_its_single_task_student(
        fused_job: dict[str, Any], single_task_jobs: dict[str, dict[str, Any]]) -> None:
    tasks = {task["name"]: task for task in fused_job["summary"]["tasks"]}
    assert set(tasks) == {"digits", SECOND_TASK}
    for name, single in single_task_jobs.items():
        head, alone = tasks[name]["accuracy"], single["metrics"]["student"]["accuracy"]
        assert head >= alone - HEAD_TOLERANCE_PTS / 100, (name, head, alone)
        assert tasks[name]["passed"]
    metrics = fused_job["metrics"]
    # One fused model instead of two: fewer parameters than two single-task students, and one pass.
    separate = metrics["separate_students"]
    assert metrics["student"]["param_count"] < separate["param_count"]
    assert metrics["ratios"]["vs_separate_students"]["params"] > 1
    assert metrics["teacher"]["param_count"] == sum(member["param_count"] for member in metrics["teachers"])
    assert [member["task"] for member in metrics["teachers"]] == ["digits", "digits", SECOND_TASK]


def test_control_run_reports_the_kd_gain(single_task_jobs: dict[str, dict[str, Any]]) -> None:
    digits = single_task_jobs["digits"]
    control = digits["metrics"]["control"]
    assert 0.1 < control["accuracy"] <= 1.0
    assert control["kd_gain_pts"] == pytest.approx((digits["metrics"]["student"]["accuracy"] - control["accuracy"])
                                                   * 100)
    assert digits["summary"]["control"] == {"accuracy": control["accuracy"], "kd_gain_pts": control["kd_gain_pts"]}
    assert "control" not in single_task_jobs[SECOND_TASK]["metrics"]
