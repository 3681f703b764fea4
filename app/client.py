"""A Python client for the condenser API. Needs only httpx: no torch, no server code.

    from app.client import Client

    with Client("http://127.0.0.1:8000", "cnd_...") as client:
        model = client.upload_model(Path("teacher.safetensors"), spec={...})
        job = client.submit({"teacher": model["id"], "dataset": "digits", "student": {"arch": "small_cnn"}})
        job = client.wait(job["id"], on_progress=lambda snap: print(snap["progress"]))
        for artifact in job["artifacts"]:
            client.download(artifact["id"], Path("."))
        pipeline = client.submit_pipeline({"model": model["id"], "dataset": "digits", "stages": [...]})
        pipeline = client.wait_pipeline(pipeline["id"], on_progress=lambda p: print(p["current_stages"]))
        print(client.pipeline_report(pipeline["id"], markdown=True))

Every failure is a ClientError: ApiError (the server answered 4xx/5xx; `detail` says why), Unreachable (no
answer), IntegrityError (a download whose sha256 is not the server's).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

# Standard library only underneath (no torch, no server stack): the client stays light.
from core.storage import sha256_file

TERMINAL = ("succeeded", "failed", "canceled")
CHUNK_BYTES = 1 << 20
# Consecutive failed (re)connections of an event stream or a download before giving up.
MAX_RECONNECTS = 5
RECONNECT_SECONDS = 1.0


class ClientError(Exception):
    """Anything that went wrong talking to the server, as one readable sentence."""


class ApiError(ClientError):
    def __init__(self, status: int, detail: str) -> None:
        super().__init__(f"HTTP {status}: {detail}")
        self.status = status
        self.detail = detail


class Unreachable(ClientError):
    """No HTTP answer: wrong URL, server down, network cut."""


class IntegrityError(ClientError):
    """A downloaded file is not the one the server describes."""


@dataclass(frozen=True)
class Event:
    """One Server-Sent Event of a job: `state`, `progress`, `log`, `webhook` (stored, with an id),
    `snapshot` (live progress: {"status", "progress"}) or `end` ({"status"}, the last one)."""

    event: str
    data: dict[str, Any]
    id: int | None = None


@dataclass(frozen=True)
class Downloaded:
    path: Path
    sha256: str
    bytes: int


ProgressCallback = Callable[[dict[str, Any]], None]
BytesCallback = Callable[[int, int], None]
# A pipeline has no event stream: it is polled, soon after a change, then less often while nothing moves.
PIPELINE_POLL_SECONDS = 0.5
PIPELINE_POLL_MAX_SECONDS = 5.0


class Client:
    def __init__(self, base_url: str, api_key: str, timeout: float = 300.0,
                 transport: httpx.BaseTransport | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.http = httpx.Client(base_url=self.base_url, timeout=timeout, transport=transport,
                                 headers={"Authorization": f"Bearer {api_key}"})

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    # ---- requests ------------------------------------------------------------------------------

    def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            return self.http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from exc

    def _unreachable(self, exc: Exception) -> Unreachable:
        return Unreachable(f"cannot reach {self.base_url}: {exc or type(exc).__name__}")

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self._send(method, path, **kwargs)
        _raise_for_status(response)
        return response.json()

    def whoami(self) -> dict[str, Any]:
        """{"tenant", "key_prefix"}: a quick check of the URL and the key."""
        return self._json("GET", "/v1/me")

    def upload_model(self, path: Path, spec: dict[str, Any], name: str | None = None,
                     model_format: str | None = None) -> dict[str, Any]:
        fields = {"spec": json.dumps(spec), **({"name": name} if name else {}),
                  **({"format": model_format} if model_format else {})}
        with open(path, "rb") as handle:
            return self._json("POST", "/v1/models", data=fields, files={"file": (path.name, handle)})

    def upload_dataset(self, path: Path, name: str | None = None) -> dict[str, Any]:
        with open(path, "rb") as handle:
            return self._json("POST", "/v1/datasets", data={"name": name} if name else {},
                              files={"file": (path.name, handle)})

    def submit(self, spec: dict[str, Any], idempotency_key: str | None = None) -> dict[str, Any]:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return self._json("POST", "/v1/jobs", json=spec, headers=headers)

    def get(self, job_id: str) -> dict[str, Any]:
        return self._json("GET", f"/v1/jobs/{job_id}")

    def list(self, status: str | None = None, limit: int = 20, cursor: str | None = None) -> dict[str, Any]:
        """One page of jobs, newest first: {"items", "next_cursor"}; pass next_cursor back for the next."""
        return self.page("jobs", limit, cursor, **({"status": status} if status else {}))

    def page(self, resource: str, limit: int = 20, cursor: str | None = None, **filters: str) -> dict[str, Any]:
        """One page of `jobs`, `models` or `datasets`, newest first."""
        params = {"limit": limit, **filters, **({"cursor": cursor} if cursor else {})}
        return self._json("GET", f"/v1/{resource}", params=params)

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self._json("POST", f"/v1/jobs/{job_id}/cancel")

    def model_lineage(self, model_id: str) -> dict[str, Any]:
        """{"model", "chain", "root"}: the model, the job that made it, that job's input model, ... back to the
        upload (chain: newest first, each {"model", "made_by"})."""
        return self._json("GET", f"/v1/models/{model_id}/lineage")

    def replay_job(self, job_id: str, idempotency_key: str | None = None) -> dict[str, Any]:
        """A new job running the ended job's stored spec on the same inputs (its `replay_of` names the original);
        the server refuses (409) if an input was deleted or changed since."""
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return self._json("POST", f"/v1/jobs/{job_id}/replay", headers=headers)

    def delete_model(self, model_id: str) -> None:
        """Delete a model (409 while a queued or running job uses it; deleting it again is no error)."""
        _raise_for_status(self._send("DELETE", f"/v1/models/{model_id}"))

    def delete_dataset(self, dataset_id: str) -> None:
        """Delete an uploaded dataset (409 while a queued or running job uses it)."""
        _raise_for_status(self._send("DELETE", f"/v1/datasets/{dataset_id}"))

    def artifact(self, artifact_id: str) -> dict[str, Any]:
        return self._json("GET", f"/v1/artifacts/{artifact_id}")

    def job_artifacts(self, job_id: str) -> list[dict[str, Any]]:
        return self._json("GET", f"/v1/jobs/{job_id}/artifacts")

    # ---- events --------------------------------------------------------------------------------

    def history(self, job_id: str, after: int = 0, limit: int = 1000) -> list[dict[str, Any]]:
        """The job's stored events after `after`, oldest first (no waiting)."""
        return self._json("GET", f"/v1/jobs/{job_id}/events", params={"after": after, "limit": limit})

    def events(self, job_id: str, after: int = 0) -> Iterator[Event]:
        """Follow the job live until it ends (the last event is `end`). A dropped connection is resumed
        where it stopped (Last-Event-ID), so no event is lost or repeated."""
        return (event for event in self._stream(job_id, after) if event is not None)

    def _stream(self, job_id: str, after: int) -> Iterator[Event | None]:
        """Events, and None for each keep-alive (so that callers can check their own deadlines)."""
        failures = 0
        while True:
            try:
                for event in self._connect(job_id, after):
                    failures = 0
                    if event is not None and event.id is not None:
                        after = event.id
                    yield event
                    if event is not None and event.event == "end":
                        return
            except httpx.TransportError as exc:
                failures += 1
                if failures > MAX_RECONNECTS:
                    raise self._unreachable(exc) from exc
            time.sleep(RECONNECT_SECONDS)

    def _connect(self, job_id: str, after: int) -> Iterator[Event | None]:
        headers = {"Accept": "text/event-stream", "Last-Event-ID": str(after)}
        with self.http.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers) as response:
            if response.status_code >= 400:
                response.read()
                _raise_for_status(response)
            yield from parse_sse(response.iter_lines())

    def wait(self, job_id: str, on_progress: ProgressCallback | None = None,
             timeout: float | None = None) -> dict[str, Any]:
        """Block until the job ends and return it (with metrics and artifacts). on_progress gets
        {"status", "progress"} whenever either changes (progress: stage, epoch, epochs, step, total_steps,
        eta_seconds, train_loss, val_accuracy)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for event in self._stream(job_id, 0):
            if event is not None and event.event == "snapshot" and on_progress is not None:
                on_progress(event.data)
            if event is not None and event.event == "end":
                break
            if deadline is not None and time.monotonic() > deadline:
                raise ClientError(f"job {job_id} did not finish within {timeout:g} s")
        return self.get(job_id)

    # ---- pipelines -----------------------------------------------------------------------------

    def submit_pipeline(self, document: dict[str, Any], idempotency_key: str | None = None) -> dict[str, Any]:
        """Submit {"model", "dataset", "stages": [{"kind", "after"?, "gate"?, ...job settings}]}; every stage is
        checked at once (a mistake anywhere is an ApiError 422 naming the stage)."""
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return self._json("POST", "/v1/pipelines", json=document, headers=headers)

    def pipeline(self, pipeline_id: str) -> dict[str, Any]:
        """Its status and each stage's: status, job_id, progress, model_id, summary, gate_result."""
        return self._json("GET", f"/v1/pipelines/{pipeline_id}")

    def pipelines(self, status: str | None = None, limit: int = 20, cursor: str | None = None) -> dict[str, Any]:
        """One page of pipelines, newest first: {"items", "next_cursor"}; pass next_cursor back for the next."""
        return self.page("pipelines", limit, cursor, **({"status": status} if status else {}))

    def replay_pipeline(self, pipeline_id: str, idempotency_key: str | None = None) -> dict[str, Any]:
        """A new pipeline running the ended one's stored stages on the same inputs (its `replay_of` names the
        original); the server refuses (409) if an input was deleted or changed since."""
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return self._json("POST", f"/v1/pipelines/{pipeline_id}/replay", headers=headers)

    def cancel_pipeline(self, pipeline_id: str) -> dict[str, Any]:
        return self._json("POST", f"/v1/pipelines/{pipeline_id}/cancel")

    def pipeline_report(self, pipeline_id: str, markdown: bool = False) -> Any:
        """{"pipeline", "rows", "table_markdown", "final_model_lineage"}; with markdown=True, the table alone as
        Markdown text."""
        if not markdown:
            return self._json("GET", f"/v1/pipelines/{pipeline_id}/report")
        response = self._send("GET", f"/v1/pipelines/{pipeline_id}/report", headers={"Accept": "text/markdown"})
        _raise_for_status(response)
        return response.text

    def wait_pipeline(self, pipeline_id: str, on_progress: ProgressCallback | None = None,
                      timeout: float | None = None) -> dict[str, Any]:
        """Block until the pipeline ends and return it. on_progress gets the whole pipeline whenever its status or
        a stage's status, progress or model changes. Polled: soon after a change, up to every
        PIPELINE_POLL_MAX_SECONDS while nothing moves; a few dropped connections in a row are retried."""
        deadline = None if timeout is None else time.monotonic() + timeout
        delay, seen, failures = PIPELINE_POLL_SECONDS, None, 0
        while True:
            try:
                pipeline = self.pipeline(pipeline_id)
                failures = 0
            except Unreachable:
                failures += 1
                if failures > MAX_RECONNECTS:
                    raise
            else:
                state = _pipeline_state(pipeline)
                if state != seen:
                    seen, delay = state, PIPELINE_POLL_SECONDS
                    if on_progress is not None:
                        on_progress(pipeline)
                else:
                    delay = min(delay * 1.5, PIPELINE_POLL_MAX_SECONDS)
                if pipeline["status"] in TERMINAL:
                    return pipeline
            if deadline is not None and time.monotonic() >= deadline:
                raise ClientError(f"pipeline {pipeline_id} did not finish within {timeout:g} s")
            time.sleep(delay if deadline is None else min(delay, max(0.0, deadline - time.monotonic())))

    # ---- downloads -----------------------------------------------------------------------------

    def download(self, artifact_id: str, dest: Path, on_bytes: BytesCallback | None = None) -> Downloaded:
        """Download an artifact to `dest` (a file, or a folder to put it in under its own name).

        The bytes go to `<dest>.part` first; an interrupted download (this call, or an earlier one) resumes
        from there with a Range request, conditional on the file being unchanged (If-Range). The finished
        file's sha256 must equal the server's, or it is deleted and IntegrityError raised."""
        meta = self.artifact(artifact_id)
        path = dest / meta["filename"] if dest.is_dir() else dest
        part = path.with_name(path.name + ".part")
        failures = 0
        while not self._fetch_rest(artifact_id, meta, part, on_bytes):
            failures += 1
            if failures > MAX_RECONNECTS:
                raise Unreachable(f"download of {artifact_id} kept failing; rerun to resume from {part}")
            time.sleep(RECONNECT_SECONDS)
        actual = sha256_file(part)
        if actual != meta["sha256"]:
            part.unlink(missing_ok=True)
            raise IntegrityError(f"downloaded {artifact_id} has sha256 {actual}, the server says {meta['sha256']}")
        part.replace(path)
        return Downloaded(path=path, sha256=actual, bytes=meta["bytes"])

    def _fetch_rest(self, artifact_id: str, meta: dict[str, Any], part: Path, on_bytes: BytesCallback | None) -> bool:
        """Append what `part` lacks. True when it is complete; False when the connection broke (retry)."""
        offset = part.stat().st_size if part.exists() else 0
        if offset > meta["bytes"]:
            offset = 0  # not a prefix of this file: start again
        if offset == meta["bytes"]:
            return True
        headers = {"Range": f"bytes={offset}-", "If-Range": f'"{meta["sha256"]}"'} if offset else {}
        try:
            with self.http.stream("GET", f"/v1/artifacts/{artifact_id}/download", headers=headers) as response:
                if response.status_code >= 400:
                    response.read()
                    _raise_for_status(response)
                # 200 instead of 206: the server sends the whole file (it changed, or ignored the range).
                done = offset if response.status_code == 206 else 0
                with open(part, "ab" if done else "wb") as out:
                    for chunk in response.iter_bytes(CHUNK_BYTES):
                        out.write(chunk)
                        done += len(chunk)
                        if on_bytes is not None:
                            on_bytes(done, meta["bytes"])
        except httpx.TransportError:
            return False
        return part.stat().st_size >= meta["bytes"]


