"""Shared fixtures: the built-in digits at their native 8x8, and tiny seeded small_cnn specs."""

from __future__ import annotations

import pytest
import torch

from worker.engine import data
from worker.engine.config import ArchSpec, InputSpec
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
