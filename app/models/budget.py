"""What a model, or a job's models together, may cost: refused with a 422 before anything is stored or queued.

Each kwarg of an architecture is bounded, the model is not: a student vit_h_14 trained at batch 4096 needs
terabytes. Parameters and activations per sample come from the model's constructor on the meta device, in a
limited child (worker.engine.budget: the API never imports torch); estimates are kept by spec, so that a spec
seen before costs no child.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from dataclasses import dataclass

from app.models.validator import run_torch_child
from core.errors import Invalid, public_text
from core.settings import Settings
from worker.engine.config import ArchSpec

ESTIMATOR_MODULE = "worker.engine.budget"
BYTES_PER_VALUE = 4  # float32: how every model is built and trained here
# A trained model holds, per parameter and per activation, about three values: for parameters the weight, its
# gradient and the optimizer's state (SGD momentum; AdamW's two moments make it a little more); for
# activations the output kept for backward, its gradient, and the workspace of the op that uses them.
# A model that only runs forward (a teacher, a calibrated model) holds one.
TRAINING_FACTOR = 3
INFERENCE_FACTOR = 1
_CACHED_SPECS = 1024


@dataclass(frozen=True)
class ModelCost:
    parameters: int
    activations_per_sample: int


@dataclass(frozen=True)
class ModelUse:
    """One model a job runs: which it is (for messages), its spec, the batch it runs at, whether it trains."""

    role: str
    arch: ArchSpec
    batch_size: int
    trains: bool


class _EstimateCache:
    """Least recently used estimates by the spec's canonical JSON, shared by every request of the process."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.entries: OrderedDict[str, ModelCost] = OrderedDict()
        self.lock = threading.Lock()

    def get(self, key: str) -> ModelCost | None:
        with self.lock:
            cost = self.entries.get(key)
            if cost is not None:
                self.entries.move_to_end(key)
            return cost

    def put(self, key: str, cost: ModelCost) -> None:
        with self.lock:
            self.entries[key] = cost
            self.entries.move_to_end(key)
            while len(self.entries) > self.capacity:
                self.entries.popitem(last=False)


_estimates = _EstimateCache(_CACHED_SPECS)


def spec_key(arch: ArchSpec) -> str:
    # Normalisation statistics and resize policy change no shape: specs differing only there share an estimate.
    # A multi-task student's heads (ArchSpec.heads, once the multi-head student lands) size its classifiers.
    shape_part = {"arch": arch.arch, "kwargs": arch.kwargs, "pruned_shapes": arch.pruned_shapes,
                  "heads": arch.heads, "input": [arch.input.channels, arch.input.image_size]}
    return json.dumps(shape_part, sort_keys=True, separators=(",", ":"))


def remember(arch: ArchSpec, cost: ModelCost) -> None:
    """Keep an estimate made elsewhere (the upload's weights check measures the same)."""
    _estimates.put(spec_key(arch), cost)


def estimate(archs: list[ArchSpec], timeout: float) -> list[ModelCost]:
    """The cost of each spec, from the cache or from one child for those not in it."""
    known = {spec_key(arch): _estimates.get(spec_key(arch)) for arch in archs}
    missing = {spec_key(arch): arch for arch in archs if known[spec_key(arch)] is None}
    if missing:
        for key, cost in zip(missing, _estimate_in_child(list(missing.values()), timeout), strict=True):
            known[key] = cost
            _estimates.put(key, cost)
    return [known[spec_key(arch)] for arch in archs]  # type: ignore[misc]


def _estimate_in_child(archs: list[ArchSpec], timeout: float) -> list[ModelCost]:
    arch_json = json.dumps([arch.model_dump(mode="json") for arch in archs])
    # A constructor that allocates wildly even on the meta device blows the child's limits: a 422 like any other.
    verdict = run_torch_child(ESTIMATOR_MODULE, ["--arch-json", arch_json], timeout, what="estimating the model's size")
    if not verdict.get("ok"):
        raise Invalid(f"the model cannot be built: {public_text(str(verdict.get('error', 'unknown error')))}")
    return [ModelCost(int(item["parameters"]), int(item["activations_per_sample"]))
            for item in verdict["estimates"]]  # type: ignore[union-attr]


def check_models(uses: list[ModelUse], settings: Settings) -> None:
    """422 naming the figure and the limit when a model has too many parameters or the models together need
    more memory than a job may use."""
    costs = estimate([use.arch for use in uses], settings.model_validation_timeout_seconds)
    for use, cost in zip(uses, costs, strict=True):
        check_parameters(use.role, use.arch, cost.parameters, settings)
    needed = sum(memory_bytes(use, cost) for use, cost in zip(uses, costs, strict=True))
    if needed > settings.max_training_memory_bytes:
        described = ", ".join(f"the {use.role} {use.arch.arch} at batch {use.batch_size}"
                              f"{' (training)' if use.trains else ''}" for use in uses)
        raise Invalid(f"this job needs about {_gib(needed)} of memory ({described}); this server allows "
                      f"{_gib(settings.max_training_memory_bytes)} (setting max_training_memory_bytes): use "
                      "a smaller batch_size, a smaller model or a smaller input size")


def check_parameters(role: str, arch: ArchSpec, parameters: int, settings: Settings) -> None:
    if parameters > settings.max_model_parameters:
        raise Invalid(f"the {role} {arch.arch} has {parameters:,} parameters; this server accepts models of at most "
                      f"{settings.max_model_parameters:,} (setting max_model_parameters)")


def memory_bytes(use: ModelUse, cost: ModelCost) -> int:
    factor = TRAINING_FACTOR if use.trains else INFERENCE_FACTOR
    return factor * BYTES_PER_VALUE * (cost.parameters + cost.activations_per_sample * use.batch_size)


def _gib(size: int) -> str:
    return f"{size / (1 << 30):,.1f} GiB"
