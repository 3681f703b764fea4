"""`condenser pipelines` and the Python client's pipeline calls against a real API server process on the embedded
default, with no worker: a submitted pipeline stays queued, which is all that submit, list, show, report, cancel,
wait and lineage need. (The stages running on real workers: test_pipelines_e2e.py.) The live bars are also checked
on canned pipelines, for the states a queued pipeline never reaches."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from app.cli import app as cli_app
from app.client import ApiError, Client, ClientError
from app.client_cli.pipelines import report_cells, stage_fields
from tests.conftest import SmallCnnFiles
from tests.harness import Service, running_service
from tests.support import wait_for

# A name that would be markup to rich and to HTML: the CLI and the dashboard must show it as it is.
ODD_NAME = "[bold]<b>chain</b> | 1"
PIPELINE_YAML = """\
name: "{name}"
model: {model}
dataset: digits
stages:
  - kind: distill
    student: {{arch: small_cnn, kwargs: {{width: 4, depth: 1}}}}
    epochs: 1
    gate: {{max_accuracy_drop_pts: 5, against: input}}
  - kind: prune
    channel_ratio: 0.5
    epochs: 1
    gate: {{max_accuracy_drop_pts: 2, against: previous}}
  - kind: quantize
    method: static
  - name: quantize-dynamic
    kind: quantize
    after: prune
    method: dynamic
