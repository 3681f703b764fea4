"""Is each file good? Every result of a few (teacher, student, method) cases, run through the job code the worker runs
(worker/jobs/*: export, reload from disk, acceptance checks), judged per format on images no model trained on.

Cases: on `digits` (8x8 handwritten digits) and on `photo-patches` (32x32 crops of 14 photographs: harder), a small_cnn
teacher trained on the training part of the job's own split, then distilled into a smaller small_cnn (and, on digits,
into torchvision's mobilenet_v3_small, whose BatchNorm momentum of 0.01 leaves stale statistics after a short run),
pruned (structured, channel ratio 0.5, 8 epochs of recovery fine-tuning) and quantized (static int8).

Prints one JSON line per (case, result): `case`, `accuracy` (format -> top-1), `agreement` (format -> top-1 agreement
with the float model the file was made from; for the float weights file, with the input model), `drop_pts` (the
largest drop of a published file below the input model, in points), `drop_pts_by_format`, `passed` (format -> the
acceptance verdict), `input_accuracy`, `batchnorm` (what re-estimating the BatchNorm statistics did) and the CPU
it ran on. Run: `.venv/bin/python bench/quality.py`.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script from a fresh clone, without installing the package
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from core.jobspec import SPEC_CLASSES, JobSpecBase  # noqa: E402
from worker.engine import cpu, data, export, models  # noqa: E402
from worker.engine.config import ADAMW_LOOP, ArchSpec, DistillConfig  # noqa: E402
from worker.engine.distill import distill  # noqa: E402
from worker.engine.training import Progress  # noqa: E402
from worker.jobs.base import Checkpoints, JobContext, ModelSource, job_function  # noqa: E402

SEED, VAL_FRACTION = 0, 0.25
TEACHERS = {
    "digits": {"arch": "small_cnn", "kwargs": {"num_classes": 10, "width": 32, "depth": 2},
               "input": {"image_size": 8, "channels": 1, "mean": [0.5], "std": [0.5]}},
    "photo-patches": {"arch": "small_cnn", "kwargs": {"num_classes": 14, "width": 32, "depth": 3},
                      "input": {"image_size": 32, "channels": 3, "mean": [0.5], "std": [0.25]}},
}
SMALL_STUDENT = {"arch": "small_cnn", "kwargs": {"width": 8, "depth": 2}}
# A torchvision student needs 3 channels and room for its strides: digits upscaled to 32 px RGB.
DIGITS_RGB_TEACHER = {**TEACHERS["digits"], "input": {"image_size": 32, "channels": 3, "mean": [0.5], "std": [0.5]}}
# The loop the figures in bench/README.md were measured with (before the defaults changed).
TRAINING = {"epochs": 30, "batch_size": 64, "lr": 3e-3, "alpha": 0.9, **ADAMW_LOOP}


class QuietGuard:
    """The runner's guard without a job row: nothing to report to, nothing to stop for."""

    def stage(self, name: str, steps: int | None = None) -> None:
        pass

    def step(self) -> None:
        pass

    def on_progress(self, progress: Progress) -> None:
        pass

    def on_checkpoint(self, state: dict[str, Any]) -> None:
        pass


def trained_teacher(dataset: str, spec: dict[str, Any], folder: Path) -> ModelSource:
    """A teacher trained on the training part of the split every job below uses: the jobs judge on images it never
    saw."""
    arch = ArchSpec.model_validate(spec)
    train, val = data.train_val_tensors(data.load_builtin(dataset), arch.input, VAL_FRACTION, SEED)
    torch.manual_seed(SEED)
    teacher = models.build_model(arch)
    distill(None, teacher, train, val, DistillConfig(epochs=12, batch_size=64, lr=3e-3, **ADAMW_LOOP),
            on_progress=lambda _: None)
    path = folder / f"teacher-{dataset}-{arch.input.image_size}.safetensors"
    export.save_safetensors(teacher, path)
    input_spec = arch.input.model_dump(mode="json")
    return ModelSource(path=path, format="safetensors", arch={"arch": arch.arch, "kwargs": arch.kwargs},
                       input_spec=input_spec, bytes=path.stat().st_size)


def run_job(kind: str, body: dict[str, Any], teacher: ModelSource, folder: Path) -> dict[str, Any]:
    # Each kind's default gate: 2 points for pruning and quantization, off for distillation.
    spec: JobSpecBase = SPEC_CLASSES[kind].model_validate({"kind": kind, **body, "seed": SEED,
                                                           "val_fraction": VAL_FRACTION, "device": "cpu"})
    work_dir = folder / f"job-{len(list(folder.iterdir()))}"
    ctx = JobContext(job_id="bench", kind=kind, owner="bench", attempt=1, max_attempts=1, spec=spec, teacher=teacher,
                     dataset_path=None, work_dir=work_dir, provenance={})
    return job_function(kind)(ctx, QuietGuard(), Checkpoints(work_dir / "checkpoint.pt")).metrics


def line(case: str, metrics: dict[str, Any]) -> dict[str, Any]:
    acceptance = metrics["acceptance"]
    formats = acceptance["formats"]
    drops = {fmt: entry["drop_pts"] for fmt, entry in formats.items()}
    published = [drops[fmt] for fmt in acceptance["passed_formats"]]
    return {"benchmark": "quality", "case": case,
            "accuracy": {fmt: entry["accuracy"] for fmt, entry in formats.items()},
            "agreement": {fmt: entry["agreement"] for fmt, entry in formats.items()},
            "drop_pts": max(published) if published else None, "drop_pts_by_format": drops,
            "passed": {fmt: entry["passed"] for fmt, entry in formats.items()},
            "input_accuracy": acceptance["reference_accuracy"], "evaluation_images": metrics["validation_samples"],
            "batchnorm": metrics.get("batchnorm"),
            "measured_on": cpu.summary_line(cpu.describe())}


def cases(folder: Path) -> list[tuple[str, str, dict[str, Any], ModelSource]]:
    teachers = {name: trained_teacher(name, spec, folder) for name, spec in TEACHERS.items()}
    rgb_digits = trained_teacher("digits", DIGITS_RGB_TEACHER, folder)
    listed = []
    for name, teacher in teachers.items():
        listed += [
            (f"{name}/distill small_cnn-32 -> small_cnn-8", "distill",
             {"teacher": "bench", "dataset": name, "student": SMALL_STUDENT, **TRAINING}, teacher),
            (f"{name}/prune structured 0.5 + 8 epochs", "prune",
             {"model": "bench", "dataset": name, "channel_ratio": 0.5, "epochs": 8, "lr": 1e-3}, teacher),
            (f"{name}/quantize static int8", "quantize", {"model": "bench", "dataset": name, "method": "static"},
             teacher),
        ]
    listed.append(("digits-32px-rgb/distill small_cnn-32 -> mobilenet_v3_small", "distill",
                   {"teacher": "bench", "dataset": "digits", "student": {"arch": "mobilenet_v3_small"},
                    **TRAINING, "epochs": 3}, rgb_digits))
    return listed


def main() -> None:
    torch.manual_seed(SEED)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for case, kind, body, teacher in cases(folder):
            print(json.dumps(line(case, run_job(kind, body, teacher, folder))), flush=True)


if __name__ == "__main__":
    main()
