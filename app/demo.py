"""`condenser demo`: the whole service, end to end, as a new user would drive it.

Trains a teacher on the built-in digits (or reuses the one it saved), starts the embedded server
(unless --url is given), uploads the teacher over HTTP, distills, downloads the student, checks its
sha256, loads it with plain torch + safetensors and measures it on the held-out split.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.table import Table

from app.client import Client
from app.client_cli.jobs import follow_with_bar
from core.settings import get_settings

# Far above the ~1 minute the demo's job takes on 2 cores: a stuck job fails the demo instead of hanging it.
DEMO_TIMEOUT_SECONDS = 1800


def run_demo(json_output: bool, url: str | None, api_key: str | None) -> int:
    console = Console(stderr=True)
    demo_dir = get_settings().data_dir.resolve() / "demo"
    teacher_path, teacher_spec = _teacher(demo_dir, console)
    with _server(url, api_key, console) as (base_url, key), Client(base_url, key) as client:
        model = client.upload_model(teacher_path, teacher_spec, name="digits-teacher")
        console.print(f"uploaded teacher {model['id']} ({model['param_count']:,} parameters)")
        job = client.submit(_job_spec(model["id"]))
        console.print(f"submitted {job['id']}")
        job = follow_with_bar(client, job["id"], DEMO_TIMEOUT_SECONDS)
        if job["status"] != "succeeded":
            console.print(f"[red]job {job['status']}: {job.get('error')}[/red]")
            return 1
        result = _download_and_check(client, job, demo_dir / "downloads" / job["id"], console)
    _report(result, json_output, console)
    return 0


def _job_spec(teacher_id: str) -> dict[str, Any]:
    from worker.engine.recipes import DIGITS_DISTILLATION, DIGITS_SEED, DIGITS_STUDENT, DIGITS_VAL_FRACTION

    return {"kind": "distill", "teacher": teacher_id, "dataset": "digits", "seed": DIGITS_SEED,
            "val_fraction": DIGITS_VAL_FRACTION, "student": DIGITS_STUDENT.model_dump(),
            "distill": DIGITS_DISTILLATION.model_dump()}


def _teacher(demo_dir: Path, console: Console) -> tuple[Path, dict[str, Any]]:
    """Train the demo teacher once and keep it; a second demo reuses it."""
    from core.threads import host_cpus
    from worker.engine import export
    from worker.engine.recipes import DIGITS_TEACHER, train_digits_teacher

    weights = demo_dir / "teacher.safetensors"
    spec = DIGITS_TEACHER.model_dump(mode="json")
    if weights.exists():
        console.print(f"reusing the teacher in {weights}")
        return weights, spec
    console.print(f"training a {DIGITS_TEACHER.arch} teacher on digits (once; it is kept in {demo_dir})")
    import torch

    # PyTorch counts the machine's cores; in a container given a few of them that oversubscribes.
    torch.set_num_threads(min(torch.get_num_threads(), host_cpus()))
    teacher, accuracy = train_digits_teacher()
    demo_dir.mkdir(parents=True, exist_ok=True)
    export.save_safetensors(teacher, weights)
    console.print(f"teacher trained: held-out accuracy {accuracy:.4f}")
    return weights, spec


@contextmanager
def _server(url: str | None, api_key: str | None, console: Console) -> Iterator[tuple[str, str]]:
    if url:
        if not api_key:
            raise SystemExit("--url needs --api-key (or CONDENSER_API_KEY)")
        yield url, api_key
        return
    from app.auth.service import create_key
    from core.db.migrate import upgrade_to_head
    from core.db.session import session_scope

    upgrade_to_head(get_settings().database_url)
    with session_scope() as session:
        _, key = create_key(session, "demo")
    port = _free_port()
    log_path = get_settings().data_dir.resolve() / "demo" / "server.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    # The server's and worker's logs go to a file: the demo's own output stays readable (and its
    # --json line stays last), and no server process holds the caller's pipes open.
    with open(log_path, "ab") as log:
        process = subprocess.Popen([sys.executable, "-m", "app.cli", "serve", f"--port={port}"],
                                   env=os.environ.copy(), stdout=log, stderr=subprocess.STDOUT)
    base_url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(base_url, process)
        console.print(f"embedded server up at {base_url} (SQLite + filesystem broker + a Celery worker; "
                      f"log: {log_path})")
        yield base_url, key
    finally:
        process.terminate()
        try:
            process.wait(timeout=90)
        except subprocess.TimeoutExpired:
            process.kill()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_healthy(base_url: str, process: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server exited with code {process.returncode}")
        try:
            if httpx.get(f"{base_url}/healthz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"the server did not answer on {base_url} within {timeout} s")


def _download_and_check(client: Client, job: dict[str, Any], folder: Path, console: Console) -> dict[str, Any]:
    """Download every artifact, verify its sha256, load the student without condenser and test it."""
    import torch
    from safetensors.torch import load_file

    from worker.engine.data import load_builtin, stratified_split, to_model_input
    from worker.engine.recipes import DIGITS_SEED, DIGITS_TEACHER, DIGITS_VAL_FRACTION

    folder.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    hashes: dict[str, str] = {}
    for artifact in job["artifacts"]:
        path = folder / artifact["filename"]
        # download() checks the file's sha256 against the artifact record (IntegrityError otherwise).
        hashes[artifact["kind"]] = client.download(artifact["id"], path).sha256
        paths[artifact["kind"]] = path
    # The ExportedProgram, as anyone loads it with plain PyTorch on its maintained path (TorchScript is deprecated).
    program = torch.export.load(str(paths["student_pt2"]))
    weights = load_file(paths["student_safetensors"])
    if set(weights) != set(program.state_dict) or any(not torch.equal(weights[name], program.state_dict[name])
                                                       for name in weights):
        raise SystemExit("the safetensors weights differ from the exported (.pt2) student")
    digits = load_builtin("digits")
    _, val_idx = stratified_split(digits.y, DIGITS_VAL_FRACTION, DIGITS_SEED)
    x_val = to_model_input(digits.x[val_idx], DIGITS_TEACHER.input)
    with torch.inference_mode():
        predictions = program.module()(x_val).argmax(1).numpy()
    downloaded_accuracy = float((predictions == digits.y[val_idx]).mean())
    console.print(f"downloaded {len(paths)} artifacts to {folder}; sha256 verified")
    metrics = job["metrics"]
    return {
        "job_id": job["id"],
        "teacher_accuracy": metrics["teacher"]["accuracy"],
        "student_accuracy": metrics["student"]["accuracy"],
        "downloaded_student_accuracy": downloaded_accuracy,
        "agreement_with_teacher": metrics["student"]["agreement_with_teacher"],
        "teacher_params": metrics["teacher"]["param_count"],
        "student_params": metrics["student"]["param_count"],
        "teacher_bytes": metrics["teacher"]["file_bytes"],
        "student_bytes": metrics["student"]["file_bytes"],
        "teacher_latency_ms": metrics["teacher"]["cpu_latency_ms_batch1"],
        "student_latency_ms": metrics["student"]["cpu_latency_ms_batch1"],
        "validation_samples": metrics["validation_samples"],
        "artifact_sha256": hashes["student_safetensors"],
        "artifact_path": str(paths["student_safetensors"]),
        "torchscript_sha256": hashes["student_torchscript"],
        "pt2_sha256": hashes["student_pt2"],
    }


def _report(result: dict[str, Any], json_output: bool, console: Console) -> None:
    table = Table(title=f"condenser demo: {result['job_id']} (held-out digits, n={result['validation_samples']})")
    for column in ("", "teacher", "student"):
        table.add_column(column, justify="right")
    table.add_row("top-1 accuracy", f"{result['teacher_accuracy']:.4f}", f"{result['student_accuracy']:.4f}")
    table.add_row("parameters", f"{result['teacher_params']:,}", f"{result['student_params']:,}")
    table.add_row("file size", _size(result["teacher_bytes"]), _size(result["student_bytes"]))
    table.add_row("CPU latency, batch 1", f"{result['teacher_latency_ms']:.2f} ms",
                  f"{result['student_latency_ms']:.2f} ms")
    Console().print(table)
    print(f"downloaded student (.pt2, torch.export.load) accuracy: {result['downloaded_student_accuracy']:.4f}; "
          f"agreement with teacher {result['agreement_with_teacher']:.4f}")
    print(f"artifact sha256 {result['artifact_sha256']}  {result['artifact_path']}")
    if json_output:
        print(json.dumps(result))


def _size(num_bytes: int) -> str:
    return f"{num_bytes / 1024:.1f} KiB" if num_bytes < 1 << 20 else f"{num_bytes / (1 << 20):.2f} MiB"
