"""Store: trials, winners, jobs, snapshots and misses in one SQL database (SQLite or PostgreSQL).

Every public method is one transaction, committed before it returns, so a tuner killed halfway
loses nothing it was told was recorded. Winners are maintained in the same transaction as the
trial that changes them. Only plain row dataclasses (db.rows) leave this module.
"""

from __future__ import annotations

import json
import math
import re
import secrets
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime
from numbers import Integral, Real
from typing import Any

from sqlalchemy import (
    Engine,
    Select,
    String,
    and_,
    cast,
    delete,
    exists,
    func,
    insert,
    literal,
    or_,
    select,
    text,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import URL
from sqlalchemy.orm import Session, aliased

from tunerd.kernels import aot, generator, limits, trust
from tunerd.kernels.block import Block
from tunerd.kernels.generator import source_id
from tunerd.kernels.plan import Plan
from tunerd.kernels.schedule import Schedule
from tunerd.kernels.spec import BlockSpec

from . import engine as _engine
from .binaries import BinaryStore, blobs_of, check_binary, keepable
from .compiles import CompileQueue
from .errors import (
    InvalidRecord,
    SnapshotExists,
    StoreError,
    UnknownJob,
    UnknownSnapshot,
    UnknownWinner,
    UntrustedRecord,
)
from .fingerprint import DeviceFingerprint
from .queue import JobQueue, rowcount
from .rows import (
    BlockWinnerRow,
    DeviceRow,
    MissRow,
    SnapshotRow,
    TrialRow,
    VariantRow,
    WinnerRow,
    block_of,
    device_of,
    number,
    schedule_of,
    schedules_json,
    schedules_of,
    spec_of,
)
from .rows import label as _label
from .rows import row_limit as _limit
from .tables import (
    TRIAL_STATUSES,
    BlockWinnerTable,
    DeviceTable,
    JobTable,
    MissTable,
    SnapshotBlockWinnerTable,
    SnapshotTable,
    SnapshotWinnerTable,
    SpecTable,
    TrialTable,
    VariantTable,
    WinnerTable,
    _BlockWinnerColumns,
    _WinnerColumns,
    utcnow,
)

DeviceLike = DeviceFingerprint | str  # a fingerprint or its exact key
_SNAPSHOT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


variant_id = source_id  # the content hash that names a variant, as kernels.generator.Variant.id


def _device_key(device: DeviceLike) -> str:
    if isinstance(device, DeviceFingerprint):
        return device.key
    if isinstance(device, str) and device:
        return device
    raise InvalidRecord(f"device must be a DeviceFingerprint or its key, got {type(device).__name__}")


def _require(name: str, value: Any, cls: type) -> None:
    if not isinstance(value, cls):
        raise InvalidRecord(f"{name} must be a {cls.__name__}, got {type(value).__name__}")


def _check_measurement(
    status: Any, median_ms: Any, spread_ms: Any, reps: Any, max_error: Any, error: Any, strategy: Any
) -> dict[str, Any]:
    """Validated trial columns. An ok trial needs a time, at least one rep and a finite max error."""
    if status not in TRIAL_STATUSES:
        raise InvalidRecord(f"trial status must be one of {TRIAL_STATUSES}, got {status!r}")
    ok = status == "ok"
    if not isinstance(reps, Integral) or isinstance(reps, bool) or reps < (1 if ok else 0):
        raise InvalidRecord(f"reps must be an int >= {1 if ok else 0}{' for an ok trial' if ok else ''}, got {reps!r}")
    reps = int(reps)
    if not ok and isinstance(max_error, Real) and not math.isfinite(max_error):
        max_error = None  # NaN/inf error of a failed variant: unbounded; the error text says why
    if error is not None and not isinstance(error, str):
        raise InvalidRecord(f"error must be a string or None, got {type(error).__name__}")
    return dict(
        status=status,
        median_ms=number("median_ms", median_ms, optional=not ok, positive=True),
        spread_ms=number("spread_ms", spread_ms),
        reps=reps,
        max_error=number("max_error", max_error, optional=not ok),
        error=error,
        strategy=_label("strategy", strategy, 64),
    )


def _rendered(
    spec: BlockSpec, schedule: Schedule, source: Any, variant: str | None, generator_version: str
) -> generator.Variant:
    """This process's rendering of (spec, schedule), which the given source (and variant id) must equal: the
    store keeps only sources rendered here (kernels.trust). A claim of another generator cannot be checked."""
    if generator_version != generator.GENERATOR_VERSION:
        raise InvalidRecord(
            f"this tunerd renders with generator {generator.GENERATOR_VERSION} and cannot verify a "
            f"source recorded for generator {generator_version!r}: source and spec/schedule/device "
            f"mismatch"
        )
    if not isinstance(source, str) or not source.strip():
        raise InvalidRecord("source must be the non-empty Triton source text that was measured")
    try:
        return trust.verify(spec, schedule, source, variant_id=variant, generator_version=generator_version)
    except trust.UntrustedSource as e:
        raise InvalidRecord(str(e)) from None


def _plan_rendered(
    block: Block, plan: Plan | dict, schedules: Any, claimed_id: str | None, generator_version: str
) -> trust.TrustedPlan:
    """This process's check and rendering of a block winner (kernels.trust.verify_plan). The plan id is
    compared only for a winner of this generator version (another version's kernels render differently)."""
    same = generator_version == generator.GENERATOR_VERSION
    return trust.verify_plan(block, plan, schedules, claimed_id=claimed_id if same else None)


def _which_block(i: int, r: Any) -> str:
    return f"block winner {i} ({r.block.describe() if isinstance(r, BlockWinnerRow) else repr(r)[:200]})"


INGEST_BATCH_ROWS = 256  # an import writes at most this many rows per transaction ...
INGEST_BATCH_S = 0.05  # ... and starts no new row once a transaction has run this long


def _which(i: int, r: Any) -> str:
    return f"winner {i} ({r.spec.describe() if isinstance(r, WinnerRow) else repr(r)[:200]})"


@dataclass
class _Ingested:
    """What committed import batches wrote (Store.ingest), to take back if a later batch fails."""

    outcomes: list[str] = field(default_factory=list)
    trials: list[int] = field(default_factory=list)
    winners: dict[tuple[int, int], dict[str, Any] | None] = field(default_factory=dict)  # before the import
    devices: set[int] = field(default_factory=set)
    specs: set[int] = field(default_factory=set)
    variants: set[str] = field(default_factory=set)

    def note(
        self, t: TrialTable, before: WinnerTable | None, new_device: bool, new_spec: bool, new_variant: bool
    ) -> None:
        self.trials.append(t.id)
        prior = None if before is None else {c.key: getattr(before, c.key) for c in WinnerTable.__table__.columns}
        self.winners.setdefault((t.device_id, t.spec_id), prior)
        if new_device:
            self.devices.add(t.device_id)
        if new_spec:
            self.specs.add(t.spec_id)
        if new_variant:
            self.variants.add(t.variant_id)

    def merge(self, later: _Ingested) -> None:
        self.trials += later.trials
        for key, prior in later.winners.items():
            self.winners.setdefault(key, prior)
        self.devices |= later.devices
        self.specs |= later.specs
        self.variants |= later.variants


class Store(JobQueue, BinaryStore, CompileQueue):
    """The tuning database. Store(url) or Store.open(url); url defaults to db.engine.default_url()."""

    def __init__(self, url: str | URL | None = None, *, busy_timeout_s: float = 30.0) -> None:
        self._engine: Engine = _engine.create(url, busy_timeout_s=busy_timeout_s)
        self._writer = self._engine.execution_options(**{_engine.WRITE: True})
        self._pg = self._engine.dialect.name == "postgresql"
        self._upsert = postgresql.insert if self._pg else sqlite.insert
        try:
            self.revision = _engine.upgrade(self._engine)
        except BaseException:
            self._engine.dispose()
            raise

    @classmethod
    def open(cls, url: str | URL | None = None, *, busy_timeout_s: float = 30.0) -> Store:
        return cls(url, busy_timeout_s=busy_timeout_s)

    @property
    def url(self) -> str:
        """The database URL with any password hidden."""
        return _engine.safe(self._engine.url)

    @property
    def backend(self) -> str:
        return self._engine.dialect.name

    def close(self) -> None:
        self._engine.dispose()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Store({self.url!r})"

    def ping(self) -> None:
        """Raise StoreUnavailable unless the database answers."""
        with self._read() as s:
            s.execute(text("SELECT 1"))

    def health(self, *, write: bool = True) -> None:
        """Raise StoreUnavailable unless the database file is the one opened and sound, and (write) its
        schema is this tunerd's and it takes a write (db.engine.check_health)."""
        _engine.check_health(self._engine, write=write)

    # ---- transactions ------------------------------------------------------------------------
    @contextmanager
    def _read(self) -> Iterator[Session]:
        with _engine.guard(self._engine), Session(self._engine) as s:
            yield s

    @contextmanager
    def _write(self) -> Iterator[Session]:
        """One committed write transaction (SQLite: BEGIN IMMEDIATE, so writers queue, never deadlock)."""
        with _engine.guard(self._engine), Session(self._writer) as s, s.begin():
            yield s

    # ---- keys ----------------------------------------------------------------------------------
    def _find(self, s: Session, model: type[DeviceTable] | type[SpecTable], key: str) -> int | None:
        return s.scalar(select(model.id).where(model.key == key))

    def _ensure(self, s: Session, model: type[DeviceTable] | type[SpecTable], key: str, **values: Any) -> int:
        found = self._find(s, model, key)
        if found is not None:
            return found
        s.execute(
            self._upsert(model)
            .values(key=key, created_at=utcnow(), **values)
            .on_conflict_do_nothing(index_elements=["key"])
        )
        found = self._find(s, model, key)
        if found is None:
            raise StoreError(f"no {model.__tablename__} row for {key[:80]!r} after inserting it")
        return found

    def _ensure_device(self, s: Session, fp: DeviceFingerprint) -> int:
        _require("device", fp, DeviceFingerprint)
        return self._ensure(s, DeviceTable, fp.key, digest=fp.digest, name=fp.name[:200], interpreter=fp.interpreter)

    def _ensure_spec(self, s: Session, spec: BlockSpec) -> int:
        _require("spec", spec, BlockSpec)
        return self._ensure(
            s,
            SpecTable,
            spec.to_json(),
            digest=spec.digest,
            kind=spec.kind,
            op=spec.op,
            dtype=spec.dtype,
            summary=spec.describe()[:300],
        )

    def _ensure_variant(self, s: Session, spec_id: int, v: generator.Variant) -> str:
        """The row of a variant rendered in this process (see _rendered)."""
        row = s.execute(select(VariantTable.spec_id, VariantTable.source).where(VariantTable.id == v.id)).first()
        if row is None:
            s.execute(
                self._upsert(VariantTable)
                .values(
                    id=v.id,
                    spec_id=spec_id,
                    schedule=v.schedule.to_json(),
                    source=v.source,
                    generator_version=generator.GENERATOR_VERSION,
                    created_at=utcnow(),
                )
                .on_conflict_do_nothing(index_elements=["id"])
            )
            row = s.execute(select(VariantTable.spec_id, VariantTable.source).where(VariantTable.id == v.id)).first()
            if row is None:
                raise StoreError(f"no variants row for {v.id} after inserting it")
        # v is this process's rendering of (spec, schedule): a variant recorded first for another spec (row.spec_id)
        # serves this one too when the sources agree (a kernel that takes the batch as a launch argument)
        if row.source != v.source:
            raise StoreError(
                f"variant {v.id} is stored with a source this tunerd does not render (written by "
                f"another program?); refusing to build on it"
            )
        return v.id

    # ---- trials and winners --------------------------------------------------------------------
    def record_trial(
        self,
        device: DeviceFingerprint,
        spec: BlockSpec,
        schedule: Schedule,
        source: str,
        *,
        status: str,
        median_ms: float | None,
        spread_ms: float | None,
        reps: int,
        max_error: float | None,
        error: str | None = None,
        strategy: str | None = None,
        job_id: int | None = None,
    ) -> int:
        """Record one measurement made by this process (committed on return) and promote it to winner if it
        is the fastest correct one; a local measurement beats any imported claim. source must be this
        process's rendering of (spec, schedule). A wrong-result trial disqualifies its variant on this device,
        demoting it if it won; any failed local trial of a claimed winner ends that claim. Non-finite
        max_error of a failed trial is stored as None."""
        m = _check_measurement(status, median_ms, spread_ms, reps, max_error, error, strategy)
        if job_id is not None and (not isinstance(job_id, int) or isinstance(job_id, bool)):
            raise InvalidRecord(f"job_id must be an int or None, got {job_id!r}")
        with self._write() as s:
            if job_id is not None and s.get(JobTable, job_id) is None:
                raise UnknownJob(f"no job {job_id}: record the trial without job_id or enqueue the job first")
            return self._insert_trial(
                s,
                device,
                spec,
                schedule,
                source,
                m,
                job_id=job_id,
                origin=None,
                created_at=utcnow(),
                stats=(None, None),
            )

    def _insert_trial(
        self,
        s: Session,
        device: DeviceFingerprint,
        spec: BlockSpec,
        schedule: Schedule,
        source: str,
        m: dict[str, Any],
        *,
        job_id: int | None,
        origin: str | None,
        created_at: datetime,
        stats: tuple[float | None, float | None],
        claimed_id: str | None = None,
        rendered: generator.Variant | None = None,
    ) -> int:
        """origin None: measured by this process; else a claim (an import) naming where it came from.
        rendered: _rendered(spec, schedule, source, ...) when the caller checked it already."""
        _require("device", device, DeviceFingerprint)
        _require("spec", spec, BlockSpec)
        _require("schedule", schedule, Schedule)
        v = rendered or _rendered(spec, schedule, source, claimed_id, device.generator_version)
        dev_id = self._ensure_device(s, device)
        spec_id = self._ensure_spec(s, spec)
        vid = self._ensure_variant(s, spec_id, v)
        trial = TrialTable(
            device_id=dev_id, spec_id=spec_id, variant_id=vid, job_id=job_id, origin=origin, created_at=created_at, **m
        )
        s.add(trial)
        s.flush()
        if trial.status == "ok":
            self._offer_winner(s, trial, stats)
        else:
            current = s.get(WinnerTable, (dev_id, spec_id), with_for_update=True, populate_existing=True)
            # A wrong result disqualifies a variant; a local failure of a claimed winner ends the claim.
            if (
                current is not None
                and current.variant_id == vid
                and (trial.status == "wrong-result" or (current.claimed and origin is None))
            ):
                self._recompute_winner(s, current)
        return trial.id

    # A variant is its source; one source may serve several specs (a kernel taking the batch as a launch argument),
    # so what a trial says about a variant holds for its (device, spec) only.
    def _disqualified(self, device_id: int, spec_id: int):
        """Variants that produced a wrong result for this spec on this device at least once."""
        return select(TrialTable.variant_id).where(
            TrialTable.device_id == device_id, TrialTable.spec_id == spec_id, TrialTable.status == "wrong-result"
        )

    def _measured_here(self, device_id: int, spec_id: int):
        """Variants with a local trial (any status) for this spec on this device: their claims no longer count."""
        return select(TrialTable.variant_id).where(
            TrialTable.device_id == device_id, TrialTable.spec_id == spec_id, TrialTable.origin.is_(None)
        )

    def _offer_winner(self, s: Session, trial: TrialTable, stats: tuple[float | None, float | None]) -> None:
        """Atomic upsert. A local measurement wins over a claim (an imported timing) whatever the claimed
        time; otherwise the trial wins if there is no winner or it is strictly faster. A claim for a variant
        measured here never wins. The old winner's ratios are rescaled to the new time (both are
        reference_time / winner_time)."""
        if s.scalar(
            self._disqualified(trial.device_id, trial.spec_id).where(TrialTable.variant_id == trial.variant_id).limit(1)
        ):
            return
        claim = trial.origin is not None
        here = self._measured_here(trial.device_id, trial.spec_id)
        if claim and s.scalar(here.where(TrialTable.variant_id == trial.variant_id).limit(1)):
            return
        w = WinnerTable.__table__.c
        ins = self._upsert(WinnerTable).values(
            device_id=trial.device_id,
            spec_id=trial.spec_id,
            trial_id=trial.id,
            variant_id=trial.variant_id,
            median_ms=trial.median_ms,
            claimed=claim,
            speedup_vs_default=stats[0],
            fraction_of_roofline=stats[1],
            updated_at=utcnow(),
        )
        ex = ins.excluded
        ratio = w.median_ms / ex.median_ms
        faster = w.median_ms > ex.median_ms
        s.execute(
            ins.on_conflict_do_update(
                index_elements=[w.device_id, w.spec_id],
                set_={
                    "trial_id": ex.trial_id,
                    "variant_id": ex.variant_id,
                    "median_ms": ex.median_ms,
                    "claimed": ex.claimed,
                    "updated_at": ex.updated_at,
                    "speedup_vs_default": func.coalesce(ex.speedup_vs_default, w.speedup_vs_default * ratio),
                    "fraction_of_roofline": func.coalesce(ex.fraction_of_roofline, w.fraction_of_roofline * ratio),
                },
                where=and_(w.claimed, faster) if claim else or_(w.claimed, faster),
            )
        )

    def _recompute_winner(self, s: Session, current: WinnerTable) -> None:
        """The best remaining trial: local measurements first, then claims of variants not measured here."""
        d = current.device_id
        best = s.scalars(
            select(TrialTable)
            .where(
                TrialTable.device_id == d,
                TrialTable.spec_id == current.spec_id,
                TrialTable.status == "ok",
                TrialTable.variant_id.not_in(self._disqualified(d, current.spec_id)),
                or_(TrialTable.origin.is_(None), TrialTable.variant_id.not_in(self._measured_here(d, current.spec_id))),
            )
            .order_by(TrialTable.origin.is_not(None), TrialTable.median_ms, TrialTable.id)
            .limit(1)
        ).first()
        if best is None:
            s.delete(current)
            return
        if best.median_ms is None:
            raise StoreError(f"ok trial {best.id} has no median time")
        ratio = current.median_ms / best.median_ms
        current.trial_id, current.variant_id, current.median_ms = best.id, best.variant_id, best.median_ms
        current.claimed = best.origin is not None
        current.updated_at = utcnow()
        if current.speedup_vs_default is not None:
            current.speedup_vs_default *= ratio
        if current.fraction_of_roofline is not None:
            current.fraction_of_roofline *= ratio

    def measured(self, device: DeviceLike, spec: BlockSpec) -> dict[str, TrialRow]:
        """Every variant measured here for (device, spec), keyed by variant id, for resuming a tuning run
        (imported claims are not measurements: a tuner measures those variants itself).

        Per variant: its latest wrong-result trial if any (disqualified), else its fastest ok trial,
        else its latest trial."""
        _require("spec", spec, BlockSpec)
        with self._read() as s:
            q = (
                select(TrialTable, VariantTable.schedule, DeviceTable.key)
                .join(VariantTable, VariantTable.id == TrialTable.variant_id)
                .join(DeviceTable, DeviceTable.id == TrialTable.device_id)
                .join(SpecTable, SpecTable.id == TrialTable.spec_id)
                .where(
                    DeviceTable.key == _device_key(device), SpecTable.key == spec.to_json(), TrialTable.origin.is_(None)
                )
                .order_by(TrialTable.id)
            )
            out: dict[str, TrialRow] = {}
            for t, sched, dkey in s.execute(q):
                prev = out.get(t.variant_id)
                if prev is None or _supersedes(t, prev):
                    out[t.variant_id] = _trial_row(t, spec, sched, dkey)
            return out

    def claims(self, device: DeviceLike, spec: BlockSpec | None = None, limit: int = 100) -> list[TrialRow]:
        """Imported timings for device (and spec) whose variants were never measured here for their spec, one
        per (spec, variant), oldest first: what a verify job re-measures (until then such a winner answers with
        claimed=True)."""
        limit = _limit(limit)
        here = aliased(TrialTable)  # a local trial of the same (device, spec, variant)
        with self._read() as s:
            dev_id = select(DeviceTable.id).where(DeviceTable.key == _device_key(device)).scalar_subquery()
            q = (
                select(TrialTable, VariantTable.schedule, SpecTable.key)
                .join(VariantTable, VariantTable.id == TrialTable.variant_id)
                .join(SpecTable, SpecTable.id == TrialTable.spec_id)
                .where(
                    TrialTable.device_id == dev_id,
                    TrialTable.status == "ok",
                    TrialTable.origin.is_not(None),
                    ~exists().where(
                        here.device_id == TrialTable.device_id,
                        here.spec_id == TrialTable.spec_id,
                        here.variant_id == TrialTable.variant_id,
                        here.origin.is_(None),
                    ),
                )
                .order_by(TrialTable.id)
                .limit(limit)
            )
            if spec is not None:
                _require("spec", spec, BlockSpec)
                q = q.where(SpecTable.key == spec.to_json())
            out: dict[tuple[int, str], TrialRow] = {}
            for t, sched, skey in s.execute(q):
                out.setdefault((t.spec_id, t.variant_id), _trial_row(t, spec_of(skey), sched, _device_key(device)))
            return list(out.values())

    def winner(self, device: DeviceLike, spec: BlockSpec, snapshot: str | None = None) -> WinnerRow | None:
        """The winner for exactly this device key and spec (live, or as pinned in snapshot)."""
        _require("spec", spec, BlockSpec)
        rows = self._winner_rows(device_key=_device_key(device), spec_key=spec.to_json(), snapshot=snapshot)
        return rows[0] if rows else None

    def winners(self, device: DeviceLike | None = None, snapshot: str | None = None) -> list[WinnerRow]:
        return self._winner_rows(
            device_key=None if device is None else _device_key(device), spec_key=None, snapshot=snapshot
        )

    # ---- upgrades: winners measured under an older software stack of the same hardware --------------------
    def predecessors(self, device: DeviceFingerprint) -> list[DeviceFingerprint]:
        """Devices the store knows with device's hardware under another driver, CUDA, Triton, torch or
        generator version, newest first: what this device was before an upgrade."""
        _require("device", device, DeviceFingerprint)
        with self._read() as s:
            keys = s.scalars(
                select(DeviceTable.key)
                .where(DeviceTable.name == device.name, DeviceTable.key != device.key)
                .order_by(DeviceTable.id.desc())
            ).all()
        return [d for d in map(device_of, keys) if _hardware(d) == _hardware(device)]

    def stale_winner(self, device: DeviceFingerprint, spec: BlockSpec) -> WinnerRow | None:
        """spec's winner under the newest predecessor of device that has one (None if there is none): not
        current until re-validated here."""
        return next((w for old in self.predecessors(device) if (w := self.winner(old, spec)) is not None), None)

    def stale_specs(self, device: DeviceFingerprint, limit: int = 16) -> list[BlockSpec]:
        """Specs with a winner under a predecessor of device and none under device: what re-validation takes."""
        olds = [d.key for d in self.predecessors(device)]
        if not olds:
            return []
        with self._read() as s:
            here = (
                select(WinnerTable.spec_id)
                .join(DeviceTable, DeviceTable.id == WinnerTable.device_id)
                .where(DeviceTable.key == device.key)
            )
            keys = s.scalars(
                select(SpecTable.key)
                .join(WinnerTable, WinnerTable.spec_id == SpecTable.id)
                .join(DeviceTable, DeviceTable.id == WinnerTable.device_id)
                .where(DeviceTable.key.in_(olds), WinnerTable.spec_id.not_in(here))
                .group_by(SpecTable.id, SpecTable.key)
                .order_by(SpecTable.id)
                .limit(_limit(limit))
            ).all()
        return [spec_of(k) for k in keys]

    def stale_candidates(self, device: DeviceFingerprint, spec: BlockSpec, top: int = 4) -> list[Schedule]:
        """What re-validating spec on device re-measures: the `top` fastest correct schedules measured under
        its newest predecessor that measured spec."""
        for old in self.predecessors(device):
            ok = sorted((t for t in self.measured(old, spec).values() if t.status == "ok"), key=_median)
            if ok:
                return list(dict.fromkeys(t.schedule for t in ok))[: _limit(top)]
        return []

    # ---- shapes near a tuned one ------------------------------------------------------------------------
    def nearest_winners(self, device: DeviceLike, spec: BlockSpec, limit: int = 4) -> list[WinnerRow]:
        """Winners on device for specs that differ from spec only in batch and spatial size (same family,
        channels, kernel, stride, padding, dilation, groups, epilogue, dtype), nearest first: the closest
        log-distance of n and every spatial size. What a miss may borrow a schedule from."""
        _require("spec", spec, BlockSpec)
        want = _shape_free(spec)
        with self._read() as s:
            keys = s.scalars(
                select(SpecTable.key)
                .join(WinnerTable, WinnerTable.spec_id == SpecTable.id)
                .join(DeviceTable, DeviceTable.id == WinnerTable.device_id)
                .where(
                    DeviceTable.key == _device_key(device),
                    SpecTable.kind == spec.kind,
                    SpecTable.op == spec.op,
                    SpecTable.dtype == spec.dtype,
                    SpecTable.key != spec.to_json(),
                )
            ).all()
        near = [o for o in map(spec_of, keys) if _shape_free(o) == want and len(o.in_size) == len(spec.in_size)]
        near.sort(key=lambda o: (_shape_distance(o, spec), o.to_json()))
        return [w for o in near[: _limit(limit)] if (w := self.winner(device, o)) is not None]

    def _winner_rows(self, *, device_key: str | None, spec_key: str | None, snapshot: str | None) -> list[WinnerRow]:
        W: type[_WinnerColumns] = WinnerTable if snapshot is None else SnapshotWinnerTable
        with self._read() as s:
            q = (
                select(W, TrialTable, VariantTable.source, VariantTable.schedule, SpecTable.key, DeviceTable.key)
                .join(TrialTable, TrialTable.id == W.trial_id)
                .join(VariantTable, VariantTable.id == W.variant_id)
                .join(SpecTable, SpecTable.id == W.spec_id)
                .join(DeviceTable, DeviceTable.id == W.device_id)
            )
            q = _scoped(s, q, SnapshotWinnerTable.snapshot, snapshot, device_key)
            if spec_key is not None:
                q = q.where(SpecTable.key == spec_key)
            return [
                WinnerRow(
                    device=device_of(dkey),
                    spec=spec_of(skey),
                    schedule=schedule_of(sched),
                    source=src,
                    variant_id=w.variant_id,
                    median_ms=w.median_ms,
                    spread_ms=t.spread_ms,
                    reps=t.reps,
                    max_error=t.max_error,
                    speedup_vs_default=w.speedup_vs_default,
                    fraction_of_roofline=w.fraction_of_roofline,
                    strategy=t.strategy,
                    created_at=t.created_at,
                    trial_id=t.id,
                    job_id=t.job_id,
                    origin=t.origin,
                    claimed=w.claimed,
                    snapshot=snapshot,
                )
                for w, t, src, sched, skey, dkey in s.execute(q.order_by(DeviceTable.id, SpecTable.id))
            ]

    def set_winner_stats(
        self,
        device: DeviceLike,
        spec: BlockSpec,
        *,
        speedup_vs_default: float | None = None,
        fraction_of_roofline: float | None = None,
    ) -> None:
        """Attach ratios to the current winner (values left None are unchanged)."""
        _require("spec", spec, BlockSpec)
        values = {
            k: v
            for k, v in (
                ("speedup_vs_default", number("speedup_vs_default", speedup_vs_default, positive=True)),
                ("fraction_of_roofline", number("fraction_of_roofline", fraction_of_roofline, positive=True)),
            )
            if v is not None
        }
        with self._write() as s:
            ids = self._ids(s, device, spec)
            w = s.get(WinnerTable, ids) if ids else None
            if w is None:
                raise UnknownWinner(f"no winner for {spec.describe()} on this device")
            for k, v in values.items():
                setattr(w, k, v)

    def _ids(self, s: Session, device: DeviceLike, spec: BlockSpec) -> tuple[int, int] | None:
        d, sp = self._find(s, DeviceTable, _device_key(device)), self._find(s, SpecTable, spec.to_json())
        return None if d is None or sp is None else (d, sp)

    def variant(self, vid: str) -> VariantRow | None:
        with self._read() as s:
            row = s.execute(
                select(VariantTable, SpecTable.key)
                .join(SpecTable, SpecTable.id == VariantTable.spec_id)
                .where(VariantTable.id == vid)
            ).first()
            if row is None:
                return None
            v, skey = row
            return VariantRow(
                id=v.id,
                spec=spec_of(skey),
                schedule=schedule_of(v.schedule),
                source=v.source,
                generator_version=v.generator_version,
                created_at=v.created_at,
            )

    def devices(self) -> list[DeviceRow]:
        def per_device(col):
            return select(col.label("d"), func.count().label("n")).group_by(col).subquery()

        with self._read() as s:
            t, w, m = (
                per_device(TrialTable.device_id),
                per_device(WinnerTable.device_id),
                per_device(MissTable.device_id),
            )
            q = (
                select(DeviceTable.key, DeviceTable.created_at, t.c.n, w.c.n, m.c.n)
                .outerjoin(t, t.c.d == DeviceTable.id)
                .outerjoin(w, w.c.d == DeviceTable.id)
                .outerjoin(m, m.c.d == DeviceTable.id)
                .order_by(DeviceTable.id)
            )
            return [
                DeviceRow(fingerprint=device_of(k), trials=nt or 0, winners=nw or 0, misses=nm or 0, created_at=created)
                for k, created, nt, nw, nm in s.execute(q)
            ]

    def trial_counts(self) -> dict[str, int]:
        """Trials per status (every status present, zeros included)."""
        with self._read() as s:
            got = dict(s.execute(select(TrialTable.status, func.count()).group_by(TrialTable.status)).all())
        return {st: int(got.get(st, 0)) for st in TRIAL_STATUSES}

    def ingest(
        self,
        rows: Sequence[WinnerRow],
        *,
        origin: str,
        blocks: Sequence[BlockWinnerRow] = (),
        binaries: Sequence[aot.Binary] = (),
        signed_by: str | None = None,
        batch_rows: int = INGEST_BATCH_ROWS,
        batch_s: float = INGEST_BATCH_S,
    ) -> list[str]:
        """Merge winners measured elsewhere, all or nothing, without holding the write lock for long.

        Each becomes an ok trial tagged with origin: a claim. Its source must be byte-identical to this
        process's rendering of its (spec, schedule) (else the whole merge is refused); only that rendering
        is stored. A claim never displaces a winner measured here (whatever time it claims), and competes by
        time with other claims. Returns per row: 'added' (no winner before), 'replaced' (a slower claim),
        'kept' (a local or faster winner stays, or the variant was measured or found wrong here) or
        'unchanged' (this very measurement is already stored).

        Every row is checked and rendered before anything is written; then rows are written in short
        transactions (at most batch_rows rows or about batch_s seconds each; on SQLite each is followed by a
        pause as long as it held the lock), so other writers (misses, trials, jobs) wait about one batch, not
        the import. If a batch fails, the batches already committed are taken back (their trials, the rows
        they created, the winners they changed) before the error is raised.
        Readers may see an import half done while it runs; a process killed halfway leaves the batches it
        committed (claims like the rest: re-importing the bundle completes it, verify jobs check them).
        blocks: fused block winners, each checked and rendered (kernels.trust.verify_plan) before anything is
        written, then merged by the same rules in one transaction after the winners (their outcomes follow the
        winners' in the returned list).
        binaries: ahead-of-time binaries to keep (BinaryStore), with the key_id of the pinned key that signed them
        (the caller decides whether they may be kept: db.bundle). Their files are written first, one blob per short
        transaction and invisible until referred to; their rows go into that last transaction (a failed import
        leaves only unreferenced blobs, which BinaryStore.collect_blobs deletes after a grace period)."""
        origin = _label("origin", origin, 80, optional=False)
        try:
            to_keep = [check_binary(b) for b in binaries]
        except InvalidRecord as e:
            raise InvalidRecord(f"binary refused: {e}") from None
        checked: list[tuple[WinnerRow, generator.Variant, dict[str, Any]]] = []
        for i, r in enumerate(rows):
            try:
                _require("winner", r, WinnerRow)
                limits.check(r.spec)  # rendering a claim must not cost more than this process agrees to
                v = _rendered(r.spec, r.schedule, r.source, r.variant_id, r.device.generator_version)
                m = _check_measurement("ok", r.median_ms, r.spread_ms, r.reps, r.max_error, None, r.strategy)
            except (InvalidRecord, limits.LimitExceeded) as e:
                raise InvalidRecord(f"{_which(i, r)}: {e}") from None
            checked.append((r, v, m))
        checked_blocks: list[tuple[BlockWinnerRow, trust.TrustedPlan, dict[str, Any]]] = []
        for i, b in enumerate(blocks):
            try:
                _require("block winner", b, BlockWinnerRow)
                tp = _plan_rendered(b.block, b.plan, b.schedules, b.plan_id, b.device.generator_version)
                m = _check_measurement("ok", b.median_ms, b.spread_ms, b.reps, b.max_error, None, b.strategy)
            except (InvalidRecord, trust.UntrustedSource) as e:
                raise InvalidRecord(f"{_which_block(i, b)}: {e}") from None
            checked_blocks.append((b, tp, m))
        rows_to_keep = keepable(to_keep)
        self.keep_blobs(blobs_of(to_keep))  # first: no row refers to them until the last transaction
        outcomes: list[str] = []
        done = _Ingested()
        try:
            while len(outcomes) < len(checked):
                batch = _Ingested()
                with self._write() as s:
                    s.connection()  # BEGIN (IMMEDIATE on SQLite): the batch's time runs from holding the lock
                    until = time.monotonic() + batch_s
                    for _ in range(max(1, batch_rows)):
                        i = len(outcomes) + len(batch.outcomes)
                        if i == len(checked) or (batch.outcomes and time.monotonic() > until):
                            break
                        r, v, m = checked[i]
                        try:
                            batch.outcomes.append(self._ingest_one(s, r, m, origin, v, batch))
                        except InvalidRecord as e:
                            raise InvalidRecord(f"{_which(i, r)}: {e}") from None
                done.merge(batch)  # committed
                outcomes += batch.outcomes
                if not self._pg and len(outcomes) < len(checked):  # let waiting writers in: SQLite's busy
                    time.sleep(min(batch_s, time.monotonic() - until + batch_s))  # handler polls, no queue
            if checked_blocks or to_keep:

                def last(s: Session) -> list[str]:
                    got = [self._offer_block(s, b.device, tp, m, origin, b.created_at) for b, tp, m in checked_blocks]
                    self._add_binaries(s, rows_to_keep, origin, signed_by)
                    return got

                outcomes += self._referring(to_keep, last, kept=True)
        except BaseException:
            if done.trials:
                self._take_back(done, batch_rows)
            raise
        return outcomes

    def _ingest_one(
        self, s: Session, r: WinnerRow, m: dict[str, Any], origin: str, v: generator.Variant, ledger: _Ingested
    ) -> str:
        ids = self._ids(s, r.device, r.spec)
        if (
            ids is not None
            and s.scalar(
                select(TrialTable.id)
                .where(
                    TrialTable.device_id == ids[0],
                    TrialTable.variant_id == r.variant_id,
                    TrialTable.status == "ok",
                    TrialTable.median_ms == r.median_ms,
                    TrialTable.created_at == r.created_at,
                )
                .limit(1)
            )
            is not None
        ):
            return "unchanged"
        before = s.get(WinnerTable, ids) if ids else None
        new_device = self._find(s, DeviceTable, r.device.key) is None
        new_spec = ids is None and self._find(s, SpecTable, r.spec.to_json()) is None
        new_variant = s.get(VariantTable, v.id) is None
        tid = self._insert_trial(
            s,
            r.device,
            r.spec,
            r.schedule,
            r.source,
            m,
            job_id=None,
            origin=origin,
            created_at=r.created_at,
            stats=(r.speedup_vs_default, r.fraction_of_roofline),
            claimed_id=r.variant_id,
            rendered=v,
        )
        trial = s.get(TrialTable, tid)
        if trial is None:
            raise StoreError(f"trial {tid} vanished while importing it")
        ledger.note(trial, before, new_device, new_spec, new_variant)
        won = s.scalar(select(WinnerTable.trial_id).where(WinnerTable.trial_id == tid)) is not None
        if not won:
            return "kept"
        return "replaced" if before is not None else "added"

    def _take_back(self, done: _Ingested, chunk: int) -> None:
        """Undo the committed batches of a failed import, in short transactions: winners the import made are
        set back to what they were (a winner something else set meanwhile stays), then its trials and the
        devices, specs and variants it created go, unless something else refers to them now (a snapshot
        taken during the import keeps what it pinned)."""
        chunk = max(1, chunk)
        mine = set(done.trials)
        pairs = list(done.winners.items())
        for k in range(0, len(pairs), chunk):
            with self._write() as s:
                for key, prior in pairs[k : k + chunk]:
                    current = s.get(WinnerTable, key)
                    if current is None or current.trial_id not in mine:
                        continue
                    if prior is None:
                        s.delete(current)
                    else:
                        for name, value in prior.items():
                            setattr(current, name, value)
        refs: dict[Any, list[Select[Any]]] = {
            TrialTable.id: [select(t.trial_id) for t in (WinnerTable, SnapshotWinnerTable)],
            VariantTable.id: [select(t.variant_id) for t in (TrialTable, WinnerTable, SnapshotWinnerTable)],
            SpecTable.id: [
                select(t.spec_id) for t in (TrialTable, VariantTable, WinnerTable, SnapshotWinnerTable, MissTable)
            ],
            DeviceTable.id: [
                select(t.device_id)
                for t in (
                    TrialTable,
                    WinnerTable,
                    SnapshotWinnerTable,
                    MissTable,
                    BlockWinnerTable,
                    SnapshotBlockWinnerTable,
                )
            ],
        }
        for col, created in (
            (TrialTable.id, done.trials),
            (VariantTable.id, sorted(done.variants)),
            (SpecTable.id, sorted(done.specs)),
            (DeviceTable.id, sorted(done.devices)),
        ):
            for k in range(0, len(created), chunk):
                with self._write() as s:
                    s.execute(
                        delete(col.class_).where(col.in_(created[k : k + chunk]), *[col.not_in(q) for q in refs[col]])
                    )

    # ---- fused block winners ----------------------------------------------------------------------
    def record_block_winner(
        self,
        device: DeviceFingerprint,
        block: Block,
        plan: Plan,
        schedules: dict[int, Schedule],
        *,
        median_ms: float,
        spread_ms: float | None,
        reps: int,
        max_error: float | None,
        strategy: str | None = None,
        created_at: datetime | None = None,
    ) -> str:
        """Record a block's plan x schedules measured by this process; it wins over an imported claim whatever
        the claim's time, else when it is strictly faster. schedules: by fused step index (steps without one
        take their default). Returns 'added', 'replaced' or 'kept'."""
        _require("device", device, DeviceFingerprint)
        _require("block", block, Block)
        _require("plan", plan, Plan)
        m = _check_measurement("ok", median_ms, spread_ms, reps, max_error, None, strategy)
        try:
            full = trust.complete_schedules(block, plan, schedules)
            tp = _plan_rendered(block, plan, full, None, device.generator_version)
        except (ValueError, trust.UntrustedSource) as e:  # SpecError / ScheduleError
            raise InvalidRecord(f"block winner for {block.describe()}: {e}") from None
        with self._write() as s:
            return self._offer_block(s, device, tp, m, None, created_at or utcnow())

    def _offer_block(
        self,
        s: Session,
        device: DeviceFingerprint,
        tp: trust.TrustedPlan,
        m: dict[str, Any],
        origin: str | None,
        created_at: datetime,
    ) -> str:
        """Upsert a checked block winner (see record_block_winner; a claim replaces only a slower claim)."""
        dev_id = self._ensure_device(s, device)
        key = tp.block.to_json()
        values = dict(
            device_id=dev_id,
            block_digest=tp.block.digest,
            block_key=key,
            summary=tp.block.describe()[:300],
            plan=tp.plan.to_json(),
            schedules=schedules_json(tp.schedules),
            plan_id=tp.id,
            median_ms=m["median_ms"],
            spread_ms=m["spread_ms"],
            reps=m["reps"],
            max_error=m["max_error"],
            strategy=m["strategy"],
            origin=origin,
            claimed=origin is not None,
            created_at=created_at,
            updated_at=utcnow(),
        )
        ins = self._upsert(BlockWinnerTable).values(**values)
        new = ins.on_conflict_do_nothing(index_elements=["device_id", "block_digest"]).returning(
            BlockWinnerTable.device_id
        )
        if s.execute(new).first() is not None:
            return "added"
        row = s.get(BlockWinnerTable, (dev_id, tp.block.digest), with_for_update=True, populate_existing=True)
        if row is None:
            raise StoreError(f"no block_winners row for {tp.block.describe()} after inserting it")
        if row.block_key != key:
            raise StoreError(f"two blocks share digest {tp.block.digest}: {row.summary!r} and {tp.block.describe()!r}")
        if row.plan_id == tp.id and row.median_ms == m["median_ms"] and row.created_at == created_at:
            return "unchanged"
        faster = m["median_ms"] < row.median_ms
        if not (row.claimed and faster if origin is not None else row.claimed or faster):
            return "kept"
        for k, v in values.items():
            setattr(row, k, v)
        return "replaced"

    def block_winner(self, device: DeviceLike, block: Block, snapshot: str | None = None) -> BlockWinnerRow | None:
        """The winner for exactly this device key and block (live, or as pinned in snapshot), checked and
        rendered here; UntrustedRecord for a row whose plan or schedules are not legal for its block."""
        _require("block", block, Block)
        rows = self._block_rows(device_key=_device_key(device), block=block, snapshot=snapshot)
        return rows[0] if rows else None

    def block_winners(
        self, device: DeviceLike | None = None, snapshot: str | None = None, *, refused: list[str] | None = None
    ) -> list[BlockWinnerRow]:
        """Every block winner (of device; live or pinned in snapshot), each checked as block_winner's. A row that
        fails the check raises UntrustedRecord, or, given a `refused` list, is left out with its reason added
        there (a listing that shows the rest)."""
        return self._block_rows(
            device_key=None if device is None else _device_key(device), block=None, snapshot=snapshot, refused=refused
        )

    def claimed_blocks(self, device: DeviceLike, limit: int = 16) -> list[Block]:
        """Blocks whose winner on device is an imported claim never measured here (what a verify job takes)."""
        with self._read() as s:
            keys = s.scalars(
                select(BlockWinnerTable.block_key)
                .join(DeviceTable, DeviceTable.id == BlockWinnerTable.device_id)
                .where(DeviceTable.key == _device_key(device), BlockWinnerTable.claimed.is_(True))
                .order_by(BlockWinnerTable.updated_at, BlockWinnerTable.block_digest)
                .limit(_limit(limit))
            ).all()
        return [block_of(k) for k in keys]

    def stale_block_winner(self, device: DeviceFingerprint, block: Block) -> BlockWinnerRow | None:
        """block's winner under the newest predecessor of device that has one, marked stale (as stale_winner)."""
        for old in self.predecessors(device):
            row = self.block_winner(old, block)
            if row is not None:
                return replace(row, stale=True)
        return None

    def _block_rows(
        self, *, device_key: str | None, block: Block | None, snapshot: str | None, refused: list[str] | None = None
    ) -> list[BlockWinnerRow]:
        W: type[_BlockWinnerColumns] = BlockWinnerTable if snapshot is None else SnapshotBlockWinnerTable
        with self._read() as s:
            q = select(W, DeviceTable.key).join(DeviceTable, DeviceTable.id == W.device_id)
            q = _scoped(s, q, SnapshotBlockWinnerTable.snapshot, snapshot, device_key)
            if block is not None:
                q = q.where(W.block_digest == block.digest)
            found = list(s.execute(q.order_by(DeviceTable.id, W.block_digest)))
        out = []
        for w, dkey in found:
            if block is not None and w.block_key != block.to_json():
                continue  # another block with the same digest
            try:
                out.append(self._block_row(w, device_of(dkey), snapshot))
            except UntrustedRecord as e:
                if refused is None:
                    raise
                refused.append(str(e))
        return out

    @staticmethod
    def _block_row(w: _BlockWinnerColumns, device: DeviceFingerprint, snapshot: str | None) -> BlockWinnerRow:
        """A stored block winner as a row, after kernels.trust re-checked and re-rendered it."""
        blk = block_of(w.block_key)
        try:
            tp = _plan_rendered(
                blk, json.loads(w.plan), schedules_of("schedules", w.schedules), w.plan_id, device.generator_version
            )
        except (ValueError, trust.UntrustedSource) as e:  # JSON, InvalidRecord, UntrustedSource
            raise UntrustedRecord(f"refusing the stored block winner for {w.summary!r} on {device.name}: {e}") from None
        return BlockWinnerRow(
            device=device,
            block=blk,
            plan=tp.plan,
            schedules=tp.schedules,
            plan_id=w.plan_id,
            median_ms=w.median_ms,
            spread_ms=w.spread_ms,
            reps=w.reps,
            max_error=w.max_error,
            strategy=w.strategy,
            created_at=w.created_at,
            origin=w.origin,
            claimed=w.claimed,
            snapshot=snapshot,
        )

    # ---- snapshots -------------------------------------------------------------------------------
    def create_snapshot(self, name: str | None = None) -> str:
        """Pin every current winner under name (generated when None); lookups naming it never change."""
        if name is None:
            name = f"snap-{utcnow():%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"
        if not isinstance(name, str) or not _SNAPSHOT_NAME.match(name):
            raise InvalidRecord(
                f"snapshot name must be 1-64 of [A-Za-z0-9._-] starting with a letter or digit, got {name!r}"
            )
        with self._write() as s:
            if s.get(SnapshotTable, name) is not None:
                raise SnapshotExists(f"snapshot {name!r} already exists (snapshots are immutable; pick a new name)")
            snap = SnapshotTable(name=name, created_at=utcnow(), winner_count=0)
            s.add(snap)
            s.flush()
            w = WinnerTable.__table__.c
            cols = [
                "device_id",
                "spec_id",
                "trial_id",
                "variant_id",
                "median_ms",
                "claimed",
                "speedup_vs_default",
                "fraction_of_roofline",
                "updated_at",
            ]
            res = s.execute(
                insert(SnapshotWinnerTable).from_select(
                    ["snapshot", *cols], select(cast(literal(name), String(64)), *[w[c] for c in cols])
                )
            )
            snap.winner_count = rowcount(res)
            b = BlockWinnerTable.__table__.c
            bcols = [c.key for c in BlockWinnerTable.__table__.columns]
            s.execute(
                insert(SnapshotBlockWinnerTable).from_select(
                    ["snapshot", *bcols], select(cast(literal(name), String(64)), *[b[c] for c in bcols])
                )
            )
        return name

    def snapshots(self) -> list[SnapshotRow]:
        with self._read() as s:
            return [
                SnapshotRow(name=x.name, created_at=x.created_at, winners=x.winner_count)
                for x in s.scalars(select(SnapshotTable).order_by(SnapshotTable.created_at, SnapshotTable.name))
            ]

    # ---- misses ------------------------------------------------------------------------------------
    def record_miss(self, device: DeviceFingerprint, spec: BlockSpec) -> int:
        """Count a lookup that found no winner; returns the new count for (device, spec)."""
        with self._write() as s:
            dev_id, spec_id = self._ensure_device(s, device), self._ensure_spec(s, spec)
            now = utcnow()
            ins = self._upsert(MissTable).values(
                device_id=dev_id, spec_id=spec_id, count=1, first_seen=now, last_seen=now
            )
            s.execute(
                ins.on_conflict_do_update(
                    index_elements=["device_id", "spec_id"],
                    set_={"count": MissTable.__table__.c.count + 1, "last_seen": ins.excluded.last_seen},
                )
            )
            return s.execute(
                select(MissTable.count).where(MissTable.device_id == dev_id, MissTable.spec_id == spec_id)
            ).scalar_one()

    def top_misses(self, limit: int = 20, *, device: DeviceLike | None = None) -> list[MissRow]:
        """The most requested untuned (device, spec) pairs, most frequent first."""
        limit = _limit(limit)
        with self._read() as s:
            q = (
                select(DeviceTable.key, SpecTable.key, MissTable.count, MissTable.last_seen)
                .join(DeviceTable, DeviceTable.id == MissTable.device_id)
                .join(SpecTable, SpecTable.id == MissTable.spec_id)
            )
            if device is not None:
                q = q.where(DeviceTable.key == _device_key(device))
            q = q.order_by(MissTable.count.desc(), MissTable.last_seen.desc()).limit(limit)
            return [MissRow(device_key=d, spec=spec_of(sk), count=c, last_seen=t) for d, sk, c, t in s.execute(q)]

    def record_misses(self, counts: Sequence[tuple[DeviceFingerprint, BlockSpec, int]]) -> None:
        """Add many miss counts in one transaction (the daemon batches its lookups' misses this way)."""
        with self._write() as s:
            for device, spec, n in counts:
                dev_id, spec_id = self._ensure_device(s, device), self._ensure_spec(s, spec)
                now = utcnow()
                ins = self._upsert(MissTable).values(
                    device_id=dev_id, spec_id=spec_id, count=n, first_seen=now, last_seen=now
                )
                s.execute(
                    ins.on_conflict_do_update(
                        index_elements=["device_id", "spec_id"],
                        set_={
                            "count": MissTable.__table__.c.count + ins.excluded.count,
                            "last_seen": ins.excluded.last_seen,
                        },
                    )
                )

    def miss_counts(self, device: DeviceLike, specs: Sequence[BlockSpec]) -> dict[str, int]:
        """Spec key -> misses recorded for (device, spec), for the specs that have any."""
        keys = [sp.to_json() for sp in specs]
        with self._read() as s:
            q = (
                select(SpecTable.key, MissTable.count)
                .join(MissTable, MissTable.spec_id == SpecTable.id)
                .join(DeviceTable, DeviceTable.id == MissTable.device_id)
                .where(DeviceTable.key == _device_key(device), SpecTable.key.in_(keys))
            )
            return {k: c for k, c in s.execute(q)}

    def prune_misses(self, keep: int) -> int:
        """Keep the `keep` most recently seen misses, drop the rest and the specs only they named; returns
        how many misses were dropped (bounds the table under a flood of distinct lookups)."""
        keep = _limit(keep)
        with self._write() as s:
            cutoff = s.scalar(select(MissTable.last_seen).order_by(MissTable.last_seen.desc()).offset(keep).limit(1))
            if cutoff is None:
                return 0
            core = {"synchronize_session": False}  # plain DELETE statements: no session state to update
            gone = rowcount(s.execute(delete(MissTable).where(MissTable.last_seen <= cutoff).execution_options(**core)))
            used = [select(m.spec_id) for m in (MissTable, VariantTable, TrialTable, WinnerTable, SnapshotWinnerTable)]
            s.execute(delete(SpecTable).where(*[SpecTable.id.not_in(q) for q in used]).execution_options(**core))
            return gone

    def clear_miss(self, device: DeviceLike, spec: BlockSpec) -> bool:
        """Forget the misses of (device, spec); True when there were any."""
        _require("spec", spec, BlockSpec)
        with self._write() as s:
            ids = self._ids(s, device, spec)
            miss = s.get(MissTable, ids) if ids else None
            if miss is not None:
                s.delete(miss)
            return miss is not None


def _scoped(s: Session, q: Any, snapshot_column: Any, snapshot: str | None, device_key: str | None) -> Any:
    """A winner query narrowed to one snapshot (UnknownSnapshot if there is none by that name; None: the live
    winners) and to one device key (None: every device)."""
    if snapshot is not None:
        if s.get(SnapshotTable, snapshot) is None:
            raise UnknownSnapshot(f"no snapshot named {snapshot!r}")
        q = q.where(snapshot_column == snapshot)
    if device_key is not None:
        q = q.where(DeviceTable.key == device_key)
    return q


def _shape_free(spec: BlockSpec) -> dict[str, Any]:
    """spec without its batch and spatial size."""
    return {k: v for k, v in spec.to_dict().items() if k not in ("n", "in_size")}


def _shape_distance(a: BlockSpec, b: BlockSpec) -> float:
    return sum(abs(math.log(x / y)) for x, y in zip((a.n, *a.in_size), (b.n, *b.in_size)))


def _hardware(d: DeviceFingerprint) -> tuple[Any, ...]:
    """What an upgrade leaves unchanged: the fingerprint without its software versions."""
    return (d.name, d.compute_capability, d.sm_count, d.memory_bytes, d.interpreter)


def _median(t: TrialTable | TrialRow) -> float:
    """An ok trial's median time (which it always has; inf otherwise)."""
    return math.inf if t.median_ms is None else t.median_ms


def _supersedes(t: TrialTable, prev: TrialRow) -> bool:
    """measured()'s choice per variant (trials arrive oldest first)."""
    if t.status == "wrong-result" or prev.status == "wrong-result":
        return t.status == "wrong-result"
    if t.status == "ok" or prev.status == "ok":
        return t.status == "ok" and (prev.status != "ok" or _median(t) < _median(prev))
    return True


def _trial_row(t: TrialTable, spec: BlockSpec, sched: str, dkey: str) -> TrialRow:
    return TrialRow(
        id=t.id,
        device_key=dkey,
        spec=spec,
        variant_id=t.variant_id,
        schedule=schedule_of(sched),
        status=t.status,
        median_ms=t.median_ms,
        spread_ms=t.spread_ms,
        reps=t.reps,
        max_error=t.max_error,
        error=t.error,
        strategy=t.strategy,
        job_id=t.job_id,
        origin=t.origin,
        created_at=t.created_at,
    )
