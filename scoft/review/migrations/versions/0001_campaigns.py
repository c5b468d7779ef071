"""Campaigns, images, pairs, reviewers and ratings.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "campaigns",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("culture", sa.String(3), nullable=False, index=True),
        sa.Column("candidate_sha256", sa.String(64), nullable=False),
        sa.Column("lineage", sa.String(128), nullable=False),
        sa.Column("evaluation", sa.Text, nullable=False),
        sa.Column("opened_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
    )
    op.create_table(
        "images",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("campaign_id", sa.String(32), sa.ForeignKey("campaigns.id"), nullable=False, index=True),
        sa.Column("model", sa.String(32), nullable=False),
        sa.Column("path", sa.Text, nullable=False),
    )
    op.create_table(
        "pairs",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("campaign_id", sa.String(32), sa.ForeignKey("campaigns.id"), nullable=False, index=True),
        sa.Column("comparison", sa.String(16), nullable=False),
        sa.Column("prompt", sa.Text, nullable=False),
        sa.Column("seed", sa.Integer, nullable=False),
        sa.Column("record", sa.String(64), nullable=False),
        sa.Column("first_image", sa.String(32), sa.ForeignKey("images.id"), nullable=False),
        sa.Column("second_image", sa.String(32), sa.ForeignKey("images.id"), nullable=False),
        sa.Column("candidate_first", sa.Boolean, nullable=False),
    )
    op.create_table(
        "reviewers",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("campaign_id", sa.String(32), sa.ForeignKey("campaigns.id"), nullable=False, index=True),
        sa.Column("token_sha256", sa.String(64), nullable=False, unique=True),
        sa.Column("invited_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_table(
        "ratings",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("pair_id", sa.String(32), sa.ForeignKey("pairs.id"), nullable=False, index=True),
        sa.Column("reviewer_id", sa.String(32), sa.ForeignKey("reviewers.id"), nullable=False, index=True),
        sa.Column("better", sa.Integer, nullable=True),
        sa.Column("more_stereotyped", sa.Integer, nullable=True),
        sa.Column("offensive_first", sa.Boolean, nullable=False),
        sa.Column("offensive_second", sa.Boolean, nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    for table in ("ratings", "reviewers", "pairs", "images", "campaigns"):
        op.drop_table(table)
