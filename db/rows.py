"""Rows the store hands out: plain frozen dataclasses (no ORM objects), each with a JSON-ready to_dict()."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields, is_dataclass
from datetime import datetime, timezone
from functools import lru_cache
from numbers import Real
from typing import Any, Literal, overload

from tunerd.kernels.block import Block
from tunerd.kernels.plan import Plan
from tunerd.kernels.schedule import Schedule, ScheduleError
from tunerd.kernels.spec import BlockSpec, SpecError, canonical_json

from .errors import InvalidRecord, SchemaError, field_mismatch
from .fingerprint import DeviceFingerprint


def jsonable(value: Any) -> Any:
    """Spec/Block/Plan/Schedule/fingerprint -> dict, datetime -> ISO 8601 UTC, tuples -> lists; the rest as is."""
    if isinstance(value, (BlockSpec, Block, Plan, Schedule, DeviceFingerprint)):
        return value.to_dict()
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, (tuple, list)):
        return [jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k) if isinstance(k, int) else k: jsonable(v) for k, v in value.items()}
    return value


class _Row:
    def to_dict(self) -> dict[str, Any]:
        assert is_dataclass(self)
        return {f.name: jsonable(getattr(self, f.name)) for f in fields(self)}


# ---- parsing stored keys (cached: the same few specs and devices are read over and over) ----
@lru_cache(maxsize=4096)
def spec_of(key: str) -> BlockSpec:
    try:
        return BlockSpec.from_json(key)
    except SpecError as e:
        raise SchemaError(f"a stored spec no longer parses with this tunerd ({e}): {key[:200]}") from None


@lru_cache(maxsize=4096)
def schedule_of(text: str) -> Schedule:
    try:
        return Schedule.from_json(text)
    except ScheduleError as e:
        raise SchemaError(f"a stored schedule no longer parses with this tunerd ({e}): {text[:200]}") from None


@lru_cache(maxsize=1024)
def block_of(key: str) -> Block:
    try:
        return Block.from_json(key)
    except SpecError as e:
        raise SchemaError(f"a stored block no longer parses with this tunerd ({e}): {key[:200]}") from None


@lru_cache(maxsize=1024)
def target_of(key: str) -> BlockSpec | Block:
    """A stored tuning target: a fused block (kind 'block') or a single conv's spec."""
    try:
        kind = json.loads(key).get("kind")
    except (json.JSONDecodeError, AttributeError):
        kind = None
    return block_of(key) if kind == "block" else spec_of(key)


def schedules_json(schedules: dict[int, Schedule]) -> str:
    """A block winner's schedules as stored: canonical JSON keyed by the fused step's index."""
    return canonical_json({str(i): s.to_dict() for i, s in sorted(schedules.items())})


