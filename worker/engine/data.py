"""Datasets in memory, stratified splits, and the transform to a model's input."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from worker.engine.config import InputSpec, check_dataset_fits
from worker.engine.errors import DataError
from worker.engine.ingest import load_builtin_arrays

# Images converted per chunk: bounds the float temporaries whatever the dataset's size.
CHUNK_IMAGES = 512


@dataclass(frozen=True)
class ArrayDataset:
    x: np.ndarray  # uint8 NxHxWxC
    y: np.ndarray  # int64 N, labels 0..K-1
    class_names: list[str]

    def __post_init__(self) -> None:
        if self.x.dtype != np.uint8 or self.x.ndim != 4 or len(self.x) != len(self.y):
            raise DataError(
                f"a dataset needs uint8 images NxHxWxC and one label per image; got x {self.x.dtype} "
                f"{self.x.shape} and y {self.y.shape}"
            )


def load_builtin(name: str) -> ArrayDataset:
    return ArrayDataset(*load_builtin_arrays(name))


def load_canonical(path: Path) -> ArrayDataset:
    """The .npz written by ingest.ingest_dataset."""
    try:
        with np.load(path, allow_pickle=False) as arrays:
            return ArrayDataset(arrays["x"], arrays["y"].astype(np.int64), arrays["class_names"].tolist())
    except (OSError, KeyError, ValueError) as exc:
        raise DataError(f"{path.name} is not a dataset written by ingest: {exc}") from exc


def stratified_split(y: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Disjoint sorted (train, val) indices covering every sample, the same for the same seed.

    Each class with at least 2 samples lands in both parts; a singleton class goes to train.
    """
    rng = np.random.default_rng(seed)
    train, val = [], []
    for label in np.unique(y):
        members = rng.permutation(np.flatnonzero(y == label))
        n_val = min(len(members) - 1, max(1, round(len(members) * val_fraction)))
        val.append(members[:n_val])
        train.append(members[n_val:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def train_val_tensors(
    dataset: ArrayDataset, input_spec: InputSpec, val_fraction: float, seed: int
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """The stratified split as ((x_train, y_train), (x_val, y_val)), ready for distill()."""

    def part(indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        return to_model_input(dataset.x[indices], input_spec), torch.from_numpy(dataset.y[indices])

    train_idx, val_idx = stratified_split(dataset.y, val_fraction, seed)
    return part(train_idx), part(val_idx)


def to_model_input(x: np.ndarray, input_spec: InputSpec) -> torch.Tensor:
    """uint8 NxHxWxC images -> normalized float NxCxSxS, as the model was trained to see them."""
    check_dataset_fits(list(x.shape[1:]), input_spec)
    size, channels = input_spec.image_size, input_spec.channels
    mean = torch.tensor(input_spec.mean).view(1, -1, 1, 1)
    std = torch.tensor(input_spec.std).view(1, -1, 1, 1)
    out = torch.empty((len(x), channels, size, size))
    for start in range(0, len(x), CHUNK_IMAGES):
        # torch.tensor copies, so read-only or non-contiguous arrays are fine.
        chunk = torch.tensor(x[start : start + CHUNK_IMAGES]).permute(0, 3, 1, 2).float()
        chunk = _fit_size(chunk, input_spec)
        if chunk.shape[1] != channels:
            chunk = chunk.expand(-1, channels, -1, -1)  # grayscale -> RGB: check_dataset_fits allows only that
        out[start : start + len(chunk)] = (chunk / 255.0 - mean) / std
    return out


def _fit_size(batch: torch.Tensor, input_spec: InputSpec) -> torch.Tensor:
    size = input_spec.image_size
    height, width = batch.shape[-2:]
    if (height, width) == (size, size):
        return batch
    if input_spec.resize == "pad":
        top, left = (size - height) // 2, (size - width) // 2
        return F.pad(batch, (left, size - width - left, top, size - height - top))
    if input_spec.resize == "resize":
        return _bilinear(batch, size, size)
    scale = size / min(height, width)
    scaled_h, scaled_w = max(size, round(height * scale)), max(size, round(width * scale))
    top, left = (scaled_h - size) // 2, (scaled_w - size) // 2
    return _bilinear(batch, scaled_h, scaled_w)[..., top : top + size, left : left + size]


def _bilinear(batch: torch.Tensor, height: int, width: int) -> torch.Tensor:
    return F.interpolate(batch, size=(height, width), mode="bilinear", align_corners=False, antialias=True)
