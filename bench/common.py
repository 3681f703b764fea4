"""What both benchmarks share: the trained resnet18, its digits split, and latency measured fairly.

Run from a fresh clone as `.venv/bin/python bench/<script>.py`; each script prints one JSON line.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script from a fresh clone, without installing the package
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from worker.engine import cpu, data, evaluate  # noqa: E402
from worker.engine.recipes import DIGITS_INPUT, DIGITS_SEED, DIGITS_VAL_FRACTION, train_digits_teacher  # noqa: E402

# The model is trained on digits upscaled to 32 px; it is fully convolutional with adaptive pooling, so
# latency is measured at the ImageNet size its users would feed it.
LATENCY_SHAPE = (3, 224, 224)
TensorPair = tuple[torch.Tensor, torch.Tensor]


def trained_resnet18() -> tuple[nn.Module, TensorPair, TensorPair]:
    """resnet18 (10 classes) trained briefly on digits at 32 px, and the (train, val) split it used."""
    model, _ = train_digits_teacher()
    train, val = data.train_val_tensors(data.load_builtin("digits"), DIGITS_INPUT, DIGITS_VAL_FRACTION, DIGITS_SEED)
    return model.cpu().eval(), train, val


def accuracy_pts(model: Callable[[torch.Tensor], torch.Tensor] | nn.Module, val: TensorPair) -> float:
    return 100 * evaluate.accuracy(model, *val)


def interleaved_latency_ms(models: dict[str, Any], batch_size: int = 1, rounds: int = 100) -> dict[str, float]:
    """Median milliseconds per call of each model, timed the way jobs time them (evaluate.interleaved_latency:
    one call of each model per round, so that another process's burst slows every model alike)."""
    timed = evaluate.interleaved_latency(models, LATENCY_SHAPE, (batch_size,), min_rounds=rounds, max_rounds=rounds)
    return {name: by_batch[batch_size].median_ms for name, by_batch in timed.items()}


def environment() -> dict[str, Any]:
    host = cpu.describe()
    return {"torch": torch.__version__.split("+")[0], "cpu": host["model"], "cpu_features": host["features"],
            "threads": torch.get_num_threads(), "latency_input": list(LATENCY_SHAPE)}


def print_result(result: dict[str, Any]) -> None:
    print(json.dumps({key: round(value, 4) if isinstance(value, float) else value for key, value in result.items()}))
