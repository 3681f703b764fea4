"""Request helpers for the API tests."""

from __future__ import annotations

import io
import json
import secrets
import zipfile
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy import func, select

from core.db.models import Base
from core.db.session import session_scope


def upload_model(client: TestClient, headers: dict[str, str], path: Path, spec: dict[str, Any] | str,
                 **fields: str) -> httpx.Response:
    data = {"spec": spec if isinstance(spec, str) else json.dumps(spec), **fields}
    with open(path, "rb") as handle:
        return client.post("/v1/models", headers=headers, data=data, files={"file": (path.name, handle)})


def upload_dataset(client: TestClient, headers: dict[str, str], content: bytes, filename: str,
                   **fields: str) -> httpx.Response:
    return client.post("/v1/datasets", headers=headers, data=fields, files={"file": (filename, content)})


def multipart_body(fields: dict[str, str], file_content: bytes | None, filename: str = "upload.bin",
                   closing: bool = True) -> tuple[str, bytes]:
    """(Content-Type, body) built by hand, for bodies httpx would not send (chunked, truncated)."""
    boundary = secrets.token_hex(8)
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
        for name, value in fields.items()
    ]
    if file_content is not None:
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{filename}"\r\n'
                     f"Content-Type: application/octet-stream\r\n\r\n".encode() + file_content + b"\r\n")
    if closing:
        parts.append(f"--{boundary}--\r\n".encode())
    return f"multipart/form-data; boundary={boundary}", b"".join(parts)


def npz_dataset(num_classes: int = 10, per_class: int = 4, shape: tuple[int, ...] = (8, 8), seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(num_classes), per_class)
    images = rng.integers(0, 256, size=(len(labels), *shape), dtype=np.uint8)
    buffer = io.BytesIO()
    np.savez(buffer, x=images, y=labels)
    return buffer.getvalue()


def png(size: int = 8, value: int = 128) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (size, size), color=value).save(buffer, format="PNG")
    return buffer.getvalue()


def zip_archive(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def count_rows(model: type[Base], tenant: str) -> int:
    with session_scope() as session:
        return session.scalar(select(func.count()).select_from(model).where(model.tenant == tenant)) or 0


def files_in(folder: Path) -> list[Path]:
    return sorted(path for path in folder.rglob("*") if path.is_file()) if folder.exists() else []
