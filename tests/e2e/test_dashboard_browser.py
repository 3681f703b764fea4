"""The dashboard in a real headless Chromium, against a real server process, worker and CLI: sign in with a
key, submit a job with `condenser jobs submit`, watch its bar reach done, read the job page, download an
artifact and check its sha256, look at the tenant's trade-off charts. Screenshots of each step are saved to
test-artifacts/screenshots/ for a person to look at.

Needs Debian's chromium (`apt-get install -y chromium`) and the playwright package (its bundled browsers are
never downloaded: the system's Chromium is driven instead).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import torch

from tests.e2e.test_distill_e2e import check_report
from tests.harness import Service
from tests.support import REPO, wait_for
from worker.engine import data, export, models
from worker.engine.config import ADAMW_LOOP, ArchSpec, DistillConfig
from worker.engine.distill import distill

pytestmark = pytest.mark.slow

CHROMIUM = Path(os.environ.get("CONDENSER_TEST_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SCREENSHOTS = REPO / "test-artifacts" / "screenshots"
TEACHER_SPEC: dict[str, Any] = {"arch": "small_cnn", "kwargs": {"num_classes": 10, "width": 16, "depth": 2},
                                "input": {"image_size": 8, "channels": 1, "mean": [0.5], "std": [0.5]}}
# Long enough (several seconds) that the list, polled every 1.5 s, shows the bar part-way even on a fast machine.
EPOCHS = 10
JOB_SPEC_YAML = """\
kind: distill
teacher: {teacher}
dataset: digits
student:
  arch: small_cnn
  kwargs: {{width: 8, depth: 2}}
epochs: {epochs}
batch_size: 8
lr: 0.01
seed: 0
"""


def sync_playwright() -> Any:
    """Playwright's entry point, or a skip (a failure in CI) naming what is missing."""
    missing = []
    try:
        from playwright.sync_api import sync_playwright as entry_point
    except ImportError:
        missing.append("the playwright package (pip install -e '.[dev]')")
    if not CHROMIUM.exists():
        missing.append(f"Chromium at {CHROMIUM} (apt-get install -y chromium)")
    if missing:
        reason = "browser test needs " + " and ".join(missing)
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    return entry_point()


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A teacher trained for a few seconds, so that the charts show real accuracies."""
    arch = ArchSpec.model_validate(TEACHER_SPEC)
    train, val = data.train_val_tensors(data.load_builtin("digits"), arch.input, 0.2, 0)
    torch.manual_seed(0)
    teacher = models.build_model(arch)
    distill(None, teacher, train, val, DistillConfig(epochs=4, batch_size=32, lr=5e-3, **ADAMW_LOOP), lambda _: None)
    path = tmp_path_factory.mktemp("teacher") / "teacher.safetensors"
    export.save_safetensors(teacher, path)
    return path


@pytest.fixture
def server(service_factory: Any) -> tuple[Service, str]:
    """The service on PostgreSQL + Redis with one worker, and its API served over real HTTP by `condenser serve`."""
    service = service_factory("distributed")
    service.start_worker(OMP_NUM_THREADS="1")
    return service, service.serve_http()


def submit_with_cli(base_url: str, key: str, spec_file: Path) -> str:
    env = {**os.environ, "CONDENSER_URL": base_url, "CONDENSER_API_KEY": key,
           "CONDENSER_CONFIG": str(spec_file.parent / "cli-config.toml")}
    result = subprocess.run([sys.executable, "-m", "app.cli", "jobs", "submit", str(spec_file)], env=env, cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout.split()[0]


def screenshot(page: Any, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.evaluate("window.scrollTo(0, 0)")  # else the sticky top bar lands mid-page in a full-page shot
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)


def test_dashboard_follows_a_cli_job_to_its_download(server: tuple[Service, str], teacher_file: Path,
                                                    tmp_path: Path) -> None:
    service, base_url = server
    key = service.api_key
    teacher_id = service.upload_teacher(teacher_file, TEACHER_SPEC)
    shutil.rmtree(SCREENSHOTS, ignore_errors=True)

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        context = browser.new_context(viewport={"width": 1360, "height": 900}, accept_downloads=True)
        page = context.new_page()
        problems: list[str] = []
        page.on("console", lambda message: message.type == "error" and problems.append(message.text))
        page.on("pageerror", lambda error: problems.append(str(error)))
        origins: set[str] = set()
        page.on("request", lambda request: origins.add(_origin(request.url)))
        try:
            sign_in(page, base_url, key)
            job_id = submit_with_cli(base_url, key, _spec_file(tmp_path, teacher_id))
            seen = watch_bar_until_done(page, job_id)
            assert "running" in seen["statuses"], seen
            assert any(0 < percent < 100 for percent in seen["percents"]), seen

            job = service.api_job(job_id)
            check_job_page(page, job)
            check_download(page, job, "student_safetensors", tmp_path)
            check_download(page, job, "report_model_card", tmp_path)
            check_tradeoffs(page)
        finally:
            browser.close()
    # A CSP violation or a script error shows up here; the one 401 is the wrong key tried on purpose.
    assert [problem for problem in problems if "status of 401" not in problem] == [], problems
    assert origins <= {_origin(base_url), "blob", "data"}, origins
    check_report(service, job)


def _origin(url: str) -> str:
    parsed = urlparse(url)
    return parsed.scheme if parsed.scheme in ("blob", "data") else f"{parsed.scheme}://{parsed.netloc}"


def _spec_file(folder: Path, teacher_id: str) -> Path:
    path = folder / "spec.yaml"
    path.write_text(JOB_SPEC_YAML.format(teacher=teacher_id, epochs=EPOCHS))
    return path


def sign_in(page: Any, base_url: str, key: str) -> None:
    page.goto(base_url + "/")
    page.get_by_test_id("api-key-input").wait_for()
    page.get_by_test_id("api-key-input").fill("cnd_not_a_key")
    page.get_by_test_id("login-button").click()
    page.get_by_test_id("login-error").wait_for()
    assert "not accepted" in page.get_by_test_id("login-error").inner_text()
    screenshot(page, "01-sign-in")
    page.get_by_test_id("api-key-input").fill(key)
    page.get_by_test_id("login-button").click()
    page.get_by_test_id("jobs-table").wait_for()
    page.get_by_test_id("jobs-empty").wait_for()
    assert page.get_by_test_id("tenant").inner_text().startswith("tenant-")
    screenshot(page, "02-no-jobs")


def watch_bar_until_done(page: Any, job_id: str) -> dict[str, list[Any]]:
    """The job's bar in the list, sampled until it shows the job succeeded at 100%; what it showed on the way."""
    bar = page.locator(f'tr[data-job-id="{job_id}"] [data-testid="job-progress"]')
    bar.wait_for(timeout=30_000)
    seen: dict[str, list[Any]] = {"statuses": [], "percents": []}
    shot_while_running = False

    def done() -> bool:
        nonlocal shot_while_running
        status, percent = bar.get_attribute("data-status"), bar.get_attribute("data-percent")
        seen["statuses"].append(status)
        if percent:
            seen["percents"].append(int(percent))
        if status == "running" and percent and 0 < int(percent) < 100 and not shot_while_running:
            screenshot(page, "03-job-running")
            shot_while_running = True
        return status == "succeeded" and percent == "100"

    wait_for(done, timeout=240, interval=0.1, what=f"the dashboard to show {job_id} done")
    screenshot(page, "04-job-done")
    return seen


