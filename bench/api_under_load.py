"""The API's own speed under load (issue 13): one JSON line per measurement.

- `get_job_alone`: GET /v1/jobs/{id} with a Bearer key, 16 keep-alive connections, against `condenser serve`
  (embedded SQLite, its own process); `get_bare`: the same row read, from the same SQLite file, by a bare FastAPI +
  SQLAlchemy app started here (a sync route, an ORM session per request, no key); `ratio_vs_bare` = ours / bare
  in requests per second.
- `get_job_with_streams`: the same GET while 1,000 SSE streams (10 tenants, 100 each) are open.
- `get_job_with_uploads`: the same GET while another tenant keeps 20 uploads in flight.
- `model_upload`: POST /v1/models of a resnet152 safetensors (random weights, ~241 MB) until 201, vs the same
  bytes streamed by a bare Starlette route (sha256 + fsync): bench/upload_speed.py's measurement, whose
  `ratio` (the steady state, after the first upload that starts the validator's forkserver) is `ratio_vs_bare`.

The load generator is raw asyncio sockets in this process, sharing the machine's cores with the servers: on a
2-core machine the figures include its cost. Run from the repository root: .venv/bin/python bench/api_under_load.py
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

CONNECTIONS = 16
STREAMS = 1000
STREAM_TENANTS = 10
UPLOADS = 20
UPLOAD_BODY_BYTES = 64 << 20

# The reference the issue names: a bare FastAPI + SQLAlchemy + SQLite app reading one row, written as such an app
# usually is (a sync route, an ORM session per request), on the same database file (WAL) as the service.
BARE_READ_APP = textwrap.dedent('''
    import os
    from typing import Any
    from fastapi import FastAPI, HTTPException
    from sqlalchemy import JSON, String, create_engine
    from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

    engine = create_engine(os.environ["BARE_DB"], connect_args={"check_same_thread": False})
    Session = sessionmaker(engine)

    class Base(DeclarativeBase):
        pass

    class Job(Base):
        __tablename__ = "jobs"
        id: Mapped[str] = mapped_column(String(40), primary_key=True)
        status: Mapped[str] = mapped_column(String(16))
        progress: Mapped[dict[str, Any]] = mapped_column(JSON)

    app = FastAPI()

    @app.get("/v1/jobs/{job_id}")
    def get_job(job_id: str) -> dict[str, Any]:
        with Session() as session:
            job = session.get(Job, job_id)
            if job is None:
                raise HTTPException(404)
            return {"id": job.id, "status": job.status, "progress": job.progress}
''')

def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def server(command: list[str], env: dict[str, str], port: int) -> Iterator[None]:
    process = subprocess.Popen(command, env={**os.environ, **env}, cwd=REPO)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise RuntimeError(f"server {command} did not start") from None
                time.sleep(0.2)
        yield
    finally:
        process.terminate()
        process.wait(timeout=30)


# --- raw HTTP/1.1 over asyncio sockets: cheap enough to leave the cores to the servers ------------------------

async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    return status, await reader.readexactly(length)


async def get_loop(port: int, path: str, headers: str, until: float, latencies: list[float],
                   errors: list[int]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    request = f"GET {path} HTTP/1.1\r\nHost: bench\r\n{headers}\r\n".encode()
    while time.monotonic() < until:
        started = time.perf_counter()
        writer.write(request)
        status, _ = await read_response(reader)
        latencies.append(time.perf_counter() - started)
        if status != 200:
            errors.append(status)
    writer.close()


async def measure_get(port: int, path: str, headers: str, seconds: float) -> dict[str, Any]:
    latencies: list[float] = []
    errors: list[int] = []
    until = time.monotonic() + seconds
    started = time.monotonic()
    await asyncio.gather(*(get_loop(port, path, headers, until, latencies, errors) for _ in range(CONNECTIONS)))
    elapsed = time.monotonic() - started
    cuts = statistics.quantiles(latencies, n=100)
    return {"requests": len(latencies), "req_per_s": len(latencies) / elapsed, "p50_ms": 1000 * cuts[49],
            "p99_ms": 1000 * cuts[98], "non_200": len(errors), "connections": CONNECTIONS, "seconds": seconds}


async def open_stream(port: int, path: str, headers: str) -> asyncio.StreamWriter:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: bench\r\nAccept: text/event-stream\r\n{headers}\r\n".encode())
    head = await reader.readuntil(b"\r\n\r\n")
    if b" 200 " not in head.split(b"\r\n", 1)[0]:
        raise RuntimeError(f"stream refused: {head[:200]!r}")
    asyncio.get_running_loop().create_task(drain(reader))
    return writer


async def drain(reader: asyncio.StreamReader) -> None:
    while await reader.read(65536):
        pass


async def upload_loop(port: int, headers: str, until: float, counts: list[int]) -> None:
    """Uploads one after another on one connection: a body that the server reads whole, then refuses (422:
    no spec) without starting a validation, so that what loads the API is the receiving."""
    boundary = secrets.token_hex(8)
    head = (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="x.bin"\r\n'
            f"Content-Type: application/octet-stream\r\n\r\n").encode()
    tail = f"\r\n--{boundary}--\r\n".encode()
    chunk = os.urandom(1 << 20)
    length = len(head) + UPLOAD_BODY_BYTES + len(tail)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    while time.monotonic() < until:
        writer.write(f"POST /v1/models HTTP/1.1\r\nHost: bench\r\n{headers}Content-Type: multipart/form-data; "
                     f"boundary={boundary}\r\nContent-Length: {length}\r\n\r\n".encode() + head)
        for _ in range(UPLOAD_BODY_BYTES // len(chunk)):
            writer.write(chunk)
            await writer.drain()
        writer.write(tail)
        status, _ = await read_response(reader)
        counts.append(status)
    writer.close()


# --- the service's data: keys, a model row, jobs --------------------------------------------------------------

def seed(env: dict[str, str]) -> dict[str, Any]:
    os.environ.update(env)
    from app.auth.service import create_key
    from core.db.migrate import upgrade_to_head
    from core.db.models import Job, Model
    from core.db.session import session_scope
    from core.lifecycle import record_event
    from core.settings import get_settings

    upgrade_to_head(get_settings().database_url)

    def tenant_with_job(tenant: str) -> tuple[str, str]:
        with session_scope() as session:
            _, key = create_key(session, tenant)
            model = Model(tenant=tenant, name="m", format="safetensors", sha256="0" * 64, bytes=0,
                          arch={"arch": "small_cnn", "kwargs": {"num_classes": 10}},
                          input_spec={"image_size": 8, "channels": 1, "mean": [0.5], "std": [0.5]},
                          num_classes=10, param_count=1)
            session.add(model)
            session.flush()
            job = Job(tenant=tenant, kind="distill", spec={"dataset": "digits"}, teacher_id=model.id,
                      status="queued", max_attempts=3)
            session.add(job)
            session.flush()
            for index in range(20):  # a job with some history, as GET shows it
                record_event(session, job, "progress", "worker", f"epoch {index} done", {"epoch": index})
            return key, job.id

    reader_key, reader_job = tenant_with_job("reader")
    streams = [tenant_with_job(f"follower-{index}") for index in range(STREAM_TENANTS)]
    uploader_key, _ = tenant_with_job("uploader")
    return {"reader": (reader_key, reader_job), "streams": streams, "uploader": uploader_key}


def bearer(key: str) -> str:
    return f"Authorization: Bearer {key}\r\n"


async def service_gets(port: int, data: dict[str, Any], seconds: float) -> list[dict[str, Any]]:
    key, job_id = data["reader"]
    path, headers = f"/v1/jobs/{job_id}", bearer(key)
    results = [{"name": "get_job_alone", **await measure_get(port, path, headers, seconds)}]

    writers = []
    for follower_key, follower_job in data["streams"]:
        for _ in range(STREAMS // STREAM_TENANTS):
            writers.append(await open_stream(port, f"/v1/jobs/{follower_job}/events", bearer(follower_key)))
    await asyncio.sleep(2)
    results.append({"name": "get_job_with_streams", "open_streams": len(writers),
                    **await measure_get(port, path, headers, seconds)})
    for writer in writers:
        writer.close()
    await asyncio.sleep(2)

    statuses: list[int] = []
    until = time.monotonic() + seconds + 3
    uploads = [asyncio.create_task(upload_loop(port, bearer(data["uploader"]), until, statuses))
               for _ in range(UPLOADS)]
    await asyncio.sleep(2)
    measured = await measure_get(port, path, headers, seconds)
    await asyncio.gather(*uploads)
    results.append({"name": "get_job_with_uploads", "uploads_in_flight": UPLOADS,
                    "upload_statuses": sorted(set(statuses)), **measured})
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=10.0, help="Length of each GET measurement.")
    parser.add_argument("--skip-upload", action="store_true", help="Leave out the large model upload.")
    args = parser.parse_args()
    # Other work on a shared machine takes cores from the servers: each line says how busy it was before the run.
    load_before = round(os.getloadavg()[0], 2)
    with tempfile.TemporaryDirectory(prefix="api-under-load-") as folder:  # the resnet152 file alone is 241 MB
        results = measure(Path(folder), args.seconds, args.skip_upload)
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown")
    for result in results:
        print(json.dumps({"cpu": cpu, "cores": os.cpu_count(), "load_1m_before": load_before,
                          **{key: round(value, 3) if isinstance(value, float) else value
                             for key, value in result.items()}}))


def measure(work: Path, seconds: float, skip_upload: bool) -> list[dict[str, Any]]:
    env = {"CONDENSER_DATA_DIR": str(work / "data"), "CONDENSER_DATABASE_URL": "", "CONDENSER_BROKER_URL": "",
           "CONDENSER_LOG_LEVEL": "WARNING", "CONDENSER_MAX_UPLOADS_IN_FLIGHT": str(UPLOADS + 2),
           "CONDENSER_MAX_UPLOADS_IN_FLIGHT_PER_TENANT": str(UPLOADS + 1), "PYTHONPATH": str(REPO)}
    data = seed(env)
    port = free_port()
    serve = [sys.executable, "-c", "from app.cli import main; main()", "serve", "--concurrency", "0",
             "--port", str(port)]
    results: list[dict[str, Any]] = []
    with server(serve, env, port):
        results += asyncio.run(service_gets(port, data, seconds))

    bare_port = free_port()
    (work / "bare_read.py").write_text(BARE_READ_APP)
    bare_env = {"BARE_DB": f"sqlite:///{work / 'data' / 'condenser.db'}", "BARE_DIR": str(work),
                "PYTHONPATH": str(work)}
    uvicorn = [sys.executable, "-m", "uvicorn", "--port", str(bare_port), "--log-level", "warning"]
    with server([*uvicorn, "bare_read:app"], bare_env, bare_port):
        bare = asyncio.run(measure_get(bare_port, f"/v1/jobs/{data['reader'][1]}", "", seconds))
    results.append({"name": "get_bare", **bare})
    for result in results:
        if result["name"].startswith("get_job"):
            result["ratio_vs_bare"] = result["req_per_s"] / bare["req_per_s"]
    if not skip_upload:
        # Its own process, server and data directory: the upload is measured on an idle service.
        measured = subprocess.run([sys.executable, str(REPO / "bench" / "upload_speed.py")], cwd=REPO,
                                  capture_output=True, text=True, check=True)
        upload = json.loads(measured.stdout.strip().splitlines()[-1])
        results.append({"name": "model_upload", **upload, "ratio_vs_bare": upload["ratio"]})
    return results


if __name__ == "__main__":
    main()
