"""BatchNorm recalibration: running statistics re-estimated with the final weights, kept if they score better.

In eval mode BatchNorm normalizes with running averages that training updates by `momentum` per step. With a
small momentum (torchvision's MobileNetV3 uses 0.01) a short run leaves them far behind the activations of
the final weights, and a model that trained well can predict one class for every image in eval mode. An exact
average over a few hundred training images, taken with the final weights, fixes that; the validation split
decides whether it is kept, so a model whose statistics were already right never gets worse.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypedDict

import torch
from torch import nn

from worker.engine import evaluate
from worker.engine.evaluate import TensorPair

# Enough for per-channel means and variances to settle; a second or so of forward passes for a small model.
RECALIBRATION_IMAGES = 512


class BatchNormRecalibration(TypedDict):
    recalibrated: bool  # the re-estimated statistics were kept: they scored higher on the validation split
    images: int  # training images the statistics were estimated on
    val_accuracy_before: float  # with the statistics training left
    val_accuracy_after: float  # with the re-estimated ones


def batchnorm_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The BatchNorm layers (any dimension) that normalize with running statistics in eval mode."""
    return [module for module in model.modules()
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats]


def recalibrate_batchnorm_(model: nn.Module, train_x: torch.Tensor, val: TensorPair | Callable[[nn.Module], float],
                           *, seed: int, batch_size: int,
                           images: int = RECALIBRATION_IMAGES) -> BatchNormRecalibration | None:
    """Re-estimate `model`'s BatchNorm running statistics on `images` training images (the same ones for the same
    seed) and keep them if they score higher on `val` than the ones it had; ties keep the old ones. `val`: the
    validation split, or what scores the model on it (a multi-head model's mean accuracy over its tasks).

    Runs on the model's device, in fp32: the precision its exported weights run in. Leaves the model in eval mode.
    None, with nothing run, when the model has no BatchNorm layer with running statistics.
    """
    layers = batchnorm_layers(model)
    if not layers:
        return None
    score = val if callable(val) else lambda scored: evaluate.accuracy(scored, *val)
    before = score(model)
    saved = [_statistics(layer) for layer in layers]
    batches = _subset_batches(train_x, images, batch_size, seed)
    reestimate_running_statistics_(model, batches)
    after = score(model)
    kept = after > before
    if not kept:
        for layer, statistics in zip(layers, saved, strict=True):
            _load_statistics(layer, statistics)
    return BatchNormRecalibration(recalibrated=kept, images=sum(len(batch) for batch in batches),
                                  val_accuracy_before=before, val_accuracy_after=after)


def reestimate_running_statistics_(model: nn.Module, batches: list[torch.Tensor]) -> None:
    """Replace the BatchNorm running statistics by their average over `batches`, every batch weighing the same.

    Only the BatchNorm layers run in train mode: dropout and the like stay off, so the statistics are those of
    the activations that eval mode will normalize. Leaves the model in eval mode.
    """
    layers = batchnorm_layers(model)
    momenta = [layer.momentum for layer in layers]
    model.eval()
    for layer in layers:
        layer.reset_running_stats()
        layer.momentum = None  # a cumulative average rather than an exponential one
        layer.train()
    device = layers[0].running_mean.device
    with torch.no_grad():
        for batch in batches:
            model(batch.to(device))
    for layer, momentum in zip(layers, momenta, strict=True):
        layer.momentum = momentum
    model.eval()


def _subset_batches(x: torch.Tensor, images: int, batch_size: int, seed: int) -> list[torch.Tensor]:
    """Up to `images` rows of `x` drawn by `seed`, in full batches of up to `batch_size`: in train mode BatchNorm
    cannot normalize a batch of one image on a 1x1 map, and a short batch would weigh as much as a full one."""
    count = min(images, len(x))
    batch = min(batch_size, count)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    return list(x[order[: count - count % batch]].split(batch))


def _statistics(layer: nn.modules.batchnorm._BatchNorm) -> list[torch.Tensor]:
    return [buffer.clone() for buffer in layer.buffers()]


def _load_statistics(layer: nn.modules.batchnorm._BatchNorm, statistics: list[torch.Tensor]) -> None:
    for buffer, saved in zip(layer.buffers(), statistics, strict=True):
        buffer.copy_(saved)