"""


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, small_cnn_files: SmallCnnFiles) -> Iterator[tuple[Service, str]]:
    """(the service, the base URL of its HTTP API): SQLite and the filesystem broker, no worker."""
    with running_service(tmp_path_factory.mktemp("pipelines-cli"), "embedded") as service:
        yield service, service.serve_http()


@pytest.fixture(scope="module")
def teacher(served: tuple[Service, str], small_cnn_files: SmallCnnFiles) -> str:
    return served[0].upload_teacher(small_cnn_files.safetensors, small_cnn_files.spec)


@pytest.fixture
def env(served: tuple[Service, str], tmp_path: Path) -> dict[str, str]:
    service, url = served
    return {"CONDENSER_URL": url, "CONDENSER_API_KEY": service.api_key, "CONDENSER_CONFIG": str(tmp_path / "none")}


@pytest.fixture
def pipeline_file(tmp_path: Path, teacher: str) -> Path:
    path = tmp_path / "pipeline.yaml"
    path.write_text(PIPELINE_YAML.format(name=ODD_NAME, model=teacher))
    return path


def cli(*args: str, env: dict[str, str]) -> Any:
    result = CliRunner(env=env).invoke(cli_app, list(args))
    assert "Traceback" not in result.output + result.stderr, result.output + result.stderr
    return result


def test_the_client_submits_lists_reports_and_cancels(served: tuple[Service, str], teacher: str) -> None:
    service, url = served
    document = {"name": ODD_NAME, "model": teacher, "dataset": "digits",
                "stages": [{"kind": "prune", "channel_ratio": 0.5, "epochs": 1}, {"kind": "quantize"}]}
    with Client(url, service.api_key) as client:
        first, second = client.submit_pipeline(document), client.submit_pipeline(document)
        assert client.pipeline(first["id"])["stages"][1]["status"] == "waiting"
        assert first["name"] == ODD_NAME

        # Paging as the job listing pages: newest first, a cursor to the next page.
        page = client.pipelines(status="queued", limit=1)
        assert [item["id"] for item in page["items"]] == [second["id"]] and page["next_cursor"]
        rest = client.pipelines(status="queued", limit=100, cursor=page["next_cursor"])
        assert first["id"] in [item["id"] for item in rest["items"]]

        report = client.pipeline_report(first["id"])
        assert [row["stage"] for row in report["rows"]] == ["input"] and report["pipeline"]["id"] == first["id"]
        markdown = client.pipeline_report(first["id"], markdown=True)
        assert markdown.startswith("| Stage | Kind | Model |") and f"| input | - | {teacher} |" in markdown

        # Still queued (no worker): waiting gives up at its timeout, having shown the pipeline once.
        seen: list[dict[str, Any]] = []
        with pytest.raises(ClientError, match=f"pipeline {first['id']} did not finish within 1 s"):
            client.wait_pipeline(first["id"], on_progress=seen.append, timeout=1)
        assert [p["status"] for p in seen] == ["queued"]

        canceled = client.cancel_pipeline(first["id"])
        assert canceled["status"] == "canceled"
        assert [stage["status"] for stage in canceled["stages"]] == ["canceled", "skipped"]
        assert client.wait_pipeline(first["id"])["status"] == "canceled"
        assert client.pipelines(status="canceled")["items"][0]["id"] == first["id"]

        lineage = client.model_lineage(teacher)
        assert lineage["root"] == teacher and [step["made_by"] for step in lineage["chain"]] == [None]
        with pytest.raises(ApiError, match="stages\\[0\\] \\('prune'\\)") as refused:
            client.submit_pipeline({**document, "stages": [{"kind": "prune"}]})
        assert refused.value.status == 422
        client.cancel_pipeline(second["id"])


def test_cli_submit_list_show_report_cancel(env: dict[str, str], pipeline_file: Path, teacher: str) -> None:
    submitted = cli("pipelines", "submit", str(pipeline_file), env=env)
    assert submitted.exit_code == 0, submitted.output
    pipeline_id = submitted.stdout.strip()
    assert pipeline_id.startswith("pip_")

    listed = cli("pipelines", "list", "--status", "queued", env=env).stdout
    assert pipeline_id in listed and ODD_NAME in listed and "0/4" in listed

    shown = cli("pipelines", "show", pipeline_id, env=env).stdout
    assert f"name      {ODD_NAME}" in shown
    stages = {line.split()[0]: line for line in shown.split("stages\n")[1].splitlines()[1:]}
    assert set(stages) == {"distill", "prune", "quantize", "quantize-dynamic"}
    assert "queued" in stages["distill"] and "job_" in stages["distill"] and "<= 5 pts vs input" in stages["distill"]
    assert "waiting" in stages["prune"] and "<= 2 pts vs previous" in stages["prune"]
    assert stages["quantize-dynamic"].split()[1:4] == ["quantize", "prune", "waiting"]

    report = cli("pipelines", "report", pipeline_id, env=env).stdout.splitlines()
    assert report[0].split()[:4] == ["stage", "kind", "model", "precision"]
    assert report[1].split()[:4] == ["input", "-", teacher, "float32"] and len(report) == 2
    markdown = cli("pipelines", "report", pipeline_id, "--markdown", env=env).stdout
    assert markdown.startswith("| Stage |") and markdown.endswith("|\n")

    canceled = cli("pipelines", "cancel", pipeline_id, env=env)
    assert canceled.stdout.strip() == f"{pipeline_id} canceled"
    again = cli("pipelines", "cancel", pipeline_id, env=env)
    assert again.exit_code == 1 and "HTTP 409" in again.stderr and "already canceled" in again.stderr

    replayed = cli("pipelines", "replay", pipeline_id, env=env)
    assert replayed.exit_code == 0, replayed.output
    replay_id = replayed.stdout.strip()
    assert replay_id.startswith("pip_") and replay_id != pipeline_id
    replay_report = cli("pipelines", "report", replay_id, env=env).stdout
    assert f"the original, pipeline {pipeline_id}:" in replay_report
    cli("pipelines", "cancel", replay_id, env=env)

    lineage = cli("models", "lineage", teacher, env=env).stdout.splitlines()
    assert lineage == [f"{teacher}  teacher  float32  upload"]


def test_submit_wait_shows_a_bar_per_stage_and_fails_unless_the_pipeline_succeeds(
        served: tuple[Service, str], env: dict[str, str], pipeline_file: Path) -> None:
    service, url = served
    outcome: dict[str, Any] = {}
    waiting = threading.Thread(target=lambda: outcome.update(result=cli(
        "pipelines", "submit", str(pipeline_file), "--wait", env=env)))
    waiting.start()
    with Client(url, service.api_key) as client:
        pipeline_id = wait_for(lambda: next((p["id"] for p in client.pipelines(status="queued")["items"]
                                             if p["name"] == ODD_NAME), None), timeout=60, what="the pipeline")
        client.cancel_pipeline(pipeline_id)
    waiting.join(timeout=60)
    result = outcome["result"]
    assert result.exit_code == 1, result.output
    assert result.stdout.splitlines()[0] == pipeline_id
    assert result.stderr.strip().splitlines()[-1] == f"error: pipeline {pipeline_id} canceled"
    bars = {line.split()[0]: line for line in result.stderr.splitlines() if line.strip()}
    assert "canceled" in bars["distill"] and "skipped" in bars["quantize-dynamic"], result.stderr
    # The report follows: the input's row alone, nothing having run.
    assert [line.split()[0] for line in result.stdout.splitlines()[1:]] == ["stage", "input"]


def test_wait_gives_up_at_its_timeout(served: tuple[Service, str], env: dict[str, str], teacher: str) -> None:
    service, url = served
    with Client(url, service.api_key) as client:
        pipeline = client.submit_pipeline({"model": teacher, "dataset": "digits", "stages": [{"kind": "quantize"}]})
        waited = cli("pipelines", "wait", pipeline["id"], "--timeout", "1", env=env)
        client.cancel_pipeline(pipeline["id"])
    assert waited.exit_code == 1
    assert waited.stderr.strip().splitlines()[-1] == f"error: pipeline {pipeline['id']} did not finish within 1 s"


def _stage(name: str, status: str, progress: dict[str, Any] | None = None, **fields: Any) -> dict[str, Any]:
    return {"name": name, "kind": "prune", "after": "distill", "gate": None, "status": status, "job_id": None,
            "model_id": None, "progress": progress, "summary": None, "gate_result": None, "error": None, **fields}


def test_a_stage_bar_shows_its_jobs_progress_and_its_gate() -> None:
    running = stage_fields(_stage("prune", "running", {"stage": "prune", "epoch": 2, "epochs": 3, "step": 40,
                                                       "total_steps": 60, "eta_seconds": 12, "train_loss": 0.5}))
    assert running == {"description": "running prune epoch 2/3", "completed": 40, "total": 60, "steps": "40/60",
                       "eta": "ETA 0:12", "metrics": "loss 0.5000"}
    waiting = stage_fields(_stage("quantize", "waiting"))
    assert (waiting["description"], waiting["completed"], waiting["total"], waiting["steps"]) == (
        "waiting for distill", 0, 1, "")
    assert stage_fields(_stage("quantize", "skipped"))["description"] == "skipped"
    gate = {"max_accuracy_drop_pts": 1, "against": "previous"}
    passed = stage_fields(_stage("prune", "succeeded", {"stage": "exporting", "step": 60, "total_steps": 60,
                                                        "eta_seconds": 0.4}, gate=gate, model_id="mdl_p"))
    assert passed["description"] == "succeeded, gate passed" and passed["metrics"] == "-> mdl_p"
    assert passed["eta"] == ""
    assert (passed["completed"], passed["total"]) == (60, 60)
    # A stage without training steps (static quantization) still shows a full bar once done.
    done = stage_fields(_stage("quantize", "succeeded", {"stage": "exporting"}, model_id="mdl_q"))
    assert (done["completed"], done["total"], done["steps"]) == (1, 1, "")
    missed = stage_fields(_stage("prune", "succeeded", gate=gate, gate_result="its onnx file scores ..."))
    assert missed["description"] == "succeeded, gate MISSED"


def test_a_report_row_reads_in_a_terminal() -> None:
    row = {"stage": "quantize", "kind": "quantize", "model": "mdl_q", "precision": "int8", "accuracy": 0.9512,
           "formats": {"onnx": 0.95, "torchscript": 0.9512}, "params": 5321, "macs": 100000, "file_bytes": None,
           "torchscript_bytes": 30720, "cpu_latency_ms_batch1": 0.12345, "gate": ""}
    assert report_cells(row) == ["quantize", "quantize", "mdl_q", "int8", "95.12%", "onnx 95.00%, torchscript 95.12%",
                                 "5,321", "100,000", "-", "30.0 KiB", "0.123", "-"]