def schedules_of(name: str, value: Any) -> dict[int, Schedule]:
    """{"<step index>": schedule dict} -> {index: Schedule}; InvalidRecord naming what is wrong."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise InvalidRecord(f"{name} is not JSON: {e}") from None
    if not isinstance(value, dict):
        raise InvalidRecord(f"{name} must map fused step index to schedule, got {type(value).__name__}")
    out: dict[int, Schedule] = {}
    for k, v in value.items():
        if not isinstance(k, str) or not k.isdigit() or len(k) > 4:
            raise InvalidRecord(f"{name} keys must be step indices, got {k!r}")
        try:
            out[int(k)] = Schedule.from_dict(v)
        except ScheduleError as e:
            raise InvalidRecord(f"{name}[{k}]: {e}") from None
    return out


@lru_cache(maxsize=256)
def device_of(key: str) -> DeviceFingerprint:
    try:
        return DeviceFingerprint.from_key(key)
    except InvalidRecord as e:
        raise SchemaError(f"a stored device fingerprint no longer parses ({e}): {key[:200]}") from None


def parse_time(value: Any, name: str) -> datetime:
    if isinstance(value, datetime):
        t = value
    elif isinstance(value, str):
        try:
            t = datetime.fromisoformat(value)
        except ValueError:
            raise InvalidRecord(f"{name} is not an ISO 8601 time: {value!r}") from None
    else:
        raise InvalidRecord(f"{name} must be an ISO 8601 time string, got {type(value).__name__}")
    return t.replace(tzinfo=timezone.utc) if t.tzinfo is None else t.astimezone(timezone.utc)


@overload
def number(name: str, value: Any, *, optional: Literal[False], positive: bool = False) -> float: ...
@overload
def number(name: str, value: Any, *, optional: bool = True, positive: bool = False) -> float | None: ...
def number(name: str, value: Any, *, optional: bool = True, positive: bool = False) -> float | None:
    """A finite real >= 0 (> 0 when positive), or None when optional."""
    if value is None:
        if optional:
            return None
        raise InvalidRecord(f"{name} is required")
    if not isinstance(value, Real) or isinstance(value, bool):
        raise InvalidRecord(f"{name} must be a number, got {type(value).__name__}")
    v = float(value)
    if not math.isfinite(v) or v < 0 or (positive and v == 0):
        raise InvalidRecord(f"{name} must be a finite number {'> 0' if positive else '>= 0'}, got {value!r}")
    return v


@overload
def label(name: str, value: Any, limit: int, *, optional: Literal[False]) -> str: ...
@overload
def label(name: str, value: Any, limit: int, *, optional: bool = True) -> str | None: ...
def label(name: str, value: Any, limit: int, *, optional: bool = True) -> str | None:
    """A non-empty string of at most limit characters, or None when optional."""
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value.strip() or len(value) > limit:
        raise InvalidRecord(f"{name} must be a non-empty string of at most {limit} characters, got {value!r}")
    return value


def json_object(name: str, value: Any) -> str | None:
    """A dict as canonical JSON text (None stays None)."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise InvalidRecord(f"{name} must be a dict, got {type(value).__name__}")
    try:
        return json.dumps(value, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise InvalidRecord(f"{name} is not JSON-serialisable: {e}") from None


def row_limit(limit: Any) -> int:
    """A positive int: how many rows a listing returns."""
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
        raise InvalidRecord(f"limit must be a positive int, got {limit!r}")
    return limit


@dataclass(frozen=True)
class TrialRow(_Row):
    """One measured variant on one device."""

    id: int
    device_key: str
    spec: BlockSpec
    variant_id: str
    schedule: Schedule
    status: str
    median_ms: float | None
    spread_ms: float | None
    reps: int
    max_error: float | None
    error: str | None
    strategy: str | None
    job_id: int | None
    origin: str | None  # None: measured here; "bundle:<sha256>": an imported claim
    created_at: datetime


class _Portable(_Row):
    """A winner row a bundle carries: PORTABLE names the fields that mean the same thing in another store."""

    PORTABLE: tuple[str, ...] = ()

    def portable(self) -> dict[str, Any]:
        """The fields that mean the same thing in another store (what a bundle carries)."""
        return {k: jsonable(getattr(self, k)) for k in self.PORTABLE}

    @classmethod
    def _measurement(cls, kind: str, d: Any) -> dict[str, Any]:
        """The device and measurement fields every portable winner has, checked (InvalidRecord naming the
        bad field), after the whole record's field set."""
        if not isinstance(d, dict):
            raise InvalidRecord(f"a {kind} must be a JSON object, got {type(d).__name__}")
        if set(d) != set(cls.PORTABLE):
            raise InvalidRecord(field_mismatch(kind, cls.PORTABLE, d))
        if not isinstance(d["reps"], int) or isinstance(d["reps"], bool) or d["reps"] < 1:
            raise InvalidRecord(f"reps must be an int >= 1, got {d['reps']!r}")
        if d["strategy"] is not None and not isinstance(d["strategy"], str):
            raise InvalidRecord("strategy must be a string or null")
        return {
            "device": DeviceFingerprint.from_dict(d["device"]),
            "median_ms": number("median_ms", d["median_ms"], optional=False, positive=True),
            "spread_ms": number("spread_ms", d["spread_ms"]),
            "reps": d["reps"],
            "max_error": number("max_error", d["max_error"]),
            "strategy": d["strategy"],
            "created_at": parse_time(d["created_at"], "created_at"),
        }


@dataclass(frozen=True)
class WinnerRow(_Portable):
    """The winning variant for (device, spec), with its source (rendered by the store's tunerd). claimed: its
    timing is an imported claim (origin says where from) that no local measurement has replaced yet."""

    device: DeviceFingerprint
    spec: BlockSpec
    schedule: Schedule
    source: str
    variant_id: str
    median_ms: float
    spread_ms: float | None
    reps: int
    max_error: float | None
    speedup_vs_default: float | None
    fraction_of_roofline: float | None
    strategy: str | None
    created_at: datetime  # when the winning trial was measured
    trial_id: int | None = None  # local to one store; not carried by bundles
    job_id: int | None = None
    origin: str | None = None
    claimed: bool = False
    snapshot: str | None = None  # the snapshot this answer came from, None for live winners

    @property
    def device_key(self) -> str:
        return self.device.key

    PORTABLE = (
        "device",
        "spec",
        "schedule",
        "source",
        "variant_id",
        "median_ms",
        "spread_ms",
        "reps",
        "max_error",
        "speedup_vs_default",
        "fraction_of_roofline",
        "strategy",
        "created_at",
    )

    @classmethod
    def from_portable(cls, d: Any) -> WinnerRow:
        """Parse portable() output; raises InvalidRecord naming the bad field."""
        measured = cls._measurement("winner", d)
        try:
            spec = BlockSpec.from_dict(d["spec"])
            schedule = Schedule.from_dict(d["schedule"])
        except (SpecError, ScheduleError) as e:
            raise InvalidRecord(str(e)) from None
        for name in ("source", "variant_id"):
            if not isinstance(d[name], str) or not d[name]:
                raise InvalidRecord(f"{name} must be a non-empty string")
        return cls(
            spec=spec,
            schedule=schedule,
            source=d["source"],
            variant_id=d["variant_id"],
            speedup_vs_default=number("speedup_vs_default", d["speedup_vs_default"], positive=True),
            fraction_of_roofline=number("fraction_of_roofline", d["fraction_of_roofline"], positive=True),
            **measured,
        )


@dataclass(frozen=True)
class BlockWinnerRow(_Portable):
    """The winning plan of a fused block on a device: the plan and one schedule per fused step (kernels.trust
    checked and rendered them when the store read the row), never source. claimed: an imported timing."""

    device: DeviceFingerprint
    block: Block
    plan: Plan
    schedules: dict[int, Schedule]
    plan_id: str  # kernels.trust.plan_id of the kernels the plan launches, as rendered here
    median_ms: float
    spread_ms: float | None
    reps: int
    max_error: float | None
    strategy: str | None
    created_at: datetime  # when it was measured
    origin: str | None = None
    claimed: bool = False
    snapshot: str | None = None
    stale: bool = False  # measured under a predecessor of the device asked about (before an upgrade)

    @property
    def device_key(self) -> str:
        return self.device.key

    def describe(self) -> str:
        """e.g. 'block n1 c16->16 @8x8 dw-ln-pw-act-pw-scale-add float32: 1 step [convnext] 1.23 ms'."""
        kinds = [s.kind for s in self.plan.steps]
        fused = [k for k in kinds if k not in ("conv", "op")]
        return (
            f"{self.block.describe()}: {len(kinds)} step{'s' if len(kinds) != 1 else ''} "
            f"[{', '.join(kinds)}]{'' if fused else ' (unfused)'} {self.median_ms:.4g} ms"
        )

    PORTABLE = (
        "device",
        "block",
        "plan",
        "schedules",
        "plan_id",
        "median_ms",
        "spread_ms",
        "reps",
        "max_error",
        "strategy",
        "created_at",
    )

    @classmethod
    def from_portable(cls, d: Any) -> BlockWinnerRow:
        """Parse portable() output (InvalidRecord naming the bad field). The plan must be a legal plan of the
        block; the schedules are checked (and every kernel rendered) by kernels.trust.verify_plan when stored."""
        measured = cls._measurement("block winner", d)
        try:
            block = Block.from_dict(d["block"])
            plan = Plan.from_dict(block, d["plan"])
        except SpecError as e:
            raise InvalidRecord(str(e)) from None
        if not isinstance(d["plan_id"], str) or not d["plan_id"]:
            raise InvalidRecord("plan_id must be a non-empty string")
        return cls(
            block=block,
            plan=plan,
            schedules=schedules_of("schedules", d["schedules"]),
            plan_id=d["plan_id"],
            **measured,
        )


@dataclass(frozen=True)
class VariantRow(_Row):
    id: str
    spec: BlockSpec
    schedule: Schedule
    source: str
    generator_version: str
    created_at: datetime


@dataclass(frozen=True)
class DeviceRow(_Row):
    fingerprint: DeviceFingerprint
    trials: int
    winners: int
    misses: int
    created_at: datetime

    @property
    def key(self) -> str:
        return self.fingerprint.key

    @property
    def digest(self) -> str:
        return self.fingerprint.digest

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "key": self.key, "digest": self.digest}


