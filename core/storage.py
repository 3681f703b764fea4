"""Content-addressed file storage: blobs/<sha[:2]>/<sha>, every write tmp + fsync + rename.

Paths come only from a sha256 computed here, never from anything a client sent.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from worker.engine.fileio import fsync_dir

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
CHUNK = 1 << 20


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
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        self.blob_dir.mkdir(parents=True, exist_ok=True)

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
        if final.exists():
            # Same content already stored: content addressing makes the second copy redundant.
            tmp.unlink(missing_ok=True)
        else:
            os.replace(tmp, final)
            fsync_dir(final.parent)
        return StoredBlob(sha256=sha256, bytes=size, path=final)


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
