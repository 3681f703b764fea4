"""Shared fixtures: a real database (SQLite file and PostgreSQL), a configured app, API keys, test models.

Environments are module-scoped so that a module pays for migrations (and model uploads) once per
database; tests stay independent by each using fresh tenants, which see nothing of one another.

Reusable by other suites (e2e): database_url, broker_url, app_env (AppEnv: settings, env vars for
subprocesses, store), client, make_api_key, tenant, auth_headers, other_auth_headers, insert_model (and
insert_model_row, for a database set up otherwise), insert_dataset (insert_dataset_row), insert_artifact,
small_cnn_files, digits_teacher.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, make_url, text

from app.auth.service import create_key
from app.main import create_app
from core.db.migrate import upgrade_to_head
from core.db.models import Artifact, Dataset, Model
from core.db.session import get_engine, get_sessionmaker, session_scope
from core.settings import Settings, get_settings
from core.storage import BlobStore

if TYPE_CHECKING:
    from torch import nn

POSTGRES_SERVER_URL = os.environ.get(
    "CONDENSER_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
SMALL_CNN_SPEC: dict[str, Any] = {
    "arch": "small_cnn",
    "kwargs": {"num_classes": 10, "width": 4, "depth": 2},
    "input": {"image_size": 8, "channels": 1},
}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


# --- databases -----------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A fresh, empty database: a SQLite file, or a uniquely named PostgreSQL database dropped afterwards."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path_factory.mktemp('sqlite') / 'condenser.db'}"
    else:
        yield from fresh_postgres_database()


def fresh_postgres_database() -> Iterator[str]:
    """Generator: yields the URL of a new database on the test server, drops it (WITH FORCE) when resumed."""
    server = make_url(POSTGRES_SERVER_URL)
    admin = create_engine(server, isolation_level="AUTOCOMMIT")
    name = f"condenser_test_{secrets.token_hex(6)}"
    try:
        with admin.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as exc:
        admin.dispose()
        reason = f"PostgreSQL unreachable at {server.render_as_string(hide_password=True)}: {exc}"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    try:
        yield server.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(scope="module")
def broker_url() -> str:
    """The embedded broker (files under data_dir/broker): no worker is needed to accept jobs.
    Override this fixture (e.g. with a Redis URL) in a suite that runs real workers."""
    return "filesystem://"


# --- the configured application ------------------------------------------------------------------


@dataclass(frozen=True)
class AppEnv:
    settings: Settings
    env: dict[str, str]  # CONDENSER_* variables, for starting workers or servers as subprocesses
    data_dir: Path
    database_url: str

    @property
    def store(self) -> BlobStore:
        return BlobStore(self.settings.storage_dir)

    def subprocess_env(self) -> dict[str, str]:
        return {**os.environ, **self.env}


def clear_cached_singletons() -> None:
    """Settings, engine, sessionmaker and Celery app are cached per process; reset them with the env."""
    from core.broker import get_celery

    engine_was_built = get_engine.cache_info().currsize > 0
    if engine_was_built:
        get_engine().dispose()
    for cached in (get_settings, get_engine, get_sessionmaker, get_celery):
        cached.cache_clear()


@pytest.fixture(scope="module")
def app_env(database_url: str, broker_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AppEnv]:
    """Environment variables set, caches reset, database migrated to head."""
    data_dir = tmp_path_factory.mktemp("data")
    env = {"CONDENSER_DATA_DIR": str(data_dir), "CONDENSER_DATABASE_URL": database_url,
           "CONDENSER_BROKER_URL": broker_url}
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        clear_cached_singletons()
        upgrade_to_head(database_url)
        yield AppEnv(settings=get_settings(), env=env, data_dir=data_dir, database_url=database_url)
        clear_cached_singletons()


@pytest.fixture(scope="module")
def client(app_env: AppEnv) -> Iterator[TestClient]:
    with TestClient(create_app()) as test_client:
        yield test_client


# --- tenants and keys ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def make_api_key(app_env: AppEnv) -> Callable[[str], str]:
    """make_api_key(tenant) -> a new plaintext key for that tenant."""

    def make(tenant: str) -> str:
        with session_scope() as session:
            return create_key(session, tenant)[1]

    return make


def unique_tenant() -> str:
    return f"tenant-{secrets.token_hex(6)}"


@pytest.fixture
def tenant() -> str:
    """A tenant of this test alone: it starts with no models, datasets or jobs."""
    return unique_tenant()


@pytest.fixture
def auth_headers(make_api_key: Callable[[str], str], tenant: str) -> dict[str, str]:
    return bearer(make_api_key(tenant))


@pytest.fixture
def other_auth_headers(make_api_key: Callable[[str], str]) -> dict[str, str]:
    """A key of a second tenant, who must see none of the first tenant's resources."""
    return bearer(make_api_key(unique_tenant()))


# --- rows written directly, as the worker or a fast setup would ----------------------------------


