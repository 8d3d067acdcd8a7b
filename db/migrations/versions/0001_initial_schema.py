"""Initial schema: devices, specs, variants, trials, winners, jobs, snapshots, misses.

Revision ID: 0001
Revises:
Create Date: 2025-01-01
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "devices",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("key", sa.Text(), nullable=False),
        sa.Column("digest", sa.String(length=16), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("interpreter", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_devices")),
        sa.UniqueConstraint("key", name=op.f("uq_devices_key")),
    )
    op.create_index(op.f("ix_devices_digest"), "devices", ["digest"], unique=False)

    op.create_table(
        "jobs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("specs", sa.Text(), nullable=True),
        sa.Column("suite", sa.String(length=100), nullable=True),
        sa.Column("strategy", sa.String(length=64), nullable=False),
        sa.Column("budget_trials", sa.Integer(), nullable=True),
        sa.Column("budget_seconds", sa.Float(), nullable=True),
        sa.Column("device_key", sa.Text(), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("progress", sa.Text(), nullable=True),
        sa.Column("worker_id", sa.String(length=200), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("claimed_at", sa.DateTime(), nullable=True),
        sa.Column("heartbeat_at", sa.DateTime(), nullable=True),
        sa.Column("finished_at", sa.DateTime(), nullable=True),
        sa.Column("result", sa.Text(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.CheckConstraint("status IN ('queued', 'running', 'done', 'failed')", name=op.f("ck_jobs_status")),
        sa.CheckConstraint("specs IS NOT NULL OR suite IS NOT NULL", name=op.f("ck_jobs_target")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_jobs")),
    )
    op.create_index(op.f("ix_jobs_status"), "jobs", ["status"], unique=False)

    op.create_table(
        "snapshots",
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("winner_count", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_snapshots")),
    )
    op.create_table(
        "specs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("key", sa.Text(), nullable=False),
        sa.Column("digest", sa.String(length=16), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("op", sa.String(length=8), nullable=False),
        sa.Column("dtype", sa.String(length=16), nullable=False),
        sa.Column("summary", sa.String(length=300), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_specs")),
        sa.UniqueConstraint("key", name=op.f("uq_specs_key")),
    )
    op.create_index(op.f("ix_specs_digest"), "specs", ["digest"], unique=False)

    op.create_table(
        "misses",
        sa.Column("device_id", sa.Integer(), nullable=False),
        sa.Column("spec_id", sa.Integer(), nullable=False),
        sa.Column("count", sa.Integer(), nullable=False),
        sa.Column("first_seen", sa.DateTime(), nullable=False),
        sa.Column("last_seen", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(["device_id"], ["devices.id"], name=op.f("fk_misses_device_id")),
        sa.ForeignKeyConstraint(["spec_id"], ["specs.id"], name=op.f("fk_misses_spec_id")),
        sa.PrimaryKeyConstraint("device_id", "spec_id", name=op.f("pk_misses")),
    )
    op.create_table(
        "variants",
        sa.Column("id", sa.String(length=24), nullable=False),
        sa.Column("spec_id", sa.Integer(), nullable=False),
        sa.Column("schedule", sa.Text(), nullable=False),
        sa.Column("source", sa.Text(), nullable=False),
        sa.Column("generator_version", sa.String(length=32), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(["spec_id"], ["specs.id"], name=op.f("fk_variants_spec_id")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_variants")),
    )
    op.create_index(op.f("ix_variants_spec_id"), "variants", ["spec_id"], unique=False)

    op.create_table(
        "trials",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("device_id", sa.Integer(), nullable=False),
        sa.Column("spec_id", sa.Integer(), nullable=False),
        sa.Column("variant_id", sa.String(length=24), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("median_ms", sa.Float(), nullable=True),
        sa.Column("spread_ms", sa.Float(), nullable=True),
        sa.Column("reps", sa.Integer(), nullable=False),
        sa.Column("max_error", sa.Float(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("strategy", sa.String(length=64), nullable=True),
        sa.Column("job_id", sa.Integer(), nullable=True),
        sa.Column("origin", sa.String(length=80), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.CheckConstraint(
            "status IN ('ok', 'wrong-result', 'compile-error', 'crash', 'timeout')", name=op.f("ck_trials_status")
        ),
        sa.ForeignKeyConstraint(["device_id"], ["devices.id"], name=op.f("fk_trials_device_id")),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], name=op.f("fk_trials_job_id")),
        sa.ForeignKeyConstraint(["spec_id"], ["specs.id"], name=op.f("fk_trials_spec_id")),
        sa.ForeignKeyConstraint(["variant_id"], ["variants.id"], name=op.f("fk_trials_variant_id")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_trials")),
    )
    op.create_index(op.f("ix_trials_device_id_spec_id"), "trials", ["device_id", "spec_id"], unique=False)
    op.create_index(op.f("ix_trials_device_id_variant_id"), "trials", ["device_id", "variant_id"], unique=False)
    op.create_index(op.f("ix_trials_job_id"), "trials", ["job_id"], unique=False)

    op.create_table(
        "snapshot_winners",
        sa.Column("snapshot", sa.String(length=64), nullable=False),
        sa.Column("device_id", sa.Integer(), nullable=False),
        sa.Column("spec_id", sa.Integer(), nullable=False),
        sa.Column("trial_id", sa.Integer(), nullable=False),
        sa.Column("variant_id", sa.String(length=24), nullable=False),
        sa.Column("median_ms", sa.Float(), nullable=False),
        sa.Column("speedup_vs_default", sa.Float(), nullable=True),
        sa.Column("fraction_of_roofline", sa.Float(), nullable=True),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(["device_id"], ["devices.id"], name=op.f("fk_snapshot_winners_device_id")),
        sa.ForeignKeyConstraint(["snapshot"], ["snapshots.name"], name=op.f("fk_snapshot_winners_snapshot")),
        sa.ForeignKeyConstraint(["spec_id"], ["specs.id"], name=op.f("fk_snapshot_winners_spec_id")),
        sa.ForeignKeyConstraint(["trial_id"], ["trials.id"], name=op.f("fk_snapshot_winners_trial_id")),
        sa.ForeignKeyConstraint(["variant_id"], ["variants.id"], name=op.f("fk_snapshot_winners_variant_id")),
        sa.PrimaryKeyConstraint("snapshot", "device_id", "spec_id", name=op.f("pk_snapshot_winners")),
    )
    op.create_table(
        "winners",
        sa.Column("device_id", sa.Integer(), nullable=False),
        sa.Column("spec_id", sa.Integer(), nullable=False),
        sa.Column("trial_id", sa.Integer(), nullable=False),
        sa.Column("variant_id", sa.String(length=24), nullable=False),
        sa.Column("median_ms", sa.Float(), nullable=False),
        sa.Column("speedup_vs_default", sa.Float(), nullable=True),
        sa.Column("fraction_of_roofline", sa.Float(), nullable=True),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(["device_id"], ["devices.id"], name=op.f("fk_winners_device_id")),
        sa.ForeignKeyConstraint(["spec_id"], ["specs.id"], name=op.f("fk_winners_spec_id")),
        sa.ForeignKeyConstraint(["trial_id"], ["trials.id"], name=op.f("fk_winners_trial_id")),
        sa.ForeignKeyConstraint(["variant_id"], ["variants.id"], name=op.f("fk_winners_variant_id")),
        sa.PrimaryKeyConstraint("device_id", "spec_id", name=op.f("pk_winners")),
    )


def downgrade() -> None:
    op.drop_table("winners")
    op.drop_table("snapshot_winners")
    op.drop_index(op.f("ix_trials_job_id"), table_name="trials")
    op.drop_index(op.f("ix_trials_device_id_variant_id"), table_name="trials")
    op.drop_index(op.f("ix_trials_device_id_spec_id"), table_name="trials")

    op.drop_table("trials")
    op.drop_index(op.f("ix_variants_spec_id"), table_name="variants")

    op.drop_table("variants")
    op.drop_table("misses")
    op.drop_index(op.f("ix_specs_digest"), table_name="specs")

    op.drop_table("specs")
    op.drop_table("snapshots")
    op.drop_index(op.f("ix_jobs_status"), table_name="jobs")

    op.drop_table("jobs")
    op.drop_index(op.f("ix_devices_digest"), table_name="devices")

    op.drop_table("devices")
