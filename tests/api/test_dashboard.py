"""The dashboard's files: served without a key (they hold no data), under a Content-Security-Policy that
allows nothing from another origin; and the jobs' before/after summary the dashboard reads."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

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
