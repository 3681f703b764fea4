"""Uploaded datasets -> one canonical .npz (x uint8 NxHxWxC, y int64, class_names). Torch-free.

Every upload is hostile: the API runs this in a limited child process (worker.engine.ingest_child
under app.sandbox), and it checks what it can before reading: a zip's entry count from its central
directory before Python builds one object per entry, a tar's extended headers (GNU long names, PAX
records) by their declared size before they are read, declared sizes and compression ratios before
any data, member names before use (links and special files refused), bytes counted while they
stream (declared sizes are not trusted), and image dimensions from the header before a pixel is
decoded. Nothing is extracted to disk: members are read into memory one at a time.

Memory stays near one copy of the data: an .npz's x is converted to uint8 in chunks of rows (never
a full-size float copy), and the canonical .npz is written as a stream, each decoded image dropped
once written. Its size is known before a byte of it is written, so a dataset that would not fit
the tenant's storage quota is refused (StorageQuotaError) before it costs any disk.
"""

from __future__ import annotations

import io
import lzma
import math
import re
import struct
import tarfile
import zipfile
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, BinaryIO

import numpy as np
from PIL import Image

from worker.engine.config import BUILTIN_DATASETS
from worker.engine.errors import DataError
from worker.engine.fileio import atomic_write
from worker.engine.photo_patches import photo_patches
from worker.engine.shapes import shapes

IMAGE_FORMATS = ("PNG", "JPEG")
# Entries this small cannot be bombs, and small uniform images legitimately compress very far.
_RATIO_EXEMPT_BYTES = 64 * 1024
_READ_CHUNK = 1 << 20
# Bytes of an .npz's x read and converted at a time: memory stays this small whatever N is.
_CONVERT_CHUNK_BYTES = 2 << 20
# How much of a member or file name an error message repeats: enough to find it, never megabytes.
_NAME_SHOWN = 120
_GRAY_MODES = frozenset({"1", "L", "LA"})
_SIXTEEN_BIT_GRAY_MODES = frozenset({"I", "I;16", "I;16B", "I;16L"})
_NPY_HEADER_READERS = {
    (1, 0): np.lib.format.read_array_header_1_0,
    (2, 0): np.lib.format.read_array_header_2_0,
}
_ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")
_COMPRESSED_TAR_MAGICS = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")
_LAYOUT_HELP = "expected class_name/image.png, or one top folder: root/class_name/image.png"
# Tar records whose payload tarfile reads whole into memory and parses (PAX with CVE-2024-6232's
# quadratic regex in this interpreter) before the member they describe.
_TAR_EXTENDED_HEADERS = frozenset({tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE,
                                   tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE})
_ZIP_DIRECTORY_ENTRY = struct.Struct("<4s24xHHH12x")  # signature, then name, extra and comment lengths
_ZIP_DIRECTORY_SIGNATURE = b"PK\x01\x02"
# The zip container around the canonical arrays (local headers, directory, zip64 records): 320 bytes
# measured, about 430 once x passes 4 GiB; this bound keeps the predicted size at or above the file's.
_CANONICAL_ZIP_OVERHEAD = 512

# Archive members as (path components, content), read one at a time.
Member = tuple[tuple[str, ...], bytes]
# A view of a block of x's rows as NxHxWxC.
_Layout = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class IngestLimits:
    max_entries: int
    max_unpacked_bytes: int
    max_compression_ratio: int
    max_image_pixels: int
    # A tar's GNU long name or PAX record; real ones hold a path (at most 4096 bytes) and a few attributes.
    max_tar_header_bytes: int = 16 << 10
    # What the tenant may still store; None: no quota.
    max_stored_bytes: int | None = None


class StorageQuotaError(DataError):
    """The canonical .npz would take the tenant past its storage quota."""

    def __init__(self, canonical_bytes: int, allowed_bytes: int) -> None:
        super().__init__(f"the dataset's canonical form (uint8 images, as stored) is {canonical_bytes} bytes, "
                         f"more than the {allowed_bytes} bytes this tenant may still store")
        self.canonical_bytes = canonical_bytes


