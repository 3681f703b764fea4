"""Client-visible file names: never trusted as paths, only kept as labels after cleaning."""

from __future__ import annotations

import re
import unicodedata
from pathlib import PurePosixPath, PureWindowsPath

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
MAX_NAME = 200


def safe_filename(name: str | None, fallback: str) -> str:
    """The last path component in plain ASCII letters, digits, '.', '_' and '-', or `fallback`."""
    if not name:
        return fallback
    # Browsers on Windows may send a full path; keep only what follows the last separator of either kind.
    base = PureWindowsPath(PurePosixPath(name).name).name
    ascii_only = unicodedata.normalize("NFKD", base).encode("ascii", "ignore").decode()
    cleaned = _UNSAFE.sub("_", ascii_only).strip("._")[:MAX_NAME]
    return cleaned or fallback


def stem(filename: str) -> str:
    """'resnet.safetensors' -> 'resnet', 'data.tar.gz' -> 'data'."""
    return filename.split(".", 1)[0] or filename
