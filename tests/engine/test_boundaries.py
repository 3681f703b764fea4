"""Import boundaries: the API side stays torch-free, the engine stays free of the service."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
ENGINE = REPO_ROOT / "worker" / "engine"
TORCH_FREE = ["config", "errors", "ingest", "catalog", "fileio", "recipes"]
SERVICE_PACKAGES = {"fastapi", "celery", "sqlalchemy", "starlette", "app"}


def test_api_facing_modules_do_not_import_torch() -> None:
    imports = "; ".join(f"import worker.engine.{name}" for name in TORCH_FREE)
    code = f"import sys, json; {imports}; print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
    code += "('torch', 'torchvision', 'safetensors'))))"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    assert json.loads(result.stdout) == []


def test_engine_never_imports_the_service() -> None:
    offenders = []
    for path in sorted(ENGINE.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            else:
                continue
            offenders += [f"{path.name}: {name}" for name in names if name.split(".")[0] in SERVICE_PACKAGES]
    assert offenders == []
