"""The API process must never import torch: it is slow to load, large in memory, and runs user models."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from tests.api.helpers import npz_dataset
from tests.support import REPO

# Runs in a fresh interpreter: builds the app, imports every app module, serves the routes that touch
# the engine's torch-free side (built-in datasets, job checks, dispatch) and a dataset upload, then reports
# torch's absence.
SCRIPT = textwrap.dedent(
    """
    import importlib, pkgutil, sys
    import app
    from app.main import create_app
    from core.db.migrate import upgrade_to_head
    from core.settings import get_settings
    from core.db.session import session_scope
    from core.db.models import Model
    from app.auth.service import create_key
    from fastapi.testclient import TestClient

    test_client = TestClient(create_app())
    for module in pkgutil.walk_packages(app.__path__, "app."):
        importlib.import_module(module.name)

    upgrade_to_head(get_settings().database_url)
    with session_scope() as session:
        key = create_key(session, "no-torch")[1]
        teacher = Model(tenant="no-torch", name="t", format="safetensors", sha256="0" * 64, bytes=0,
                        arch={"arch": "small_cnn", "kwargs": {"num_classes": 10}},
                        input_spec={"image_size": 8, "channels": 1}, num_classes=10, param_count=1)
        session.add(teacher)
    headers = {"Authorization": "Bearer " + key}
    assert test_client.get("/v1/datasets/builtin", headers=headers).status_code == 200
    job = {"teacher": teacher.id, "dataset": "digits", "student": {"arch": "small_cnn"}}
    response = test_client.post("/v1/jobs", headers=headers, json=job)
    assert response.status_code == 201, response.text
    # Datasets are read by a child process: this one never imports the ingestion (numpy, Pillow, tarfile).
    with open(sys.argv[1], "rb") as upload:
        response = test_client.post("/v1/datasets", headers=headers, files={"file": ("d.npz", upload.read())})
    assert response.status_code == 201, response.text
    assert "worker.engine.ingest" not in sys.modules
    print("torch loaded:", sorted(name for name in sys.modules if name == "torch" or name.startswith("torch.")))
    """
)


def test_api_never_imports_torch(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "CONDENSER_DATA_DIR": str(tmp_path), "PYTHONPATH": str(REPO)}
    dataset = tmp_path / "d.npz"
    dataset.write_bytes(npz_dataset())
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(dataset)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "torch loaded: []"


def test_cli_and_client_import_light() -> None:
    """`condenser --help` and `from app.client import Client` load none of the server's or the worker's stack."""
    heavy = ("torch", "sqlalchemy", "fastapi", "celery")
    script = (f"import sys, app.cli, app.client; print([m for m in {heavy!r} if m in sys.modules])")
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60,
                          check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
