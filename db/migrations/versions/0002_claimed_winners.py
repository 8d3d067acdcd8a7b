"""Winners say whether their timing is an imported claim (winners.claimed, snapshot_winners.claimed).

A local measurement beats a claim whatever time the claim names; a verify job re-measures claims.
Existing winners whose trial came from a bundle (trials.origin set) are marked claimed.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

TABLES = ("winners", "snapshot_winners")


def upgrade() -> None:
    for table in TABLES:
        op.add_column(table, sa.Column("claimed", sa.Boolean(), server_default=sa.false(), nullable=False))
        op.execute(
            sa.text(
                f"UPDATE {table} SET claimed = :yes WHERE trial_id IN (SELECT id FROM trials WHERE origin IS NOT NULL)"
            ).bindparams(yes=True)
        )


def downgrade() -> None:
    for table in TABLES:
        with op.batch_alter_table(table) as batch:
            batch.drop_column("claimed")
