"""Shared fixtures: the built-in digits at their native 8x8, and tiny seeded small_cnn specs."""

from __future__ import annotations

import pytest
import torch

from worker.engine import data
from worker.engine.config import ADAMW_LOOP, ArchSpec, InputSpec
from worker.engine.ingest import IngestLimits

DIGITS_8X8 = InputSpec(image_size=8, channels=1, mean=(0.5,), std=(0.5,))


def small_cnn(width: int = 8, num_classes: int = 10, input_spec: InputSpec = DIGITS_8X8, **kwargs) -> ArchSpec:
    return ArchSpec(arch="small_cnn", kwargs={"num_classes": num_classes, "width": width, **kwargs}, input=input_spec)


@pytest.fixture(scope="session")
def digits_splits() -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    return data.train_val_tensors(data.load_builtin("digits"), DIGITS_8X8, val_fraction=0.2, seed=0)


@pytest.fixture
def limits() -> IngestLimits:
    return IngestLimits(
        max_entries=200, max_unpacked_bytes=20_000_000, max_compression_ratio=50, max_image_pixels=4096 * 4096
    )


@pytest.fixture(scope="session")
def trained_small_cnn(digits_splits) -> tuple[ArchSpec, torch.nn.Module]:
    """A small_cnn (width 16, 3 blocks) trained on digits to about 0.98: real weights to prune and quantize,
    so that agreement between a model and its compressed copy means something."""
    from worker.engine.config import DistillConfig
    from worker.engine.distill import distill
    from worker.engine.models import build_model

    arch = small_cnn(16, depth=3)
    torch.manual_seed(0)
    model = build_model(arch)
    config = DistillConfig(epochs=4, batch_size=64, lr=1e-2, **ADAMW_LOOP)
    distill(None, model, digits_splits[0], digits_splits[1], config, lambda _: None, device="cpu")
    return arch, model.eval()
