"""Tuner: search a spec's schedule space on this device and keep the fastest correct variant.

tune() builds the space, always measures the default schedule, runs a strategy within the
budget, reports every new measurement through `on_trial` (the store's glue layer writes them)
and progress through `on_progress`, and skips variants already measured (`known`, keyed by
variant id: resuming a run re-uses them instead of measuring again).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from tunerd.kernels import schedule as _sched
from tunerd.kernels.schedule import Schedule
from tunerd.kernels.spec import BlockSpec

from . import cost, ops
from .device import DeviceLimits
from .harness import Harness, Interrupted, guard
from .space import DEFAULT_MAX_CANDIDATES, space
from .strategies import Budget, make
from .trial import Trial, best_of


@dataclass(frozen=True)
class Progress:
    """What a progress bar needs after each trial."""

    done: int  # measure calls so far (known trials included)
    total: int | None  # expected calls: the trial budget, or the space size
    measured: int  # new measurements
    best: Trial | None
    elapsed_s: float
    eta_s: float | None


@dataclass
class TuneResult:
    spec: BlockSpec
    best: Trial | None
    trials: list[Trial]
    default_trial: Trial
    speedup_vs_default: float | None
    roofline_fraction: float | None  # None on the interpreter: its rates are not a roofline
    device: str = ""
    strategy: str = ""
    candidates: int = 0
    measured: int = 0  # trials measured in this run (not taken from `known`)
    seconds: float = 0.0
    statuses: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "spec": self.spec.to_dict(),
            "best": self.best.to_dict() if self.best else None,
            "trials": [t.to_dict() for t in self.trials],
            "default_trial": self.default_trial.to_dict(),
            "speedup_vs_default": self.speedup_vs_default,
            "roofline_fraction": self.roofline_fraction,
            "device": self.device,
            "strategy": self.strategy,
            "candidates": self.candidates,
            "measured": self.measured,
            "seconds": self.seconds,
            "statuses": self.statuses,
        }


class _Measure:
    """The strategies' measure(schedule, reps): known/cached trials first, then the harness."""

    def __init__(
        self, spec: BlockSpec, harness: Harness, known: dict[str, Trial], on_trial: Callable[[Trial], None] | None
    ) -> None:
        self.spec = spec
        self.harness = harness
        self.cache = dict(known)
        self.on_trial = on_trial
        self.measured = 0

    def __call__(self, schedule: Schedule, reps: int) -> Trial:
        vid = self._id(schedule)
        hit = self.cache.get(vid) if vid else None
        if hit is not None and (not hit.ok or hit.reps >= reps):
            return hit
        t = self.harness.measure(self.spec, schedule, reps)
        self.measured += 1
        if t.variant_id:
            self.cache[t.variant_id] = t
        if self.on_trial is not None:
            self.on_trial(t)
        return t

    def prefetch(self, schedules: Sequence[Schedule]) -> None:
        self.harness.prefetch(self.spec, [s for s in schedules if self._id(s) not in self.cache])

    def _id(self, schedule: Schedule) -> str | None:
        try:
            return self.harness.variant(self.spec, schedule).id
        except ValueError:  # ScheduleError / SpecError: the harness reports it as a compile-error
            return None


