"""What every distillation makes and says of its student: the files (weights + spec, and the formats that run
without condenser) and the loss in words."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from core.jobspec import DistillJobSpec
from worker.engine import export
from worker.engine.config import ArchSpec
from worker.jobs import measure
from worker.jobs.base import OutputFile


def export_student(student: nn.Module, student_spec: ArchSpec, example: torch.Tensor, folder: Path,
                   on_step: Callable[[], None]) -> tuple[Path, Path, dict[str, Path]]:
    """The weights, their arch spec, and the files that run without condenser (by format)."""
    folder.mkdir(parents=True, exist_ok=True)
    weights, spec_file = folder / "student.safetensors", folder / "student.arch.json"
    export.save_safetensors(student, weights)
    export.save_json(export.arch_spec_document(student_spec), spec_file)
    runnable = {fmt: folder / f"student{measure.SUFFIXES[fmt]}" for fmt in measure.EXPORTERS}
    for fmt, exporter in measure.EXPORTERS.items():
        exporter(student, example, runnable[fmt])
        on_step()
    return weights, spec_file, runnable


def student_files(weights: Path, spec_file: Path, runnable: dict[str, Path]) -> list[OutputFile]:
    return [
        OutputFile("student_safetensors", weights, weights.name, "application/octet-stream",
                   "safetensors (+ student.arch.json)", measure.SAFETENSORS),
        OutputFile("student_arch_spec", spec_file, spec_file.name, "application/json", "spec"),
        *(OutputFile(f"student_{fmt}", path, path.name, "application/octet-stream", measure.runtime_of(fmt), fmt)
          for fmt, path in runnable.items()),
    ]


LOSS_WORDS = {"kd": "Hinton KD", "dkd": "decoupled KD", "kd_ls": "KD on standardised logits",
              "feature": "Hinton KD plus a FitNets hint"}


def loss_words(spec: DistillJobSpec) -> str:
    config = spec.distill
    words = LOSS_WORDS[config.loss]
    if config.loss == "dkd":
        words += f" (alpha {config.dkd_alpha:g}, beta {config.dkd_beta:g})"
    if config.feature is not None:
        words += (f" ({config.feature.student_layer} -> {config.feature.teacher_layer}, "
                  f"weight {config.feature.weight:g})")
    return words
