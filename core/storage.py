"""Content-addressed file storage: blobs/<sha[:2]>/<sha>, every write tmp + fsync + rename.

Paths come only from a sha256 computed here, never from anything a client sent.

A blob is published before the transaction that records it commits (its row names it by sha256). When that
transaction never commits, the blob is an orphan: the collector (core.orphans) removes blobs that no row names
once they are older than a grace period. Publishing content that is already stored refreshes the blob's mtime,
so an old orphan that a new row is about to name again is young once more; and the collector moves a blob aside
before it looks at the rows a last time, so a publish that races it writes the blob anew (see remove_blobs).
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import time
from collections.abc import AsyncIterator, Callable, Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from worker.engine.fileio import fsync_dir

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
CHUNK = 1 << 20
# A blob moved aside this long ago belongs to a collector that died before it settled it (a pass takes seconds).
ABANDONED_ASIDE_SECONDS = 600


class UploadTooLarge(Exception):
    def __init__(self, limit: int) -> None:
        super().__init__(f"upload exceeds the limit of {limit} bytes")
        self.limit = limit


@dataclass(frozen=True)
class StoredBlob:
    sha256: str
    bytes: int
    path: Path


class BlobStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.tmp_dir = root / "tmp"
        self.blob_dir = root / "blobs"
        # Blobs being removed: on the same filesystem, so that moving one aside (and back) is a rename.
        self.trash_dir = root / "trash"
        for folder in (self.tmp_dir, self.blob_dir, self.trash_dir):
            folder.mkdir(parents=True, exist_ok=True)

    def path_for(self, sha256: str) -> Path:
        if not _SHA256.match(sha256):
            raise ValueError("not a sha256 hex digest")
        return self.blob_dir / sha256[:2] / sha256

    def exists(self, sha256: str) -> bool:
        return self.path_for(sha256).is_file()

    @contextmanager
    def temp_path(self, suffix: str = "") -> Iterator[Path]:
        """A scratch file in the store's own filesystem (so rename is atomic), removed on exit."""
        path = self.tmp_dir / f"{secrets.token_hex(8)}{suffix}"
        try:
            yield path
        finally:
            path.unlink(missing_ok=True)

    async def put_stream(self, chunks: AsyncIterator[bytes], limit: int) -> StoredBlob:
        """Stream to a temp file with a running sha256 and a byte cap, then publish."""
        digest = hashlib.sha256()
        size = 0
        with self.temp_path() as tmp:
            with open(tmp, "wb") as out:
                async for chunk in chunks:
                    size += len(chunk)
                    if size > limit:
                        raise UploadTooLarge(limit)
                    digest.update(chunk)
                    out.write(chunk)
                _flush(out)
            return self._publish(tmp, digest.hexdigest(), size)

    def put_file(self, source: Path, sha256: str | None = None) -> StoredBlob:
        """Publish a file written elsewhere in this store's tmp dir (moved, not copied). `sha256`: the digest its
        writer computed over the bytes as it wrote them (an upload's), which spares reading the file again."""
        digest = hashlib.sha256()
        with open(source, "rb") as handle:
            if sha256 is None:
                while chunk := handle.read(CHUNK):
                    digest.update(chunk)
            os.fsync(handle.fileno())
            size = os.fstat(handle.fileno()).st_size
        return self._publish(source, sha256 or digest.hexdigest(), size)

    def put_bytes(self, data: bytes) -> StoredBlob:
        with self.temp_path() as tmp:
            with open(tmp, "wb") as out:
                out.write(data)
                _flush(out)
            return self._publish(tmp, hashlib.sha256(data).hexdigest(), len(data))

    def _publish(self, tmp: Path, sha256: str, size: int) -> StoredBlob:
        final = self.path_for(sha256)
        final.parent.mkdir(parents=True, exist_ok=True)
        if _touch(final):
            # Same content already stored: content addressing makes the second copy redundant. The touch tells
            # the collector that a row is about to name it, should it be an orphan until now.
            tmp.unlink(missing_ok=True)
        else:
            os.replace(tmp, final)
            fsync_dir(final.parent)
        return StoredBlob(sha256=sha256, bytes=size, path=final)

    def blobs_older_than(self, seconds: float) -> list[str]:
        """The sha256 of every blob not written (or re-published) in the last `seconds`."""
        cutoff = time.time() - seconds
        return [path.name for path in self.blob_dir.glob("??/*")
                if _SHA256.match(path.name) and _modified_before(path, cutoff)]

    def remove_blobs(self, sha256s: Collection[str], still_named: Callable[[list[str]], set[str]],
                     seconds: float) -> list[str]:
        """Remove these blobs, except those that `still_named` reports a row names, or that were published in the
        last `seconds` after all. Returns the sha256 of those removed.

        Each is moved aside first, and only then are the rows and its mtime looked at again: a publish that
        finds it moved aside writes it anew, and one that touched it before the move leaves it young."""
        moved = {}
        for sha256 in sha256s:
            aside = self.trash_dir / f"{sha256}.{secrets.token_hex(4)}"
            try:
                os.replace(self.path_for(sha256), aside)
            except FileNotFoundError:
                continue
            moved[sha256] = aside
        named = still_named(list(moved)) if moved else set()
        cutoff = time.time() - seconds
        removed = []
        for sha256, aside in moved.items():
            if sha256 in named or not _modified_before(aside, cutoff):
                self._restore(sha256, aside)
            else:
                aside.unlink(missing_ok=True)
                removed.append(sha256)
        return removed

    def _restore(self, sha256: str, aside: Path) -> None:
        final = self.path_for(sha256)
        if final.exists():  # published anew meanwhile: same content
            aside.unlink(missing_ok=True)
        else:
            os.replace(aside, final)

    def remove_temp_files_older_than(self, seconds: float) -> list[Path]:
        """Remove temp files (uploads, canonical datasets being written) that a crash left behind, and files
        moved aside by a collector that died before it settled them (restored: the next pass decides)."""
        cutoff = time.time() - seconds
        removed = []
        for path in self.tmp_dir.iterdir():
            if path.is_file() and _modified_before(path, cutoff):
                path.unlink(missing_ok=True)
                removed.append(path)
        abandoned = time.time() - ABANDONED_ASIDE_SECONDS
        for aside in self.trash_dir.iterdir():
            if _modified_before(aside, abandoned, "st_ctime"):  # the rename aside set its ctime
                self._restore(aside.name.split(".", 1)[0], aside)
        return removed


def _touch(path: Path) -> bool:
    """Set the file's mtime to now; False if there is no such file."""
    try:
        os.utime(path)
    except FileNotFoundError:
        return False
    return True


def _modified_before(path: Path, cutoff: float, time_field: str = "st_mtime") -> bool:
    """Whether the file's mtime (or ctime) is before `cutoff`; False if it is gone (another collector took it)."""
    try:
        return getattr(path.stat(), time_field) < cutoff
    except FileNotFoundError:
        return False


def _flush(handle: BinaryIO) -> None:
    handle.flush()
    os.fsync(handle.fileno())


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def get_store() -> BlobStore:
    from core.settings import get_settings

    return BlobStore(get_settings().storage_dir)
