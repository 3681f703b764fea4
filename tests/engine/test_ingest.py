"""Dataset ingestion: npz layouts and dtypes, ImageFolder zip/tar, and hostile archives refused."""

from __future__ import annotations

import dataclasses
import io
import tarfile
import time
import tracemalloc
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.hostile import png_claiming
from worker.engine.data import load_canonical
from worker.engine.errors import DataError
from worker.engine.ingest import (
    DatasetSummary,
    IngestLimits,
    StorageQuotaError,
    ingest_dataset,
    load_builtin_arrays,
    load_builtin_summary,
)

LABELS = np.array([0, 1, 2, 0, 1, 2])


def _png(size: tuple[int, int] = (8, 8), mode: str = "L", value: int | tuple = 0) -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, value).save(buffer, format="PNG")
    return buffer.getvalue()


def _zip(path: Path, members: dict[str, bytes], compression: int = zipfile.ZIP_DEFLATED) -> Path:
    with zipfile.ZipFile(path, "w", compression) as archive:
        for name, payload in members.items():
            archive.writestr(name, payload)
    return path


def _tar(path: Path, members: list[tarfile.TarInfo | tuple[str, bytes]], mode: str = "w:gz") -> Path:
    with tarfile.open(path, mode) as archive:
        for member in members:
            if isinstance(member, tarfile.TarInfo):
                archive.addfile(member)
            else:
                info = tarfile.TarInfo(member[0])
                info.size = len(member[1])
                archive.addfile(info, io.BytesIO(member[1]))
    return path


def _npz(path: Path, **arrays: np.ndarray) -> Path:
    with open(path, "wb") as handle:
        np.savez(handle, **arrays)
    return path


def _ingest(src: Path, limits: IngestLimits) -> tuple[DatasetSummary, np.ndarray, np.ndarray]:
    dest = src.with_name("canonical.npz")
    summary = ingest_dataset(src, src.name, dest, limits)
    dataset = load_canonical(dest)
    assert dataset.class_names == summary.class_names
    return summary, dataset.x, dataset.y


def _refused(src: Path, limits: IngestLimits, message: str) -> None:
    dest = src.with_name("canonical.npz")
    with pytest.raises(DataError, match=message):
        ingest_dataset(src, src.name, dest, limits)
    assert not dest.exists()


# --- npz --------------------------------------------------------------------------------------------

RGB_NHWC = np.arange(6 * 8 * 8 * 3, dtype=np.int64).reshape(6, 8, 8, 3) % 256


@pytest.mark.parametrize(
    "x",
    [
        RGB_NHWC.astype(np.uint8),
        RGB_NHWC.astype(np.uint8).transpose(0, 3, 1, 2),
        RGB_NHWC.astype(np.float32) / 255,
        RGB_NHWC.astype(np.float64),
    ],
    ids=["nhwc-uint8", "nchw-uint8", "float-0-1", "float-0-255"],
)
def test_npz_layouts_and_dtypes(tmp_path: Path, limits: IngestLimits, x: np.ndarray) -> None:
    summary, canonical_x, y = _ingest(_npz(tmp_path / "d.bin", x=x, y=LABELS), limits)
    assert np.array_equal(canonical_x, RGB_NHWC.astype(np.uint8)) and canonical_x.dtype == np.uint8
    assert np.array_equal(y, LABELS) and y.dtype == np.int64
    assert summary == DatasetSummary("npz", 3, ["0", "1", "2"], 6, [2, 2, 2], [8, 8, 3])


def test_npz_grayscale_without_channel_axis_and_class_names(tmp_path: Path, limits: IngestLimits) -> None:
    x = np.full((6, 5, 7), 9, dtype=np.uint8)
    names = np.array(["cat", "dog", "eel"])
    summary, canonical_x, _ = _ingest(_npz(tmp_path / "d.npz", x=x, y=LABELS, class_names=names), limits)
    assert canonical_x.shape == (6, 5, 7, 1) and summary.class_names == ["cat", "dog", "eel"]


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"x": np.zeros((6, 8, 8)), "y": LABELS + 1}, r"0\.\.K-1 .* from 1 to 3"),
        ({"x": np.zeros((6, 8, 8)), "y": np.zeros(6, dtype=int)}, r"0\.\.K-1 .*K >= 2"),
        ({"x": np.zeros((6, 8, 8)), "y": LABELS.astype(float)}, "integer class labels"),
        ({"x": np.zeros((5, 8, 8)), "y": LABELS}, "one label per image"),
        ({"x": np.full((6, 8, 8), 300.0), "y": LABELS}, r"\[0, 1\] or \[0, 255\]"),
        ({"x": np.full((6, 8, 8), -0.5), "y": LABELS}, r"\[0, 1\] or \[0, 255\]"),
        ({"x": np.zeros((6, 8, 8, 4)), "y": LABELS}, "1 or 3 channels"),
        ({"x": np.zeros((6, 8, 8)), "labels": LABELS}, "arrays named x"),
        ({"x": np.zeros((6, 8, 8)), "y": LABELS, "class_names": np.array(["a"])}, "class_names must be 3"),
    ],
    ids=["labels-from-1", "one-class", "float-labels", "count", "float-range", "negative", "channels", "no-y", "names"],
)
def test_npz_problems_say_what_to_fix(tmp_path: Path, limits: IngestLimits, arrays: dict, message: str) -> None:
    _refused(_npz(tmp_path / "d.npz", **arrays), limits, message)


