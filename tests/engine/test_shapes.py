"""The built-in shapes: the same bytes every time, balanced, every image its own, and learnable."""

from __future__ import annotations

import numpy as np
import torch

from tests.engine.conftest import small_cnn
from worker.engine import data, shapes
from worker.engine.config import DistillConfig, InputSpec
from worker.engine.distill import distill
from worker.engine.models import build_model
from worker.engine.shapes import CLASS_NAMES, PER_CLASS, SIDE


def test_shape_dtype_and_balance() -> None:
    x, y, class_names = shapes.shapes()
    assert x.shape == (len(CLASS_NAMES) * PER_CLASS, SIDE, SIDE, 3) and x.dtype == np.uint8
    assert y.dtype == np.int64 and class_names == list(CLASS_NAMES) == list(dict.fromkeys(CLASS_NAMES))
    assert np.bincount(y).tolist() == [PER_CLASS] * len(CLASS_NAMES)
    # The arrays are shared by every caller in the process.
    assert not x.flags.writeable and not y.flags.writeable


def test_two_builds_give_the_same_bytes() -> None:
    cached_x, cached_y, _ = shapes.shapes()
    fresh_x, fresh_y = shapes._built.__wrapped__()
    assert fresh_x.tobytes() == cached_x.tobytes() and fresh_y.tobytes() == cached_y.tobytes()


def test_every_image_differs() -> None:
    x, _, _ = shapes.shapes()
    assert len({image.tobytes() for image in x}) == len(x)


def test_a_small_model_learns_it_well_above_chance() -> None:
    """Chance is 10%; a 6 k-parameter small_cnn trained for a few epochs on CPU is far above it."""
    x, y, class_names = shapes.shapes()
    rgb = InputSpec(image_size=SIDE, channels=3, mean=(0.5,), std=(0.25,))
    train, val = data.train_val_tensors(data.ArrayDataset(x, y, class_names), rgb, val_fraction=0.2, seed=0)
    torch.manual_seed(0)
    model = build_model(small_cnn(8, num_classes=len(class_names), input_spec=rgb))
    result = distill(None, model, train, val, DistillConfig(epochs=6, augment="none"),
                     on_progress=lambda _: None, device="cpu")
    assert result.final_val_accuracy > 0.4, result.history
