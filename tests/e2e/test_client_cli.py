"""The CLI and the Python client as a new user drives them, against a real API server process, a real Celery
worker, PostgreSQL and Redis: login, upload, submit --wait, list, show, logs -f, download (resumed, checked),
replay --wait (its report beside the original's), models delete, cancel; and the one-line errors of bad input and
an unreachable server."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from app.cli import app as cli_app
from app.client import Client, IntegrityError
from app.client_cli.jobs import format_line, progress_fields
from tests.harness import Service
from tests.support import REPO, wait_for

pytestmark = pytest.mark.slow

JOB_YAML = """\
kind: distill
teacher: {teacher}
dataset: digits
student:
  arch: small_cnn
  kwargs: {{width: 8, depth: 2}}
epochs: {epochs}
batch_size: 32
lr: 0.01
seed: 0
"""


@pytest.fixture
def served(service_factory: Any, small_cnn_files: Any) -> tuple[Service, str, str]:
    """(service, base URL of its HTTP API, an uploaded teacher's id); the worker logs JSON."""
    service = service_factory("distributed")
    service.start_worker(OMP_NUM_THREADS="1", CONDENSER_LOG_FORMAT="json")
    return service, service.serve_http(), service.upload_teacher(small_cnn_files.safetensors, small_cnn_files.spec)


def cli(*args: str, env: dict[str, str]) -> Any:
    result = CliRunner(env=env).invoke(cli_app, list(args))
    assert "Traceback" not in result.output + result.stderr, result.output + result.stderr
    return result


def job_file(folder: Path, teacher_id: str, epochs: int) -> Path:
    path = folder / f"job-{epochs}.yaml"
    path.write_text(JOB_YAML.format(teacher=teacher_id, epochs=epochs))
    return path


def test_cli_from_login_to_download(served: tuple[Service, str, str], small_cnn_files: Any, tmp_path: Path) -> None:
    service, url, _ = served
    env = {"CONDENSER_CONFIG": str(tmp_path / "config.toml"), "CONDENSER_URL": "", "CONDENSER_API_KEY": ""}

    login = cli("login", "--url", url, "--api-key", service.api_key, env=env)
    assert login.exit_code == 0 and "logged in" in login.stdout, login.output
    assert stat.S_IMODE((tmp_path / "config.toml").stat().st_mode) == 0o600
    assert service.api_key[:12] in cli("config", "show", env=env).stdout

    spec_path = tmp_path / "spec.json"
    spec_path.write_text(json.dumps(small_cnn_files.spec))
    uploaded = cli("models", "upload", str(small_cnn_files.safetensors), "--spec", str(spec_path), env=env)
    assert uploaded.exit_code == 0, uploaded.output
    teacher_id = uploaded.stdout.strip()
    assert teacher_id.startswith("mdl_") and "small_cnn" in uploaded.stderr

    submitted = cli("jobs", "submit", str(job_file(tmp_path, teacher_id, epochs=2)), "--wait", env=env)
    assert submitted.exit_code == 0, submitted.output + service.worker_logs()
    job_id = submitted.stdout.split()[0]
    assert job_id.startswith("job_") and "succeeded" in submitted.stdout and "student.accuracy" in submitted.stdout
    # Each file's verdict, and which images the accuracies come from.
    assert "format    pt2: accuracy " in submitted.stdout and "agreement " in submitted.stdout
    assert "evaluated accuracies are measured on a held-out split" in submitted.stdout

    assert job_id in cli("jobs", "list", env=env).stdout
    shown = cli("jobs", "show", job_id, "--json", env=env)
    job = json.loads(shown.stdout)
    assert job["status"] == "succeeded"
    logs = cli("jobs", "logs", job_id, env=env).stdout
    followed = cli("jobs", "logs", "-f", job_id, env=env).stdout
    assert "claimed (attempt 1 of" in logs and "epoch 2 done" in logs
    assert followed.splitlines()[-1] == logs.splitlines()[-1]

    downloads = tmp_path / "downloads"
    fetched = cli("artifacts", "download", job_id, "-o", str(downloads), env=env)
    assert fetched.exit_code == 0, fetched.output
    for artifact in job["artifacts"]:
        content = (downloads / artifact["filename"]).read_bytes()
        assert hashlib.sha256(content).hexdigest() == artifact["sha256"]
        assert artifact["sha256"] in fetched.stdout

    # Every worker line is JSON; those written while the job ran carry its id.
    records = [json.loads(line) for line in service.workers[0].log().splitlines() if line.startswith("{")]
    assert any(record.get("job_id") == job_id and "claimed" in record["message"] for record in records), records[-5:]

    replay_then_delete(service, env, job_id, teacher_id, downloads)


def replay_then_delete(service: Service, env: dict[str, str], job_id: str, teacher_id: str, downloads: Path) -> None:
    """The ended job run again on its inputs, its report beside the original's; then its teacher deleted."""
    replayed = cli("jobs", "replay", job_id, "--wait", env=env)
    assert replayed.exit_code == 0, replayed.output + service.worker_logs()
    replay_id = replayed.stdout.split()[0]
    assert replay_id.startswith("job_") and replay_id != job_id and f"replay of {job_id}" in replayed.stdout
    replay = json.loads(cli("jobs", "show", replay_id, "--json", env=env).stdout)
    assert replay["replay_of"] == job_id and replay["spec"] == json.loads(
        cli("jobs", "show", job_id, "--json", env=env).stdout)["spec"]
    card = next(artifact for artifact in replay["artifacts"] if artifact["kind"] == "report_model_card")
    assert cli("artifacts", "download", card["id"], "-o", str(downloads / "replay.md"), env=env).exit_code == 0
    text = (downloads / "replay.md").read_text()
    assert f"## Replay of `{job_id}`: original vs this run" in text and "| Top-1 accuracy (student) |" in text

    deleted = cli("models", "delete", teacher_id, env=env)
    assert deleted.exit_code == 0 and deleted.stdout.strip() == f"deleted {teacher_id}", deleted.output
    assert teacher_id not in cli("models", "list", env=env).stdout
    assert teacher_id in cli("models", "list", "--include-deleted", env=env).stdout
    refused = cli("jobs", "replay", job_id, env=env)
    assert refused.exit_code == 1 and refused.stderr.startswith(f"error: HTTP 409: cannot replay job {job_id}: its "
                                                                f"model {teacher_id} was deleted on ")
    missing = cli("datasets", "delete", "dst_" + "0" * 24, env=env)
    assert missing.exit_code == 1 and "HTTP 404: dataset dst_" in missing.stderr


def test_the_exit_code_says_a_waited_job_did_not_succeed(served: tuple[Service, str, str], tmp_path: Path) -> None:
    service, url, teacher_id = served
    env = {"CONDENSER_URL": url, "CONDENSER_API_KEY": service.api_key, "CONDENSER_CONFIG": str(tmp_path / "none")}
    outcome: dict[str, Any] = {}
    waiting = threading.Thread(target=lambda: outcome.update(result=cli(
        "jobs", "submit", str(job_file(tmp_path, teacher_id, epochs=200)), "--wait", env=env)))
    waiting.start()
    with Client(url, service.api_key) as client:
        job_id = wait_for(lambda: next((job["id"] for job in client.list()["items"] if job["status"] == "running"),
                                       None), timeout=60, what="the job to run")
        client.cancel(job_id)
    waiting.join(timeout=60)
    result = outcome["result"]
    assert result.exit_code == 1, result.output
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: job {job_id} canceled")


def test_python_client_waits_streams_and_resumes_downloads(served: tuple[Service, str, str], tmp_path: Path) -> None:
    service, url, teacher_id = served
    requests: list[httpx.Request] = []
    with Client(url, service.api_key) as client:
        client.http.event_hooks["request"].append(requests.append)
        job = client.submit({"teacher": teacher_id, "dataset": "digits", "epochs": 2, "batch_size": 32, "lr": 0.01,
                             "student": {"arch": "small_cnn", "kwargs": {"width": 8, "depth": 2}}})
        snapshots: list[dict[str, Any]] = []
        done = client.wait(job["id"], on_progress=snapshots.append, timeout=240)
        assert done["status"] == "succeeded", done["error"]
        # A tiny job may finish between two heartbeats: what is certain is the first state, the last, and that
        # the progress the worker reported in between arrived.
        assert snapshots[0]["status"] in ("queued", "running") and snapshots[-1]["status"] == "succeeded"
        assert any(s["progress"]["stage"] for s in snapshots), snapshots

        events = list(client.events(job["id"]))
        assert events[-1].event == "end" and events[-1].data == {"status": "succeeded"}
        stored = [event for event in events if event.id is not None]
        resumed = [event.id for event in client.events(job["id"], after=stored[2].id) if event.id is not None]
        assert resumed == [event.id for event in stored[3:]]

        artifact = next(a for a in done["artifacts"] if a["kind"] == "student_torchscript")
        whole = httpx.get(f"{url}{artifact['download_url']}", headers=service.headers).content
        target = tmp_path / artifact["filename"]
        # An interrupted earlier download left the first half.
        target.with_name(target.name + ".part").write_bytes(whole[: len(whole) // 2])
        requests.clear()
        got = client.download(artifact["id"], tmp_path)
        assert got.path == target and target.read_bytes() == whole and got.sha256 == artifact["sha256"]
        assert not target.with_name(target.name + ".part").exists()
        (ranged,) = [r for r in requests if r.url.path.endswith("/download")]
        assert ranged.headers["Range"] == f"bytes={len(whole) // 2}-"

        # A partial file that is not a prefix of the artifact: the sha256 check catches it, nothing is kept.
        target.unlink()
        target.with_name(target.name + ".part").write_bytes(b"\0" * (len(whole) // 2))
        with pytest.raises(IntegrityError, match="sha256"):
            client.download(artifact["id"], target)
        assert not target.exists() and not target.with_name(target.name + ".part").exists()


def test_errors_are_one_line_without_traceback(tmp_path: Path) -> None:
    env = {**os.environ, "CONDENSER_CONFIG": str(tmp_path / "none.toml"), "CONDENSER_API_KEY": "cnd_x"}
    (tmp_path / "bad.yaml").write_text("kind: [distill\n")
    cases = [
        (["--url", "http://127.0.0.1:1", "jobs", "list"], 1, "error: cannot reach http://127.0.0.1:1"),
        (["jobs", "submit", str(tmp_path / "missing.yaml")], 2, "error: "),
        (["jobs", "submit", str(tmp_path / "bad.yaml")], 2, "is neither valid YAML nor JSON"),
        (["jobs", "show"], 2, "error: Missing argument"),
    ]
    for args, code, expected in cases:
        done = subprocess.run([sys.executable, "-m", "app.cli", *args], env=env, cwd=REPO, capture_output=True,
                              text=True, timeout=60, check=False)
        assert done.returncode == code, (args, done.stderr)
        assert len(done.stderr.strip().splitlines()) == 1 and expected in done.stderr, (args, done.stderr)
    no_key = subprocess.run([sys.executable, "-m", "app.cli", "jobs", "list"], env={**env, "CONDENSER_API_KEY": ""},
                            cwd=REPO, capture_output=True, text=True, timeout=60, check=False)
    assert no_key.returncode == 2 and "condenser login" in no_key.stderr


def test_server_refusals_show_the_servers_detail(served: tuple[Service, str, str], tmp_path: Path) -> None:
    service, url, _ = served
    env = {"CONDENSER_URL": url, "CONDENSER_API_KEY": service.api_key, "CONDENSER_CONFIG": str(tmp_path / "none")}
    missing = cli("jobs", "show", "job_" + "0" * 24, env=env)
    assert missing.exit_code == 1 and missing.stderr.strip() == f"error: HTTP 404: job job_{'0' * 24} not found"
    spec = tmp_path / "job.yaml"
    spec.write_text("teacher: mdl_" + "0" * 24 + "\ndataset: digits\nstudent: {arch: small_cnn}\nepochs: 0\n")
    invalid = cli("jobs", "submit", str(spec), env=env)
    assert invalid.exit_code == 1 and invalid.stderr.startswith("error: HTTP 422: ") and "epochs" in invalid.stderr
    wrong_key = cli("--api-key", "cnd_00000000_" + "x" * 30, "jobs", "list", env=env)
    assert wrong_key.exit_code == 1 and "HTTP 401" in wrong_key.stderr


def test_the_progress_bar_shows_epoch_eta_and_metrics() -> None:
    fields = progress_fields({"status": "running", "progress": {
        "stage": "distill", "epoch": 3, "epochs": 10, "step": 120, "total_steps": 400, "eta_seconds": 75.2,
        "train_loss": 0.4123, "val_accuracy": 0.93}})
    assert fields == {"description": "running distill epoch 3/10", "completed": 120, "total": 400, "eta": "ETA 1:15",
                      "metrics": "loss 0.4123  val acc 0.9300"}
    assert progress_fields({"status": "queued", "progress": {}})["description"] == "queued"
    exporting = {"stage": "exporting", "epoch": 10, "epochs": 10, "stage_step": 2, "stage_steps": 3}
    assert progress_fields({"status": "running", "progress": exporting})["description"] == "running exporting 2/3"
    assert progress_fields({"status": "succeeded", "progress": exporting})["description"] == "succeeded"


def test_a_files_verdict_reads_as_one_line() -> None:
    rejected = {"format": "onnx", "accuracy": 0.43, "agreement": 0.44, "agreement_with": "float input model",
                "drop_pts": 54.0, "source_drop_pts": 54.0, "passed": False, "reasons": ["scores 43.00%, ..."]}
    assert format_line(rejected) == ("onnx: accuracy 43.00%, agreement 44.00% with the float input model, -54.00 pts "
                                     "vs the input model, REJECTED: scores 43.00%, ...")
    legacy = {"format": "onnx", "accuracy": 0.97, "source_drop_pts": 0.2, "passed": True}
    assert format_line(legacy) == "onnx: accuracy 97.00%, -0.20 pts vs its float source, passed"
