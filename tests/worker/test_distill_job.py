"""The distillation job's code as the worker runs it, in process: a control run beside a FitNets hint."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from core.jobspec import DistillJobSpec
from tests.conftest import SmallCnnFiles
from worker.engine.training import Progress
from worker.jobs.base import Checkpoints, JobContext, ModelSource, job_function


class RecordingGuard:
    """The runner's guard without a job row: records the stages it is told about."""

    def __init__(self) -> None:
        self.stages: list[str] = []

    def stage(self, name: str, steps: int | None = None) -> None:
        self.stages.append(name)

    def step(self) -> None:
        pass

    def on_progress(self, progress: Progress) -> None:
        pass

    def on_checkpoint(self, state: dict[str, Any]) -> None:
        pass


def test_a_control_run_beside_a_hint_trains_the_student_alone(small_cnn_files: SmallCnnFiles, tmp_path: Path) -> None:
    """The control has no teacher, so no hint: it trains on the labels and the job reports the gain over it."""
    spec = DistillJobSpec.model_validate({
        "teacher": "mdl_t", "dataset": "digits", "device": "cpu", "epochs": 2, "batch_size": 64, "control": True,
        "student": {"arch": "small_cnn", "kwargs": {"width": 4, "depth": 2, "num_classes": 10}},
        "loss": "feature", "feature": {"teacher_layer": "features.2", "student_layer": "features.2"}})
    path = small_cnn_files.safetensors
    teacher = ModelSource(path=path, format="safetensors", arch={"arch": "small_cnn",
                          "kwargs": small_cnn_files.spec["kwargs"]}, input_spec=small_cnn_files.spec["input"],
                          bytes=path.stat().st_size, id="mdl_t")
    ctx = JobContext(job_id="job_t", kind="distill", owner="test", attempt=1, max_attempts=1, spec=spec,
                     teacher=teacher, dataset_path=None, work_dir=tmp_path / "job", provenance={},
                     models={"mdl_t": teacher}, dataset_paths={"digits": None})
    guard = RecordingGuard()
    metrics = job_function("distill")(ctx, guard, Checkpoints(tmp_path / "checkpoint.pt")).metrics
    assert guard.stages.index("training") < guard.stages.index("control") < guard.stages.index("exporting")
    control = metrics["control"]
    assert 0 < control["accuracy"] <= 1
    assert control["kd_gain_pts"] == (metrics["student"]["accuracy"] - control["accuracy"]) * 100
    done = metrics["work"]["done"]
    assert "FitNets hint" in done[0] and any(line.startswith("a control:") for line in done)
