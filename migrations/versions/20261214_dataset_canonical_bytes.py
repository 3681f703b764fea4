"""dataset canonical bytes: the size of the stored canonical .npz, which the storage quota counts

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-14 10:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Nullable: earlier rows keep NULL and the quota counts their upload size (the blobs may live on
    # another host than the one migrating, so they are not measured here).
    with op.batch_alter_table("datasets", schema=None) as batch_op:
        batch_op.add_column(sa.Column("canonical_bytes", sa.BigInteger(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("datasets", schema=None) as batch_op:
        batch_op.drop_column("canonical_bytes")
