"""What a model costs before anything is allocated: parameters, and activations per input sample.

The model is built and run on the meta device, so a spec asking for billions of parameters or gigabytes of
activations costs shapes only. Run as a child of the API (which never imports torch):

    python -m worker.engine.budget --arch-json '[{"arch": ...}, ...]'

prints one JSON line, {"ok": true, "estimates": [{"parameters": N, "activations_per_sample": M}, ...]} in the
order given, or {"ok": false, "error": "<message for the user>"}, and exits 0 either way.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from typing import Any

import torch
from pydantic import TypeAdapter, ValidationError
from torch import nn

from worker.engine.config import ArchSpec
from worker.engine.errors import EngineError, SpecError
from worker.engine.models import build_model, describe_validation_error, logits_of, param_count


@dataclass(frozen=True)
class ModelCost:
    parameters: int
    # Elements of every leaf module's output for one input sample: what a training step keeps for backward.
    activations_per_sample: int


def build_on_meta(arch: ArchSpec) -> nn.Module:
    """`arch` with shapes and no storage: no initialisation runs and no memory is taken, whatever its size."""
    with torch.device("meta"):
        return build_model(arch)


def estimate(arch: ArchSpec) -> ModelCost:
    return measure(build_on_meta(arch), arch)


def measure(model: nn.Module, arch: ArchSpec) -> ModelCost:
    """Count `model`'s parameters and the activations of one forward pass at the spec's input size, checking that
    it runs there; `model` may live on the meta device."""
    activations = 0

    def count(_module: nn.Module, _inputs: Any, output: Any) -> None:
        nonlocal activations
        activations += sum(tensor.numel() for tensor in _tensors(output))

    # Leaves only: a container's output is its last child's, counted already.
    leaves = [module for module in model.modules() if not any(module.children())]
    handles = [module.register_forward_hook(count) for module in leaves]
    try:
        _check_forward(model, arch)
    finally:
        for handle in handles:
            handle.remove()
    return ModelCost(parameters=param_count(model), activations_per_sample=activations)


def _check_forward(model: nn.Module, arch: ArchSpec) -> None:
    """Prove the model runs at the declared input size and gives one score per class (shapes only, on meta)."""
    shape = (1, arch.input.channels, arch.input.image_size, arch.input.image_size)
    size = "x".join(str(dim) for dim in shape[1:])
    try:
        with torch.no_grad():
            output = logits_of(model.eval()(torch.empty(shape, device="meta")))
    # Shape errors surface as RuntimeError; torchvision's own input checks (torch._assert) as AssertionError.
    except (RuntimeError, AssertionError, ValueError) as exc:
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise SpecError(f"{arch.arch} does not run on {size} inputs: {first_line}") from exc
    if isinstance(output, dict):  # a multi-head model: one score per class of each task
        shapes = {task: list(logits.shape) for task, logits in output.items()}
        expected = {task: [1, classes] for task, classes in (arch.heads or {}).items()}
        if shapes != expected:
            raise SpecError(f"{arch.arch} outputs shapes {shapes} on a {size} input; expected {expected}")
    elif tuple(output.shape) != (1, arch.num_classes):
        raise SpecError(
            f"{arch.arch} outputs shape {list(output.shape)} on a {size} input; expected [1, {arch.num_classes}]"
        )


def _tensors(output: Any) -> list[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, (tuple, list)):
        return [tensor for item in output for tensor in _tensors(item)]
    return []


def estimate_all(arch_json: str) -> dict[str, Any]:
    try:
        archs = TypeAdapter(list[ArchSpec]).validate_json(arch_json)
    except ValidationError as exc:
        return {"ok": False, "error": f"invalid architecture spec: {describe_validation_error(exc)}"}
    try:
        return {"ok": True, "estimates": [asdict(estimate(arch)) for arch in archs]}
    except EngineError as exc:
        return {"ok": False, "error": str(exc)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--arch-json", required=True, help="a JSON list of architecture specs")
    args = parser.parse_args(argv)
    print(json.dumps(estimate_all(args.arch_json)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
