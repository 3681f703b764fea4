"""The dashboard's files: served without a key (they hold no data), under a Content-Security-Policy that
allows nothing from another origin; and the jobs' before/after summary the dashboard reads."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.dashboard.router import STATIC_DIR
from core.db.models import Job
from core.db.session import session_scope
from tests.worker.test_report import DISTILL_METRICS


def test_the_page_and_its_files_need_no_key_and_allow_only_this_origin(client: TestClient) -> None:
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    policy = page.headers["content-security-policy"]
    assert "default-src 'self'" in policy and "script-src 'self'" in policy and "unsafe-inline" not in policy
    assert page.headers["x-content-type-options"] == "nosniff"
    referenced = re.findall(r'(?:src|href)="([^"#]+)"', page.text)
    assert referenced and all(url.startswith("/dashboard/") for url in referenced), referenced
    for url in referenced:
        response = client.get(url)
        assert response.status_code == 200, url
        assert response.headers["content-security-policy"] == policy
    assert client.get("/dashboard/app.js").headers["content-type"].startswith("text/javascript")


def test_scripts_load_nothing_from_elsewhere() -> None:
    """Every import is relative and every fetch goes to this server's /v1: no CDN, no third party."""
    for script in STATIC_DIR.glob("*.js"):
        source = script.read_text()
        assert "http://" not in source.replace("http://www.w3.org/2000/svg", ""), script.name
        assert "https://" not in source, script.name
        assert all(target.startswith("./") for target in re.findall(r'from "([^"]+)"', source)), script.name
    for style in STATIC_DIR.glob("*.css"):
        assert "url(" not in style.read_text() and "@import" not in style.read_text()


def test_unknown_dashboard_files_are_404_and_the_api_still_needs_a_key(client: TestClient) -> None:
    assert client.get("/dashboard/missing.js").status_code == 404
    assert client.get("/dashboard/../app/main.py").status_code in (400, 404)
    assert client.get("/v1/jobs").status_code == 401


def test_a_succeeded_job_carries_its_before_after_summary(client: TestClient, auth_headers: dict[str, str],
                                                         insert_model: Callable[..., str], tenant: str) -> None:
    model_id = insert_model(tenant)
    with session_scope() as session:
        job = Job(tenant=tenant, kind="distill", spec={"dataset": "digits"}, teacher_id=model_id, max_attempts=3,
                  status="succeeded", metrics=DISTILL_METRICS)
        running = Job(tenant=tenant, kind="prune", spec={"dataset": "digits"}, teacher_id=model_id, max_attempts=3,
                      status="running")
        session.add_all([job, running])
        session.flush()
        job_id, running_id = job.id, running.id
    summary: dict[str, Any] = client.get(f"/v1/jobs/{job_id}", headers=auth_headers).json()["summary"]
    assert summary["before"]["label"] == "teacher" and summary["after"]["params"] == 5321
    assert summary["after"]["torchscript_bytes"] == 30000 and summary["validation_samples"] == 450
    listed = {item["id"]: item for item in client.get("/v1/jobs", headers=auth_headers).json()["items"]}
    assert listed[job_id]["summary"] == summary and listed[running_id]["summary"] is None


def run_in_node(folder: Path, driver: str, *arguments: Any) -> Any:
    """`driver`, an ES module that imports the dashboard's scripts (`./name.js`) and reads its JSON arguments from
    process.argv[2], run by node (skipped without it, failed in CI); returns what it printed, as JSON."""
    node = shutil.which("node")
    if node is None:
        if os.environ.get("CI") == "true":
            pytest.fail("the dashboard's JavaScript tests need node (apt-get install -y nodejs)")
        pytest.skip("the dashboard's JavaScript tests need node")
    for script in STATIC_DIR.glob("*.js"):
        shutil.copy(script, folder / script.name)
    # Under a package.json of type "module", node reads .js files as ES modules, as the browser does.
    (folder / "package.json").write_text('{"type": "module"}\n')
    (folder / "driver.js").write_text(driver)
    result = subprocess.run([node, str(folder / "driver.js"), json.dumps(arguments)], capture_output=True, text=True,
                            timeout=60, check=True)
    return json.loads(result.stdout)


def run_tradeoff_pairs(jobs: list[dict[str, Any]], key: str, sha256_by_model: dict[str, str],
                       folder: Path) -> list[dict[str, Any]]:
    """tradeoffs.js's tradeoffPairs."""
    driver = ('import { tradeoffPairs } from "./tradeoffs.js";\n'
              "const [jobs, key, shas] = JSON.parse(process.argv[2]);\n"
              "console.log(JSON.stringify(tradeoffPairs(jobs, key, new Map(Object.entries(shas)))));\n")
    return run_in_node(folder, driver, jobs, key, sha256_by_model)


def _succeeded(job_id: str, model: str, latency_ms: float, accuracy: float) -> dict[str, Any]:
    before = {"label": "teacher", "accuracy": accuracy, "cpu_latency_ms_batch1": latency_ms}
    after = {"label": "student", "accuracy": accuracy - 0.01, "cpu_latency_ms_batch1": latency_ms / 4}
    return {"id": job_id, "kind": "distill", "model": model, "summary": {"before": before, "after": after}}