def check_job_page(page: Any, job: dict[str, Any]) -> None:
    page.locator(f'tr[data-job-id="{job["id"]}"] [data-testid="job-link"]').click()
    page.get_by_test_id("metrics-table").wait_for()
    assert json.loads(page.get_by_test_id("job-spec").inner_text()) == job["spec"]
    parameters = page.locator('#metrics-table tr[data-figure="params"]').inner_text()
    assert f"{job['summary']['after']['params']:,}" in parameters and "fewer" in parameters
    accuracy = page.locator('#metrics-table tr[data-figure="accuracy"]').inner_text()
    assert f"{job['summary']['after']['accuracy'] * 100:.2f}%" in accuracy
    # Each file's verdict, which images the accuracies come from, and what the job did and did not do.
    assert page.locator('[data-testid="format-table"] tr[data-format="pt2"]').inner_text().endswith("passed")
    assert "held-out split" in page.get_by_test_id("evaluation").inner_text()
    work = page.get_by_test_id("work").inner_text()
    assert "what was not done" in work.lower() and "no pruning and no quantization" in work
    for series in ("train_loss", "val_accuracy"):
        assert page.locator(f'circle.point[data-series="{series}"]').count() == EPOCHS
    kinds = {a["kind"] for a in job["artifacts"]}
    assert {"student_safetensors", "report_json", "report_model_card", "report_curves_svg"} <= kinds
    assert page.get_by_test_id("download-button").count() == len(job["artifacts"])
    screenshot(page, "05-job-page")


