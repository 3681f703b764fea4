"""Hostile inputs shared by the engine and API tests: each would do harm if the code under test trusted it."""

from __future__ import annotations

import builtins
import io
import struct
import zipfile
import zlib
from pathlib import Path
from typing import Any


class PickleCanary:
    """Unpickling this creates the file `canary`: proof that a loader ran code from the file."""

    def __init__(self, canary: Path) -> None:
        self.canary = canary

    def __reduce__(self) -> tuple[Any, ...]:
        return builtins.open, (str(self.canary), "w")


def png_claiming(width: int, height: int) -> bytes:
    """A valid PNG header for a huge image, with almost no pixel data behind it."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def zip_bomb(legit: dict[str, bytes], bomb_name: str, unpacked_bytes: int) -> bytes:
    """A zip holding `legit` and one member of `unpacked_bytes` zeros, written in chunks (no big buffer here)."""
    buffer = io.BytesIO()
    chunk = bytes(1 << 20)
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in legit.items():
            archive.writestr(name, data)
        with archive.open(bomb_name, "w", force_zip64=True) as member:
            for _ in range(unpacked_bytes // len(chunk)):
                member.write(chunk)
    return buffer.getvalue()
