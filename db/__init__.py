"""tunerd's store: device fingerprints, trials, winners, jobs, snapshots, misses, bundles and kept binaries.

Service-side (sqlalchemy + alembic); imports kernels for spec keys, never schedules or tunerd.
Names load lazily, so `db.fingerprint` and `db.errors` import on a bare GPU box without sqlalchemy.
"""

from importlib import import_module
from typing import Any

_EXPORTS = {
    "binaries": ["BinaryRow"],
    "errors": [
        "BundleError",
        "InvalidRecord",
        "JobNotOwned",
        "SchemaError",
        "SnapshotExists",
        "StoreError",
        "StoreUnavailable",
        "UnknownJob",
        "UnknownSnapshot",
        "UnknownWinner",
        "UntrustedRecord",
    ],
    "fingerprint": ["DeviceFingerprint", "current"],
    "rows": ["BlockWinnerRow", "DeviceRow", "JobRow", "MissRow", "SnapshotRow", "TrialRow", "VariantRow", "WinnerRow"],
    "store": ["Store", "variant_id"],
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'db' has no attribute {name!r}")
    return getattr(import_module(f".{_WHERE[name]}", __name__), name)