def check_download(page: Any, job: dict[str, Any], kind: str, folder: Path) -> None:
    """The button fetches the file with the key, checks its sha256 in the browser, and saves it."""
    artifact = next(a for a in job["artifacts"] if a["kind"] == kind)
    row = page.locator(f'tr[data-testid="artifact-row"][data-artifact-kind="{kind}"]')
    with page.expect_download() as download_info:
        row.get_by_test_id("download-button").click()
    download = download_info.value
    assert download.suggested_filename == artifact["filename"]
    saved = folder / "downloads" / artifact["filename"]
    download.save_as(str(saved))
    assert hashlib.sha256(saved.read_bytes()).hexdigest() == artifact["sha256"]
    status = row.get_by_test_id("download-status")
    wait_for(lambda: "verified" in status.inner_text(), timeout=10, what="the page to verify the sha256")
    assert status.get_attribute("data-sha256") == artifact["sha256"]
    screenshot(page, f"06-downloaded-{kind}")


def check_tradeoffs(page: Any) -> None:
    page.get_by_test_id("nav-tradeoffs").click()
    for chart in ("chart-size", "chart-latency"):
        page.locator(f'[data-testid="{chart}"] [data-testid="tradeoff-after"]').first.wait_for()
        assert page.locator(f'[data-testid="{chart}"] [data-testid="tradeoff-before"]').count() == 1
    page.locator('[data-testid="chart-size"] [data-testid="tradeoff-after"]').first.hover()
    screenshot(page, "07-tradeoffs")


# A pipeline name a client chose: markup to a page that would insert it as HTML.
HOSTILE_NAME = '<img src=x data-injected="1"> digits & chain'
# Views the dashboard has left stay in the page, hidden: the pipeline page's elements are looked for in it alone.
PIPELINE_VIEW = "#pipeline-view"


@pytest.fixture
def api_only(service_factory: Any) -> tuple[Service, str]:
    """The API over real HTTP on the embedded default, with no worker: a pipeline stays queued."""
    service = service_factory("embedded")
    return service, service.serve_http()


def test_pipeline_pages_show_stage_cards_the_report_and_lineage(api_only: tuple[Service, str],
                                                                small_cnn_files: Any) -> None:
    """A queued pipeline through the real API (list, page, a stage's job, cancel); then the same page on canned
    reports of the states a pipeline without a worker never reaches: a stage running, and all done."""
    service, base_url = api_only
    teacher_id = service.upload_teacher(small_cnn_files.safetensors, small_cnn_files.spec)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        page = browser.new_context(viewport={"width": 1360, "height": 900}).new_page()
        problems: list[str] = []
        page.on("console", lambda message: message.type == "error" and problems.append(message.text))
        page.on("pageerror", lambda error: problems.append(str(error)))
        try:
            sign_in(page, base_url, service.api_key)
            pipeline = _submit_pipeline(service, teacher_id)
            check_pipeline_list_and_page(page, pipeline)
            check_cancel_from_the_pipeline_page(page, pipeline)
            report = service.client.get(f"/v1/pipelines/{pipeline['id']}/report", headers=service.headers).json()
            check_running_pipeline(page, _canned(report, "running"))
            check_finished_pipeline(page, _canned(report, "succeeded"))
        finally:
            browser.close()
    assert [problem for problem in problems if "status of 401" not in problem] == [], problems


def _submit_pipeline(service: Service, teacher_id: str) -> dict[str, Any]:
    gate = {"max_accuracy_drop_pts": 3, "against": "input"}
    response = service.client.post("/v1/pipelines", headers=service.headers, json={
        "name": HOSTILE_NAME, "model": teacher_id, "dataset": "digits", "stages": [
            {"kind": "distill", "student": {"arch": "small_cnn", "kwargs": {"width": 4, "depth": 1}}, "epochs": 1,
             "gate": gate},
            {"kind": "prune", "channel_ratio": 0.5, "epochs": 1, "gate": {**gate, "against": "previous"}},
            {"kind": "quantize", "method": "static"},
            {"name": "quantize-dynamic", "kind": "quantize", "after": "prune", "method": "dynamic"}]})
    assert response.status_code == 201, response.text
    return response.json()


def _cards(page: Any) -> dict[str, dict[str, Any]]:
    """Each stage card by stage name: its status, gate verdict, model and whether it shows a bar."""
    page.locator(_card("distill")).wait_for()
    script = """cards => Object.fromEntries(cards.map(card => [
        card.dataset.stage, {status: card.dataset.status,
          gate: card.querySelector('[data-testid="stage-gate"]')?.dataset.verdict ?? null,
          model: card.querySelector('[data-testid="stage-model"]').textContent,
          bar: card.querySelector('[role="progressbar"]')?.dataset.percent ?? null,
          job: card.querySelector('[data-testid="stage-job-link"]')?.getAttribute("href") ?? null}]))"""
    return page.eval_on_selector_all(f'{PIPELINE_VIEW} [data-testid="stage-card"]', script)


