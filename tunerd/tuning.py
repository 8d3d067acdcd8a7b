"""Tuning against the store: resume from what is measured, record trials as they complete,
keep winner statistics, run queued jobs (tuning, and verifying imported claims), tune fused blocks into the
store's block winners, and answer conv calls and patched blocks from the local store."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import torch

from tunerd.db.errors import StoreError
from tunerd.db.fingerprint import DeviceFingerprint, current
from tunerd.db.rows import TrialRow
from tunerd.db.store import Store
from tunerd.kernels import trust
from tunerd.kernels.block import Block
from tunerd.kernels.conv import set_schedule_lookup
from tunerd.kernels.plan import Plan
from tunerd.kernels.plan import best as best_plan
from tunerd.kernels.schedule import Schedule
from tunerd.kernels.spec import BlockSpec, SpecError
from tunerd.schedules import block_suites, strategies, suites
from tunerd.schedules.blocks import BlockHarness, BlockTuneResult, tune_block
from tunerd.schedules.trial import Trial
from tunerd.schedules.tuner import Progress, TuneResult, tune

from .blocks import set_block_lookup

DEFAULT_STRATEGY = strategies.DEFAULT
VERIFY = "verify"  # the strategy of a job that re-measures imported claims (see run_job)
REVALIDATE = "revalidate"  # the strategy of a job that re-measures, after an upgrade, what won before it
REVALIDATE_TOP = 4  # schedules a re-validation re-measures per spec unless the job's budget_trials says
log = logging.getLogger("tunerd.tuning")


def _known(store: Store, device: DeviceFingerprint, spec: BlockSpec) -> dict[str, Trial]:
    """Trials already in the store for (device, spec), as the tuner's resume input."""
    out: dict[str, Trial] = {}
    rows: dict[str, TrialRow] = store.measured(device, spec)
    for vid, row in rows.items():
        v = store.variant(vid)
        out[vid] = Trial(
            schedule=row.schedule,
            variant_id=vid,
            source=v.source if v else "",
            status=row.status,
            median_ms=row.median_ms,
            reps=row.reps,
            max_error=row.max_error,
            error=row.error,
            device=device.name,
        )
    return out


def tune_spec(
    store: Store,
    device: DeviceFingerprint,
    spec: BlockSpec,
    *,
    strategy: str = DEFAULT_STRATEGY,
    budget_trials: int | None = None,
    budget_seconds: float | None = None,
    job_id: int | None = None,
    seed: int = 0,
    on_progress: Callable[[Progress], None] | None = None,
    label: str | None = None,
    **tune_options: Any,
) -> TuneResult:
    """Tune one spec on this process's device, writing every trial to the store as it completes (with
    strategy label, default the strategy's name).

    A run killed halfway resumes: trials already stored count toward the budget and are not measured again.
    """
    here = current()
    if device.key != here.key:
        raise ValueError(f"cannot tune for {device.describe()} on {here.describe()}: measurements are per device")

    def record(t: Trial) -> None:
        if not t.source:  # a schedule rejected before rendering has no variant to store
            return
        store.record_trial(
            device,
            spec,
            t.schedule,
            t.source,
            status=t.status,
            median_ms=t.median_ms,
            spread_ms=t.spread_ms,
            reps=t.reps,
            max_error=t.max_error,
            error=t.error,
            strategy=label or strategy,
            job_id=job_id,
        )

    result = tune(
        spec,
        strategy=strategy,
        budget_trials=budget_trials,
        budget_seconds=budget_seconds,
        seed=seed,
        known=_known(store, device, spec),
        on_trial=record,
        on_progress=on_progress,
        **tune_options,
    )
    if result.best is not None and store.winner(device, spec) is not None:
        store.set_winner_stats(
            device, spec, speedup_vs_default=result.speedup_vs_default, fraction_of_roofline=result.roofline_fraction
        )
    return result


BLOCK_SUITE = "blocks:"  # a job suite named blocks:<name> tunes that block suite's fused blocks (block_suites)


def job_specs(
    specs: tuple[BlockSpec | Block, ...] | list[BlockSpec | Block] | None, suite: str | None
) -> list[BlockSpec | Block]:
    """What a job tunes: explicit specs and/or every spec of a suite, or every block of a block suite
    ('blocks:<name>', schedules.block_suites at its default batch and dtype)."""
    out = list(specs or ())
    if suite and suite.startswith(BLOCK_SUITE):
        out += [e.block for e in block_suites.block_suite(suite.removeprefix(BLOCK_SUITE))]
    elif suite:
        out += suites.suite(suite)
    if not out:
        raise SpecError("a job needs specs or a suite")
    return list(dict.fromkeys(out))


