"""Failures of what the API depends on are answers a client can act on, not 500 "internal error": a database
that is gone is a 503 with Retry-After, a full disk is a 507, /readyz says why it is not ready, and `condenser
serve` waits for a database that starts after it.

All on real services: a PostgreSQL database created late and then dropped, and a tmpfs of a few MiB mounted for
the server alone (a user and mount namespace: no privilege needed) that really fills up.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import create_engine, make_url, text

from tests.conftest import POSTGRES_SERVER_URL, bearer
from tests.support import REPO, ApiServerProcess, wait_for

TMPFS_BYTES = 4 << 20


@pytest.mark.postgres
def test_serve_waits_for_the_database_and_answers_503_while_it_is_gone(tmp_path: Path) -> None:
    server_url = make_url(POSTGRES_SERVER_URL)
    name = f"condenser_late_{os.getpid()}_{threading.get_ident() % 10_000}"
    admin = create_engine(server_url, isolation_level="AUTOCOMMIT")
    env = {**os.environ, "CONDENSER_DATA_DIR": str(tmp_path / "data"),
           "CONDENSER_DATABASE_URL": server_url.set(database=name).render_as_string(hide_password=False)}
    server = ApiServerProcess(env, tmp_path / "server.log")

    def create_database_once_serve_waits() -> None:
        wait_for(lambda: "waiting for the database" in _read(server.log_path), 60, what="serve to wait")
        with admin.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{name}"'))

    creator = threading.Thread(target=create_database_once_serve_waits)
    try:
        creator.start()
        server.start(timeout=90)
        creator.join()
        assert (f"waiting for the database at {server_url.host}:{server_url.port}/{name} ... (attempt 1"
                in _read(server.log_path))
        key = subprocess.run([sys.executable, "-m", "app.cli", "keys", "create", "--tenant", "late"], env=env,
                             cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
        assert httpx.get(f"{server.url}/v1/me", headers=bearer(key)).status_code == 200
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE "{name}" WITH (FORCE)'))
        gone = httpx.get(f"{server.url}/v1/me", headers=bearer(key))
        assert gone.status_code == 503, gone.text
        assert gone.headers["retry-after"] == "5"
        assert gone.json() == {"detail": "the database is unavailable; retry after the Retry-After delay"}
    finally:
        server.stop()
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture
def server_on_tmpfs(tmp_path: Path) -> Iterator[tuple[ApiServerProcess, Path, str]]:
    """(server, its data directory as this process sees it, an API key): `condenser serve` on the embedded default
    whose data directory (SQLite database included) is a tmpfs of TMPFS_BYTES mounted for it alone."""
    if shutil.which("unshare") is None:
        pytest.skip("unshare (util-linux) is not installed")
    data = tmp_path / "data"
    data.mkdir()
    env = {**os.environ, "CONDENSER_DATA_DIR": str(data), "CONDENSER_READINESS_MIN_FREE_BYTES": str(64 << 10)}
    for name in ("CONDENSER_DATABASE_URL", "CONDENSER_BROKER_URL"):
        env.pop(name, None)
    key_file = tmp_path / "key"
    # The key is created inside the namespace: the database lives on the tmpfs.
    script = (f'mount -t tmpfs -o size={TMPFS_BYTES} condenser-test "$0" && '
              f'"$1" -m app.cli keys create --tenant full > {key_file} && exec "$@"')
    server = ApiServerProcess(env, tmp_path / "server.log", prefix=[
        "unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script, str(data)])
    try:
        server.start()
    except AssertionError as exc:
        if "Operation not permitted" in _read(server.log_path):
            pytest.skip(f"this kernel allows no user namespace mounts: {_read(server.log_path)[-300:]}")
        raise exc
    assert server.process is not None
    try:
        # /proc/<pid>/root: the server's view of the filesystem, tmpfs included.
        yield server, Path(f"/proc/{server.process.pid}/root{data}"), key_file.read_text().strip()
    finally:
        server.stop()


def test_a_full_disk_is_a_507_and_readyz_says_why(server_on_tmpfs: tuple[ApiServerProcess, Path, str]) -> None:
    server, data, key = server_on_tmpfs
    assert httpx.get(f"{server.url}/readyz").json()["checks"]["storage"] == "ok"
    _fill(data / "filler")

    ready = httpx.get(f"{server.url}/readyz")
    assert ready.status_code == 503
    assert ready.json()["checks"]["storage"] == "unavailable"
    assert ready.json()["reasons"]["storage"] == "the data directory is full"

    upload = httpx.post(f"{server.url}/v1/datasets", headers=bearer(key),
                        files={"file": ("tiny.npz", os.urandom(256 << 10))})
    assert upload.status_code == 507, upload.text
    assert "out of disk space" in upload.json()["detail"]
    assert not list((data / "storage" / "tmp").glob("*")), "the partial upload was left behind"
    # A row to write: SQLite says "database or disk is full".
    secret = httpx.put(f"{server.url}/v1/webhook", headers=bearer(key), json={"url": "https://93.184.215.14/hook"})
    assert secret.status_code == 507, secret.text

    (data / "filler").unlink()
    assert httpx.get(f"{server.url}/readyz").status_code == 200


def _fill(path: Path) -> None:
    """Write until the filesystem refuses: ENOSPC, from the kernel."""
    # Unbuffered: a refused write leaves nothing behind for close() to flush (and be refused again, uncaught).
    with open(path, "wb", buffering=0) as filler:
        try:
            while True:
                filler.write(b"\0" * (64 << 10))
        except OSError as exc:
            assert exc.errno == 28, exc


def _read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""