@dataclass
class DatasetSummary:
    format: str  # "npz", "zip", "tar", or "builtin"
    num_classes: int
    class_names: list[str]
    num_samples: int
    class_counts: list[int]
    image_shape: list[int]  # [H, W, C]


@dataclass
class _Canonical:
    """A dataset ready to write: x is produced in blocks of rows, so it never has to exist whole."""

    x_shape: tuple[int, ...]  # N, H, W, C
    x_blocks: Iterator[np.ndarray]  # uint8, C-contiguous, consecutive rows of x
    y: np.ndarray
    class_names: list[str]


def ingest_dataset(src: Path, filename: str, dest_npz: Path, limits: IngestLimits) -> DatasetSummary:
    """Check and convert the upload at `src` (named `filename` by the client) into `dest_npz`."""
    filename = shown(filename)
    if _sniff_format(src, filename) == "tar":
        fmt = "tar"
        canonical = _image_folder(_tar_files(src, filename, limits), limits)
        _write_canonical(dest_npz, canonical, limits)
    else:
        _check_zip_entry_count(src, filename, limits)
        with _open_zip(src, filename) as archive:
            infos = _checked_zip_infos(archive, src.stat().st_size, limits)
            names = [info.filename for info in infos if not info.is_dir()]
            if names and all(name.endswith(".npy") for name in names):
                fmt = "npz"
                canonical = _npz_arrays(archive, infos, limits)
            else:
                fmt = "zip"
                canonical = _image_folder(_zip_files(archive, infos, limits), limits)
            # Inside the `with`: an .npz's x is still being read from the archive while it is written.
            _write_canonical(dest_npz, canonical, limits)
    return summarize(fmt, canonical.x_shape[1:], canonical.y, canonical.class_names)


def shown(name: str) -> str:
    """A client-chosen name as error messages repeat it: at most _NAME_SHOWN characters."""
    return name if len(name) <= _NAME_SHOWN else name[: _NAME_SHOWN - 1] + "\u2026"


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
    "shapes": shapes,
}


def load_builtin_summary(name: str) -> DatasetSummary:
    x, y, class_names = load_builtin_arrays(name)
    return summarize("builtin", x.shape[1:], y, class_names)


def summarize(fmt: str, image_shape: Iterable[int], y: np.ndarray, class_names: list[str]) -> DatasetSummary:
    return DatasetSummary(
        format=fmt,
        num_classes=len(class_names),
        class_names=list(class_names),
        num_samples=len(y),
        class_counts=np.bincount(y, minlength=len(class_names)).tolist(),
        image_shape=[int(size) for size in image_shape],
    )


# --- the canonical .npz ---------------------------------------------------------------------------


def _write_canonical(dest: Path, canonical: _Canonical, limits: IngestLimits) -> None:
    """The .npz that numpy.load reads (stored, not compressed), streamed; refused first if over the quota."""
    x_header = _npy_header(np.dtype(np.uint8), canonical.x_shape)
    y_npy, names_npy = _npy_bytes(canonical.y), _npy_bytes(np.array(canonical.class_names, dtype=str))
    size = len(x_header) + math.prod(canonical.x_shape) + len(y_npy) + len(names_npy) + _CANONICAL_ZIP_OVERHEAD
    if limits.max_stored_bytes is not None and size > limits.max_stored_bytes:
        raise StorageQuotaError(size, limits.max_stored_bytes)

    def write(handle: BinaryIO) -> None:
        with zipfile.ZipFile(handle, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
            with archive.open(_member("x.npy"), "w", force_zip64=True) as member:
                member.write(x_header)
                for block in canonical.x_blocks:
                    member.write(block.data)
            archive.writestr(_member("y.npy"), y_npy)
            archive.writestr(_member("class_names.npy"), names_npy)

    atomic_write(dest, write)


def _member(name: str) -> zipfile.ZipInfo:
    # A fixed timestamp (zipfile's default is the clock's): the same images give the same bytes, so the same
    # canonical sha256, which is how an evaluation dataset that repeats the training images is recognised.
    return zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))


