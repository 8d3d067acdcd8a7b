"""Ahead-of-time binaries: kernels compiled for an arch (here, or imported from a bundle a pinned key signed).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "binaries",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("variant_id", sa.String(length=24), nullable=False),
        sa.Column("arch", sa.Integer(), nullable=False),
        sa.Column("key", sa.String(length=64), nullable=False),
        sa.Column("source_sha256", sa.String(length=64), nullable=False),
        sa.Column("triton_version", sa.String(length=64), nullable=False),
        sa.Column("ptxas_version", sa.String(length=200), nullable=True),
        sa.Column("name", sa.String(length=150), nullable=False),
        sa.Column("env", sa.Text(), nullable=False),
        sa.Column("signature", sa.Text(), nullable=False),
        sa.Column("files", sa.Text(), nullable=False),
        sa.Column("size", sa.Integer(), nullable=False),
        sa.Column("origin", sa.String(length=80), nullable=False),
        sa.Column("signed_by", sa.String(length=16), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_binaries")),
        sa.UniqueConstraint("variant_id", "arch", "key", name=op.f("uq_binaries_variant_id_arch_key")),
    )
    op.create_index(op.f("ix_binaries_arch_variant_id"), "binaries", ["arch", "variant_id"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_binaries_arch_variant_id"), table_name="binaries")
    op.drop_table("binaries")