def test_the_tradeoff_chart_shows_one_input_point_per_file_at_the_median_of_its_jobs(tmp_path: Path) -> None:
    """The same file uploaded twice (two ids, one sha256) and measured by three jobs on a busy host is one
    point; another file, and a model the dashboard has no sha256 for, are a point each; every job keeps its
    own result."""
    jobs = [_succeeded("job_1", "mdl_a", 9.4, 0.95), _succeeded("job_2", "mdl_b", 17.8, 0.95),
            _succeeded("job_3", "mdl_a", 12.0, 0.96), _succeeded("job_4", "mdl_c", 3.0, 0.90),
            _succeeded("job_5", "mdl_unlisted", 5.0, 0.80)]
    pairs = run_tradeoff_pairs(jobs, "cpu_latency_ms_batch1", {"mdl_a": "sha-x", "mdl_b": "sha-x",
                                                               "mdl_c": "sha-y"}, tmp_path)
    inputs = {pair["before"]["key"]: pair["before"] for pair in pairs}
    assert set(inputs) == {"sha-x", "sha-y", "mdl_unlisted"}
    shared = inputs["sha-x"]
    assert (shared["x"], shared["y"], shared["count"]) == (12.0, 0.95, 3)
    assert "median of 3 jobs" in shared["label"]
    assert (inputs["sha-y"]["x"], inputs["sha-y"]["count"]) == (3.0, 1)
    assert sorted(pair["id"] for pair in pairs) == ["job_1", "job_2", "job_3", "job_4", "job_5"]
    assert {pair["id"]: pair["after"]["x"] for pair in pairs}["job_2"] == pytest.approx(17.8 / 4)


def test_an_input_point_takes_its_median_from_the_jobs_that_measured_the_figure(tmp_path: Path) -> None:
    """An older job without the figure does not pull the median, and a file no job measured has no point."""
    measured, unmeasured = _succeeded("job_1", "mdl_a", 8.0, 0.9), _succeeded("job_2", "mdl_a", 2.0, 0.7)
    unmeasured["summary"]["before"]["cpu_latency_ms_batch1"] = None
    never = _succeeded("job_3", "mdl_b", 1.0, 0.5)
    never["summary"]["before"]["cpu_latency_ms_batch1"] = None
    pairs = run_tradeoff_pairs([measured, unmeasured, never], "cpu_latency_ms_batch1", {}, tmp_path)
    inputs = {pair["before"]["key"]: pair["before"] for pair in pairs}
    assert (inputs["mdl_a"]["x"], inputs["mdl_a"]["y"], inputs["mdl_a"]["count"]) == (8.0, 0.9, 1)
    assert inputs["mdl_b"]["x"] is None and inputs["mdl_b"]["count"] == 0


NOT_MEASURED = "\N{EN DASH}"  # as format.js writes it


def _stage(name: str, status: str, **fields: Any) -> dict[str, Any]:
    return {"name": name, "kind": "prune", "after": "distill", "gate": None, "status": status, "gate_result": None,
            **fields}


def test_the_pipeline_page_words_each_stage_gate_and_report_cell(tmp_path: Path) -> None:
    """pipelines.js: a gate is judged only once its stage succeeded; a stage says what it comes after (or waits
    for); report cells read as the job page's figures, and what was not measured as a dash."""
    gate = {"max_accuracy_drop_pts": 1.5, "against": "previous"}
    stages = [_stage("distill", "succeeded", after="input", gate={"max_accuracy_drop_pts": 3, "against": "input"}),
              _stage("prune", "succeeded", gate=gate, gate_result="its onnx file scores 80.00%, ..."),
              _stage("quantize", "waiting", after="prune", gate=gate), _stage("qat", "skipped", gate=gate),
              _stage("other", "running")]
    row = {"stage": "prune", "kind": "prune", "model": "mdl_0123456789abcdef01234567", "precision": "float32",
           "accuracy": 0.9512, "formats": {"onnx": 0.95, "torchscript": 0.9512}, "params": 5321, "macs": None,
           "file_bytes": 22000, "torchscript_bytes": 30720, "cpu_latency_ms_batch1": 0.12345,
           "gate": "<= 1.5 pts vs previous: passed"}
    driver = ('import * as p from "./pipelines.js";\n'
              "const [stages, row] = JSON.parse(process.argv[2]);\n"
              "console.log(JSON.stringify({ gates: stages.map(p.gateOf), origins: stages.map(p.stageOrigin),\n"
              "  cells: p.REPORT_COLUMNS.map(([key]) => p.reportCell(key, row[key])),\n"
              "  input: p.reportCell(\"formats\", {}), done: p.stagesDone({ stages }) }));\n")
    shown = run_in_node(tmp_path, driver, stages, row)
    assert shown["gates"] == [
        {"text": "≤ 3 pts vs the input model", "verdict": "passed", "detail": None},
        {"text": "≤ 1.5 pts vs the previous stage", "verdict": "missed", "detail": "its onnx file scores 80.00%, ..."},
        {"text": "≤ 1.5 pts vs the previous stage", "verdict": "pending", "detail": None},
        {"text": "≤ 1.5 pts vs the previous stage", "verdict": "not reached", "detail": None},
        None]
    assert shown["origins"] == ["after the input model", "after distill", "waits for prune",
                                "after distill; skipped: the pipeline ended first", "after distill"]
    assert shown["cells"] == ["prune", "prune", "mdl_01234567\N{HORIZONTAL ELLIPSIS}", "float32", "95.12%",
                              "onnx 95.00%\ntorchscript 95.12%", "5,321", NOT_MEASURED, "21.5 KiB", "30.0 KiB",
                              "0.123 ms", "<= 1.5 pts vs previous: passed"]
    assert shown["input"] == NOT_MEASURED and shown["done"] == "2 of 5 stages done"
