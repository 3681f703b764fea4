"""The built-in `photo-patches`: 32x32 RGB crops of 14 photographs; a crop's class is the photograph it shows.

The photographs ship inside scikit-image (skimage.data, read from the installed wheel) and scikit-learn
(load_sample_images), so nothing is downloaded. Harder than digits: a crop shows a small, zoomed, possibly
mirrored piece of texture (fur, bricks, petals, roof tiles, stars), several sources are grayscale textures,
and the crops a job validates on come from parts of the photographs that its training never saw.

That last point holds for every split a job can draw: each crop is cut from its own cell of a 32-pixel grid
laid over its photograph, so no two images of the set share a single source pixel (plan_windows' contract).
Torch-free: the API summarizes built-ins in its own process.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image

from worker.engine.errors import DataError

# Fixed: the set is the same everywhere, so results on it compare across jobs and machines.
SEED = 0
SIDE = 32  # the grid's cell and the output image
# Zoom jitter: a window of 24 to 32 pixels inside its cell, resized to 32x32.
MIN_WINDOW = 24
PER_CLASS = 100  # the smallest photograph (coins, 303x384) has 108 usable cells
# Cells flatter than this (blank sky, black space, the dark rim of the retina photo) show nothing of their source.
MIN_CELL_STD = 4.0

# Public domain or CC0 (see README), each a function of skimage.data.
SKIMAGE_PHOTOS = ("astronaut", "brick", "camera", "chelsea", "coffee", "coins", "grass", "gravel",
                  "hubble_deep_field", "immunohistochemistry", "retina", "rocket")
# CC BY 2.0, in scikit-learn's datasets/images.
SKLEARN_PHOTOS = ("china", "flower")
CLASS_NAMES = SKIMAGE_PHOTOS + SKLEARN_PHOTOS


@dataclass(frozen=True)
class Window:
    """Where one image comes from: a square of `side` pixels of photograph `label`, mirrored if `flip`."""

    label: int
    top: int
    left: int
    side: int
    flip: bool


def photo_patches() -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(x uint8 Nx32x32x3, y int64 N, class names), class by class; read-only arrays, built once per process."""
    x, y = _built()
    return x, y, list(CLASS_NAMES)


@lru_cache(maxsize=1)
def _built() -> tuple[np.ndarray, np.ndarray]:
    photos = load_photos()
    windows = plan_windows(photos, np.random.default_rng(SEED))
    x = np.stack([_render(photos[window.label], window) for window in windows])
    y = np.array([window.label for window in windows], dtype=np.int64)
    # Shared by every caller in the process: nobody may change them in place.
    x.flags.writeable = y.flags.writeable = False
    return x, y


def load_photos() -> list[np.ndarray]:
    """The CLASS_NAMES photographs as uint8 HxWx3 (grayscale ones repeated into three channels)."""
    # Heavy imports, only when asked for. skimage.data checks each file's sha256 before reading it.
    from skimage import data
    from sklearn.datasets import load_sample_images

    sample_images = load_sample_images()
    by_file = {path.rsplit("/", 1)[-1].removesuffix(".jpg"): image
               for path, image in zip(sample_images.filenames, sample_images.images, strict=True)}
    photos = [getattr(data, name)() for name in SKIMAGE_PHOTOS] + [by_file[name] for name in SKLEARN_PHOTOS]
    return [photo if photo.ndim == 3 else np.repeat(photo[..., None], 3, axis=2) for photo in photos]


def plan_windows(photos: list[np.ndarray], rng: np.random.Generator) -> list[Window]:
    """PER_CLASS windows per photograph, each inside a different textured cell of its SIDE-pixel grid."""
    windows = []
    for label, photo in enumerate(photos):
        cells = _textured_cells(photo)
        if len(cells) < PER_CLASS:
            raise DataError(f"{CLASS_NAMES[label]} has {len(cells)} textured cells, fewer than {PER_CLASS}")
        for row, col in cells[rng.permutation(len(cells))[:PER_CLASS]]:
            side = int(rng.integers(MIN_WINDOW, SIDE + 1))
            top, left = row * SIDE + int(rng.integers(SIDE - side + 1)), col * SIDE + int(rng.integers(SIDE - side + 1))
            windows.append(Window(label, top, left, side, flip=bool(rng.random() < 0.5)))
    return windows


def _textured_cells(photo: np.ndarray) -> np.ndarray:
    """(row, col) of the whole grid cells whose pixels vary by at least MIN_CELL_STD."""
    rows, cols = photo.shape[0] // SIDE, photo.shape[1] // SIDE
    grid = photo[: rows * SIDE, : cols * SIDE].reshape(rows, SIDE, cols, SIDE, -1).astype(np.float32)
    return np.argwhere(grid.std(axis=(1, 3, 4)) >= MIN_CELL_STD)


def _render(photo: np.ndarray, window: Window) -> np.ndarray:
    crop = Image.fromarray(photo[window.top : window.top + window.side, window.left : window.left + window.side])
    crop = crop.resize((SIDE, SIDE), Image.Resampling.BILINEAR)
    if window.flip:
        crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.asarray(crop)
