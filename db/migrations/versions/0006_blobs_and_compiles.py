"""Kept binaries' files become blobs named by their sha256, held in chunks of at most 4 MiB (each written in its
own short transaction, so an import never holds the write lock for a whole bundle), and the ahead-of-time compile
queue moves from a daemon's memory into the store (shared by a fleet, kept across restarts).

A kept row whose files do not check out (base64, sha256) is dropped: it was never shipped, and compiling that kernel
again keeps it anew.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02
"""

import base64
import binascii
import hashlib
import json
import logging
from datetime import datetime, timezone

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None
log = logging.getLogger("alembic.runtime.migration")

_binaries = sa.table("binaries", sa.column("id", sa.Integer()), sa.column("files", sa.Text()))
CHUNK_BYTES = 4 << 20  # db.binaries.CHUNK_BYTES when this revision was written
_blobs = sa.table(
    "blobs",
    sa.column("sha256", sa.String()),
    sa.column("size", sa.Integer()),
    sa.column("chunks", sa.Integer()),
    sa.column("created_at", sa.DateTime()),
)
_chunks = sa.table(
    "blob_chunks",
    sa.column("sha256", sa.String()),
    sa.column("seq", sa.Integer()),
    sa.column("data", sa.LargeBinary()),
    sa.column("created_at", sa.DateTime()),
)
_refs = sa.table(
    "binary_files",
    sa.column("binary_id", sa.Integer()),
    sa.column("name", sa.String()),
    sa.column("sha256", sa.String()),
)


def upgrade() -> None:
    op.create_table(
        "blobs",
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("size", sa.Integer(), nullable=False),
        sa.Column("chunks", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("sha256", name=op.f("pk_blobs")),
    )
    op.create_table(
        "blob_chunks",
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("data", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("sha256", "seq", name=op.f("pk_blob_chunks")),
    )
    refs = _move_files_to_blobs()
    with op.batch_alter_table("binaries") as batch:  # before anything refers to binaries: SQLite rebuilds the table
        batch.drop_column("files")
    op.create_table(
        "binary_files",
        sa.Column("binary_id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=160), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.ForeignKeyConstraint(
            ["binary_id"], ["binaries.id"], name=op.f("fk_binary_files_binary_id"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(["sha256"], ["blobs.sha256"], name=op.f("fk_binary_files_sha256")),
        sa.PrimaryKeyConstraint("binary_id", "name", name=op.f("pk_binary_files")),
    )
    op.create_index(op.f("ix_binary_files_sha256"), "binary_files", ["sha256"], unique=False)
    if refs:
        op.bulk_insert(_refs, refs)
    op.create_table(
        "binary_compiles",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("variant_id", sa.String(length=24), nullable=False),
        sa.Column("arch", sa.Integer(), nullable=False),
        sa.Column("kernel", sa.Text(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("worker_id", sa.String(length=200), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("claimed_at", sa.DateTime(), nullable=True),
        sa.Column("tried_at", sa.DateTime(), nullable=True),
        sa.CheckConstraint("status IN ('queued', 'running', 'tried')", name=op.f("ck_binary_compiles_status")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_binary_compiles")),
        sa.UniqueConstraint("variant_id", "arch", name=op.f("uq_binary_compiles_variant_id_arch")),
    )
    op.create_index(op.f("ix_binary_compiles_status_id"), "binary_compiles", ["status", "id"], unique=False)


def _move_files_to_blobs() -> list[dict]:
    """Every kept row's files into blobs; returns the binary_files rows that refer to them."""
    conn = op.get_bind()
    refs: list[dict] = []
    now = datetime.now(timezone.utc).replace(tzinfo=None)
    kept: set[str] = set()
    for (row_id,) in conn.execute(sa.select(_binaries.c.id).order_by(_binaries.c.id)).all():
        raw = conn.execute(sa.select(_binaries.c.files).where(_binaries.c.id == row_id)).scalar_one()
        try:
            files = {n: (f["sha256"], base64.b64decode(f["data"], validate=True)) for n, f in json.loads(raw).items()}
            bad = [n for n, (sha, data) in files.items() if hashlib.sha256(data).hexdigest() != sha]
        except (ValueError, TypeError, KeyError, AttributeError, binascii.Error) as e:
            files, bad = {}, [f"unreadable ({e})"]
        if bad or not files:
            log.warning("kept binary %d does not check out (%s): dropped, compiled again when wanted", row_id, bad)
            conn.execute(sa.delete(_binaries).where(_binaries.c.id == row_id))
            continue
        for name, (sha, data) in sorted(files.items()):
            if sha not in kept:
                pieces = [data[i : i + CHUNK_BYTES] for i in range(0, len(data), CHUNK_BYTES)] or [b""]
                for seq, piece in enumerate(pieces):
                    conn.execute(sa.insert(_chunks).values(sha256=sha, seq=seq, data=piece, created_at=now))
                conn.execute(sa.insert(_blobs).values(sha256=sha, size=len(data), chunks=len(pieces), created_at=now))
            kept.add(sha)
            refs.append({"binary_id": row_id, "name": name, "sha256": sha})
    return refs


def downgrade() -> None:
    with op.batch_alter_table("binaries") as batch:
        batch.add_column(sa.Column("files", sa.Text(), nullable=True))
    conn = op.get_bind()
    for (row_id,) in conn.execute(sa.select(_binaries.c.id).order_by(_binaries.c.id)).all():
        q = (
            sa.select(_refs.c.name, _refs.c.sha256, _chunks.c.data)
            .join(_chunks, _chunks.c.sha256 == _refs.c.sha256)
            .where(_refs.c.binary_id == row_id)
            .order_by(_refs.c.name, _chunks.c.seq)
        )
        parts: dict[str, tuple[str, list[bytes]]] = {}
        for name, sha, piece in conn.execute(q):
            parts.setdefault(name, (sha, []))[1].append(piece)
        files = {n: {"sha256": sha, "data": base64.b64encode(b"".join(p)).decode()} for n, (sha, p) in parts.items()}
        text = json.dumps(files, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
        conn.execute(sa.update(_binaries).where(_binaries.c.id == row_id).values(files=text))
    op.drop_index(op.f("ix_binary_compiles_status_id"), table_name="binary_compiles")
    op.drop_table("binary_compiles")
    op.drop_index(op.f("ix_binary_files_sha256"), table_name="binary_files")
    op.drop_table("binary_files")
    op.drop_table("blob_chunks")
    op.drop_table("blobs")
    with op.batch_alter_table("binaries") as batch:
        batch.alter_column("files", existing_type=sa.Text(), nullable=False)
