"""Kept binaries: kernels compiled ahead of time (kernels.aot.Binary), stored so that an export or the daemon's
GET /v1/bundle?arch= ships them again without compiling.

A mixin of db.store.Store (it shares the store's transactions). A binary is kept once per (variant, arch, Triton
cache key), with where it came from: "compiled" (built by this tunerd) or "bundle:<sha256>" with the pinned key
that signed that bundle (db.bundle imports binaries from no other bundle). A row is a claim like any other: every
read re-checks its files against their sha256 (a row that does not check out is returned with its problem, never
as a binary), and whoever ships one compares its source sha256 with this process's rendering (db.bundle).

Keeping is short on the write lock whatever the size: each file is a blob named by its sha256, written first in
chunks of at most CHUNK_BYTES, each in its own short, idempotent transaction (a blob nobody refers to is invisible),
then one short transaction inserts the rows that refer to them, all or none. Blobs nobody refers to (an import that
failed or was killed halfway) are deleted by collect_blobs once older than a grace period (the idle worker runs it).
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, TypeVar

from sqlalchemy import delete, exists, func, select
from sqlalchemy.orm import Session

from tunerd.kernels import aot

from .engine import Transactional
from .errors import InvalidRecord, StoreError
from .queue import rowcount
from .rows import label, number
from .tables import BinaryFileTable, BinaryTable, BlobChunkTable, BlobTable, utcnow

COMPILED = "compiled"  # the origin of a binary this tunerd built
_CONTENT = ("source_sha256", "triton_version", "ptxas_version", "name", "env", "signature", "size")
_IN_CHUNK = 500  # ids per IN (...) list: SQLite's bound-parameter limit
CHUNK_BYTES = 4 << 20  # of a blob per write transaction: what bounds how long one holds the write lock
BLOB_GRACE_S = 3600.0  # a blob nobody refers to is collected once this old: an import refers to its blobs sooner
_REFER_TRIES = 3  # a collector may take an old unreferenced blob between its write and the rows referring to it
_T = TypeVar("_T")


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


class MissingBlobs(StoreError):
    """Blobs a write refers to are not (or no longer) in the store: write them, then try again."""

    def __init__(self, shas: Collection[str]) -> None:
        super().__init__(f"{len(shas)} blob(s) missing: {sorted(shas)[:4]}")
        self.shas = set(shas)


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def _chunks(items: Sequence[_T]) -> Iterable[Sequence[_T]]:
    return (items[i : i + _IN_CHUNK] for i in range(0, len(items), _IN_CHUNK))


def check_binary(b: Any) -> aot.Binary:
    """b re-checked as a bundle entry is (field types, file names, sizes, sha256): InvalidRecord otherwise."""
    if not isinstance(b, aot.Binary):
        raise InvalidRecord(f"a binary must be a kernels.aot.Binary, got {type(b).__name__}")
    try:
        return aot.Binary.from_portable(b.to_portable())
    except aot.AotError as e:
        raise InvalidRecord(str(e)) from None


def blobs_of(binaries: Iterable[aot.Binary]) -> dict[str, bytes]:
    """The distinct files of binaries by sha256."""
    return {hashlib.sha256(data).hexdigest(): data for b in binaries for data in b.files.values()}


@dataclass(frozen=True)
class Keep:
    """What keeping one binary writes in the transaction that refers to its blobs, worked out before it begins (hashing
    and encoding a large binary must not happen while the write lock is held)."""

    variant_id: str
    arch: int
    key: str
    content: dict[str, Any]  # the row's columns that name its bytes
    files: dict[str, str]  # file name -> sha256 of its blob


def keepable(binaries: Sequence[aot.Binary]) -> list[Keep]:
    """binaries (checked already: check_binary) as the rows that keep them."""
    return [
        Keep(
            b.variant_id,
            b.arch,
            b.key,
            dict(
                source_sha256=b.source_sha256,
                triton_version=label("triton_version", b.triton_version, 64, optional=False),
                ptxas_version=label("ptxas_version", b.ptxas_version, 200),
                name=b.name,
                env=_canonical(b.env),
                signature=_canonical(b.signature),
                size=b.size,
            ),
            {n: hashlib.sha256(data).hexdigest() for n, data in b.files.items()},
        )
        for b in binaries
    ]


class BinaryStore(Transactional):
    """Binary operations; the class using it provides the transactions and the dialect's insert."""

    _upsert: Any
    _pg: bool

    def add_binaries(
        self, binaries: Sequence[aot.Binary], *, origin: str = COMPILED, signed_by: str | None = None
    ) -> int:
        """Keep binaries, all or none as readers see them: their files as blobs first (each in its own short
        transaction), then the rows in one short transaction. Returns how many were given. A (variant, arch, key)
        kept already stays as it is (and where it came from), unless its row holds other bytes (damaged): then it is
        replaced."""
        checked = [check_binary(b) for b in binaries]
        rows = keepable(checked)
        return self._referring(checked, lambda s: self._add_binaries(s, rows, origin, signed_by))

    def keep_blobs(self, blobs: dict[str, bytes]) -> int:
        """Write each blob (sha256 -> bytes): its chunks of at most CHUNK_BYTES, each in its own short transaction, then
        its row (what says it is whole). Idempotent: writing a blob again rewrites its chunks (repairing damaged ones)
        and renews its age, so the collector leaves it alone for a grace period. On SQLite each write is followed by a
        pause as long as it held the lock (at most 0.1 s), so other writers get in between. Returns how many."""
        for sha, data in blobs.items():
            if hashlib.sha256(data).hexdigest() != sha:
                raise InvalidRecord(f"blob {sha[:16]} does not hold bytes with that sha256")
        for sha, data in blobs.items():
            pieces = [data[i : i + CHUNK_BYTES] for i in range(0, len(data), CHUNK_BYTES)] or [b""]
            for _ in range(_REFER_TRIES):
                for seq, piece in enumerate(pieces):
                    with self._paced() as s:
                        ins = self._upsert(BlobChunkTable).values(sha256=sha, seq=seq, data=piece, created_at=utcnow())
                        ex = ins.excluded
                        set_ = {"data": ex.data, "created_at": ex.created_at}
                        s.execute(ins.on_conflict_do_update(index_elements=["sha256", "seq"], set_=set_))
                with self._paced() as s:
                    q = select(BlobChunkTable.seq).where(BlobChunkTable.sha256 == sha, BlobChunkTable.seq < len(pieces))
                    if len(s.scalars(q.with_for_update(read=True, key_share=True)).all()) < len(pieces):
                        continue  # a collector took a chunk meanwhile: write them again
                    extra = (BlobChunkTable.sha256 == sha, BlobChunkTable.seq >= len(pieces))
                    s.execute(delete(BlobChunkTable).where(*extra))  # a longer blob's under this name: damaged
                    row = dict(sha256=sha, size=len(data), chunks=len(pieces), created_at=utcnow())
                    ins = self._upsert(BlobTable).values(**row)
                    ex = ins.excluded
                    set_ = {"size": ex.size, "chunks": ex.chunks, "created_at": ex.created_at}
                    s.execute(ins.on_conflict_do_update(index_elements=["sha256"], set_=set_))
                    break
            else:
                raise StoreError(f"blob {sha[:16]}: its chunks keep vanishing (a collector with no grace period?)")
        return len(blobs)

    @contextmanager
    def _paced(self) -> Iterator[Session]:
        """One short write transaction; on SQLite followed by a pause as long as it held the lock (at most 0.1 s):
        SQLite's busy handler polls, so without one a waiting writer may not get in before the next write."""
        start = time.monotonic()
        with self._write() as s:
            yield s
        if not self._pg:
            time.sleep(min(0.1, time.monotonic() - start))

    def _referring(self, binaries: Sequence[aot.Binary], write: Callable[[Session], _T], *, kept: bool = False) -> _T:
        """write(session) in one transaction once every file of binaries is kept as a blob (keep_blobs first, unless
        kept: the caller did). A blob the collector took meanwhile (an old unreferenced one this write meant to
        reuse) is written again."""
        missing = {} if kept else blobs_of(binaries)
        for _ in range(_REFER_TRIES):
            self.keep_blobs(missing)
            try:
                with self._write() as s:
                    return write(s)
            except MissingBlobs as e:
                missing = {sha: data for sha, data in blobs_of(binaries).items() if sha in e.shas}
        raise StoreError(f"blobs kept for {len(binaries)} binaries keep vanishing (a collector with no grace period?)")

    def _add_binaries(self, s: Session, binaries: Sequence[Keep], origin: str, signed_by: str | None) -> int:
        """The rows of binaries (keepable) whose blobs are kept (MissingBlobs otherwise), in the caller's
        transaction."""
        origin = label("origin", origin, 80, optional=False)
        signed_by = label("signed_by", signed_by, 16)
        wanted = sorted({sha for b in binaries for sha in b.files.values()})
        present: set[str] = set()
        for chunk in _chunks(wanted):  # PostgreSQL: FOR KEY SHARE, so the collector skips them until this commits
            q = select(BlobTable.sha256).where(BlobTable.sha256.in_(chunk))
            present.update(s.scalars(q.with_for_update(read=True, key_share=True)))
        if len(present) < len(wanted):
            raise MissingBlobs(set(wanted) - present)
        for b in binaries:
            content, files = b.content, b.files
            made = dict(origin=origin, signed_by=signed_by, created_at=utcnow())
            where = (BinaryTable.variant_id == b.variant_id, BinaryTable.arch == b.arch, BinaryTable.key == b.key)
            s.execute(
                self._upsert(BinaryTable)
                .values(variant_id=b.variant_id, arch=b.arch, key=b.key, **content, **made)
                .on_conflict_do_nothing(index_elements=["variant_id", "arch", "key"])
            )
            row = s.scalars(select(BinaryTable).where(*where).with_for_update()).one()
            refs = select(BinaryFileTable.name, BinaryFileTable.sha256).where(BinaryFileTable.binary_id == row.id)
            if {n: sha for n, sha in s.execute(refs)} == files and all(
                getattr(row, c) == v for c, v in content.items()
            ):
                continue  # kept already: it stays as it is, and where it came from
            for c, v in (content | made).items():  # new, or a row with other bytes under this key (damaged)
                setattr(row, c, v)
            s.execute(delete(BinaryFileTable).where(BinaryFileTable.binary_id == row.id))
            s.add_all(BinaryFileTable(binary_id=row.id, name=n, sha256=sha) for n, sha in sorted(files.items()))
            s.flush()
        return len(binaries)

    def collect_blobs(self, grace_s: float | None = None, *, limit: int = 64) -> int:
        """Delete up to limit blobs no kept binary refers to, and up to limit chunks of no blob (an unfinished write),
        written longer than grace_s ago (None: BLOB_GRACE_S): what an import that failed or was killed halfway left.
        Returns how many blobs and stray chunks. One short transaction (PostgreSQL: what an import is writing or
        referring to right now is locked, and skipped)."""
        grace = BLOB_GRACE_S if grace_s is None else number("grace_s", grace_s, optional=False)
        cutoff, n = utcnow() - timedelta(seconds=grace), max(1, int(limit))
        referred = exists().where(BinaryFileTable.sha256 == BlobTable.sha256)
        whole = exists().where(BlobTable.sha256 == BlobChunkTable.sha256)
        with self._write() as s:
            q = select(BlobTable.sha256).where(BlobTable.created_at < cutoff, ~referred).limit(n)
            doomed = list(s.scalars(q.with_for_update(skip_locked=True)))
            gone = 0
            if doomed:
                gone = rowcount(s.execute(delete(BlobTable).where(BlobTable.sha256.in_(doomed), ~referred)))
                s.execute(delete(BlobChunkTable).where(BlobChunkTable.sha256.in_(doomed), ~whole))
            q2 = select(BlobChunkTable.sha256, BlobChunkTable.seq).where(BlobChunkTable.created_at < cutoff, ~whole)
            stray = s.execute(q2.limit(n).with_for_update(skip_locked=True)).all()
            for sha, seq in stray:
                s.execute(delete(BlobChunkTable).where(BlobChunkTable.sha256 == sha, BlobChunkTable.seq == seq, ~whole))
            return gone + len(stray)

    def blob_count(self) -> tuple[int, int]:
        """(blobs, bytes) kept, referred to or not."""
        with self._read() as s:
            n, size = s.execute(select(func.count(), func.coalesce(func.sum(BlobTable.size), 0))).one()
            return int(n), int(size)

    def binaries(self, variant_ids: Collection[str] | None = None, arches: Collection[int] = ()) -> list[BinaryRow]:
        """Kept binaries of these variants (None: all) for these arches (empty: all), newest first, each re-checked
        (BinaryRow.problem says why one is not usable)."""
        ids = None if variant_ids is None else sorted(set(variant_ids))
        chunks: Iterable[Sequence[str] | None] = [None] if ids is None else _chunks(ids)
        out: list[BinaryRow] = []
        with self._read() as s:
            for chunk in chunks:
                q = select(BinaryTable)
                if chunk is not None:
                    q = q.where(BinaryTable.variant_id.in_(chunk))
                if arches:
                    q = q.where(BinaryTable.arch.in_(sorted(set(arches))))
                rows = list(s.scalars(q))
                files: dict[int, dict[str, str]] = {}
                for id_part in _chunks([t.id for t in rows]):
                    q2 = select(BinaryFileTable).where(BinaryFileTable.binary_id.in_(id_part))
                    for f in s.scalars(q2):
                        files.setdefault(f.binary_id, {})[f.name] = f.sha256
                data: dict[str, bytes] = {}
                for part in _chunks(sorted({sha for fs in files.values() for sha in fs.values()})):
                    q3 = (
                        select(BlobTable.sha256, BlobTable.chunks, BlobChunkTable.seq, BlobChunkTable.data)
                        .join(BlobChunkTable, BlobChunkTable.sha256 == BlobTable.sha256)
                        .where(BlobTable.sha256.in_(part), BlobChunkTable.seq < BlobTable.chunks)
                        .order_by(BlobTable.sha256, BlobChunkTable.seq)
                    )
                    pieces: dict[str, list[bytes]] = {}
                    for sha, _, _, piece in s.execute(q3):
                        pieces.setdefault(sha, []).append(piece)
                    data.update((sha, b"".join(p)) for sha, p in pieces.items())  # a lost chunk: its sha256 differs
                out += [_row(t, files.get(t.id, {}), data) for t in rows]
        return sorted(out, key=lambda r: (r.created_at, r.id), reverse=True)


def _row(t: BinaryTable, files: dict[str, str], blobs: dict[str, bytes]) -> BinaryRow:
    binary, problem = None, None
    try:
        d = {
            k: getattr(t, k)
            for k in ("variant_id", "source_sha256", "arch", "triton_version", "ptxas_version", "key", "name")
        }
        lost = sorted(n for n, sha in files.items() if sha not in blobs)
        if lost:
            raise aot.AotError(f"its files {lost} are missing")
        portable = {n: {"sha256": sha, "data": base64.b64encode(blobs[sha]).decode()} for n, sha in files.items()}
        d.update(env=json.loads(t.env), signature=json.loads(t.signature), files=portable)
        binary = aot.Binary.from_portable(d)  # each file's bytes against the sha256 that names them
    except (aot.AotError, ValueError) as e:
        problem = f"kept binary {t.id} (variant {t.variant_id}, sm_{t.arch}) does not check out: {e}"
    return BinaryRow(t.id, t.variant_id, t.arch, t.key, t.origin, t.signed_by, t.created_at, binary, problem)
