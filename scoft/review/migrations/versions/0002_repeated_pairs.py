"""Repeated pairs: each reviewer sees one pair a second time, images swapped, to measure their
self-consistency.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("pairs") as batch:  # batch: SQLite alters tables by copying them
        batch.add_column(sa.Column("repeat_of", sa.String(32), nullable=True))
        batch.add_column(sa.Column("reviewer_id", sa.String(32), nullable=True))
        batch.create_index("ix_pairs_reviewer_id", ["reviewer_id"])


def downgrade() -> None:
    with op.batch_alter_table("pairs") as batch:
        batch.drop_index("ix_pairs_reviewer_id")
        batch.drop_column("reviewer_id")
        batch.drop_column("repeat_of")
