"""The compile queue: (kernel, arch) pairs GET /v1/bundle?arch= found no kept binary of, waiting for an idle worker
to compile them ahead of time (tunerd.worker), kept in the store so a restart loses none and a fleet shares them.

A mixin of db.store.Store (it shares the store's transactions). A row names its kernel by what renders it
(kernels.aot.describe: spec and schedule, or block, step and schedule) and its variant id, never by source: the
worker that claims it renders it again and compiles only its own rendering, whose id must be the row's. At most
`limit` pairs wait (queued or running); a pair tried (compiled, or failed) within retry_s is not queued again. A
claim takes up to `limit` rows in one transaction (PostgreSQL: FOR UPDATE SKIP LOCKED; SQLite: BEGIN IMMEDIATE), so
two workers never compile the same pair; a claim older than stale_s (its worker died) is claimed again, and one
claimed max_attempts times is given up until retry_s has passed.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import and_, delete, func, or_, select, update

from tunerd.kernels import aot
from tunerd.kernels.generator import Variant

from .engine import Transactional
from .errors import InvalidRecord
from .queue import rowcount
from .rows import label, number
from .tables import BinaryCompileTable, utcnow

PENDING = ("queued", "running")
_IN_CHUNK = 500  # ids per IN (...) list: SQLite's bound-parameter limit


@dataclass(frozen=True)
class CompileRow:
    """A claimed (kernel, arch): what renders the kernel (kernels.aot.rendered), and the id it must render as."""

    id: int
    variant_id: str
    arch: int
    kernel: dict[str, Any]
    attempts: int


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


class CompileQueue(Transactional):
    """Compile queue operations; the class using it provides the transactions and the dialect's insert."""

    _upsert: Any

    def want_compiles(self, pairs: Sequence[tuple[Variant, int]], *, limit: int, retry_s: float) -> int:
        """Queue (kernel, arch) pairs, kernels this process rendered, unless waiting already or tried within retry_s;
        at most limit wait at once (the rest wait for a later request). Returns how many wait now."""
        retry = number("retry_s", retry_s, optional=False)
        wanted: dict[tuple[str, int], Variant] = {}
        for v, arch in pairs:
            if not isinstance(v, Variant):
                raise InvalidRecord(f"a compile names a kernels.generator.Variant, got {type(v).__name__}")
            try:
                wanted[(v.id, aot.check_arch(arch))] = v
            except ValueError as e:
                raise InvalidRecord(str(e)) from None
        cutoff = utcnow() - timedelta(seconds=retry)
        keys = list(wanted)  # the request's order: the first ones get the room left
        known: dict[tuple[str, int], tuple[str, Any]] = {}
        with self._read() as s:  # the usual request finds every pair waiting or tried: no write
            for i in range(0, len(keys), _IN_CHUNK):
                ids = sorted({vid for vid, _ in keys[i : i + _IN_CHUNK]})
                t = BinaryCompileTable
                q = select(t.variant_id, t.arch, t.status, t.tried_at).where(t.variant_id.in_(ids))
                known.update(((vid, a), (st, at)) for vid, a, st, at in s.execute(q))
            todo = [k for k in keys if k not in known or (known[k][0] == "tried" and (known[k][1] or cutoff) <= cutoff)]
            if not todo:
                return self._pending(s)
        now = utcnow()
        with self._write() as s:
            room = max(0, int(limit) - self._pending(s))
            for vid, arch in todo[:room]:
                ins = self._upsert(BinaryCompileTable).values(
                    variant_id=vid,
                    arch=arch,
                    kernel=_canonical(aot.describe(wanted[(vid, arch)])),
                    status="queued",
                    attempts=0,
                    created_at=now,
                )
                s.execute(
                    ins.on_conflict_do_update(  # tried long enough ago: queued again (one waiting stays as it is)
                        index_elements=["variant_id", "arch"],
                        set_={"status": "queued", "worker_id": None, "attempts": 0, "kernel": ins.excluded.kernel},
                        where=and_(BinaryCompileTable.status == "tried", BinaryCompileTable.tried_at < cutoff),
                    )
                )
            return self._pending(s)

    def claim_compiles(self, worker_id: str, *, limit: int, stale_s: float, max_attempts: int = 3) -> list[CompileRow]:
        """Take up to limit waiting pairs, oldest first (and pairs whose claim is older than stale_s: their worker
        died); one claimed max_attempts times already is given up (tried) instead."""
        worker_id = label("worker_id", worker_id, 200, optional=False)
        now = utcnow()
        stale = now - timedelta(seconds=number("stale_s", stale_s, optional=False))
        t = BinaryCompileTable
        claimable = or_(t.status == "queued", and_(t.status == "running", t.claimed_at < stale))
        with self._read() as s:  # an idle fleet polls this: no write lock while there is nothing to claim
            if s.scalar(select(t.id).where(claimable).limit(1)) is None:
                return []
        out: list[CompileRow] = []
        with self._write() as s:
            q = select(t).where(claimable).order_by(t.id).limit(max(1, int(limit)))
            for row in s.scalars(q.with_for_update(skip_locked=True)):
                if row.attempts >= max_attempts:
                    row.status, row.worker_id, row.tried_at = "tried", None, now
                    continue
                row.status, row.worker_id, row.claimed_at, row.attempts = "running", worker_id, now, row.attempts + 1
                out.append(CompileRow(row.id, row.variant_id, row.arch, json.loads(row.kernel), row.attempts))
        return out

    def finish_compiles(self, worker_id: str, ids: Sequence[int]) -> int:
        """Mark claimed pairs tried (compiled or not: not queued again within the retry back-off); returns how many
        this worker still held."""
        t = BinaryCompileTable
        done = 0
        with self._write() as s:
            for i in range(0, len(ids), _IN_CHUNK):
                mine = (t.id.in_(list(ids[i : i + _IN_CHUNK])), t.worker_id == worker_id, t.status == "running")
                q = update(t).where(*mine).values(status="tried", tried_at=utcnow())
                done += rowcount(s.execute(q.execution_options(synchronize_session=False)))
        return done

    def pending_compiles(self) -> int:
        """Pairs waiting to be compiled (queued or running)."""
        with self._read() as s:
            return self._pending(s)

    def prune_compiles(self, retry_s: float) -> int:
        """Forget pairs tried longer than retry_s ago (a request may queue them again anyway); returns how many."""
        cutoff = utcnow() - timedelta(seconds=number("retry_s", retry_s, optional=False))
        t = BinaryCompileTable
        with self._write() as s:
            return rowcount(s.execute(delete(t).where(t.status == "tried", t.tried_at < cutoff)))

    @staticmethod
    def _pending(s: Any) -> int:
        q = select(func.count()).select_from(BinaryCompileTable).where(BinaryCompileTable.status.in_(PENDING))
        return int(s.execute(q).scalar_one())
