"""Fused block winners: per (device, block) the plan and one schedule per fused step, live and pinned by snapshots.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def _columns() -> list[sa.Column]:
    return [
        sa.Column("device_id", sa.Integer(), nullable=False),
        sa.Column("block_digest", sa.String(length=16), nullable=False),
        sa.Column("block_key", sa.Text(), nullable=False),
        sa.Column("summary", sa.String(length=300), nullable=False),
        sa.Column("plan", sa.Text(), nullable=False),
        sa.Column("schedules", sa.Text(), nullable=False),
        sa.Column("plan_id", sa.String(length=24), nullable=False),
        sa.Column("median_ms", sa.Float(), nullable=False),
        sa.Column("spread_ms", sa.Float(), nullable=True),
        sa.Column("reps", sa.Integer(), nullable=False),
        sa.Column("max_error", sa.Float(), nullable=True),
        sa.Column("strategy", sa.String(length=64), nullable=True),
        sa.Column("origin", sa.String(length=80), nullable=True),
        sa.Column("claimed", sa.Boolean(), server_default=sa.false(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
    ]


def upgrade() -> None:
    op.create_table(
        "block_winners",
        *_columns(),
        sa.ForeignKeyConstraint(["device_id"], ["devices.id"], name=op.f("fk_block_winners_device_id")),
        sa.PrimaryKeyConstraint("device_id", "block_digest", name=op.f("pk_block_winners")),
    )
    op.create_table(
        "snapshot_block_winners",
        *_columns(),
        sa.Column("snapshot", sa.String(length=64), nullable=False),
        sa.ForeignKeyConstraint(["device_id"], ["devices.id"], name=op.f("fk_snapshot_block_winners_device_id")),
        sa.ForeignKeyConstraint(["snapshot"], ["snapshots.name"], name=op.f("fk_snapshot_block_winners_snapshot")),
        sa.PrimaryKeyConstraint("device_id", "block_digest", "snapshot", name=op.f("pk_snapshot_block_winners")),
    )


def downgrade() -> None:
    op.drop_table("snapshot_block_winners")
    op.drop_table("block_winners")
