"""Trial: one measured variant (status, timings, numerics), as the store records it."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from tunerd.kernels.schedule import Schedule

OK = "ok"
WRONG = "wrong-result"
COMPILE_ERROR = "compile-error"
CRASH = "crash"
TIMEOUT = "timeout"
STATUSES = (OK, WRONG, COMPILE_ERROR, CRASH, TIMEOUT)


@dataclass(frozen=True)
class Trial:
    """A variant's measurement. Timings are per launch in milliseconds over `reps` repetitions.

    rel_error is the correctness gate's ||out - ref|| / ||ref|| against the float64 reference,
    max_error the largest absolute difference; both None when the kernel never produced output.
    """

    schedule: Schedule
    variant_id: str
    source: str
    status: str
    median_ms: float | None = None
    p10_ms: float | None = None
    p90_ms: float | None = None
    reps: int = 0
    rel_error: float | None = None
    max_error: float | None = None
    error: str | None = None
    device: str = ""
    seconds: float = 0.0  # wall time spent on this trial (compile, gate and timing)

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {self.status!r}")
        if self.status == OK and self.median_ms is None:
            raise ValueError("an ok trial needs median_ms")

    @classmethod
    def from_reply(
        cls, reply: dict[str, Any], *, schedule: Schedule, variant_id: str, source: str, device: str, seconds: float
    ) -> Trial:
        """The trial a measurement worker's reply describes (repetitions count only for an ok reply)."""
        return cls(
            schedule=schedule,
            variant_id=variant_id,
            source=source,
            status=reply["status"],
            median_ms=reply.get("median_ms"),
            p10_ms=reply.get("p10_ms"),
            p90_ms=reply.get("p90_ms"),
            reps=reply.get("reps", 0) if reply["status"] == OK else 0,
            rel_error=reply.get("rel_error"),
            max_error=reply.get("max_error"),
            error=reply.get("error"),
            device=device,
            seconds=seconds,
        )

    @property
    def ok(self) -> bool:
        return self.status == OK

    @property
    def spread_ms(self) -> float | None:
        """p90 - p10: the timing spread."""
        if self.p10_ms is None or self.p90_ms is None:
            return None
        return self.p90_ms - self.p10_ms

    @property
    def cost(self) -> float:
        """What strategies minimise: the median, +inf for anything that is not ok."""
        return self.median_ms if self.ok and self.median_ms is not None else float("inf")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["schedule"] = self.schedule.to_dict()
        d["spread_ms"] = self.spread_ms
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Trial:
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        kw["schedule"] = Schedule.from_dict(d["schedule"])
        return cls(**kw)

    def with_(self, **changes: Any) -> Trial:
        return replace(self, **changes)


def best_of(trials: list[Trial]) -> Trial | None:
    """The fastest ok trial; for a variant measured several times, its longest run counts."""
    latest: dict[str, Trial] = {}
    for t in trials:
        if not t.ok:
            continue
        prev = latest.get(t.variant_id)
        if prev is None or t.reps >= prev.reps:
            latest[t.variant_id] = t
    return min(latest.values(), key=lambda t: t.cost, default=None)
