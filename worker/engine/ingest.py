"""Uploaded datasets -> one canonical .npz (x uint8 NxHxWxC, y int64, class_names). Torch-free.

The API runs this on untrusted uploads, so every archive is treated as hostile: entry count,
declared sizes and compression ratios are checked before any data is read, member names are
checked before use, links and special files are refused, bytes are counted while they stream
(declared sizes are not trusted), and image dimensions are checked from the header before a single
pixel is decoded. Nothing is ever extracted to disk: members are read into memory one at a time.
"""

from __future__ import annotations

import io
import lzma
import math
import re
import tarfile
import zipfile
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np
from PIL import Image

from worker.engine.config import BUILTIN_DATASETS
from worker.engine.errors import DataError
from worker.engine.fileio import atomic_write
from worker.engine.photo_patches import photo_patches

IMAGE_FORMATS = ("PNG", "JPEG")
# Entries this small cannot be bombs, and small uniform images legitimately compress very far.
_RATIO_EXEMPT_BYTES = 64 * 1024
_READ_CHUNK = 1 << 20
_GRAY_MODES = frozenset({"1", "L", "LA"})
_SIXTEEN_BIT_GRAY_MODES = frozenset({"I", "I;16", "I;16B", "I;16L"})
_NPY_HEADER_READERS = {
    (1, 0): np.lib.format.read_array_header_1_0,
    (2, 0): np.lib.format.read_array_header_2_0,
}
_ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")
_COMPRESSED_TAR_MAGICS = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")
_LAYOUT_HELP = "expected class_name/image.png, or one top folder: root/class_name/image.png"

# Archive members as (path components, content), read one at a time.
Member = tuple[tuple[str, ...], bytes]


@dataclass(frozen=True)
class IngestLimits:
    max_entries: int
    max_unpacked_bytes: int
    max_compression_ratio: int
    max_image_pixels: int


@dataclass
class DatasetSummary:
    format: str  # "npz", "zip", "tar", or "builtin"
    num_classes: int
    class_names: list[str]
    num_samples: int
    class_counts: list[int]
    image_shape: list[int]  # [H, W, C]


def ingest_dataset(src: Path, filename: str, dest_npz: Path, limits: IngestLimits) -> DatasetSummary:
    """Check and convert the upload at `src` (named `filename` by the client) into `dest_npz`."""
    if _sniff_format(src, filename) == "tar":
        fmt = "tar"
        x, y, class_names = _image_folder(_tar_files(src, filename, limits), limits)
    else:
        with _open_zip(src, filename) as archive:
            infos = _checked_zip_infos(archive, src.stat().st_size, limits)
            names = [info.filename for info in infos if not info.is_dir()]
            if names and all(name.endswith(".npy") for name in names):
                fmt = "npz"
                x, y, class_names = _npz_arrays(archive, infos, limits)
            else:
                fmt = "zip"
                x, y, class_names = _image_folder(_zip_files(archive, infos, limits), limits)
    atomic_write(dest_npz, lambda handle: np.savez(handle, x=x, y=y, class_names=np.array(class_names, dtype=str)))
    return summarize(fmt, x, y, class_names)


