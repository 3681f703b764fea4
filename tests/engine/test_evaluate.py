"""Accuracy, agreement and latency on tiny deterministic models."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from worker.engine import evaluate, export, onnxio
from worker.engine.evaluate import LatencyStats


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


def _tiny_cnn() -> nn.Module:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(2))
    model(torch.zeros(1, 3, 8, 8))
    return model.eval()


class _Recorder:
    """A fake model that appends its name to a shared log on every call, and checks the batch it gets."""

    def __init__(self, name: str, calls: list[str], expected_shape: tuple[int, ...]) -> None:
        self.name, self.calls, self.expected_shape = name, calls, expected_shape

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        assert tuple(batch.shape) == self.expected_shape
        self.calls.append(self.name)
        return batch


def test_interleaving_alternates_the_models_round_by_round() -> None:
    calls: list[str] = []
    models = {name: _Recorder(name, calls, (4, 3, 2)) for name in ("a", "b")}
    timed = evaluate.interleaved_latency(models, (3, 2), (4,), min_rounds=6, max_rounds=6)
    warmup = ["a"] * evaluate.WARMUP_CALLS + ["b"] * evaluate.WARMUP_CALLS
    assert calls == warmup + ["a", "b"] * 6
    assert {name: figures[4].runs for name, figures in timed.items()} == {"a": 6, "b": 6}


def test_rounds_stop_at_the_budget_but_never_below_the_minimum() -> None:
    calls: list[str] = []
    fake = _Recorder("a", calls, (1, 2))
    def runs(**limits: float) -> int:
        return evaluate.interleaved_latency({"a": fake}, (2,), (1,), **limits)["a"][1].runs

    assert runs(min_rounds=3, max_rounds=50, budget_s=0) == 3
    assert runs(min_rounds=3, max_rounds=5, budget_s=60) == 5
    with pytest.raises(ValueError, match="min_rounds"):
        runs(min_rounds=1)


def test_stats_are_the_median_and_the_deciles_of_the_timings() -> None:
    stats = LatencyStats.of([float(ms) for ms in range(1, 12)])  # 1..11 ms
    assert (stats.p10_ms, stats.median_ms, stats.p90_ms, stats.runs) == (2.0, 6.0, 10.0, 11)
    assert LatencyStats.of([5.0, 5.0]) == LatencyStats(5.0, 5.0, 5.0, 2)


def test_every_runtime_is_timed_at_each_batch_size(tmp_path: Path) -> None:
    model = _tiny_cnn()
    example = torch.zeros(1, 3, 8, 8)
    onnx_path = tmp_path / "tiny.onnx"
    onnxio.export_onnx(model, example, onnx_path)
    models = {"eager": model, "torchscript": export.trace_torchscript(model, example),
              "onnx": onnxio.OnnxModel(onnx_path),
              # Exported at batch 2: an example of batch 1 would fix the batch dimension at 1.
              "exported": torch.export.export(model, (torch.zeros(2, 3, 8, 8),),
                                              dynamic_shapes=({0: torch.export.Dim("batch")},)).module()}
    timed = evaluate.interleaved_latency(models, (3, 8, 8), (1, 4), min_rounds=3, budget_s=0)
    for name, by_batch in timed.items():
        assert set(by_batch) == {1, 4}, name
        for stats in by_batch.values():
            assert 0 < stats.p10_ms <= stats.median_ms <= stats.p90_ms, name
            assert stats.runs == 3


def test_latency_metrics_keep_the_median_under_the_key_readers_know() -> None:
    metrics = evaluate.latency_metrics({1: LatencyStats(2.0, 1.5, 3.0, 40), 32: LatencyStats(9.0, 8.0, 12.0, 12)})
    assert metrics == {"cpu_latency_ms_batch1": 2.0, "cpu_latency_ms_batch1_p10": 1.5,
                       "cpu_latency_ms_batch1_p90": 3.0, "cpu_latency_runs_batch1": 40,
                       "cpu_latency_ms_batch32": 9.0, "cpu_latency_ms_batch32_p10": 8.0,
                       "cpu_latency_ms_batch32_p90": 12.0, "cpu_latency_runs_batch32": 12}
