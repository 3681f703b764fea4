"""The contract between the runner and the job kinds, and the registry that joins them.

A kind is one module in worker/jobs/ with a function decorated `@job_kind("name")`, taking (ctx, guard,
checkpoints) and returning a JobOutcome, plus its typed spec class in core/jobspec.py. The runner owns the
lifecycle around it (claims, leases, retries, cancel, publishing), so every kind gets them for free; it finds the
kinds here and never imports them by name.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

import torch

from core.jobspec import JobSpecBase
from worker.engine.fileio import atomic_write
from worker.engine.training import Progress

SpecT = TypeVar("SpecT", bound=JobSpecBase)


@dataclass(frozen=True)
class ModelSource:
    """The job's input model as stored: where its file is and how to rebuild it."""

    path: Path
    format: str
    arch: dict[str, Any]
    input_spec: dict[str, Any]
    bytes: int
    id: str = ""


@dataclass(frozen=True)
class JobContext(Generic[SpecT]):
    job_id: str
    kind: str
    owner: str
    attempt: int
    max_attempts: int
    spec: SpecT
    teacher: ModelSource  # the input model, whatever the kind calls it
    dataset_path: Path | None  # None: the built-in dataset named in spec.dataset
    work_dir: Path
    provenance: dict[str, Any]  # what went in, with sha256s, for the report
    deadline: datetime | None = None  # from the spec's time_limit_seconds, counted from the first start
    eval_dataset_path: Path | None = None  # None: no spec.eval_dataset, or the built-in it names
    # A replay's original job, for its report: {"id", "kind", "status", "metrics", "finished_at", "environment"}.
    original: dict[str, Any] | None = None
    # Every model the spec names by id (a distillation's teachers), and every dataset it names (a multi-task
    # distillation's too) by name or id: its canonical file, None for the built-in of that name.
    models: dict[str, ModelSource] = field(default_factory=dict)
    dataset_paths: dict[str, Path | None] = field(default_factory=dict)


@dataclass(frozen=True)
class OutputFile:
    kind: str
    path: Path
    filename: str
    media_type: str
    runtime: str
    format: str | None = None  # the format key (measure.SUFFIXES) of a file that holds a model: judged, may be rejected


@dataclass(frozen=True)
class OutputModel:
    """The job's result as a model that later jobs can take by id: which of its files holds it (the first of
    `file_kinds` that passed its acceptance checks) and how to rebuild it."""

    file_kinds: tuple[str, ...]
    arch: dict[str, Any]  # {"arch", "kwargs"} and, for a pruned model, "pruned_shapes"
    input_spec: dict[str, Any]
    num_classes: int
    param_count: int
    precision: str = "float32"
    label: str = "output"  # what the result is, in the model's name: student, pruned, int8


@dataclass
class JobOutcome:
    files: list[OutputFile]
    metrics: dict[str, Any]
    model: OutputModel | None = None


class Checkpoints:
    """The job's single checkpoint file, replaced atomically so a crash never leaves half of one."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def save(self, state: dict[str, Any]) -> None:
        atomic_write(self.path, lambda handle: torch.save(state, handle))

    def load(self) -> dict[str, Any] | None:
        if not self.path.exists():
            return None
        return torch.load(self.path, weights_only=True, map_location="cpu")


class Guard(Protocol):
    """What a kind reports to, and is stopped by, between its steps (the runner's JobGuard)."""

    def stage(self, name: str, steps: int | None = None) -> None: ...

    def step(self) -> None: ...

    def on_progress(self, progress: Progress) -> None: ...

    def on_checkpoint(self, state: dict[str, Any]) -> None: ...


JobFunction = Callable[[JobContext[Any], Guard, Checkpoints], JobOutcome]
_KINDS: dict[str, JobFunction] = {}


def job_kind(name: str) -> Callable[[JobFunction], JobFunction]:
    """Registers the decorated function as the job kind `name`."""

    def register(function: JobFunction) -> JobFunction:
        if name in _KINDS:
            raise RuntimeError(f"job kind '{name}' is registered twice ({_KINDS[name].__module__}, "
                               f"{function.__module__})")
        _KINDS[name] = function
        return function

    return register


def job_function(kind: str) -> JobFunction:
    """The function that runs jobs of `kind`."""
    return _registry()[kind]


def registered_kinds() -> list[str]:
    return sorted(_registry())


def _registry() -> dict[str, JobFunction]:
    """The kinds, once every module of worker/jobs/ is imported (importing one registers its kind)."""
    if not _KINDS:
        import worker.jobs

        for module in pkgutil.iter_modules(worker.jobs.__path__, "worker.jobs."):
            importlib.import_module(module.name)
    return _KINDS