def _npy_header(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    buffer = io.BytesIO()
    header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
    np.lib.format.write_array_header_2_0(buffer, header)
    return buffer.getvalue()


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, array, allow_pickle=False)
    return buffer.getvalue()


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


def _check_zip_entry_count(src: Path, filename: str, limits: IngestLimits) -> None:
    """Count the central directory's entries from their fixed-size headers, stopping past the limit.

    zipfile builds a ZipInfo object for every entry before anyone can count them (1M entries: 400 MB);
    this walk allocates nothing per entry. It follows the directory's byte size, as zipfile does, so an
    end record that understates the count changes nothing.
    """
    with open(src, "rb") as handle:
        # zipfile's own reader of the end record (zip64 included): private, but unchanged since Python 2.
        end = zipfile._EndRecData(handle)  # type: ignore[attr-defined]
        if end is None:
            raise DataError(f"'{filename}' is not a readable zip archive: it has no central directory")
        directory_bytes = end[zipfile._ECD_SIZE]  # type: ignore[attr-defined]
        start = end[zipfile._ECD_LOCATION] - directory_bytes  # type: ignore[attr-defined]
        if end[zipfile._ECD_SIGNATURE] == zipfile.stringEndArchive64:  # type: ignore[attr-defined]
            start -= zipfile.sizeEndCentDir64 + zipfile.sizeEndCentDir64Locator  # type: ignore[attr-defined]
        handle.seek(max(start, 0))
        walked = count = 0
        while walked < directory_bytes:
            header = handle.read(_ZIP_DIRECTORY_ENTRY.size)
            if len(header) < _ZIP_DIRECTORY_ENTRY.size:
                return  # a truncated directory: zipfile says what is wrong with it
            signature, name_length, extra_length, comment_length = _ZIP_DIRECTORY_ENTRY.unpack(header)
            if signature != _ZIP_DIRECTORY_SIGNATURE:
                return
            count += 1
            _check_entry_count(count, limits)
            variable = name_length + extra_length + comment_length
            handle.seek(variable, io.SEEK_CUR)
            walked += _ZIP_DIRECTORY_ENTRY.size + variable


