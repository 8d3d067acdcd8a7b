"""SQLAlchemy 2 models of the store. The Alembic migrations in db/migrations create exactly this schema.

ORM classes are named <Thing>Table and stay inside db/; the store hands out the frozen <Thing>Row
dataclasses of db/rows.py instead.

JSON values (spec keys, schedules, fingerprints, job payloads) are stored as canonical JSON text so
SQLite and PostgreSQL hold byte-identical keys. Timestamps are naive UTC in the database and
timezone-aware UTC in Python.
"""

from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import (
    Boolean,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    false,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

TRIAL_STATUSES = ("ok", "wrong-result", "compile-error", "crash", "timeout")
JOB_STATUSES = ("queued", "running", "done", "failed")
COMPILE_STATUSES = ("queued", "running", "tried")

NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class UTCDateTime(TypeDecorator):
    """Stores naive UTC; returns aware UTC. Naive inputs are taken to be UTC already."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect) -> datetime | None:
        if value is not None and value.tzinfo is not None:
            value = value.astimezone(timezone.utc).replace(tzinfo=None)
        return value

    def process_result_value(self, value: datetime | None, dialect) -> datetime | None:
        return None if value is None else value.replace(tzinfo=timezone.utc)


def _in(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class DeviceTable(Base):
    __tablename__ = "devices"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    key: Mapped[str] = mapped_column(Text, unique=True)  # DeviceFingerprint.key
    digest: Mapped[str] = mapped_column(String(16), index=True)
    name: Mapped[str] = mapped_column(String(200))
    interpreter: Mapped[bool] = mapped_column(Boolean)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class SpecTable(Base):
    __tablename__ = "specs"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    key: Mapped[str] = mapped_column(Text, unique=True)  # BlockSpec.to_json()
    digest: Mapped[str] = mapped_column(String(16), index=True)
    kind: Mapped[str] = mapped_column(String(16))
    op: Mapped[str] = mapped_column(String(8))
    dtype: Mapped[str] = mapped_column(String(16))
    summary: Mapped[str] = mapped_column(String(300))  # BlockSpec.describe()
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class VariantTable(Base):
    """One generated kernel, keyed by the hash of its exact source text."""

    __tablename__ = "variants"
    id: Mapped[str] = mapped_column(String(24), primary_key=True)  # sha256(source)[:24]
    spec_id: Mapped[int] = mapped_column(ForeignKey("specs.id"), index=True)
    schedule: Mapped[str] = mapped_column(Text)  # Schedule.to_json()
    source: Mapped[str] = mapped_column(Text)
    generator_version: Mapped[str] = mapped_column(String(32))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class JobTable(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        CheckConstraint(_in("status", JOB_STATUSES), name="status"),
        CheckConstraint("specs IS NOT NULL OR suite IS NOT NULL", name="target"),
    )
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    specs: Mapped[str | None] = mapped_column(Text)  # JSON list of spec objects
    suite: Mapped[str | None] = mapped_column(String(100))
    strategy: Mapped[str] = mapped_column(String(64))
    budget_trials: Mapped[int | None] = mapped_column(Integer)
    budget_seconds: Mapped[float | None] = mapped_column(Float)
    device_key: Mapped[str | None] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16), index=True)
    progress: Mapped[str | None] = mapped_column(Text)  # JSON object
    worker_id: Mapped[str | None] = mapped_column(String(200))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    claimed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    result: Mapped[str | None] = mapped_column(Text)  # JSON object
    error: Mapped[str | None] = mapped_column(Text)
    # how many tasks the job fanned out into; None while it is queued (or claimed whole, without tasks)
    tasks_total: Mapped[int | None] = mapped_column(Integer)


class TaskTable(Base):
    """One spec of a fanned-out job: what a worker claims, heartbeats and finishes. The job is done when
    every one of its tasks is."""

    __tablename__ = "tasks"
    __table_args__ = (
        CheckConstraint(_in("status", JOB_STATUSES), name="status"),
        UniqueConstraint("job_id", "position"),
        Index(None, "status", "job_id"),
    )
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"))
    position: Mapped[int] = mapped_column(Integer)  # the spec's place in the job
    spec: Mapped[str] = mapped_column(Text)  # BlockSpec.to_json()
    status: Mapped[str] = mapped_column(String(16))
    progress: Mapped[str | None] = mapped_column(Text)  # JSON object
    worker_id: Mapped[str | None] = mapped_column(String(200))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    claimed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    result: Mapped[str | None] = mapped_column(Text)  # JSON object
    error: Mapped[str | None] = mapped_column(Text)


class TrialTable(Base):
    """One measurement of one variant on one device. Never updated after it is written."""

    __tablename__ = "trials"
    __table_args__ = (
        CheckConstraint(_in("status", TRIAL_STATUSES), name="status"),
        Index(None, "device_id", "spec_id"),
        Index(None, "device_id", "variant_id"),
    )
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    device_id: Mapped[int] = mapped_column(ForeignKey("devices.id"))
    spec_id: Mapped[int] = mapped_column(ForeignKey("specs.id"))
    variant_id: Mapped[str] = mapped_column(ForeignKey("variants.id"))
    status: Mapped[str] = mapped_column(String(16))
    median_ms: Mapped[float | None] = mapped_column(Float)
    spread_ms: Mapped[float | None] = mapped_column(Float)  # p90 - p10 (or stdev), as the harness reports it
    reps: Mapped[int] = mapped_column(Integer)
    max_error: Mapped[float | None] = mapped_column(Float)
    error: Mapped[str | None] = mapped_column(Text)
    strategy: Mapped[str | None] = mapped_column(String(64))
    job_id: Mapped[int | None] = mapped_column(ForeignKey("jobs.id"), index=True)
    origin: Mapped[str | None] = mapped_column(String(80))  # None: measured here; "bundle:<sha256>": a claim
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class _WinnerColumns:
    """What a winner row and its frozen snapshot copy both hold."""

    device_id: Mapped[int] = mapped_column(ForeignKey("devices.id"), primary_key=True)
    spec_id: Mapped[int] = mapped_column(ForeignKey("specs.id"), primary_key=True)
    trial_id: Mapped[int] = mapped_column(ForeignKey("trials.id"))
    variant_id: Mapped[str] = mapped_column(ForeignKey("variants.id"))
    median_ms: Mapped[float] = mapped_column(Float)
    # True while the winning trial is an imported timing (a claim) no local measurement has replaced yet
    claimed: Mapped[bool] = mapped_column(Boolean, server_default=false())
    speedup_vs_default: Mapped[float | None] = mapped_column(Float)
    fraction_of_roofline: Mapped[float | None] = mapped_column(Float)


class WinnerTable(_WinnerColumns, Base):
    """The best trial per (device, spec): local measurements first (fastest correct one), else the fastest
    claim. Ratios are rescaled when the winner changes."""

    __tablename__ = "winners"
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class SnapshotTable(Base):
    __tablename__ = "snapshots"
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    winner_count: Mapped[int] = mapped_column(Integer)


class SnapshotWinnerTable(_WinnerColumns, Base):
    """A frozen copy of one winner row; trials and variants are immutable, so answers never change."""

    __tablename__ = "snapshot_winners"
    snapshot: Mapped[str] = mapped_column(ForeignKey("snapshots.name"), primary_key=True)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)


class _BlockWinnerColumns:
    """What a fused block's winner row and its frozen snapshot copy hold: the plan and one schedule per fused
    step (never source: whoever runs it renders it from these), keyed by the block's canonical JSON."""

    device_id: Mapped[int] = mapped_column(ForeignKey("devices.id"), primary_key=True)
    block_digest: Mapped[str] = mapped_column(String(16), primary_key=True)  # Block.digest
    block_key: Mapped[str] = mapped_column(Text)  # Block.to_json(), compared on every read
    summary: Mapped[str] = mapped_column(String(300))  # Block.describe()
    plan: Mapped[str] = mapped_column(Text)  # Plan.to_json()
    schedules: Mapped[str] = mapped_column(Text)  # canonical JSON {"<fused step index>": Schedule.to_dict()}
    plan_id: Mapped[str] = mapped_column(String(24))  # kernels.trust.plan_id of the rendered kernels
    median_ms: Mapped[float] = mapped_column(Float)
    spread_ms: Mapped[float | None] = mapped_column(Float)
    reps: Mapped[int] = mapped_column(Integer)
    max_error: Mapped[float | None] = mapped_column(Float)
    strategy: Mapped[str | None] = mapped_column(String(64))
    origin: Mapped[str | None] = mapped_column(String(80))  # None: measured here; "bundle:<sha256>": a claim
    claimed: Mapped[bool] = mapped_column(Boolean, server_default=false())
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)  # when it was measured
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class BlockWinnerTable(_BlockWinnerColumns, Base):
    """The best plan x schedules per (device, block): local measurements first (fastest), else the fastest claim."""

    __tablename__ = "block_winners"


