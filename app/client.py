"""A small Python client for the condenser API. Needs only httpx (no torch, no server code)."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

TERMINAL = ("succeeded", "failed", "canceled")


class ApiError(Exception):
    def __init__(self, status: int, detail: str) -> None:
        super().__init__(f"HTTP {status}: {detail}")
        self.status = status
        self.detail = detail


class Client:
    def __init__(self, base_url: str, api_key: str, timeout: float = 300.0) -> None:
        self.http = httpx.Client(base_url=base_url.rstrip("/"), timeout=timeout,
                                 headers={"Authorization": f"Bearer {api_key}"})

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.http.close()

    def _json(self, response: httpx.Response) -> Any:
        if response.status_code >= 400:
            try:
                detail = response.json().get("detail", response.text)
            except ValueError:
                detail = response.text
            raise ApiError(response.status_code, detail if isinstance(detail, str) else json.dumps(detail))
        return response.json()

    def upload_model(self, path: Path, spec: dict[str, Any], name: str | None = None,
                     model_format: str | None = None) -> dict[str, Any]:
        fields = {"spec": json.dumps(spec), **({"name": name} if name else {}),
                  **({"format": model_format} if model_format else {})}
        with open(path, "rb") as handle:
            return self._json(self.http.post("/v1/models", data=fields, files={"file": (path.name, handle)}))

    def upload_dataset(self, path: Path, name: str | None = None) -> dict[str, Any]:
        with open(path, "rb") as handle:
            return self._json(self.http.post("/v1/datasets", data={"name": name} if name else {},
                                             files={"file": (path.name, handle)}))

    def submit(self, spec: dict[str, Any], idempotency_key: str | None = None) -> dict[str, Any]:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return self._json(self.http.post("/v1/jobs", json=spec, headers=headers))

    def get(self, job_id: str) -> dict[str, Any]:
        return self._json(self.http.get(f"/v1/jobs/{job_id}"))

    def list(self, **params: Any) -> dict[str, Any]:
        return self._json(self.http.get("/v1/jobs", params=params))

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self._json(self.http.post(f"/v1/jobs/{job_id}/cancel"))

    def wait(self, job_id: str, on_progress: Callable[[dict[str, Any]], None] | None = None,
             poll_seconds: float = 0.5, timeout: float | None = None) -> dict[str, Any]:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = self.get(job_id)
            if on_progress:
                on_progress(job)
            if job["status"] in TERMINAL:
                return job
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job['status']} after {timeout} s")
            time.sleep(poll_seconds)

    def download(self, artifact_id: str, dest: Path) -> str:
        """Stream an artifact to dest and check it against the server's sha256. Returns the sha256."""
        digest = hashlib.sha256()
        with self.http.stream("GET", f"/v1/artifacts/{artifact_id}/download") as response:
            if response.status_code >= 400:
                response.read()
                self._json(response)
            expected = response.headers.get("x-content-sha256", "")
            with open(dest, "wb") as out:
                for chunk in response.iter_bytes(1 << 20):
                    digest.update(chunk)
                    out.write(chunk)
        actual = digest.hexdigest()
        if expected and actual != expected:
            dest.unlink(missing_ok=True)
            raise ApiError(502, f"downloaded {artifact_id} has sha256 {actual}, server said {expected}")
        return actual
