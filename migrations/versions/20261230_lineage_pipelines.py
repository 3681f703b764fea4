"""lineage and pipelines: job results registered as models, deletions kept as marks, pipelines of jobs

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-30 10:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "pipelines",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("tenant", sa.String(length=64), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("spec", sa.JSON(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("input_accuracy", sa.Double(), nullable=True),
        sa.Column("replay_of", sa.String(length=40), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("pipelines", schema=None) as batch_op:
        batch_op.create_index("ix_pipelines_tenant_created", ["tenant", "created_at"], unique=False)

    # Earlier models are uploads of float weights: the server default fills their precision.
    with op.batch_alter_table("models", schema=None) as batch_op:
        batch_op.add_column(sa.Column("precision", sa.String(length=16), nullable=False,
                                      server_default="float32"))
        batch_op.add_column(sa.Column("source_job_id", sa.String(length=40), nullable=True))
        batch_op.add_column(sa.Column("deleted_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.create_index(batch_op.f("ix_models_source_job_id"), ["source_job_id"], unique=False)
    with op.batch_alter_table("datasets", schema=None) as batch_op:
        batch_op.add_column(sa.Column("deleted_at", sa.DateTime(timezone=True), nullable=True))
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("pipeline_id", sa.String(length=40), nullable=True))
        batch_op.add_column(sa.Column("stage", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("inputs", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("replay_of", sa.String(length=40), nullable=True))
        batch_op.create_index(batch_op.f("ix_jobs_pipeline_id"), ["pipeline_id"], unique=False)
        batch_op.create_foreign_key("fk_jobs_pipeline_id", "pipelines", ["pipeline_id"], ["id"])


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_constraint("fk_jobs_pipeline_id", type_="foreignkey")
        batch_op.drop_index(batch_op.f("ix_jobs_pipeline_id"))
        batch_op.drop_column("replay_of")
        batch_op.drop_column("inputs")
        batch_op.drop_column("stage")
        batch_op.drop_column("pipeline_id")
    with op.batch_alter_table("datasets", schema=None) as batch_op:
        batch_op.drop_column("deleted_at")
    with op.batch_alter_table("models", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_models_source_job_id"))
        batch_op.drop_column("deleted_at")
        batch_op.drop_column("source_job_id")
        batch_op.drop_column("precision")
    with op.batch_alter_table("pipelines", schema=None) as batch_op:
        batch_op.drop_index("ix_pipelines_tenant_created")
    op.drop_table("pipelines")
