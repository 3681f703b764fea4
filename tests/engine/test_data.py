"""Splits and the transform from uint8 images to model input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from worker.engine import data
from worker.engine.config import InputSpec
from worker.engine.errors import DataError, SpecError


def test_stratified_split_is_disjoint_covering_stratified_and_seeded() -> None:
    y = np.repeat(np.arange(5), [2, 3, 10, 40, 1])
    train, val = data.stratified_split(y, 0.2, seed=7)
    assert np.intersect1d(train, val).size == 0
    assert np.array_equal(np.sort(np.concatenate([train, val])), np.arange(len(y)))
    assert set(y[val]) == {0, 1, 2, 3} and set(y[train]) == {0, 1, 2, 3, 4}  # a singleton class trains
    assert np.sum(y[val] == 3) == 8
    again = data.stratified_split(y, 0.2, seed=7)
    assert np.array_equal(train, again[0]) and np.array_equal(val, again[1])
    assert not np.array_equal(val, data.stratified_split(y, 0.2, seed=8)[1])


def test_builtin_and_canonical_datasets(tmp_path: Path) -> None:
    digits = data.load_builtin("digits")
    assert digits.x.shape == (1797, 8, 8, 1) and digits.x.dtype == np.uint8 and digits.x.max() == 255
    with pytest.raises(DataError, match="unknown built-in dataset 'mnist'"):
        data.load_builtin("mnist")
    (tmp_path / "bad.npz").write_bytes(b"not numpy")
    with pytest.raises(DataError, match=r"bad\.npz"):
        data.load_canonical(tmp_path / "bad.npz")


def _images(n: int = 2, h: int = 4, w: int = 4, c: int = 1, value: int = 255) -> np.ndarray:
    return np.full((n, h, w, c), value, dtype=np.uint8)


def test_scaling_and_normalization() -> None:
    spec = InputSpec(image_size=8, channels=3, mean=(0.5, 0.25, 0.0), std=(0.5, 0.25, 1.0))
    x = np.concatenate([_images(1, 8, 8, c=3, value=255), _images(1, 8, 8, c=3, value=0)])
    out = data.to_model_input(x, spec)
    assert out.shape == (2, 3, 8, 8) and out.dtype == torch.float32
    assert out[0, :, 0, 0].tolist() == [1.0, 3.0, 1.0]
    assert out[1, :, 0, 0].tolist() == [-1.0, -1.0, 0.0]


def test_grayscale_is_repeated_to_rgb_and_rgb_to_gray_refused() -> None:
    gray = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 1), dtype=np.uint8)
    out = data.to_model_input(gray, InputSpec(image_size=8, channels=3))
    assert torch.equal(out[:, 0], out[:, 1]) and torch.equal(out[:, 0], out[:, 2])
    assert torch.allclose(out[:, 0], torch.from_numpy(gray[..., 0]).float() / 127.5 - 1)
    with pytest.raises(SpecError, match="3-channel images but the model takes 1"):
        data.to_model_input(_images(c=3), InputSpec(image_size=8, channels=1))


def test_resize_policies() -> None:
    wide = np.zeros((1, 8, 16, 1), dtype=np.uint8)
    wide[..., 4:12, :] = 255  # a white center square of 8x8 on a black band
    stretched = data.to_model_input(wide, InputSpec(image_size=8, channels=1, resize="resize"))
    cropped = data.to_model_input(wide, InputSpec(image_size=8, channels=1, resize="resize_center_crop"))
    assert stretched.shape == cropped.shape == (1, 1, 8, 8)
    assert torch.all(cropped == 1.0)  # the crop keeps only the white center
    assert stretched.min() == -1.0

    padded = data.to_model_input(_images(h=4, w=6), InputSpec(image_size=8, channels=1, resize="pad"))
    assert padded.shape == (2, 1, 8, 8)
    assert torch.all(padded[:, :, 2:6, 1:7] == 1.0)  # centered
    assert padded[:, :, :2].eq(-1.0).all() and padded[:, :, :, 0].eq(-1.0).all()  # zero pixels, normalized
    with pytest.raises(SpecError, match="'pad' cannot shrink"):
        data.to_model_input(_images(h=9, w=9), InputSpec(image_size=8, channels=1, resize="pad"))


def test_upscaled_digits_keep_their_range_and_shape() -> None:
    digits = data.load_builtin("digits").x[:10]
    out = data.to_model_input(digits, InputSpec(image_size=32, channels=3))
    assert out.shape == (10, 3, 32, 32) and out.min() >= -1.0 and out.max() <= 1.0


def test_chunking_gives_the_same_result(monkeypatch) -> None:
    x = np.random.default_rng(1).integers(0, 256, (7, 5, 6, 3), dtype=np.uint8)
    spec = InputSpec(image_size=8, channels=3, resize="resize_center_crop")
    whole = data.to_model_input(x, spec)
    monkeypatch.setattr(data, "CHUNK_IMAGES", 3)
    assert torch.equal(whole, data.to_model_input(x, spec))