def test_npz_with_pickled_objects_is_refused(tmp_path: Path, limits: IngestLimits) -> None:
    x = np.empty(6, dtype=object)
    _refused(_npz(tmp_path / "d.npz", x=x, y=LABELS), limits, "Python objects")


def test_builtin_digits_summary() -> None:
    summary = load_builtin_summary("digits")
    assert (summary.num_samples, summary.num_classes, summary.image_shape) == (1797, 10, [8, 8, 1])
    assert sum(summary.class_counts) == 1797 and summary.class_names == [str(d) for d in range(10)]


@pytest.mark.parametrize("name", ["photo-patches", "shapes"])
def test_generated_builtins_pass_the_upload_checks_unchanged(tmp_path: Path, limits: IngestLimits, name: str) -> None:
    x, y, class_names = load_builtin_arrays(name)
    upload = _npz(tmp_path / f"{name}.npz", x=x, y=y, class_names=np.array(class_names))
    summary, ingested_x, ingested_y = _ingest(upload, limits)
    assert summary == dataclasses.replace(load_builtin_summary(name), format="npz")
    assert np.array_equal(ingested_x, x) and np.array_equal(ingested_y, y)


# --- image folders ----------------------------------------------------------------------------------


def test_zip_image_folder(tmp_path: Path, limits: IngestLimits) -> None:
    members = {
        "cat/a.png": _png(value=100),
        "cat/b.png": _png(size=(16, 16), value=50),  # resized to the common 8x8
        "dog/c.png": _png(mode="RGB", value=(255, 0, 0)),  # one RGB image makes the dataset RGB
        "dog/d.jpg": _jpeg(),
        "__MACOSX/cat/._a.png": b"resource fork",
        "cat/.DS_Store": b"finder",
    }
    summary, x, y = _ingest(_zip(tmp_path / "upload", members), limits)
    assert summary == DatasetSummary("zip", 2, ["cat", "dog"], 4, [2, 2], [8, 8, 3])
    assert np.array_equal(y, [0, 0, 1, 1])
    assert (x[0] == 100).all() and (x[1] == 50).all()
    assert (x[2] == [255, 0, 0]).all()


def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path: Path, limits: IngestLimits) -> None:
    members = {"bright/a.png": _png(mode="I;16", value=65535), "mid/b.png": _png(mode="I;16", value=32896)}
    _, x, _ = _ingest(_zip(tmp_path / "u.zip", members), limits)
    assert (x[0] == 255).all() and (x[1] == 128).all()


def _jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (8, 8), 30).save(buffer, format="JPEG")
    return buffer.getvalue()


@pytest.mark.parametrize("mode", ["w:gz", "w"])
def test_tar_image_folder_under_one_top_folder(tmp_path: Path, limits: IngestLimits, mode: str) -> None:
    members = [("data/one/a.png", _png(value=1)), ("data/two/b.png", _png(value=2)), ("./data/two/c.png", _png())]
    summary, x, y = _ingest(_tar(tmp_path / "upload", members, mode), limits)
    assert summary == DatasetSummary("tar", 2, ["one", "two"], 3, [1, 2], [8, 8, 1])
    assert np.array_equal(y, [0, 1, 1]) and x[0].max() == 1


