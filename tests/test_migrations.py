"""Migrations on both dialects: head matches the ORM exactly, every revision downgrades and upgrades again, and
rows written before revision 0004 read back with its defaults."""

from __future__ import annotations

from datetime import UTC, datetime

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect, text

from core.db.migrate import alembic_config, upgrade_to_head
from core.db.models import Base


def _differences(url: str) -> list[object]:
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            return compare_metadata(MigrationContext.configure(connection), Base.metadata)
    finally:
        engine.dispose()


def test_head_matches_the_orm_and_every_revision_round_trips(database_url: str) -> None:
    config = alembic_config(database_url)
    upgrade_to_head(database_url)
    assert _differences(database_url) == []
    command.downgrade(config, "base")
    engine = create_engine(database_url)
    try:
        assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
    finally:
        engine.dispose()
    upgrade_to_head(database_url)
    assert _differences(database_url) == []


def test_rows_from_before_lineage_read_back_with_its_defaults(database_url: str) -> None:
    config = alembic_config(database_url)
    command.downgrade(config, "base")  # the module's database may be at head already
    command.upgrade(config, "0003")
    engine = create_engine(database_url)
    now = datetime.now(UTC)
    try:
        with engine.begin() as connection:
            connection.execute(text(
                "INSERT INTO models (id, tenant, name, format, sha256, bytes, arch, input_spec, num_classes, "
                "param_count, created_at) VALUES ('mdl_old', 't', 'old', 'safetensors', :sha, 10, :arch, :input, 10, "
                "100, :now)"), {"sha": "0" * 64, "arch": '{"arch": "small_cnn", "kwargs": {"num_classes": 10}}',
                                "input": '{"image_size": 8, "channels": 1}', "now": now})
        command.upgrade(config, "head")
        with engine.connect() as connection:
            row = connection.execute(text(
                "SELECT precision, source_job_id, deleted_at FROM models WHERE id = 'mdl_old'")).one()
        assert tuple(row) == ("float32", None, None)
        # Back to 0003 keeps the row, minus the new columns.
        command.downgrade(config, "0003")
        with engine.connect() as connection:
            assert connection.execute(text("SELECT name FROM models WHERE id = 'mdl_old'")).scalar_one() == "old"
    finally:
        engine.dispose()
