"""The built-in photo-patches: the same bytes every time, balanced, and no source pixel in two images."""

from __future__ import annotations

import numpy as np

from worker.engine import photo_patches
from worker.engine.photo_patches import CLASS_NAMES, PER_CLASS, SEED, SIDE, load_photos, plan_windows


def test_shape_dtype_and_balance() -> None:
    x, y, class_names = photo_patches.photo_patches()
    assert x.shape == (len(CLASS_NAMES) * PER_CLASS, SIDE, SIDE, 3) and x.dtype == np.uint8
    assert y.dtype == np.int64 and class_names == list(CLASS_NAMES) == list(dict.fromkeys(CLASS_NAMES))
    assert np.bincount(y).tolist() == [PER_CLASS] * len(CLASS_NAMES)
    # The arrays are shared by every caller in the process.
    assert not x.flags.writeable and not y.flags.writeable


def test_two_builds_give_the_same_bytes() -> None:
    cached_x, cached_y, _ = photo_patches.photo_patches()
    fresh_x, fresh_y = photo_patches._built.__wrapped__()
    assert fresh_x.tobytes() == cached_x.tobytes() and fresh_y.tobytes() == cached_y.tobytes()


def test_no_source_pixel_is_in_two_images() -> None:
    """So whatever split a job draws, its validation images show parts of the photographs training never saw."""
    photos = load_photos()
    windows = plan_windows(photos, np.random.default_rng(SEED))
    uses = [np.zeros(photo.shape[:2], dtype=np.int64) for photo in photos]
    for window in windows:
        assert window.top + window.side <= uses[window.label].shape[0]
        assert window.left + window.side <= uses[window.label].shape[1]
        uses[window.label][window.top : window.top + window.side, window.left : window.left + window.side] += 1
    assert max(int(used.max()) for used in uses) == 1
    # The jitter is real: windows vary in size and half of them are mirrored.
    assert len({window.side for window in windows}) > 1
    assert 0.4 < np.mean([window.flip for window in windows]) < 0.6