def claimed_specs(store: Store, device: DeviceFingerprint, limit: int = 16) -> list[BlockSpec | Block]:
    """Specs and fused blocks with imported timings on device that were never measured here (what a verify job
    takes)."""
    specs: list[BlockSpec | Block] = list(dict.fromkeys(c.spec for c in store.claims(device, limit=8 * limit)))
    return specs[:limit] + store.claimed_blocks(device, limit)


def run_job(
    store: Store,
    job: Any,
    device: DeviceFingerprint | None = None,
    on_progress: Callable[[dict[str, Any]], None] | None = None,
    *,
    block_harness: BlockHarness | None = None,
    **tune_options: Any,
) -> dict[str, Any]:
    """Tune every spec of a claimed job; returns the result summary stored with the job. A fused block (a block
    suite's task) is tuned plan x schedule into the store's block winners (tune_block_winner; block_harness, else
    its own measurement worker).

    A VERIFY job measures here, for each of its specs, every imported claim not measured yet plus the
    default schedule: the local measurements then replace the claims in the winner table (a claim
    slower than measured loses its place, a wrong one is disqualified on this device). A REVALIDATE job
    re-checks and re-measures, for each spec, the fastest schedules measured on this hardware before an
    upgrade of its software stack (Store.stale_candidates), plus the default."""
    device = device or current()
    specs = job_specs(job.specs, job.suite)
    verify = job.strategy == VERIFY
    summary: list[dict[str, Any]] = []
    for i, spec in enumerate(specs):
        if isinstance(spec, Block):
            if verify:
                summary.append(_verify_block(store, device, spec, block_harness))
            elif job.strategy != REVALIDATE:  # upgrades are re-measured per conv spec
                summary.append(_tune_block_job(store, device, spec, job, block_harness))
            continue

        def progress(p: Progress, i: int = i, spec: BlockSpec = spec) -> None:
            if on_progress is not None:
                on_progress(
                    {
                        "spec_index": i,
                        "specs": len(specs),
                        "spec": spec.describe(),
                        "trials_done": p.done,
                        "trials_total": p.total,
                        "best_ms": p.best.median_ms if p.best else None,
                        "eta_s": p.eta_s,
                    }
                )

        if verify or job.strategy == REVALIDATE:
            if verify:
                candidates = [c.schedule for c in store.claims(device, spec, limit=1000)]
            else:
                candidates = store.stale_candidates(device, spec, top=job.budget_trials or REVALIDATE_TOP)
            if not candidates:
                continue  # measured meanwhile (or never claimed): nothing to verify
            res = tune_spec(
                store,
                device,
                spec,
                strategy="exhaustive",
                label=job.strategy,
                candidates=candidates,
                job_id=job.id,
                on_progress=progress,
                **tune_options,
            )
        else:
            res = tune_spec(
                store,
                device,
                spec,
                strategy=job.strategy,
                budget_trials=job.budget_trials,
                budget_seconds=job.budget_seconds,
                job_id=job.id,
                on_progress=progress,
                **tune_options,
            )
        summary.append(
            {
                "spec": spec.key,
                "describe": spec.describe(),
                "best_ms": res.best.median_ms if res.best else None,
                "default_ms": res.default_trial.median_ms,
                "speedup_vs_default": res.speedup_vs_default,
                "statuses": res.statuses,
                "measured": res.measured,
            }
        )
    return {"device": device.key, "specs": summary}


def _tune_block_job(
    store: Store, device: DeviceFingerprint, block: Block, job: Any, harness: BlockHarness | None
) -> dict[str, Any]:
    res = tune_block_winner(
        store,
        device,
        block,
        strategy=job.strategy,
        budget_trials=job.budget_trials,
        budget_seconds=job.budget_seconds,
        harness=harness,
    )
    best = res.best.trial.median_ms if res.best else None
    return {
        "block": block.key,
        "describe": block.describe(),
        "plan": res.best.plan.describe() if res.best else None,
        "best_ms": best,
        "default_ms": res.default.trial.median_ms,
        "speedup_vs_unfused": res.speedup_vs_unfused,
        "statuses": res.statuses,
    }