def _checked_zip_infos(archive: zipfile.ZipFile, archive_bytes: int, limits: IngestLimits) -> list[zipfile.ZipInfo]:
    """Check every entry's metadata before any data is decompressed."""
    infos = archive.infolist()
    _check_entry_count(len(infos), limits)
    declared = 0
    for info in infos:
        _member_parts(info.filename)
        name = shown(info.filename)
        if (info.external_attr >> 16) & 0o170000 == 0o120000:
            raise DataError(f"'{name}' is a symbolic link; links are not allowed in datasets")
        if info.flag_bits & 0x1:
            raise DataError(f"'{name}' is encrypted; upload an archive without a password")
        if info.file_size > _RATIO_EXEMPT_BYTES and info.file_size > limits.max_compression_ratio * max(
            info.compress_size, 1
        ):
            raise DataError(
                f"'{name}' expands {info.file_size // max(info.compress_size, 1)}x when unpacked, "
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
        raise DataError(f"'{shown(name)}': backslashes are not allowed in archive member names; use '/'")
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        raise DataError(f"'{shown(name)}': absolute paths are not allowed in archives")
    parts = tuple(part for part in name.split("/") if part not in ("", "."))
    if ".." in parts:
        raise DataError(f"'{shown(name)}': '..' is not allowed in archive member names")
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
                raise DataError(f"'{shown(name)}' holds more data than its header declares; the archive is corrupt")
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
            raise DataError(f"'{shown(info.filename)}' cannot be read from the zip archive: {exc}") from exc


def _tar_files(src: Path, filename: str, limits: IngestLimits) -> Iterator[Member]:
    """Members in streaming mode: each header is checked before its data is read."""
    budget = _ByteBudget(limits.max_unpacked_bytes)
    archive_bytes = src.stat().st_size
    declared = 0
    try:
        with tarfile.open(src, mode="r|*", tarinfo=_bounded_tar_info(limits.max_tar_header_bytes)) as archive:
            for count, member in enumerate(archive, start=1):
                _check_entry_count(count, limits)
                parts = _member_parts(member.name)
                if member.isdir():
                    continue
                if not member.isfile():
                    raise DataError(f"'{shown(member.name)}' is a link or special file; "
                                    "datasets may hold only regular files")
                declared += member.size
                _check_unpacked(declared, archive_bytes, limits)
                if _is_hidden(parts):
                    continue
                stream = archive.extractfile(member)
                if stream is not None:
                    yield parts, budget.read(stream, member.size, member.name)
    except (tarfile.TarError, OSError, EOFError, zlib.error, lzma.LZMAError) as exc:
        raise DataError(f"'{filename}' is not a readable tar archive: {exc}") from exc


def _bounded_tar_info(max_header_bytes: int) -> type[tarfile.TarInfo]:
    """A TarInfo that refuses an extended header (long name, PAX record) declaring more than the limit.

    tarfile reads such a payload whole and parses it before the member it describes, so a 300 MB long
    name costs 300 MB (and more as it is decoded), and a PAX record of digits costs quadratic time in
    this interpreter's regex (CVE-2024-6232). The size is in the 512-byte header block, read first.
    """

    class BoundedTarInfo(tarfile.TarInfo):
        @classmethod
        def fromtarfile(cls, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
            # As tarfile.TarInfo.fromtarfile, with the size check between the header and its payload.
            block = tarfile_.fileobj.read(tarfile.BLOCKSIZE)  # type: ignore[union-attr]
            info = cls.frombuf(block, tarfile_.encoding, tarfile_.errors)
            info.offset = tarfile_.fileobj.tell() - tarfile.BLOCKSIZE  # type: ignore[union-attr]
            if info.type in _TAR_EXTENDED_HEADERS and info.size > max_header_bytes:
                raise DataError(f"the archive has an extended tar header (long name or PAX record) of {info.size} "
                                f"bytes, above the limit of {max_header_bytes}; recreate it with shorter names")
            return info._proc_member(tarfile_)  # type: ignore[attr-defined]

    return BoundedTarInfo


# --- npz ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _NpyMember:
    info: zipfile.ZipInfo
    shape: tuple[int, ...]
    dtype: np.dtype


def _npz_arrays(archive: zipfile.ZipFile, infos: list[zipfile.ZipInfo], limits: IngestLimits) -> _Canonical:
    by_name = {info.filename.removesuffix(".npy"): info for info in infos}
    if "x" not in by_name or "y" not in by_name:
        raise DataError(
            f"the .npz must hold arrays named x (images) and y (labels); it holds "
            f"{[shown(name) for name in sorted(by_name)[:10]]}. Save it with numpy.savez(path, x=images, y=labels)"
        )
    x = _npy_member(archive, by_name["x"])
    x_shape, layout = _image_layout(x.shape, limits)
    to_uint8 = _uint8_converter(archive, x)
    y, num_classes = _labels(_read_npy(archive, by_name["y"]), x.shape[0])
    class_names = [str(label) for label in range(num_classes)]
    if "class_names" in by_name:
        class_names = _class_names(_read_npy(archive, by_name["class_names"]), num_classes)
    blocks = (np.ascontiguousarray(to_uint8(layout(block))) for block in _npy_blocks(archive, x))
    return _Canonical(x_shape, blocks, y, class_names)


def _npy_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> _NpyMember:
    """An array's header, after checking that its shape fits the entry's (already capped) size."""
    name = shown(info.filename)
    try:
        with archive.open(info) as stream:
            version = np.lib.format.read_magic(stream)
            if version not in _NPY_HEADER_READERS:
                raise DataError(f"'{name}' uses .npy format version {version}; save with numpy.savez")
            shape, fortran_order, dtype = _NPY_HEADER_READERS[version](stream)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        raise DataError(f"'{name}' is not a valid .npy array: {exc}") from exc
    if dtype.hasobject:
        raise DataError(f"'{name}' holds Python objects; only numeric and string arrays are accepted")
    if math.prod(shape) * dtype.itemsize > info.file_size:
        raise DataError(f"'{name}' declares shape {shape} but holds less data; the file is corrupt")
    if fortran_order and len(shape) > 1:
        raise DataError(f"'{name}' is stored in Fortran order; save numpy.ascontiguousarray(...) of it")
    return _NpyMember(info, tuple(shape), dtype)


def _read_npy(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> np.ndarray:
    """A small array (labels, class names) read whole, after checking its header."""
    _npy_member(archive, info)
    try:
        with archive.open(info) as stream:
            return np.lib.format.read_array(stream, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        raise DataError(f"'{shown(info.filename)}' is not a valid .npy array: {exc}") from exc


def _npy_blocks(archive: zipfile.ZipFile, array: _NpyMember) -> Iterator[np.ndarray]:
    """The array in blocks of whole rows (first axis), read from the archive as they are needed."""
    name = shown(array.info.filename)
    row_shape = array.shape[1:]
    row_bytes = max(1, math.prod(row_shape) * array.dtype.itemsize)
    rows_per_block = max(1, _CONVERT_CHUNK_BYTES // row_bytes)
    try:
        with archive.open(array.info) as stream:
            _NPY_HEADER_READERS[np.lib.format.read_magic(stream)](stream)
            for start in range(0, array.shape[0], rows_per_block):
                rows = min(rows_per_block, array.shape[0] - start)
                data = _read_exactly(stream, rows * row_bytes, name)
                yield np.frombuffer(data, dtype=array.dtype).reshape((rows, *row_shape))
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        raise DataError(f"'{name}' is not a valid .npy array: {exc}") from exc


def _read_exactly(stream: IO[bytes], size: int, name: str) -> bytearray:
    """`size` bytes into a buffer of their own (writable, so a block can be converted in place)."""
    buffer = bytearray(size)
    view = memoryview(buffer)
    filled = 0
    while filled < size:
        chunk = stream.read(min(size - filled, _READ_CHUNK))
        if not chunk:
            raise DataError(f"'{name}' ends before the data its header declares; the file is corrupt")
        view[filled:filled + len(chunk)] = chunk
        filled += len(chunk)
    return buffer


def _image_layout(shape: tuple[int, ...], limits: IngestLimits) -> tuple[tuple[int, ...], _Layout]:
    """Check x's shape (NxHxW, NxHxWxC or NxCxHxW, C of 1 or 3); its NxHxWxC shape, and how to view a block so."""
    if len(shape) == 3:
        nhwc, layout = (*shape, 1), _add_channel_axis
    elif len(shape) == 4:
        channels_first, channels_last = shape[1] in (1, 3), shape[3] in (1, 3)
        if channels_first and channels_last:
            raise DataError(f"cannot tell which axis of x {shape} holds the channels; store x as NxHxWxC")
        if not (channels_first or channels_last):
            raise DataError(f"x has shape {shape}: images need 1 or 3 channels (NxHxWxC or NxCxHxW)")
        if channels_first:
            nhwc, layout = (shape[0], shape[2], shape[3], shape[1]), _channels_last
        else:
            nhwc, layout = shape, _unchanged
    else:
        raise DataError(f"x has shape {shape}: expected images as NxHxW, NxHxWxC or NxCxHxW")
    if nhwc[0] == 0 or nhwc[1] * nhwc[2] == 0:
        raise DataError(f"x has shape {shape}: it holds no pixels")
    if nhwc[1] * nhwc[2] > limits.max_image_pixels:
        raise DataError(f"images of {nhwc[1]}x{nhwc[2]} exceed the limit of {limits.max_image_pixels} pixels")
    return nhwc, layout


def _add_channel_axis(block: np.ndarray) -> np.ndarray:
    return block[..., None]


def _channels_last(block: np.ndarray) -> np.ndarray:
    return block.transpose(0, 2, 3, 1)


def _unchanged(block: np.ndarray) -> np.ndarray:
    return block


def _uint8_converter(archive: zipfile.ZipFile, x: _NpyMember) -> Callable[[np.ndarray], np.ndarray]:
    """Check x's values (one pass over its blocks) and return how to turn a block into uint8."""
    if x.dtype == np.uint8:
        return _unchanged
    is_integer, is_float = np.issubdtype(x.dtype, np.integer), np.issubdtype(x.dtype, np.floating)
    if not (is_integer or is_float):
        raise DataError(f"x has dtype {x.dtype}; store images as uint8 (0..255) or float (0..1 or 0..255)")
    low, high = math.inf, -math.inf
    for block in _npy_blocks(archive, x):
        if is_float and not np.isfinite(block).all():
            raise DataError("x contains NaN or infinite values")
        low, high = min(low, block.min()), max(high, block.max())
    if is_integer:
        if low < 0 or high > 255:
            raise DataError(f"integer images must be in 0..255; x ranges from {low} to {high}")
        return lambda block: block.astype(np.uint8)
    if low < 0 or high > 255:
        raise DataError(f"float images must be in [0, 1] or [0, 255]; x ranges from {float(low):g} to {float(high):g}")
    scale = 255.0 if high <= 1.0 else 1.0

    def float_to_uint8(block: np.ndarray) -> np.ndarray:
        # In place: each block is a fresh buffer read from the archive, so no float temporaries.
        np.multiply(block, scale, out=block)
        return np.rint(block, out=block).astype(np.uint8)

    return float_to_uint8


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


def _image_folder(files: Iterable[Member], limits: IngestLimits) -> _Canonical:
    samples = []
    decoded_bytes = 0
    for parts, data in files:
        image = _decode_image(data, shown("/".join(parts)), limits)
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
        raise DataError(f"found one class folder ({shown(class_names[0])!r}); a classifier needs at least 2")
    index = {name: i for i, name in enumerate(class_names)}
    y = np.array([index[label] for label in labels_by_path], dtype=np.int64)
    images = [image for _, image in samples]
    del samples
    return _Canonical(_stacked_shape(images), _stacked_rows(images), y, class_names)


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
    except Image.UnidentifiedImageError as exc:
        # Its text names the in-memory buffer (with its address), not the member.
        raise DataError(f"'{name}' is not a readable PNG or JPEG image; remove or convert it") from exc
    # Pillow's plugins report some malformed headers with SyntaxError.
    except (OSError, ValueError, SyntaxError) as exc:
        raise DataError(f"'{name}' is not a readable PNG or JPEG image ({exc}); remove or convert it") from exc


def _class_of_each(paths: list[tuple[str, ...]]) -> list[str]:
    depths = {len(parts) for parts in paths}
    if depths == {2}:
        return [parts[0] for parts in paths]
    if depths == {3} and len({parts[0] for parts in paths}) == 1:
        return [parts[1] for parts in paths]
    examples = {len(parts): shown("/".join(parts)) for parts in paths}
    raise DataError(f"{_LAYOUT_HELP}; found {', '.join(sorted(examples.values())[:3])}")


def _stacked_shape(images: list[np.ndarray]) -> tuple[int, int, int, int]:
    """NxHxWxC of the stack: RGB if any image is, every image at the most common size."""
    channels = 3 if any(image.ndim == 3 for image in images) else 1
    height, width = Counter(image.shape[:2] for image in images).most_common(1)[0][0]
    return len(images), height, width, channels


def _stacked_rows(images: list[np.ndarray]) -> Iterator[np.ndarray]:
    """Each image as one 1xHxWxC row of the stack, dropped from `images` once yielded, so that the
    decoded images and the stack never both exist in full."""
    _, height, width, channels = _stacked_shape(images)
    for i, image in enumerate(images):
        images[i] = np.empty(0, dtype=np.uint8)
        if image.shape[:2] != (height, width):
            image = np.asarray(Image.fromarray(image).resize((width, height), Image.Resampling.BILINEAR))
        if image.ndim == 2:
            image = image[..., None]
        # Broadcasting repeats a grayscale image's single channel into RGB.
        yield np.ascontiguousarray(np.broadcast_to(image, (height, width, channels)))[None]