def tune(
    spec: BlockSpec,
    *,
    strategy: str = "exhaustive",
    budget_trials: int | None = None,
    budget_seconds: float | None = None,
    seed: int = 0,
    known: dict[str, Trial] | None = None,
    on_trial: Callable[[Trial], None] | None = None,
    on_progress: Callable[[Progress], None] | None = None,
    harness: Harness | None = None,
    limits: DeviceLimits | None = None,
    reps: int | None = None,
    candidates: Sequence[Schedule] | None = None,
    max_candidates: int | None = DEFAULT_MAX_CANDIDATES,
    strategy_options: dict[str, Any] | None = None,
) -> TuneResult:
    """Tune spec; see the module doc. `candidates` overrides the space; `reps` the long-run repetitions.

    Known trials count toward budget_trials, so a resumed seeded run proposes the same sequence
    and stops where the original would have. A winner measured with fewer repetitions than a
    long run (successive halving's short rungs) is measured again at full length.
    """
    t0 = time.monotonic()
    limits = limits or DeviceLimits.detect()
    ops.check(spec)  # bad input fails here, before any worker starts
    budget = Budget(trials=budget_trials, seconds=budget_seconds)
    cands = list(candidates) if candidates is not None else space(spec, limits, max_candidates)
    if not cands:
        raise ValueError(f"no candidate schedules for {spec.describe()}")
    own = harness is None
    harness = harness or Harness()
    try:
        full = reps or harness.reps
        strat = make(
            strategy, seed=seed, prior=lambda s: cost.predict(spec, s, limits), reps=full, **(strategy_options or {})
        )
        meas = _Measure(spec, harness, known or {}, on_trial)
        default_trial = meas(_sched.default(spec), full)
        total = min(budget_trials, len(cands)) if budget_trials else len(cands)
        tracked = _Tracked(meas, on_progress, default_trial, total, budget, t0)
        # budget_seconds also stops the trial that is running when it runs out (its worker is killed)
        deadline = time.monotonic() + budget_seconds if budget_seconds is not None else None
        try:
            with guard(deadline=deadline):
                trials = strat.search(cands, tracked, budget)
                best = best_of([default_trial] + trials)
                if best is not None and best.reps < full:  # confirm a short-run winner with a full run
                    trials.append(meas(best.schedule, full))
        except Interrupted as e:
            if e.reason != "deadline":
                raise
            trials = tracked.seen[1:]  # what the search measured before the deadline
        everything = [default_trial] + trials
        best = best_of(everything)
    finally:
        if own:
            harness.close()
    speedup = default_trial.cost / best.cost if best is not None and default_trial.ok else None
    roof = None
    if best is not None and not limits.interpreted:
        roof = cost.roofline_fraction(spec, best.cost / 1e3, limits)  # best is ok: cost is its median
    statuses: dict[str, int] = {}
    for t in everything:
        statuses[t.status] = statuses.get(t.status, 0) + 1
    return TuneResult(
        spec=spec,
        best=best,
        trials=trials,
        default_trial=default_trial,
        speedup_vs_default=speedup,
        roofline_fraction=roof,
        device=harness.device_name,
        strategy=strategy,
        candidates=len(cands),
        measured=meas.measured,
        seconds=time.monotonic() - t0,
        statuses=statuses,
    )


class _Tracked:
    """measure() plus progress reports after each call."""

    def __init__(
        self,
        meas: _Measure,
        on_progress: Callable[[Progress], None] | None,
        default_trial: Trial,
        total: int,
        budget: Budget,
        t0: float,
    ) -> None:
        self.meas = meas
        self.on_progress = on_progress
        self.seen = [default_trial]
        self.total = total
        self.budget = budget
        self.t0 = t0

    def __call__(self, schedule: Schedule, reps: int) -> Trial:
        t = self.meas(schedule, reps)
        self.seen.append(t)
        if self.on_progress is not None:
            self.on_progress(self.progress())
        return t

    def prefetch(self, schedules: Sequence[Schedule]) -> None:
        self.meas.prefetch(schedules)

    def progress(self) -> Progress:
        elapsed = time.monotonic() - self.t0
        done = len(self.seen) - 1
        eta = elapsed / done * max(0, self.total - done) if done else None
        if self.budget.seconds is not None:
            left = max(0.0, self.budget.seconds - self.budget.elapsed)
            eta = left if eta is None else min(eta, left)
        return Progress(
            done=done,
            total=self.total,
            measured=self.meas.measured,
            best=best_of(self.seen),
            elapsed_s=elapsed,
            eta_s=eta,
        )