def parse_sse(lines: Iterator[str]) -> Iterator[Event | None]:
    """Server-Sent Events from text lines (the subset the server writes: id, event, one data line)."""
    fields: dict[str, str] = {}
    for line in lines:
        if line.startswith(":"):
            yield None  # keep-alive comment
        elif line:
            name, _, value = line.partition(":")
            fields[name] = value.removeprefix(" ")
        elif "data" in fields:
            event_id = fields.get("id")
            yield Event(event=fields.get("event", "message"), data=json.loads(fields["data"]),
                        id=int(event_id) if event_id and event_id.isdigit() else None)
            fields = {}
        else:
            fields = {}


def _pipeline_state(pipeline: dict[str, Any]) -> Any:
    """What a follower of a pipeline sees change: its status, and each stage's status, progress and model."""
    return pipeline["status"], [(stage["status"], stage.get("progress"), stage.get("model_id"))
                                for stage in pipeline["stages"]]


def _raise_for_status(response: httpx.Response) -> None:
    if response.status_code < 400:
        return
    try:
        body = response.json()
    except ValueError:
        body = None
    detail = body.get("detail") if isinstance(body, dict) else None
    if detail is None:
        detail = response.text.strip()[:500] or response.reason_phrase
    raise ApiError(response.status_code, detail if isinstance(detail, str) else json.dumps(detail))
