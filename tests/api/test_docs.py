"""/docs (Swagger UI) and /redoc: every file from this server (no CDN: they work offline), under the dashboard's
Content-Security-Policy; /redoc's allows inline styles and nothing more, which ReDoc cannot render without."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from importlib.resources import files
from typing import Any
from urllib.parse import urlparse

import pytest
import uvicorn
from fastapi.testclient import TestClient

from app.dashboard.router import CONTENT_SECURITY_POLICY
from tests.support import free_port

PAGES = ("/docs", "/redoc")
CONTENT_TYPES = {".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml", ".json": "application/json"}
REFERENCE = re.compile(r'(?:src|href|spec-url|data-openapi-url)="([^"]*)"')


@pytest.fixture(scope="module")
def database_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    # The pages read no rows; one database is enough.
    return f"sqlite:///{tmp_path_factory.mktemp('sqlite') / 'condenser.db'}"


def directives(policy: str) -> dict[str, str]:
    return dict(directive.split(" ", 1) for directive in policy.split("; "))


def references(html: str) -> list[str]:
    return REFERENCE.findall(html)


@pytest.mark.parametrize("path", PAGES)
def test_the_page_references_only_files_this_server_serves(client: TestClient, path: str) -> None:
    page = client.get(path)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    inline_scripts = re.findall(r"<script(?![^>]*\ssrc=)", page.text)
    assert inline_scripts == [] and "<style" not in page.text and " style=" not in page.text  # the policy refuses them
    referenced = references(page.text)
    assert len(referenced) >= 3, referenced
    for url in referenced:
        assert url.startswith("/") and not url.startswith("//"), url
        response = client.get(url)
        assert response.status_code == 200, url
        suffix = "." + url.rsplit(".", 1)[-1]
        assert response.headers["content-type"].startswith(CONTENT_TYPES[suffix]), (url, response.headers)
    assert "/openapi.json" in referenced
    assert client.get("/openapi.json").json()["info"]["title"] == "condenser"


def test_the_viewers_are_the_packaged_bundles(client: TestClient) -> None:
    vendor = files("fastapi_offline") / "static"
    for name in ("swagger-ui-bundle.js", "swagger-ui.css", "redoc.standalone.js"):
        response = client.get(f"/docs-assets/{name}")
        assert response.status_code == 200 and response.content == (vendor / name).read_bytes(), name
    assert client.get("/docs-assets/missing.js").status_code == 404
    assert client.get("/docs/oauth2-redirect").status_code == 404  # FastAPI's page, with its inline script


def test_the_pages_send_the_dashboards_policy_and_redoc_only_adds_inline_styles(client: TestClient) -> None:
    swagger, redoc = (client.get(path).headers for path in PAGES)
    assert swagger["content-security-policy"] == CONTENT_SECURITY_POLICY
    assert swagger["x-content-type-options"] == redoc["x-content-type-options"] == "nosniff"
    assert client.get("/docs-assets/swagger-init.js").headers["content-security-policy"] == CONTENT_SECURITY_POLICY
    strict, relaxed = directives(CONTENT_SECURITY_POLICY), directives(redoc["content-security-policy"])
    assert relaxed == {**strict, "style-src": "'self' 'unsafe-inline'"}
    assert relaxed["script-src"] == "'self'"


# --- in a real browser -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base_url(client: TestClient) -> Iterator[str]:
    """The test's app over real HTTP (uvicorn in a thread: the pages need no worker and no other process)."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(client.app, host="127.0.0.1", port=port, lifespan="off",
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started and thread.is_alive():
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


def test_both_pages_render_in_a_browser_under_their_policy(base_url: str) -> None:
    # Imported here: that module loads torch for its own test, seconds that only this test should pay.
    from tests.e2e.test_dashboard_browser import CHROMIUM, CHROMIUM_ARGS, sync_playwright


    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            swagger = render(browser, base_url + "/docs", ".opblock")
            redoc = render(browser, base_url + "/redoc", "[data-section-id]")
        finally:
            browser.close()
    assert swagger["count"] >= 20 and swagger["problems"] == [], swagger
    # The one refusal is ReDoc's sidebar logo, hard-wired to its CDN: the policy blocks it, the image hides itself.
    assert redoc["count"] >= 20, redoc
    assert all("cdn.redoc.ly/redoc/logo-mini.svg" in problem for problem in redoc["problems"]), redoc
    for result in (swagger, redoc):
        assert result["origins"] == {base_url}, result


def render(browser: Any, url: str, selector: str) -> dict[str, Any]:
    """Open the page, wait for its viewer to list the operations; what it logged and where its files came from."""
    page = browser.new_page()
    problems: list[str] = []
    origins: set[str] = set()
    page.on("console", lambda message: message.type == "error" and problems.append(message.text))
    page.on("pageerror", lambda error: problems.append(str(error)))
    page.on("response", lambda response: origins.add("{0.scheme}://{0.netloc}".format(urlparse(response.url))))
    page.goto(url)
    page.locator(selector).first.wait_for(timeout=30_000)
    result = {"count": page.locator(selector).count(), "problems": problems, "origins": origins}
    page.close()
    return result
