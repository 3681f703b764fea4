"""Accuracy, agreement and latency, measured the same way for teacher and student."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from worker.engine.config import multi_head_refusal
from worker.engine.errors import SpecError
from worker.engine.models import logits_of

TensorPair = tuple[torch.Tensor, torch.Tensor]  # (images, labels)
AnyModel = nn.Module | torch.jit.ScriptModule
# What latency is measured on: anything that maps a batch tensor to outputs (a module, a TorchScript or
# ONNX Runtime model, an exported program's .module(), or a plain function).
Timeable = Callable[[torch.Tensor], object]

# Enough calls for the TorchScript profiling executor to settle and oneDNN / fbgemm to pack their weights.
WARMUP_CALLS = 3
# At least this many timed calls of every model, however slow, so that p10 / p90 mean something; at most
# MAX_ROUNDS, so that a tiny model does not spend its whole budget repeating itself.
MIN_ROUNDS, MAX_ROUNDS = 10, 200
# Seconds of rounds per batch size, after which timing stops once MIN_ROUNDS are done. Each round times every
# file of a job (up to six), so a second already gives each of them tens of calls once a model is big enough
# for the budget to bind; a job measures two batch sizes.
BUDGET_S = 1.0


def logits(model: AnyModel, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """float32 CPU logits, computed in batches on the model's own device (sets eval mode)."""
    outputs = _outputs(model, x, batch_size)
    if isinstance(outputs[0], dict):
        raise SpecError(multi_head_refusal(outputs[0], "one set of logits was asked for"))
    return torch.cat(outputs)


def head_logits(model: AnyModel, x: torch.Tensor, batch_size: int = 256) -> dict[str, torch.Tensor]:
    """A multi-head model's float32 CPU logits per task, in its heads' order, computed like logits(): from a
    module, or a downloaded file as measure.load_artifact loads it (TorchScript and .pt2 return the dict, ONNX one
    named output per task). A model with one output gives {"logits": its logits}."""
    outputs = _outputs(model, x, batch_size)
    if not isinstance(outputs[0], dict):
        return {"logits": torch.cat(outputs)}
    return {task: torch.cat([batch[task] for batch in outputs]) for task in outputs[0]}


def head_accuracies(model: AnyModel, evaluation: Mapping[str, TensorPair]) -> dict[str, float]:
    """Each task's accuracy: its head's predictions on its own evaluation images (task -> (images, labels))."""
    return {task: _fraction_equal(head_logits(model, x)[task].argmax(dim=1), y)
            for task, (x, y) in evaluation.items()}


def _outputs(model: AnyModel, x: torch.Tensor, batch_size: int) -> list[torch.Tensor | dict[str, torch.Tensor]]:
    """The model's float32 CPU outputs batch by batch (sets eval mode); at least one batch, even of no images."""
    device = next(model.parameters(), torch.empty(0)).device
    model.eval()
    with torch.inference_mode():
        return [_float_cpu(logits_of(model(x[start : start + batch_size].to(device))))
                for start in range(0, max(len(x), 1), batch_size)]


def _float_cpu(output: torch.Tensor | Mapping[str, torch.Tensor]) -> torch.Tensor | dict[str, torch.Tensor]:
    if isinstance(output, Mapping):
        return {task: logits.float().cpu() for task, logits in output.items()}
    return output.float().cpu()


def _fraction_equal(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a == b.cpu()).sum().item() / len(b)  # exact: a float32 mean is not


def predict(model: AnyModel, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    return logits(model, x, batch_size).argmax(dim=1)


def accuracy(model: AnyModel, x: torch.Tensor, y: torch.Tensor) -> float:
    return _fraction_equal(predict(model, x), y)


def agreement(model_a: AnyModel, model_b: AnyModel, x: torch.Tensor) -> float:
    """Fraction of inputs on which both models predict the same class."""
    return (predict(model_a, x) == predict(model_b, x)).sum().item() / len(x)


@dataclass(frozen=True)
class LatencyStats:
    """Milliseconds per call: the median and the 10th / 90th percentiles of `runs` timed calls."""

    median_ms: float
    p10_ms: float
    p90_ms: float
    runs: int

    @classmethod
    def of(cls, timings_ms: list[float]) -> LatencyStats:
        """Needs two timings at least; "inclusive" keeps the percentiles within the measured range."""
        deciles = statistics.quantiles(timings_ms, n=10, method="inclusive")
        return cls(median_ms=statistics.median(timings_ms), p10_ms=deciles[0], p90_ms=deciles[-1],
                   runs=len(timings_ms))


def latency_metrics(stats_by_batch: Mapping[int, LatencyStats]) -> dict[str, float]:
    """The metric keys jobs report: `cpu_latency_ms_batch{N}` stays the median (what the summary, report and
    dashboard read), with its spread beside it as `..._p10` / `..._p90` and the calls behind it."""
    metrics: dict[str, float] = {}
    for batch_size, stats in stats_by_batch.items():
        key = f"cpu_latency_ms_batch{batch_size}"
        metrics.update({key: stats.median_ms, f"{key}_p10": stats.p10_ms, f"{key}_p90": stats.p90_ms,
                        f"cpu_latency_runs_batch{batch_size}": stats.runs})
    return metrics


def interleaved_latency(
    models: Mapping[str, Timeable], input_shape: tuple[int, ...], batch_sizes: tuple[int, ...] = (1,), *,
    min_rounds: int = MIN_ROUNDS, max_rounds: int = MAX_ROUNDS, budget_s: float = BUDGET_S,
) -> dict[str, dict[int, LatencyStats]]:
    """CPU latency of several models timed in the same process, one call of each per round (A B A B ...):
    on a busy host another process's burst then slows every model's calls alike instead of whichever model
    happened to run during it, so their ratio holds even when their absolute figures drift.

    Models run as given (mode and weights as the caller left them: an exported program's module cannot
    switch mode) on a zero batch of shape (batch_size, *input_shape). Per batch size, rounds stop once
    `min_rounds` are done and `budget_s` seconds have passed, or at `max_rounds`.
    """
    if not 2 <= min_rounds <= max_rounds:
        raise ValueError(f"need 2 <= min_rounds <= max_rounds, got {min_rounds} and {max_rounds}")
    stats: dict[str, dict[int, LatencyStats]] = {name: {} for name in models}
    with torch.inference_mode():
        for batch_size in batch_sizes:
            batch = torch.zeros((batch_size, *input_shape))
            timings = _rounds(models, batch, min_rounds, max_rounds, budget_s)
            for name, model_timings in timings.items():
                stats[name][batch_size] = LatencyStats.of(model_timings)
    return stats


def _rounds(models: Mapping[str, Timeable], batch: torch.Tensor, min_rounds: int, max_rounds: int,
            budget_s: float) -> dict[str, list[float]]:
    for model in models.values():
        for _ in range(WARMUP_CALLS):
            model(batch)
    timings: dict[str, list[float]] = {name: [] for name in models}
    deadline = time.perf_counter() + budget_s
    for done in range(max_rounds):
        if done >= min_rounds and time.perf_counter() >= deadline:
            break
        for name, model in models.items():
            timings[name].append(_call_ms(model, batch))
    return timings


def _call_ms(model: Timeable, batch: torch.Tensor) -> float:
    start = time.perf_counter()
    model(batch)
    return (time.perf_counter() - start) * 1000
