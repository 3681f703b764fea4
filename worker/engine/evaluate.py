"""Accuracy, agreement and latency, measured the same way for teacher and student."""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn

from worker.engine.models import logits_of

AnyModel = nn.Module | torch.jit.ScriptModule


def logits(model: AnyModel, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """float32 CPU logits, computed in batches on the model's own device (sets eval mode)."""
    device = next(model.parameters(), torch.empty(0)).device
    model.eval()
    with torch.inference_mode():
        outputs = [
            logits_of(model(x[start : start + batch_size].to(device))).float().cpu()
            for start in range(0, len(x), batch_size)
        ]
    return torch.cat(outputs)


def predict(model: AnyModel, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    return logits(model, x, batch_size).argmax(dim=1)


def accuracy(model: AnyModel, x: torch.Tensor, y: torch.Tensor) -> float:
    return (predict(model, x) == y.cpu()).sum().item() / len(y)


def agreement(model_a: AnyModel, model_b: AnyModel, x: torch.Tensor) -> float:
    """Fraction of inputs on which both models predict the same class."""
    return (predict(model_a, x) == predict(model_b, x)).sum().item() / len(x)


def cpu_latency_ms(
    model: AnyModel, input_shape: tuple[int, ...], batch_size: int = 1, warmup: int = 10, iters: int = 50
) -> float:
    """Median milliseconds per forward pass on CPU; moves the model to CPU and sets eval mode.

    `input_shape` excludes the batch dimension, e.g. (3, 32, 32).
    """
    model = model.cpu().eval()
    batch = torch.zeros((batch_size, *input_shape))
    timings = []
    with torch.inference_mode():
        for iteration in range(warmup + iters):
            start = time.perf_counter()
            model(batch)
            if iteration >= warmup:
                timings.append((time.perf_counter() - start) * 1000)
    return statistics.median(timings)