@pytest.mark.parametrize(
    ("members", "message"),
    [
        ({"cat/a.png": _png(), "b.png": _png()}, "expected class_name/image.png"),
        ({"cat/a.png": _png(), "dog/notes.txt": b"hello"}, "'dog/notes.txt' is not a readable PNG or JPEG"),
        ({"cat/a.png": _png(), "dog/b.png": _png()[:40]}, "'dog/b.png' is not a readable PNG or JPEG"),
        ({"cat/a.png": _png(), "cat/b.png": _png()}, "a classifier needs at least 2"),
        ({"__MACOSX/x": b""}, "holds no images"),
    ],
    ids=["layout", "text-file", "truncated", "one-class", "empty"],
)
def test_image_folder_problems_say_what_to_fix(tmp_path: Path, limits: IngestLimits, members, message) -> None:
    _refused(_zip(tmp_path / "upload.zip", members), limits, message)


def test_not_an_archive(tmp_path: Path, limits: IngestLimits) -> None:
    path = tmp_path / "data.zip"
    path.write_bytes(b"just some text, named like a zip")
    _refused(path, limits, "'data.zip' is not a dataset this service reads")


# --- hostile uploads --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("../evil.png", r"'\.\.' is not allowed"),
        ("cat/../../evil.png", r"'\.\.' is not allowed"),
        ("/abs/evil.png", "absolute paths"),
        ("C:/evil.png", "absolute paths"),
        ("cat\\..\\evil.png", "backslashes"),
    ],
)
def test_zip_member_names_outside_the_archive_are_refused(tmp_path: Path, limits: IngestLimits, name, message):
    _refused(_zip(tmp_path / "u.zip", {"cat/a.png": _png(), "dog/b.png": _png(), name: _png()}), limits, message)


@pytest.mark.parametrize(("name", "message"), [("../evil.png", r"'\.\.'"), ("/abs/evil.png", "absolute paths")])
def test_tar_member_names_outside_the_archive_are_refused(tmp_path: Path, limits: IngestLimits, name, message):
    _refused(_tar(tmp_path / "u.tgz", [("cat/a.png", _png()), (name, _png())]), limits, message)


@pytest.mark.parametrize("kind", [tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.FIFOTYPE, tarfile.CHRTYPE])
def test_tar_links_and_devices_are_refused(tmp_path: Path, limits: IngestLimits, kind: bytes) -> None:
    special = tarfile.TarInfo("cat/b.png")
    special.type = kind
    special.linkname = "/etc/passwd" if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE) else ""
    _refused(_tar(tmp_path / "u.tar", [("cat/a.png", _png()), special], "w"), limits, "link or special file")


def test_zip_symlink_is_refused(tmp_path: Path, limits: IngestLimits) -> None:
    path = tmp_path / "u.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("cat/a.png", _png())
        link = zipfile.ZipInfo("cat/b.png")
        link.external_attr = 0o120777 << 16
        archive.writestr(link, "/etc/passwd")
    _refused(path, limits, "symbolic link")


def test_too_many_entries(tmp_path: Path, limits: IngestLimits) -> None:
    tiny = _png()
    members = {f"c{i % 2}/{i}.png": tiny for i in range(limits.max_entries + 1)}
    _refused(_zip(tmp_path / "u.zip", members), limits, f"more than {limits.max_entries} entries")
    _refused(_tar(tmp_path / "u.tgz", list(members.items())), limits, f"more than {limits.max_entries} entries")


def test_zip_bomb_is_refused_before_decompressing(tmp_path: Path, limits: IngestLimits) -> None:
    bomb = _zip(tmp_path / "u.zip", {"cat/a.png": _png(), "cat/bomb.png": bytes(10_000_000)})
    assert bomb.stat().st_size < 100_000
    started = time.perf_counter()
    _refused(bomb, limits, "zip bomb")
    assert time.perf_counter() - started < 1.0


def test_tar_gz_bomb_is_refused_before_reading_its_data(tmp_path: Path, limits: IngestLimits) -> None:
    bomb = _tar(tmp_path / "u.tgz", [("cat/a.png", _png()), ("cat/bomb.png", bytes(10_000_000))])
    _refused(bomb, limits, "decompression bomb")


def test_total_unpacked_size_is_capped(tmp_path: Path, limits: IngestLimits) -> None:
    noise = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, format="PNG")
    members = {"cat/a.png": buffer.getvalue(), "dog/b.png": buffer.getvalue()}
    small = dataclasses.replace(limits, max_unpacked_bytes=len(buffer.getvalue()) + 100)
    _refused(_zip(tmp_path / "u.zip", members, zipfile.ZIP_STORED), small, "unpacks to more than")
    _refused(_tar(tmp_path / "u.tar", list(members.items()), "w"), small, "unpacks to more than")