def _verify_block(
    store: Store, device: DeviceFingerprint, block: Block, harness: BlockHarness | None
) -> dict[str, Any]:
    """Measure a block's imported winner (its plan and schedules) here, and the planner's default plan beside it;
    the fastest correct one becomes the block's winner as a local measurement, which replaces the claim. A claim
    that is wrong on this device loses to the default; when neither is correct the claim stays and the summary
    says so."""
    out: dict[str, Any] = {"block": block.key, "describe": block.describe()}
    try:
        row = store.block_winner(device, block)
    except StoreError as e:  # UntrustedRecord: refused on read, never measured
        return {**out, "error": str(e)}
    if row is None or not row.claimed:
        return {**out, "skipped": "measured meanwhile"}
    default = best_plan(block)
    candidates = [(row.plan, row.schedules)] + ([(default, {})] if default != row.plan else [])
    own = harness is None
    h = harness or BlockHarness()
    try:
        trials = [(plan, scheds, h.measure(block, plan, scheds)) for plan, scheds in candidates]
    finally:
        if own:
            h.close()
    statuses = [t.status for _, _, t in trials]
    ok = [(plan, scheds, t) for plan, scheds, t in trials if t.ok]
    if not ok:
        return {**out, "statuses": statuses, "error": "neither the claim nor the default plan is correct here"}
    plan, scheds, t = min(ok, key=lambda c: c[2].cost)
    _record_block(store, device, block, plan, scheds, t, VERIFY)
    return {
        **out,
        "statuses": statuses,
        "claimed_ms": row.median_ms,
        "measured_ms": trials[0][2].median_ms,
        "plan": plan.describe(),
        "best_ms": t.median_ms,
    }


class StoreLookup:
    """kernels.conv's schedule lookup backed by the local store: the winner for this device, else None.

    Answers are cached in memory per (device, spec); misses too, so a conv call costs one dict lookup.
    """

    def __init__(self, store: Store | None = None, url: str | None = None) -> None:
        self._store = store
        self._url = url
        self._cache: dict[tuple[str, str], Any] = {}
        self._lock = threading.Lock()

    def _open(self) -> Store:
        if self._store is None:
            self._store = Store(self._url)
        return self._store

    def __call__(self, spec: BlockSpec, device: torch.device) -> Any:
        fp = current(device)
        key = (fp.key, spec.key)
        with self._lock:
            if key in self._cache:
                return self._cache[key]
        row = self._open().winner(fp, spec)
        answer = None
        if row is not None:
            try:  # a store file is data from outside this process: only its (spec, schedule) is used
                answer = trust.verify(
                    spec,
                    row.schedule,
                    row.source,
                    variant_id=row.variant_id,
                    generator_version=row.device.generator_version,
                )
            except trust.UntrustedSource as e:
                log.error("not using the local store's winner for %s: %s", spec.describe(), e)
        with self._lock:
            self._cache[key] = answer
        return answer

    def forget(self) -> None:
        with self._lock:
            self._cache.clear()


class StoreBlockLookup(StoreLookup):
    """tunerd.blocks' block lookup backed by the local store: the block winner for this device (checked and
    rendered by this process: kernels.trust.verify_plan), else None. Cached in memory per (device, block)."""

    def __call__(self, block: Block, device: torch.device) -> trust.TrustedPlan | None:  # type: ignore[override]
        fp = current(device)
        key = (fp.key, block.key)
        with self._lock:
            if key in self._cache:
                return self._cache[key]
        answer = None
        try:
            row = self._open().block_winner(fp, block)
            if row is not None:
                answer = trust.verify_plan(block, row.plan, row.schedules, claimed_id=row.plan_id)
        except (StoreError, trust.UntrustedSource) as e:
            log.error("not using the local store's block winner for %s: %s", block.describe(), e)
        with self._lock:
            self._cache[key] = answer
        return answer


def use_local_store(store: Store | None = None, url: str | None = None) -> StoreLookup:
    """Make tunerd.functional / tunerd.nn (convs) and patched blocks (tunerd.blocks) use this store's winners
    for the current device."""
    lookup = StoreLookup(store, url)
    set_schedule_lookup(lookup)
    set_block_lookup(StoreBlockLookup(store, url))
    return lookup


def tune_block_winner(
    store: Store, device: DeviceFingerprint, block: Block, *, label: str | None = None, **tune_options: Any
) -> BlockTuneResult:
    """Tune a fused block on this process's device (schedules.blocks.tune_block) and record its fastest
    correct plan x schedules as the block's winner in the store (a local measurement: it beats a claim)."""
    here = current()
    if device.key != here.key:
        raise ValueError(f"cannot tune for {device.describe()} on {here.describe()}: measurements are per device")
    res = tune_block(block, **tune_options)
    if res.best is not None:
        _record_block(store, device, block, res.best.plan, res.best.schedules, res.best.trial, label or res.strategy)
    return res


def _record_block(
    store: Store,
    device: DeviceFingerprint,
    block: Block,
    plan: Plan,
    schedules: dict[int, Schedule],
    t: Trial,
    strategy: str,
) -> None:
    """An ok trial of (plan, schedules) measured here, offered as block's winner (it beats any imported claim)."""
    assert t.median_ms is not None  # an ok trial
    store.record_block_winner(
        device,
        block,
        plan,
        schedules,
        median_ms=t.median_ms,
        spread_ms=t.spread_ms,
        reps=t.reps,
        max_error=t.max_error,
        strategy=strategy,
    )