class SnapshotBlockWinnerTable(_BlockWinnerColumns, Base):
    """A frozen copy of one block winner row."""

    __tablename__ = "snapshot_block_winners"
    snapshot: Mapped[str] = mapped_column(ForeignKey("snapshots.name"), primary_key=True)


class MissTable(Base):
    """A lookup that found no winner: what clients want that nobody has tuned yet."""

    __tablename__ = "misses"
    device_id: Mapped[int] = mapped_column(ForeignKey("devices.id"), primary_key=True)
    spec_id: Mapped[int] = mapped_column(ForeignKey("specs.id"), primary_key=True)
    count: Mapped[int] = mapped_column(Integer)
    first_seen: Mapped[datetime] = mapped_column(UTCDateTime)
    last_seen: Mapped[datetime] = mapped_column(UTCDateTime)


class BinaryTable(Base):
    """One kernel compiled ahead of time for one arch (kernels.aot.Binary), kept so exports and GET /v1/bundle?arch
    ship it again without compiling. (variant, arch, Triton cache key) names its bytes: its files are blobs, named
    by their sha256 (binary_files)."""

    __tablename__ = "binaries"
    __table_args__ = (UniqueConstraint("variant_id", "arch", "key"), Index(None, "arch", "variant_id"))
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    variant_id: Mapped[str] = mapped_column(String(24))  # no foreign key: a fused step's kernel has no variants row
    arch: Mapped[int] = mapped_column(Integer)
    key: Mapped[str] = mapped_column(String(64))  # Triton's cache hash
    source_sha256: Mapped[str] = mapped_column(String(64))
    triton_version: Mapped[str] = mapped_column(String(64))
    ptxas_version: Mapped[str | None] = mapped_column(String(200))
    name: Mapped[str] = mapped_column(String(150))  # the kernel name, as Triton names its cache files
    env: Mapped[str] = mapped_column(Text)  # canonical JSON: Triton's cache-invalidating environment
    signature: Mapped[str] = mapped_column(Text)  # canonical JSON: launch argument types
    size: Mapped[int] = mapped_column(Integer)  # the decoded files' bytes together
    origin: Mapped[str] = mapped_column(String(80))  # "compiled": built here; "bundle:<sha256>": imported
    signed_by: Mapped[str | None] = mapped_column(String(16))  # key_id of the pinned key that signed that bundle
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class BlobTable(Base):
    """Bytes named by their sha256 (a kept binary's files), held in chunks (blob_chunks). Written after all its chunks,
    each chunk in its own short transaction, and before any row refers to it, so a large import never holds the write
    lock for long; one nobody refers to is collected after a grace period (db.binaries.BinaryStore.collect_blobs)."""

    __tablename__ = "blobs"
    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    size: Mapped[int] = mapped_column(Integer)
    chunks: Mapped[int] = mapped_column(Integer)  # blob_chunks rows 0 .. chunks-1
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)  # also when last written again


