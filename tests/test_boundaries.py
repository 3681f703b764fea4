"""Import boundaries and the import graph, read from the source (every import, also those inside functions).

- core/ imports neither app/ nor worker/ (the pure worker/engine/ library aside: job specs embed its configs);
- app/ imports worker/ only for worker/engine/'s torch-free configs and checks, and never imports torch;
- worker/ never imports app/; worker/engine/ imports none of the service (FastAPI, Celery, SQLAlchemy, core);
- no cycle between the packages, and none between the modules of core/ or worker/.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("core", "app", "worker")
ENGINE = "worker.engine"
TORCH_FREE_ENGINE = ["config", "errors", "ingest", "catalog", "fileio", "recipes"]
SERVICE_PACKAGES = {"fastapi", "celery", "sqlalchemy", "starlette", "app", "core"}


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO_ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for package in PACKAGES for path in sorted((REPO_ROOT / package).rglob("*.py"))}


def imports_of(path: Path, name: str) -> Iterator[str]:
    """Every module `path` imports, absolute, with `from x import y` read as x.y when x.y is a module."""
    known = modules()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:
                yield f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base


def area(module: str) -> str:
    """Which part of the house a module belongs to: core, app, worker.engine, worker, or outside."""
    if module == ENGINE or module.startswith(ENGINE + "."):
        return ENGINE
    top = module.split(".")[0]
    return top if top in PACKAGES else "outside"


def edges() -> list[tuple[str, str]]:
    known = modules()
    found = []
    for name, path in known.items():
        for target in imports_of(path, name):
            found.append((name, target))
    return found


ALLOWED = {
    "core": {"core", ENGINE},
    "app": {"app", "core", ENGINE},
    "worker": {"worker", "core", ENGINE},
    ENGINE: {ENGINE},
}


def test_each_package_imports_only_what_it_may() -> None:
    offenders = [f"{source} -> {target}" for source, target in edges()
                 if area(target) != "outside" and area(target) not in ALLOWED[area(source)]]
    assert offenders == []


def test_the_engine_never_imports_the_service() -> None:
    offenders = [f"{source} -> {target}" for source, target in edges()
                 if area(source) == ENGINE and target.split(".")[0] in SERVICE_PACKAGES]
    assert offenders == []


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as a path that ends where it starts, or None."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                return [*stack[stack.index(target):], target]
            if target not in state and (cycle := visit(target)):
                return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_finds_one() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_cycle_between_packages() -> None:
    graph: dict[str, set[str]] = {}
    for source, target in edges():
        if area(target) != "outside" and area(source) != area(target):
            graph.setdefault(area(source), set()).add(area(target))
    assert find_cycle(graph) is None


def test_no_cycle_between_the_modules_of_core_or_worker() -> None:
    graph: dict[str, set[str]] = {}
    for source, target in edges():
        if area(source) == area(target) and area(source) in ("core", "worker", ENGINE) and source != target:
            graph.setdefault(source, set()).add(target)
    assert find_cycle(graph) is None


def test_api_facing_engine_modules_do_not_import_torch() -> None:
    imports = "; ".join(f"import worker.engine.{name}" for name in TORCH_FREE_ENGINE)
    code = f"import sys, json; {imports}; import core.views, core.lifecycle, core.summary; "
    code += "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
    code += "('torch', 'torchvision', 'safetensors'))))"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    assert json.loads(result.stdout) == []
