"""Kept binaries: kernels compiled ahead of time (kernels.aot.Binary), stored so that an export or the daemon's
GET /v1/bundle?arch= ships them again without compiling.

A mixin of db.store.Store (it shares the store's transactions). A binary is kept once per (variant, arch, Triton
cache key), with where it came from: "compiled" (built by this tunerd) or "bundle:<sha256>" with the pinned key
that signed that bundle (db.bundle imports binaries from no other bundle). A row is a claim like any other: every
read re-checks its files against their sha256 (a row that does not check out is returned with its problem, never
as a binary), and whoever ships one compares its source sha256 with this process's rendering (db.bundle).
"""

from __future__ import annotations

import json
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from tunerd.kernels import aot

from .engine import Transactional
from .errors import InvalidRecord
from .rows import label
from .tables import BinaryTable, utcnow

COMPILED = "compiled"  # the origin of a binary this tunerd built
_CONTENT = ("source_sha256", "triton_version", "ptxas_version", "name", "env", "signature", "files", "size")
_IN_CHUNK = 500  # ids per IN (...) list: SQLite's bound-parameter limit


@dataclass(frozen=True)
class BinaryRow:
    """A kept binary: the artifact when its row checks out, else None and the problem."""

    id: int
    variant_id: str
    arch: int
    key: str
    origin: str
    signed_by: str | None
    created_at: datetime
    binary: aot.Binary | None
    problem: str | None = None


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def check_binary(b: Any) -> aot.Binary:
    """b re-checked as a bundle entry is (field types, file names, sizes, sha256): InvalidRecord otherwise."""
    if not isinstance(b, aot.Binary):
        raise InvalidRecord(f"a binary must be a kernels.aot.Binary, got {type(b).__name__}")
    try:
        return aot.Binary.from_portable(b.to_portable())
    except aot.AotError as e:
        raise InvalidRecord(str(e)) from None


class BinaryStore(Transactional):
    """Binary operations; the class using it provides the transactions and the dialect's insert."""

    _upsert: Any

    def add_binaries(
        self, binaries: Sequence[aot.Binary], *, origin: str = COMPILED, signed_by: str | None = None
    ) -> int:
        """Keep binaries in one transaction (all or none); returns how many were given. A (variant, arch, key) kept
        already stays as it is (and where it came from), unless its row holds other bytes (damaged): then it is
        replaced."""
        checked = [check_binary(b) for b in binaries]
        with self._write() as s:
            return self._add_binaries(s, checked, origin, signed_by)

    def _add_binaries(self, s: Session, binaries: Sequence[aot.Binary], origin: str, signed_by: str | None) -> int:
        origin = label("origin", origin, 80, optional=False)
        signed_by = label("signed_by", signed_by, 16)
        for b in binaries:
            d = b.to_portable()
            ins = self._upsert(BinaryTable).values(
                variant_id=b.variant_id,
                arch=b.arch,
                key=b.key,
                source_sha256=b.source_sha256,
                triton_version=label("triton_version", b.triton_version, 64, optional=False),
                ptxas_version=label("ptxas_version", b.ptxas_version, 200),
                name=b.name,
                env=_canonical(d["env"]),
                signature=_canonical(d["signature"]),
                files=_canonical(d["files"]),
                size=b.size,
                origin=origin,
                signed_by=signed_by,
                created_at=utcnow(),
            )
            ex, t = ins.excluded, BinaryTable.__table__.c
            repair = {c: ex[c] for c in _CONTENT + ("origin", "signed_by", "created_at")}
            s.execute(
                ins.on_conflict_do_update(
                    index_elements=["variant_id", "arch", "key"],
                    set_=repair,  # a row with other bytes under this key was damaged: what checks out replaces it
                    where=or_(*(t[c].is_distinct_from(ex[c]) for c in _CONTENT)),
                )
            )
        return len(binaries)

    def binaries(self, variant_ids: Collection[str] | None = None, arches: Collection[int] = ()) -> list[BinaryRow]:
        """Kept binaries of these variants (None: all) for these arches (empty: all), newest first, each re-checked
        (BinaryRow.problem says why one is not usable)."""
        ids = None if variant_ids is None else sorted(set(variant_ids))
        chunks = [None] if ids is None else [ids[i : i + _IN_CHUNK] for i in range(0, len(ids), _IN_CHUNK)]
        out: list[BinaryRow] = []
        with self._read() as s:
            for chunk in chunks:
                q = select(BinaryTable)
                if chunk is not None:
                    q = q.where(BinaryTable.variant_id.in_(chunk))
                if arches:
                    q = q.where(BinaryTable.arch.in_(sorted(set(arches))))
                out += [_row(t) for t in s.scalars(q)]
        return sorted(out, key=lambda r: (r.created_at, r.id), reverse=True)


def _row(t: BinaryTable) -> BinaryRow:
    binary, problem = None, None
    try:
        d = {
            k: getattr(t, k)
            for k in ("variant_id", "source_sha256", "arch", "triton_version", "ptxas_version", "key", "name")
        }
        d.update(env=json.loads(t.env), signature=json.loads(t.signature), files=json.loads(t.files))
        binary = aot.Binary.from_portable(d)
    except (aot.AotError, ValueError) as e:
        problem = f"kept binary {t.id} (variant {t.variant_id}, sm_{t.arch}) does not check out: {e}"
    return BinaryRow(t.id, t.variant_id, t.arch, t.key, t.origin, t.signed_by, t.created_at, binary, problem)