def _in_view(page: Any, test_id: str) -> Any:
    return page.locator(f'{PIPELINE_VIEW} [data-testid="{test_id}"]')


def _card(stage: str) -> str:
    return f'{PIPELINE_VIEW} [data-testid="stage-card"][data-stage="{stage}"]'


def _report_rows(page: Any) -> dict[str, dict[str, str]]:
    return page.eval_on_selector_all('[data-testid="pipeline-report-table"] tbody tr', """rows => Object.fromEntries(
        rows.map(row => [row.dataset.stage, Object.fromEntries([...row.children].map(cell =>
          [cell.dataset.column, cell.textContent]))]))""")


def check_pipeline_list_and_page(page: Any, pipeline: dict[str, Any]) -> None:
    page.get_by_test_id("nav-pipelines").click()
    row = page.locator(f'tr[data-pipeline-id="{pipeline["id"]}"]')
    row.wait_for()
    # The name is text on the page, never markup.
    assert row.get_by_test_id("pipeline-link").inner_text() == HOSTILE_NAME
    assert page.locator("[data-injected]").count() == 0
    assert "0 of 4 stages done" in row.inner_text()
    screenshot(page, "08-pipelines")

    row.get_by_test_id("pipeline-link").click()
    assert page.get_by_test_id("pipeline-name").inner_text() == HOSTILE_NAME
    cards = _cards(page)
    first_job = pipeline["stages"][0]["job_id"]
    assert list(cards) == ["distill", "prune", "quantize", "quantize-dynamic"]
    assert cards["distill"] == {"status": "queued", "gate": "pending", "model": "\N{EN DASH}", "bar": "0",
                                "job": f"#/jobs/{first_job}"}
    assert cards["prune"] == {"status": "waiting", "gate": "pending", "model": "\N{EN DASH}", "bar": None,
                              "job": None}
    assert cards["quantize"]["gate"] is None and cards["quantize-dynamic"]["status"] == "waiting"
    assert "waits for prune" in page.locator(_card("quantize-dynamic")).inner_text()
    assert list(_report_rows(page)) == ["input"]
    assert page.locator("[data-injected]").count() == 0
    screenshot(page, "09-pipeline-queued")

    # A stage's card leads to its job, whose page leads back.
    page.locator(f'{_card("distill")} [data-testid="stage-job-link"]').click()
    page.get_by_test_id("job-pipeline").click()
    page.locator(_card("distill")).wait_for()
    assert page.get_by_test_id("pipeline-id").inner_text() == pipeline["id"]


def check_cancel_from_the_pipeline_page(page: Any, pipeline: dict[str, Any]) -> None:
    _in_view(page, "cancel-button").click()
    status = _in_view(page, "pipeline-status")
    wait_for(lambda: status.inner_text() == "canceled", timeout=30, what="the page to show the pipeline canceled")
    cards = _cards(page)
    assert {name: (card["status"], card["gate"]) for name, card in cards.items()} == {
        "distill": ("canceled", "not reached"), "prune": ("skipped", "not reached"),
        "quantize": ("skipped", None), "quantize-dynamic": ("skipped", None)}
    assert _in_view(page, "cancel-button").count() == 0


# What a canned stage measured (its report row's figures).
CANNED_FIGURES = {"accuracy": 0.95, "params": 5321, "macs": 100_000, "file_bytes": 22_000,
                  "torchscript_bytes": 30_000, "cpu_latency_ms_batch1": 0.3, "formats": {"onnx": 0.95}}


