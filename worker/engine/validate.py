"""Check an uploaded model in a short-lived child process, so that the API never imports torch.

    python -m worker.engine.validate --format safetensors --arch-json '{"arch": ...}' PATH

prints one JSON line, {"ok": true, "param_count": N, "num_classes": K, "activations_per_sample": M} or
{"ok": false, "error": "<message for the user>"}, and exits 0 either way.

The model is built on the meta device (shapes, no storage, no initialisation) and the file is read only as far
as names and shapes go: what the worker will load must fit the architecture, and the architecture must run at
the declared input size, which shapes alone prove. Checking a 233 MB resnet152 this way reads its header.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from worker.engine.budget import build_on_meta, measure
from worker.engine.config import TENSOR_FORMATS, ArchSpec
from worker.engine.errors import EngineError
from worker.engine.models import check_weights_fit, describe_validation_error


def validate(path: Path, fmt: str, arch_json: str) -> dict[str, Any]:
    try:
        arch = ArchSpec.model_validate_json(arch_json)
    except ValidationError as exc:
        return {"ok": False, "error": f"invalid architecture spec: {describe_validation_error(exc)}"}
    try:
        model = build_on_meta(arch)
        check_weights_fit(path, fmt, model, arch)
        cost = measure(model, arch)
    except EngineError as exc:
        return {"ok": False, "error": str(exc)}
    return {"ok": True, "param_count": cost.parameters, "num_classes": arch.num_classes,
            "activations_per_sample": cost.activations_per_sample}


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