def insert_model_row(tenant: str, **fields: Any) -> str:
    """The id of a Model row written without the upload path (no weights check; no blob unless `sha256` names one
    stored): enough for job submission, which only reads the row."""
    spec = fields.pop("spec", SMALL_CNN_SPEC)
    values: dict[str, Any] = {
        "tenant": tenant, "name": "inserted", "format": "safetensors", "sha256": "0" * 64, "bytes": 0,
        "arch": {"arch": spec["arch"], "kwargs": spec["kwargs"]},
        "input_spec": {"mean": [0.5], "std": [0.5], "resize": "resize", **spec["input"]},
        "num_classes": spec["kwargs"]["num_classes"], "param_count": 1, **fields,
    }
    with session_scope() as session:
        model = Model(**values)
        session.add(model)
        session.flush()
        return model.id


@pytest.fixture(scope="module")
def insert_model(app_env: AppEnv) -> Callable[..., str]:
    """insert_model(tenant, **fields) -> id of a Model row (insert_model_row) in this module's database."""
    return insert_model_row


def insert_dataset_row(tenant: str, **fields: Any) -> str:
    """The id of a Dataset row of 10 classes of 8x8 grayscale images, written without the upload path (no
    ingestion; no blob unless `canonical_sha256` names one stored, and by default a content address of its own, so
    that two such rows are never the same images): enough for job submission, which only reads the row."""
    values: dict[str, Any] = {
        "tenant": tenant, "name": "inserted", "format": "npz", "sha256": "0" * 64, "bytes": 0,
        "canonical_sha256": secrets.token_hex(32), "canonical_bytes": 0, "num_classes": 10,
        "class_names": [str(label) for label in range(10)], "num_samples": 40, "class_counts": [4] * 10,
        "image_shape": [8, 8, 1], **fields,
    }
    with session_scope() as session:
        dataset = Dataset(**values)
        session.add(dataset)
        session.flush()
        return dataset.id


@pytest.fixture(scope="module")
def insert_dataset(app_env: AppEnv) -> Callable[..., str]:
    """insert_dataset(tenant, **fields) -> id of a Dataset row (insert_dataset_row) in this module's database."""
    return insert_dataset_row


@pytest.fixture(scope="module")
def insert_artifact(app_env: AppEnv) -> Callable[..., str]:
    """insert_artifact(tenant, job_id, data, kind=..., filename=...) -> artifact id, with its blob stored."""

    def insert(tenant: str, job_id: str, data: bytes, kind: str = "student_safetensors",
               filename: str = "student.safetensors", media_type: str = "application/octet-stream") -> str:
        blob = app_env.store.put_bytes(data)
        assert blob.sha256 == hashlib.sha256(data).hexdigest()
        with session_scope() as session:
            artifact = Artifact(tenant=tenant, job_id=job_id, kind=kind, filename=filename, media_type=media_type,
                                runtime="safetensors", sha256=blob.sha256, bytes=blob.bytes)
            session.add(artifact)
            session.flush()
            return artifact.id

    return insert


# --- tiny real models (tests may import torch; the app may not) ----------------------------------


@dataclass(frozen=True)
class SmallCnnFiles:
    spec: dict[str, Any]
    safetensors: Path
    state_dict: Path


@pytest.fixture(scope="session")
def small_cnn_files(tmp_path_factory: pytest.TempPathFactory) -> SmallCnnFiles:
    """Seeded small_cnn weights (10 classes, 8x8 grayscale input) as .safetensors and as a torch.save state_dict,
    trained on digits for half a second (about 80% held out): a teacher whose students clear the acceptance floor
    (no result at chance level) in a couple of epochs."""
    import safetensors.torch
    import torch

    from worker.engine import data
    from worker.engine.config import ADAMW_LOOP, ArchSpec, DistillConfig
    from worker.engine.distill import distill
    from worker.engine.models import build_model

    torch.manual_seed(0)
    arch = ArchSpec.model_validate(SMALL_CNN_SPEC)
    model = build_model(arch)
    train, val = data.train_val_tensors(data.load_builtin("digits"), arch.input, 0.2, 0)
    distill(None, model, train, val, DistillConfig(epochs=8, batch_size=32, lr=1e-2, **ADAMW_LOOP),
            on_progress=lambda _: None)
    state = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
    folder = tmp_path_factory.mktemp("weights")
    safetensors.torch.save_file(state, folder / "teacher.safetensors")
    torch.save(state, folder / "teacher.pt")
    return SmallCnnFiles(spec=SMALL_CNN_SPEC, safetensors=folder / "teacher.safetensors",
                         state_dict=folder / "teacher.pt")


@dataclass(frozen=True)
class DigitsTeacher:
    model: nn.Module
    accuracy: float  # on the recipe's held-out split, as train_digits_teacher measured it
    safetensors: Path


@pytest.fixture(scope="session")
def digits_teacher(tmp_path_factory: pytest.TempPathFactory) -> DigitsTeacher:
    """The demo's resnet18 teacher (worker.engine.recipes.train_digits_teacher), trained once per session and
    saved as `condenser demo` saves it: the slowest training in the suite (most of a minute to two on 2 cores),
    so the tests that need this same teacher (the recipe's accuracies, the demo run) share it.

    Read-only for its users: distilling from it only puts it in eval mode (it is already) on the device that
    trains, which leaves its weights as they are."""
    from worker.engine import export
    from worker.engine.recipes import train_digits_teacher

    teacher, accuracy = train_digits_teacher()
    path = tmp_path_factory.mktemp("digits_teacher") / "teacher.safetensors"
    export.save_safetensors(teacher, path)
    return DigitsTeacher(model=teacher.eval(), accuracy=accuracy, safetensors=path)
