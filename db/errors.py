"""The store's error hierarchy: every failure a caller can act on has its own class.

Raw driver errors never escape the store: a locked or unreachable database is StoreUnavailable,
bad input is InvalidRecord (also a ValueError), a missing name is a LookupError subclass.
"""

from __future__ import annotations

from collections.abc import Iterable


class StoreError(Exception):
    """Base class of every error the store raises."""


class StoreUnavailable(StoreError):
    """The database could not be reached, or stayed locked past the busy timeout."""


class SchemaError(StoreError):
    """The database schema is unknown to this tunerd (e.g. migrated by a newer version)."""


class InvalidRecord(StoreError, ValueError):
    """A value handed to the store is malformed; nothing was written."""


class UntrustedRecord(StoreError):
    """A stored block winner this tunerd will not run: its plan or schedules are not legal for its block, or
    its kernels do not render to what it records (kernels.trust.verify_plan says which)."""


class UnknownSnapshot(StoreError, LookupError):
    """A snapshot name that was never created."""


class SnapshotExists(StoreError):
    """create_snapshot was given a name already in use (snapshots are immutable)."""


class UnknownWinner(StoreError, LookupError):
    """set_winner_stats for a (device, spec) that has no winner."""


class UnknownJob(StoreError, LookupError):
    """A job id that does not exist."""


class JobNotOwned(StoreError):
    """A heartbeat or finish from a worker that no longer holds the job (requeued, finished, or never claimed)."""


class BundleError(StoreError):
    """A bundle file that cannot be imported (corrupt, truncated, foreign, wrong version, incompatible)."""


def field_mismatch(what: str, expected: Iterable[str], got: Iterable[str]) -> str:
    """'<what> is missing [...], has unknown [...]' naming only the non-empty parts."""
    missing, unknown = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
    parts = ([f"is missing {missing}"] if missing else []) + ([f"has unknown {unknown}"] if unknown else [])
    return f"{what} {' and '.join(parts)}"
