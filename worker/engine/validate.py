"""Check an uploaded model in a short-lived child process, so that the API never imports torch.

    python -m worker.engine.validate --format safetensors --arch-json '{"arch": ...}' PATH

prints one JSON line, {"ok": true, "param_count": N, "num_classes": K} or
{"ok": false, "error": "<message for the user>"}, and exits 0 either way.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from torch import nn

from worker.engine.config import TENSOR_FORMATS, ArchSpec
from worker.engine.errors import EngineError, SpecError
from worker.engine.models import describe_validation_error, load_model, logits_of, param_count


def validate(path: Path, fmt: str, arch_json: str) -> dict[str, Any]:
    try:
        arch = ArchSpec.model_validate_json(arch_json)
    except ValidationError as exc:
        return {"ok": False, "error": f"invalid architecture spec: {describe_validation_error(exc)}"}
    try:
        model = load_model(path, fmt, arch)
        _check_forward(model, arch)
    except EngineError as exc:
        return {"ok": False, "error": str(exc)}
    return {"ok": True, "param_count": param_count(model), "num_classes": arch.num_classes}


def _check_forward(model: nn.Module, arch: ArchSpec) -> None:
    """Prove the weights run at the declared input size and give one score per class."""
    shape = (1, arch.input.channels, arch.input.image_size, arch.input.image_size)
    size = "x".join(str(dim) for dim in shape[1:])
    try:
        with torch.inference_mode():
            output = logits_of(model.eval()(torch.zeros(shape)))
    # Shape errors surface as RuntimeError; torchvision's own input checks (torch._assert) as AssertionError.
    except (RuntimeError, AssertionError, ValueError) as exc:
        first_line = str(exc).strip().splitlines()[0][:300]
        raise SpecError(f"{arch.arch} does not run on {size} inputs: {first_line}") from exc
    if tuple(output.shape) != (1, arch.num_classes):
        raise SpecError(
            f"{arch.arch} outputs shape {list(output.shape)} on a {size} input; expected [1, {arch.num_classes}]"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    # Never the code formats: this runs on the API host, which must not load them.
    parser.add_argument("--format", required=True, choices=TENSOR_FORMATS)
    parser.add_argument("--arch-json", required=True)
    parser.add_argument("path", type=Path)
    args = parser.parse_args(argv)
    print(json.dumps(validate(args.path, args.format, args.arch_json)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
