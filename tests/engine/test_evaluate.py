"""Accuracy, agreement and latency on tiny deterministic models."""

from __future__ import annotations

import torch
from torch import nn

from worker.engine import evaluate, export


def _picks(column: int) -> nn.Module:
    """A linear 'model' whose logits are its inputs plus a bonus on one class."""
    model = nn.Linear(3, 3)
    with torch.no_grad():
        model.weight.copy_(torch.eye(3))
        model.bias.copy_(torch.eye(3)[column] * 10)
    return model


def test_accuracy_and_agreement() -> None:
    x = torch.zeros(300, 3)  # more than one batch of 256
    y = torch.cat([torch.zeros(200, dtype=torch.long), torch.ones(100, dtype=torch.long)])
    assert torch.equal(evaluate.predict(_picks(1), x), torch.ones(300, dtype=torch.long))
    assert evaluate.accuracy(_picks(0), x, y) == 2 / 3
    assert evaluate.agreement(_picks(2), _picks(2), x) == 1.0
    assert evaluate.agreement(_picks(0), _picks(1), x) == 0.0


def test_cpu_latency_for_eager_and_torchscript_models() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(2))
    model(torch.zeros(1, 3, 8, 8))
    scripted = export.trace_torchscript(model, torch.zeros(1, 3, 8, 8))
    for candidate in (model, scripted):
        latency = evaluate.cpu_latency_ms(candidate, (3, 8, 8), batch_size=2, warmup=1, iters=5)
        assert 0 < latency < 1000