def _canned(report: dict[str, Any], state: str) -> dict[str, Any]:
    """The real report of the pipeline, moved on to `state` as the API would show it: "running" (distill done,
    prune training, the rest waiting) or "succeeded" (every stage done, the final model's lineage)."""
    pipeline = copy.deepcopy(report["pipeline"])
    pipeline.update(id=f"pip_{state}canned", status=state, current_stages=[], input_accuracy=0.97, error=None,
                    finished_at=None)
    for stage in pipeline["stages"]:
        stage.update(status="waiting", job_id=None, model_id=None, progress=None, error=None)
    stages = {stage["name"]: stage for stage in pipeline["stages"]}
    rows = [{**report["rows"][0], **CANNED_FIGURES, "accuracy": 0.97, "formats": {}}]
    done = ["distill"] if state == "running" else list(stages)
    rows += [_succeeded_stage(stages[name], number) for number, name in enumerate(done, 1)]
    lineage: list[dict[str, Any]] = []
    if state == "running":
        stages["prune"].update(status="running", job_id="job_prune", progress={
            "stage": "prune", "epoch": 1, "epochs": 2, "step": 5, "total_steps": 10, "eta_seconds": 4})
        pipeline["current_stages"] = ["prune"]
    else:
        pipeline["final_model"] = "mdl_quantize-dynamic"
        lineage = [_lineage_step(stages[name]) for name in ("quantize-dynamic", "prune", "distill")]
        lineage.append({"model": {"id": pipeline["model"], "name": "teacher", "precision": "float32"},
                        "made_by": None})
    return {"pipeline": pipeline, "rows": rows, "table_markdown": "", "final_model_lineage": lineage}


def _succeeded_stage(stage: dict[str, Any], number: int) -> dict[str, Any]:
    """Mark the stage succeeded; its report row."""
    name = stage["name"]
    stage.update(status="succeeded", job_id=f"job_{name}", model_id=f"mdl_{name}",
                 progress={"stage": "exporting", "step": 10, "total_steps": 10})
    gate = stage["gate"]
    return {**CANNED_FIGURES, "stage": name, "kind": stage["kind"], "model": stage["model_id"],
            "params": 5321 // number, "precision": "int8" if stage["kind"] == "quantize" else "float32",
            "gate": f"<= {gate['max_accuracy_drop_pts']:g} pts vs {gate['against']}: passed" if gate else ""}


def _lineage_step(stage: dict[str, Any]) -> dict[str, Any]:
    precision = "int8" if stage["kind"] == "quantize" else "float32"
    return {"model": {"id": stage["model_id"], "name": f"{stage['name']} of {HOSTILE_NAME}", "precision": precision},
            "made_by": {"id": stage["job_id"], "kind": stage["kind"]}}


def _show_canned(page: Any, report: dict[str, Any]) -> None:
    pipeline_id = report["pipeline"]["id"]
    page.route(f"**/v1/pipelines/{pipeline_id}/report",
               lambda route: route.fulfill(status=200, content_type="application/json", body=json.dumps(report)))
    page.evaluate(f"window.location.hash = '#/pipelines/{pipeline_id}'")
    wait_for(lambda: page.get_by_test_id("pipeline-id").inner_text() == pipeline_id, timeout=30,
             what=f"the page of {pipeline_id}")


def check_running_pipeline(page: Any, report: dict[str, Any]) -> None:
    _show_canned(page, report)
    cards = _cards(page)
    assert cards["distill"] == {"status": "succeeded", "gate": "passed", "model": "mdl_distill", "bar": None,
                                "job": "#/jobs/job_distill"}
    assert cards["prune"]["status"] == "running" and cards["prune"]["gate"] == "pending"
    assert 0 < int(cards["prune"]["bar"]) < 100
    assert "epoch 1/2" in page.locator(f'{_card("prune")} [data-testid="progress-label"]').inner_text()
    assert list(_report_rows(page)) == ["input", "distill"]
    screenshot(page, "10-pipeline-running")


def check_finished_pipeline(page: Any, report: dict[str, Any]) -> None:
    _show_canned(page, report)
    status = _in_view(page, "pipeline-status")
    wait_for(lambda: status.inner_text() == "succeeded", timeout=30,
             what="the succeeded pipeline")
    assert {card["status"] for card in _cards(page).values()} == {"succeeded"}
    rows = _report_rows(page)
    assert list(rows) == ["input", "distill", "prune", "quantize", "quantize-dynamic"]
    assert rows["input"]["accuracy"] == "97.00%" and rows["input"]["formats"] == "\N{EN DASH}"
    assert rows["prune"]["params"] == "2,660" and rows["quantize"]["precision"] == "int8"
    assert rows["prune"]["gate"] == "<= 3 pts vs previous: passed" and rows["quantize"]["gate"] == "\N{EN DASH}"
    assert rows["distill"]["formats"] == "onnx 95.00%" and rows["distill"]["torchscript_bytes"] == "29.3 KiB"
    steps = page.locator('[data-testid="lineage"] li')
    assert steps.count() == 4
    assert HOSTILE_NAME in steps.nth(0).inner_text() and page.locator("[data-injected]").count() == 0
    assert steps.nth(1).locator("a").get_attribute("href") == "#/jobs/job_prune"
    assert "uploaded" in steps.nth(3).inner_text()
    screenshot(page, "11-pipeline-succeeded")