class BlobChunkTable(Base):
    """At most db.binaries.CHUNK_BYTES of a blob. No foreign key: chunks are written before their blob's row (a chunk
    without one is an unfinished write, collected after the grace period)."""

    __tablename__ = "blob_chunks"
    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    seq: Mapped[int] = mapped_column(Integer, primary_key=True)
    data: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)  # also when last written again


class BinaryFileTable(Base):
    """One file of a kept binary (<name>.json, <name>.cubin): its blob."""

    __tablename__ = "binary_files"
    __table_args__ = (Index(None, "sha256"),)
    binary_id: Mapped[int] = mapped_column(ForeignKey("binaries.id", ondelete="CASCADE"), primary_key=True)
    name: Mapped[str] = mapped_column(String(160), primary_key=True)
    sha256: Mapped[str] = mapped_column(ForeignKey("blobs.sha256"))


class BinaryCompileTable(Base):
    """A (kernel, arch) a GET /v1/bundle?arch= found no kept binary of, for the idle workers of a fleet to compile
    ahead of time (db.compiles). The row names the kernel by what renders it (aot.describe), never by source: the
    worker that claims it renders it again and compiles only its own rendering. "tried" rows remember a compile
    (whatever its outcome) so it is not queued again within the retry back-off."""

    __tablename__ = "binary_compiles"
    __table_args__ = (
        CheckConstraint(_in("status", COMPILE_STATUSES), name="status"),
        UniqueConstraint("variant_id", "arch"),
        Index(None, "status", "id"),
    )
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    variant_id: Mapped[str] = mapped_column(String(24))
    arch: Mapped[int] = mapped_column(Integer)
    kernel: Mapped[str] = mapped_column(Text)  # canonical JSON of kernels.aot.describe(variant)
    status: Mapped[str] = mapped_column(String(16))
    worker_id: Mapped[str | None] = mapped_column(String(200))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    claimed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    tried_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