def load_builtin_arrays(name: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """A built-in dataset as canonical arrays, made from data that ships inside installed packages."""
    loader = _BUILTIN_LOADERS.get(name)
    if loader is None:
        raise DataError(f"unknown built-in dataset '{name}'; available: {', '.join(BUILTIN_DATASETS)}")
    return loader()


def _digits() -> tuple[np.ndarray, np.ndarray, list[str]]:
    """The 8x8 handwritten digits that ship inside scikit-learn."""
    from sklearn.datasets import load_digits  # heavy import, only when asked for

    digits = load_digits()
    # Pixel values are 0..16 ink counts; stretch them to the 0..255 of every other image.
    x = np.rint(digits.images * (255 / 16)).astype(np.uint8)[..., None]
    return x, digits.target.astype(np.int64), [str(label) for label in digits.target_names]


_BUILTIN_LOADERS: dict[str, Callable[[], tuple[np.ndarray, np.ndarray, list[str]]]] = {
    "digits": _digits,
    "photo-patches": photo_patches,
}


def load_builtin_summary(name: str) -> DatasetSummary:
    return summarize("builtin", *load_builtin_arrays(name))


def summarize(fmt: str, x: np.ndarray, y: np.ndarray, class_names: list[str]) -> DatasetSummary:
    return DatasetSummary(
        format=fmt,
        num_classes=len(class_names),
        class_names=list(class_names),
        num_samples=len(y),
        class_counts=np.bincount(y, minlength=len(class_names)).tolist(),
        image_shape=list(x.shape[1:]),
    )


# --- format and archive safety -------------------------------------------------------------------


def _sniff_format(src: Path, filename: str) -> str:
    """Decide by content, never by the client's file name."""
    with open(src, "rb") as handle:
        head = handle.read(512)
    if head.startswith(_ZIP_MAGICS):
        return "zip"
    if head.startswith(_COMPRESSED_TAR_MAGICS) or head[257:262] == b"ustar":
        return "tar"
    raise DataError(
        f"'{filename}' is not a dataset this service reads: upload an .npz (numpy.savez with arrays x and "
        f"y), or a zip or tar(.gz) archive of class folders holding PNG or JPEG images"
    )


def _open_zip(src: Path, filename: str) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(src)
    except (zipfile.BadZipFile, OSError) as exc:
        raise DataError(f"'{filename}' is not a readable zip archive: {exc}") from exc


def _checked_zip_infos(archive: zipfile.ZipFile, archive_bytes: int, limits: IngestLimits) -> list[zipfile.ZipInfo]:
    """Check every entry's metadata before any data is decompressed."""
    infos = archive.infolist()
    _check_entry_count(len(infos), limits)
    declared = 0
    for info in infos:
        _member_parts(info.filename)
        if (info.external_attr >> 16) & 0o170000 == 0o120000:
            raise DataError(f"'{info.filename}' is a symbolic link; links are not allowed in datasets")
        if info.flag_bits & 0x1:
            raise DataError(f"'{info.filename}' is encrypted; upload an archive without a password")
        if info.file_size > _RATIO_EXEMPT_BYTES and info.file_size > limits.max_compression_ratio * max(
            info.compress_size, 1
        ):
            raise DataError(
                f"'{info.filename}' expands {info.file_size // max(info.compress_size, 1)}x when unpacked, "
                f"above the limit of {limits.max_compression_ratio}x; this looks like a zip bomb"
            )
        declared += info.file_size
        _check_unpacked(declared, archive_bytes, limits)
    return infos


def _check_entry_count(count: int, limits: IngestLimits) -> None:
    if count > limits.max_entries:
        raise DataError(f"the archive has more than {limits.max_entries} entries, the limit for one dataset")


def _check_unpacked(total: int, archive_bytes: int, limits: IngestLimits) -> None:
    if total > limits.max_unpacked_bytes:
        raise DataError(f"the archive unpacks to more than {limits.max_unpacked_bytes} bytes, the limit")
    if total > _RATIO_EXEMPT_BYTES and total > limits.max_compression_ratio * archive_bytes:
        raise DataError(
            f"the archive unpacks to more than {limits.max_compression_ratio}x its own size; "
            f"this looks like a decompression bomb"
        )


def _member_parts(name: str) -> tuple[str, ...]:
    """A member's path components, refusing anything that could point outside the archive."""
    if "\\" in name:
        raise DataError(f"'{name}': backslashes are not allowed in archive member names; use '/'")
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        raise DataError(f"'{name}': absolute paths are not allowed in archives")
    parts = tuple(part for part in name.split("/") if part not in ("", "."))
    if ".." in parts:
        raise DataError(f"'{name}': '..' is not allowed in archive member names")
    return parts


def _is_hidden(parts: tuple[str, ...]) -> bool:
    """Metadata that archivers add (__MACOSX/, .DS_Store, ._foo.png), not part of the dataset."""
    return any(part.startswith(".") or part == "__MACOSX" for part in parts)


class _ByteBudget:
    """Counts the bytes actually read; declared sizes in an archive are not trusted."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def read(self, stream: IO[bytes], declared: int, name: str) -> bytes:
        chunks = []
        size = 0
        while chunk := stream.read(_READ_CHUNK):
            size += len(chunk)
            self.used += len(chunk)
            if size > declared:
                raise DataError(f"'{name}' holds more data than its header declares; the archive is corrupt")
            if self.used > self.limit:
                raise DataError(f"the archive unpacks to more than {self.limit} bytes, the limit")
            chunks.append(chunk)
        return b"".join(chunks)


def _zip_files(archive: zipfile.ZipFile, infos: list[zipfile.ZipInfo], limits: IngestLimits) -> Iterator[Member]:
    budget = _ByteBudget(limits.max_unpacked_bytes)
    for info in infos:
        parts = _member_parts(info.filename)
        if info.is_dir() or _is_hidden(parts):
            continue
        try:
            with archive.open(info) as stream:
                yield parts, budget.read(stream, info.file_size, info.filename)
        except (zipfile.BadZipFile, OSError, zlib.error, EOFError) as exc:
            raise DataError(f"'{info.filename}' cannot be read from the zip archive: {exc}") from exc


def _tar_files(src: Path, filename: str, limits: IngestLimits) -> Iterator[Member]:
    """Members in streaming mode: each header is checked before its data is read."""
    budget = _ByteBudget(limits.max_unpacked_bytes)
    archive_bytes = src.stat().st_size
    declared = 0
    try:
        with tarfile.open(src, mode="r|*") as archive:
            for count, member in enumerate(archive, start=1):
                _check_entry_count(count, limits)
                parts = _member_parts(member.name)
                if member.isdir():
                    continue
                if not member.isfile():
                    raise DataError(f"'{member.name}' is a link or special file; datasets may hold only regular files")
                declared += member.size
                _check_unpacked(declared, archive_bytes, limits)
                if _is_hidden(parts):
                    continue
                stream = archive.extractfile(member)
                if stream is not None:
                    yield parts, budget.read(stream, member.size, member.name)
    except (tarfile.TarError, OSError, EOFError, zlib.error, lzma.LZMAError) as exc:
        raise DataError(f"'{filename}' is not a readable tar archive: {exc}") from exc


# --- npz ------------------------------------------------------------------------------------------


def _npz_arrays(
    archive: zipfile.ZipFile, infos: list[zipfile.ZipInfo], limits: IngestLimits
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    by_name = {info.filename.removesuffix(".npy"): info for info in infos}
    if "x" not in by_name or "y" not in by_name:
        raise DataError(
            f"the .npz must hold arrays named x (images) and y (labels); it holds {sorted(by_name)}. "
            f"Save it with numpy.savez(path, x=images, y=labels)"
        )
    x = _images_from_array(_read_npy(archive, by_name["x"]), limits)
    y, num_classes = _labels(_read_npy(archive, by_name["y"]), len(x))
    class_names = [str(label) for label in range(num_classes)]
    if "class_names" in by_name:
        class_names = _class_names(_read_npy(archive, by_name["class_names"]), num_classes)
    return x, y, class_names


def _read_npy(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> np.ndarray:
    """One array, after checking that its header's shape fits the entry's (already capped) size."""
    name = info.filename
    try:
        with archive.open(info) as stream:
            version = np.lib.format.read_magic(stream)
            if version not in _NPY_HEADER_READERS:
                raise DataError(f"'{name}' uses .npy format version {version}; save with numpy.savez")
            shape, _, dtype = _NPY_HEADER_READERS[version](stream)
        if dtype.hasobject:
            raise DataError(f"'{name}' holds Python objects; only numeric and string arrays are accepted")
        if math.prod(shape) * dtype.itemsize > info.file_size:
            raise DataError(f"'{name}' declares shape {shape} but holds less data; the file is corrupt")
        with archive.open(info) as stream:
            return np.lib.format.read_array(stream, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        raise DataError(f"'{name}' is not a valid .npy array: {exc}") from exc


def _images_from_array(x: np.ndarray, limits: IngestLimits) -> np.ndarray:
    """NxHxW, NxHxWxC or NxCxHxW (C of 1 or 3) of uint8 or float -> uint8 NxHxWxC."""
    if x.ndim == 3:
        x = x[..., None]
    elif x.ndim == 4:
        channels_first, channels_last = x.shape[1] in (1, 3), x.shape[3] in (1, 3)
        if channels_first and channels_last:
            raise DataError(f"cannot tell which axis of x {x.shape} holds the channels; store x as NxHxWxC")
        if not (channels_first or channels_last):
            raise DataError(f"x has shape {x.shape}: images need 1 or 3 channels (NxHxWxC or NxCxHxW)")
        if channels_first:
            x = x.transpose(0, 2, 3, 1)
    else:
        raise DataError(f"x has shape {x.shape}: expected images as NxHxW, NxHxWxC or NxCxHxW")
    if x.shape[0] == 0 or x.shape[1] * x.shape[2] == 0:
        raise DataError(f"x has shape {x.shape}: it holds no pixels")
    if x.shape[1] * x.shape[2] > limits.max_image_pixels:
        raise DataError(f"images of {x.shape[1]}x{x.shape[2]} exceed the limit of {limits.max_image_pixels} pixels")
    return np.ascontiguousarray(_to_uint8(x))


def _to_uint8(x: np.ndarray) -> np.ndarray:
    if x.dtype == np.uint8:
        return x
    if np.issubdtype(x.dtype, np.integer):
        low, high = x.min(), x.max()
        if low < 0 or high > 255:
            raise DataError(f"integer images must be in 0..255; x ranges from {low} to {high}")
        return x.astype(np.uint8)
    if not np.issubdtype(x.dtype, np.floating):
        raise DataError(f"x has dtype {x.dtype}; store images as uint8 (0..255) or float (0..1 or 0..255)")
    if not np.isfinite(x).all():
        raise DataError("x contains NaN or infinite values")
    low, high = float(x.min()), float(x.max())
    if low < 0 or high > 255:
        raise DataError(f"float images must be in [0, 1] or [0, 255]; x ranges from {low:g} to {high:g}")
    scale = 255.0 if high <= 1.0 else 1.0
    return np.rint(x * scale).astype(np.uint8)


def _labels(y: np.ndarray, num_images: int) -> tuple[np.ndarray, int]:
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1 or len(y) != num_images:
        raise DataError(f"y must hold one label per image: x has {num_images} images, y has shape {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"y must hold integer class labels; it has dtype {y.dtype}")
    labels = np.unique(y)
    num_classes = len(labels)
    if num_classes < 2 or labels[0] != 0 or labels[-1] != num_classes - 1:
        raise DataError(
            f"labels must be the integers 0..K-1 with every class present and K >= 2; y has {num_classes} "
            f"distinct values from {labels[0]} to {labels[-1]}"
        )
    return y.astype(np.int64), num_classes


def _class_names(names: np.ndarray, num_classes: int) -> list[str]:
    if names.dtype.kind != "U" or names.shape != (num_classes,):
        raise DataError(
            f"class_names must be {num_classes} strings (one per label); got dtype {names.dtype}, shape {names.shape}"
        )
    return names.tolist()


# --- image folders --------------------------------------------------------------------------------


def _image_folder(files: Iterable[Member], limits: IngestLimits) -> tuple[np.ndarray, np.ndarray, list[str]]:
    samples = []
    decoded_bytes = 0
    for parts, data in files:
        image = _decode_image(data, "/".join(parts), limits)
        decoded_bytes += image.nbytes
        if decoded_bytes > limits.max_unpacked_bytes:
            raise DataError(f"the images decode to more than {limits.max_unpacked_bytes} bytes, the limit")
        samples.append((parts, image))
    if not samples:
        raise DataError(f"the archive holds no images; {_LAYOUT_HELP}")
    samples.sort(key=lambda sample: sample[0])
    labels_by_path = _class_of_each([parts for parts, _ in samples])
    class_names = sorted(set(labels_by_path))
    if len(class_names) < 2:
        raise DataError(f"found one class folder ({class_names[0]!r}); a classifier needs at least 2")
    index = {name: i for i, name in enumerate(class_names)}
    y = np.array([index[label] for label in labels_by_path], dtype=np.int64)
    return _stack([image for _, image in samples]), y, class_names


def _decode_image(data: bytes, name: str, limits: IngestLimits) -> np.ndarray:
    """uint8 HxW (grayscale) or HxWx3; the size is checked from the header before decoding."""
    try:
        with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as image:
            width, height = image.size
            if width * height > limits.max_image_pixels:
                raise DataError(f"'{name}' is {width}x{height} pixels, above the limit of {limits.max_image_pixels}")
            if image.mode in _SIXTEEN_BIT_GRAY_MODES:
                # Pillow's convert("L") clips 16-bit values at 255 instead of scaling them.
                wide = np.asarray(image).astype(np.int64).clip(0, 65535)
                return ((wide + 128) // 257).astype(np.uint8)
            return np.asarray(image.convert("L" if image.mode in _GRAY_MODES else "RGB"))
    except Image.DecompressionBombError as exc:
        raise DataError(f"'{name}' has far too many pixels ({exc})") from exc
    # Pillow's plugins report some malformed headers with SyntaxError.
    except (OSError, ValueError, SyntaxError) as exc:
        raise DataError(f"'{name}' is not a readable PNG or JPEG image ({exc}); remove or convert it") from exc


def _class_of_each(paths: list[tuple[str, ...]]) -> list[str]:
    depths = {len(parts) for parts in paths}
    if depths == {2}:
        return [parts[0] for parts in paths]
    if depths == {3} and len({parts[0] for parts in paths}) == 1:
        return [parts[1] for parts in paths]
    examples = {len(parts): "/".join(parts) for parts in paths}
    raise DataError(f"{_LAYOUT_HELP}; found {', '.join(sorted(examples.values())[:3])}")


def _stack(images: list[np.ndarray]) -> np.ndarray:
    """One uint8 NxHxWxC array: RGB if any image is, every image at the most common size."""
    channels = 3 if any(image.ndim == 3 for image in images) else 1
    height, width = Counter(image.shape[:2] for image in images).most_common(1)[0][0]
    stacked = np.empty((len(images), height, width, channels), dtype=np.uint8)
    for i, image in enumerate(images):
        if image.shape[:2] != (height, width):
            image = np.asarray(Image.fromarray(image).resize((width, height), Image.Resampling.BILINEAR))
        # Broadcasting repeats a grayscale image's single channel into RGB.
        stacked[i] = image if image.ndim == 3 else image[..., None]
    return stacked