@dataclass(frozen=True)
class JobRow(_Row):
    id: int
    status: str
    strategy: str
    specs: tuple[BlockSpec | Block, ...] | None  # a task's job: its one spec or fused block
    suite: str | None
    budget_trials: int | None
    budget_seconds: float | None
    device_key: str | None
    progress: dict | None
    worker_id: str | None
    attempts: int
    created_at: datetime
    claimed_at: datetime | None
    heartbeat_at: datetime | None
    finished_at: datetime | None
    result: dict | None
    error: str | None


@dataclass(frozen=True)
class TaskRow(_Row):
    """One spec of a fanned-out job; `job` is what a job runner gets: the job narrowed to this spec."""

    id: int
    job_id: int
    position: int
    spec: BlockSpec | Block  # a fused block when the job names a block suite
    status: str
    worker_id: str | None
    attempts: int
    progress: dict | None
    result: dict | None
    error: str | None
    claimed_at: datetime | None
    heartbeat_at: datetime | None
    finished_at: datetime | None
    job: JobRow


@dataclass(frozen=True)
class MissRow(_Row):
    device_key: str
    spec: BlockSpec
    count: int
    last_seen: datetime


@dataclass(frozen=True)
class SnapshotRow(_Row):
    name: str
    created_at: datetime
    winners: int
