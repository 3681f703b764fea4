"""The dashboard in a real headless Chromium, against a real server process, worker and CLI: sign in with a
key, submit a job with `condenser jobs submit`, watch its bar reach done, read the job page, download an
artifact and check its sha256, look at the tenant's trade-off charts. Screenshots of each step are saved to
test-artifacts/screenshots/ for a person to look at.

Needs Debian's chromium (`apt-get install -y chromium`) and the playwright package (its bundled browsers are
never downloaded: the system's Chromium is driven instead).
"""

from __future__ import annotations

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
from worker.engine.config import ArchSpec, DistillConfig
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
    distill(None, teacher, train, val, DistillConfig(epochs=4, batch_size=32, lr=5e-3), lambda _: None)
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
