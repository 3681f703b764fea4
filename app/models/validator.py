"""Run worker.engine.validate in a short-lived child process.

Loading weights needs torch, which the API never imports: a child (app.sandbox) keeps torch's memory,
threads and any parser bug out of the server.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

from app.sandbox import ChildLimits, run_child
from core.errors import Invalid, public_text
from worker.engine.config import ArchSpec

VALIDATOR_MODULE = "worker.engine.validate"
ADDRESS_SPACE_LIMIT = 8 << 30
# Each child imports torch (hundreds of MB): a burst of uploads or model estimates queues here instead of
# exhausting memory.
CHILD_SLOTS = threading.BoundedSemaphore(2)


@dataclass(frozen=True)
class WeightsReport:
    param_count: int
    num_classes: int
    # Elements of every layer's output for one sample, as worker.engine.budget counts them; None: not measured.
    activations_per_sample: int | None = None


def check_weights(path: Path, weights_format: str, spec: ArchSpec, timeout: float) -> WeightsReport:
    """Check in a child that the file's tensors fit `spec` and that it runs at its input size; Invalid (422) with
    the reason if not."""
    args = ["--format", weights_format, "--arch-json", spec.model_dump_json(), str(path)]
    verdict = run_torch_child(VALIDATOR_MODULE, args, timeout, what="checking the weights")
    if not verdict.get("ok"):
        raise Invalid(f"the weights do not fit the spec: {public_text(str(verdict.get('error', 'unknown error')))}")
    return WeightsReport(param_count=int(verdict["param_count"]), num_classes=int(verdict["num_classes"]),
                         activations_per_sample=int(verdict["activations_per_sample"]))


def run_torch_child(module: str, args: list[str], timeout: float, what: str) -> dict[str, object]:
    """A child that imports torch (the validator, the size estimator): one of CHILD_SLOTS, under the same limits."""
    limits = ChildLimits(timeout_seconds=timeout, cpu_seconds=max(1, int(timeout)) * 2,
                         address_space_bytes=ADDRESS_SPACE_LIMIT)
    with CHILD_SLOTS:
        return run_child(module, args, limits, what=what)