@pytest.mark.parametrize(
    ("width", "message"), [(5000, r"5000x5000 pixels, above the limit"), (100_000, "far too many pixels")]
)
def test_image_bomb_is_refused_from_its_header(tmp_path: Path, limits: IngestLimits, width: int, message: str):
    members = {"cat/a.png": _png(), "dog/bomb.png": png_claiming(width, width)}
    _refused(_zip(tmp_path / "u.zip", members), limits, message)


# --- memory and parser bounds (issue 13) ------------------------------------------------------------


def _peak_python_bytes(action: Callable[[], object]) -> int:
    """Peak of memory allocated through Python's allocators (numpy's array data included) while `action` ran."""
    tracemalloc.start()
    try:
        action()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_zip_entries_are_counted_before_zipfile_builds_them(tmp_path: Path, limits: IngestLimits) -> None:
    path = tmp_path / "many.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        for index in range(5_000):
            archive.writestr(f"c/{index}", b"")

    def refuse() -> None:
        with pytest.raises(DataError, match=f"more than {limits.max_entries} entries"):
            ingest_dataset(path, path.name, tmp_path / "canonical.npz", limits)
    # zipfile.ZipFile alone takes 3 MB for 5,000 entries (their ZipInfo objects and the name index).
    assert _peak_python_bytes(refuse) < 1 << 20


def test_float_npz_is_converted_without_full_size_copies(tmp_path: Path, limits: IngestLimits) -> None:
    x = np.random.default_rng(0).random((1024, 64, 64), dtype=np.float32)  # 16 MB
    upload = _npz(tmp_path / "floats.npz", x=x, y=np.arange(1024) % 2)
    del x
    peak = _peak_python_bytes(lambda: ingest_dataset(upload, upload.name, tmp_path / "canonical.npz", limits))
    # Less than one float copy of x; reading x whole, then scaling and rounding it, took three.
    assert peak < 16 << 20
    with np.load(upload) as original:
        expected = np.rint(original["x"] * 255).astype(np.uint8)[..., None]
    assert np.array_equal(load_canonical(tmp_path / "canonical.npz").x, expected)


@pytest.mark.parametrize("kind", [tarfile.XHDTYPE, tarfile.GNUTYPE_LONGNAME])
def test_large_tar_extended_headers_are_refused_unread(tmp_path: Path, limits: IngestLimits, kind: bytes) -> None:
    header = tarfile.TarInfo("././@LongLink")
    header.type = kind
    # Digits: the PAX regex's quadratic case (CVE-2024-6232), minutes of CPU at this size if parsed.
    payload = b"1" * (limits.max_tar_header_bytes * 64)
    header.size = len(payload)
    raw = header.tobuf(tarfile.USTAR_FORMAT) + payload + bytes(-len(payload) % tarfile.BLOCKSIZE)
    path = tmp_path / "u.tar"
    path.write_bytes(raw + bytes(2 * tarfile.BLOCKSIZE))
    _refused(path, limits, f"extended tar header .* of {len(payload)} bytes, above the limit")


def test_canonical_npz_over_the_storage_quota_is_refused_before_writing(tmp_path: Path, limits: IngestLimits) -> None:
    upload = _npz(tmp_path / "d.npz", x=np.zeros((6, 64, 64), dtype=np.uint8), y=LABELS)
    with pytest.raises(StorageQuotaError, match=r"canonical form .* is 2[0-9]{4} bytes") as refused:
        ingest_dataset(upload, upload.name, tmp_path / "canonical.npz",
                       dataclasses.replace(limits, max_stored_bytes=20_000))
    assert refused.value.canonical_bytes > 6 * 64 * 64
    assert list(tmp_path.iterdir()) == [upload]
    ingest_dataset(upload, upload.name, tmp_path / "canonical.npz",
                   dataclasses.replace(limits, max_stored_bytes=refused.value.canonical_bytes))
    assert (tmp_path / "canonical.npz").stat().st_size <= refused.value.canonical_bytes


def test_the_canonical_file_depends_on_the_images_only(tmp_path: Path, limits: IngestLimits) -> None:
    """No clock time in its zip entries: the same images uploaded again, a second later or a day later, have the
    same canonical sha256 (how an eval_dataset that repeats the training images is refused)."""
    source = tmp_path / "upload.npz"
    np.savez(source, x=np.arange(2 * 8 * 8, dtype=np.uint8).reshape(2, 8, 8), y=np.array([0, 1]))
    ingest_dataset(source, "upload.npz", tmp_path / "canonical.npz", limits)
    with zipfile.ZipFile(tmp_path / "canonical.npz") as archive:
        assert {info.date_time for info in archive.infolist()} == {(1980, 1, 1, 0, 0, 0)}
