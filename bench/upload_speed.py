"""POST /v1/models of a large safetensors file until 201, against the same bytes streamed to disk by a bare
Starlette route (running sha256 + fsync), both under uvicorn on this machine, in one run (issue 13).

    .venv/bin/python bench/upload_speed.py [--arch resnet152] [--rounds 3]

prints one JSON line: ours_mb_s (the median of the rounds after the first), ours_first_mb_s (the first upload,
which also starts the validator's forkserver: torch imported once per API process), bare_mb_s, ratio (median
vs bare), and the file's size. Reusable: `measure_upload_speed()` returns the same dict.
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script from a fresh clone, without installing the package
    sys.path.insert(0, str(REPO))

from starlette.applications import Starlette  # noqa: E402
from starlette.requests import Request  # noqa: E402
from starlette.responses import JSONResponse  # noqa: E402
from starlette.routing import Route  # noqa: E402

MB = 1e6


async def _bare_upload(request: Request) -> JSONResponse:
    """The reference: the body to disk with a running sha256 and an fsync, nothing else."""
    digest = hashlib.sha256()
    size = 0
    with tempfile.NamedTemporaryFile(dir=os.environ["BARE_UPLOAD_DIR"]) as out:
        async for chunk in request.stream():
            digest.update(chunk)
            out.write(chunk)
            size += len(chunk)
        out.flush()
        os.fsync(out.fileno())
    return JSONResponse({"sha256": digest.hexdigest(), "bytes": size}, status_code=201)


bare_app = Starlette(routes=[Route("/upload", _bare_upload, methods=["POST"])])


def make_weights(arch: str, path: Path) -> dict[str, Any]:
    """`arch` (1000 classes) with random weights, saved as safetensors; returns its spec."""
    import safetensors.torch
    import torch

    from worker.engine.budget import build_on_meta
    from worker.engine.config import ArchSpec

    spec = ArchSpec(arch=arch, kwargs={"num_classes": 1000}, input={"image_size": 224, "channels": 3})
    model = build_on_meta(spec).to_empty(device="cpu")
    with torch.no_grad():
        state = {name: (tensor.normal_(0, 0.02) if tensor.is_floating_point() else tensor.zero_()).contiguous()
                 for name, tensor in model.state_dict().items()}
    safetensors.torch.save_file(state, path)
    return spec.model_dump(mode="json")


def _timed_post(url: str, path: Path, headers: dict[str, str], data: dict[str, str] | None = None) -> float:
    import httpx

    with open(path, "rb") as handle:
        started = time.perf_counter()
        response = httpx.post(url, headers=headers, data=data, files={"file": (path.name, handle)}, timeout=600)
        elapsed = time.perf_counter() - started
    if response.status_code != 201:
        raise RuntimeError(f"{url}: {response.status_code} {response.text[:500]}")
    return elapsed


def _bare_server(folder: Path, port: int) -> subprocess.Popen[bytes]:
    env = {**os.environ, "BARE_UPLOAD_DIR": str(folder), "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "uvicorn", "bench.upload_speed:bare_app", "--port", str(port),
                             "--log-level", "warning"], cwd=REPO, env=env)


def measure_upload_speed(arch: str = "resnet152", rounds: int = 3) -> dict[str, Any]:
    from app.auth.service import create_key
    from core.db.migrate import upgrade_to_head
    from core.db.session import session_scope
    from tests.support import ApiServerProcess, free_port, wait_for

    with tempfile.TemporaryDirectory(prefix="upload-speed-") as scratch:
        folder = Path(scratch)
        weights = folder / f"{arch}.safetensors"
        spec = make_weights(arch, weights)
        env = {"CONDENSER_DATA_DIR": str(folder / "data"), "CONDENSER_MAX_UPLOAD_BYTES": str(4 << 30)}
        os.environ.update(env)
        from core.settings import get_settings

        upgrade_to_head(get_settings().database_url)
        with session_scope() as session:
            key = create_key(session, "bench")[1]
        server = ApiServerProcess({**os.environ, "PYTHONPATH": str(REPO)}, folder / "api.log").start()
        bare_port = free_port()
        bare = _bare_server(folder, bare_port)
        try:
            wait_for(lambda: _answers(f"http://127.0.0.1:{bare_port}/upload"), 60, what="the bare server")
            headers = {"Authorization": f"Bearer {key}"}
            ours = [_timed_post(f"{server.url}/v1/models", weights, headers, {"spec": json.dumps(spec)})
                    for _ in range(rounds)]
            bare_times = [_timed_post(f"http://127.0.0.1:{bare_port}/upload", weights, {}) for _ in range(rounds)]
        finally:
            bare.terminate()
            bare.wait(timeout=30)
            server.stop()
        size_mb = weights.stat().st_size / MB
    return _summary(ours, bare_times, size_mb)


def _answers(url: str) -> bool:
    import httpx

    try:
        return httpx.get(url, timeout=2).status_code == 405
    except httpx.TransportError:
        return False


def _summary(ours: list[float], bare: list[float], size_mb: float) -> dict[str, Any]:
    # The first upload also starts the validator's forkserver; the rounds after it are the steady state.
    ours_mb_s = size_mb / statistics.median(ours[1:] or ours)
    bare_mb_s = size_mb / statistics.median(bare)
    return {"bench": "model_upload", "file_mb": round(size_mb, 1), "ours_mb_s": round(ours_mb_s, 1),
            "ours_first_mb_s": round(size_mb / ours[0], 1), "bare_mb_s": round(bare_mb_s, 1),
            "ratio": round(ours_mb_s / bare_mb_s, 3), "ours_seconds": [round(t, 2) for t in ours],
            "bare_seconds": [round(t, 2) for t in bare]}


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--arch", default="resnet152")
    parser.add_argument("--rounds", type=int, default=3)
    arguments = parser.parse_args()
    print(json.dumps(measure_upload_speed(arguments.arch, arguments.rounds)))
