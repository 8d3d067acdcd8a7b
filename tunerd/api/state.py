"""The app's state: settings, store, worker, the daemon's device, the work limits and small caches;
device resolution, spec (and fused block) parsing and the lookup answer that routes share."""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from typing import Any

from tunerd.db.errors import InvalidRecord, StoreError, UntrustedRecord
from tunerd.db.fingerprint import DeviceFingerprint
from tunerd.db.fingerprint import current as current_device
from tunerd.db.rows import BlockWinnerRow, WinnerRow
from tunerd.kernels import generator, limits, trust
from tunerd.kernels.block import Block
from tunerd.kernels.schedule import ScheduleError
from tunerd.kernels.spec import BlockSpec, SpecError

from ..metrics import Metrics
from ..settings import Settings
from .errors import ApiError
from .misses import MissRecorder
from .schemas import DeviceRef

log = logging.getLogger("tunerd.api")
API = "/v1"


class Service:
    def __init__(self, settings: Settings, store: Any, worker: Any) -> None:
        self.settings = settings
        self.store = store
        self.worker = worker
        self.device: DeviceFingerprint = worker.device if worker is not None else current_device()
        self.limits = settings.work_limits()
        self.metrics = Metrics(self)
        self.misses = MissRecorder(store, max_rows=settings.max_misses)
        self._devices: dict[str, DeviceFingerprint] = {}
        self._devices_at = -1e18
        self._launch: OrderedDict[str, dict] = OrderedDict()  # variant id -> launch metadata
        self._hits: OrderedDict[tuple[str, str, str], tuple[dict, float]] = OrderedDict()  # key -> (answer, when)
        self._health: tuple[float, str | None] = (-1e18, None)  # (when, problem) of the last store check
        self._lock = threading.Lock()

    # ---- lifecycle --------------------------------------------------------------------------------
    def start(self) -> None:
        self.misses.start()
        if self.worker is not None:
            self.worker.start()

    def stop(self) -> None:
        if self.worker is not None:
            self.worker.stop()
        self.misses.stop()

    # ---- health -----------------------------------------------------------------------------------
    def store_problem(self, max_age_s: float = 1.0) -> str | None:
        """None when the store is healthy, else what is wrong. The cheap checks (file identity, header,
        write permission, free space) run on every call; the write probe (schema, a committed write) at
        most once per max_age_s while healthy, so a flood of probes costs one write a second, and on
        every call while faulty, so recovery shows at once."""
        now = time.monotonic()
        with self._lock:
            at, problem = self._health
        deep = problem is not None or now - at >= max_age_s
        try:
            self.store.health(write=deep)
            problem = None
        except StoreError as e:
            problem = f"{type(e).__name__}: {e}"
            log.error("store unhealthy: %s", problem)
        if deep or problem is not None:
            with self._lock:
                self._health = (now, problem)
        return problem

    # ---- devices ----------------------------------------------------------------------------------
    def known_devices(self, max_age_s: float = 2.0) -> dict[str, DeviceFingerprint]:
        """Device key -> fingerprint of every device the store knows, plus this daemon's own (cached)."""
        now = time.monotonic()
        if now - self._devices_at > max_age_s:
            found = {row.key: row.fingerprint for row in self.store.devices()}
            found.setdefault(self.device.key, self.device)
            self._devices, self._devices_at = found, now
        return self._devices

    def resolve_device(self, ref: DeviceRef | None, known_only: bool = True) -> DeviceFingerprint:
        """A fingerprint, key or digest -> a device this server has data for; 422 malformed, 404 unknown.

        known_only=False accepts any well-formed fingerprint or key (a job may target a new device)."""
        if ref is None:
            return self.device
        if isinstance(ref, dict):
            try:
                fp = DeviceFingerprint.from_dict(ref)
            except InvalidRecord as e:
                raise ApiError(422, f"malformed device fingerprint: {e}") from None
        elif ref.lstrip().startswith("{"):
            try:
                fp = DeviceFingerprint.from_key(ref)
            except InvalidRecord as e:
                raise ApiError(422, f"malformed device key: {e}") from None
        else:
            fp = None
        if fp is not None and not known_only:
            return fp
        for max_age_s in (2.0, 0.25):  # a device new to this daemon: look again, at most 4 times a second
            known = self.known_devices(max_age_s)
            if fp is not None and fp.key in known:
                return known[fp.key]
            if fp is None:
                match = [d for d in known.values() if d.digest == ref]
                if match:
                    return match[0]
        raise self.unknown_device(fp, ref)

    def unknown_device(self, fp: DeviceFingerprint | None, ref: Any) -> ApiError:
        known = list(self.known_devices().values())
        what = fp.describe() if fp is not None else f"digest {str(ref)[:40]!r}"
        hint = (
            "no tuned kernels exist for this exact device (name, driver, CUDA, Triton, torch and generator "
            "version all count). Tune on a machine with this device (`tunerd serve` there) or import a bundle "
            "tuned on it; until then the client uses the default schedule."
        )
        if fp is not None and not fp.interpreter and known and all(d.interpreter for d in known):
            hint += " This server only has Triton-interpreter (CPU) timings, which never answer a GPU client."
        same = [d for d in known if fp is not None and d.name == fp.name]
        if same and fp is not None:
            differ = [f for f in fp.to_dict() if getattr(same[0], f) != getattr(fp, f)]
            hint += f" It has results for {fp.name} measured with a different {', '.join(differ)}."
        return ApiError(
            404,
            f"unknown device: {what}",
            hint=hint,
            known_devices=[
                {"digest": d.digest, "description": d.describe(), "interpreter": d.interpreter} for d in known
            ],
        )

    # ---- specs ------------------------------------------------------------------------------------
    def parse_specs(self, items: list[Any], limit: int) -> list[BlockSpec]:
        """BlockSpecs within this server's work limits; 422 naming every malformed or over-limit spec."""
        return [s for s in self._parse(items, limit, blocks=False) if isinstance(s, BlockSpec)]

    def parse_lookup(self, items: list[Any], limit: int) -> list[BlockSpec | Block]:
        """What a lookup asks about: BlockSpecs, and fused blocks (kind 'block': kernels.block.Block) within the
        work limits (kernels.trust.check_block); 422 naming every malformed or over-limit item."""
        return self._parse(items, limit, blocks=True)

    def _parse(self, items: list[Any], limit: int, *, blocks: bool) -> list[BlockSpec | Block]:
        if len(items) > limit:
            raise ApiError(422, f"{len(items)} specs in one request; this server takes at most {limit}")
        specs: list[BlockSpec | Block] = []
        errors = []
        for i, item in enumerate(items):
            try:
                if blocks and isinstance(item, dict) and item.get("kind") == "block":
                    blk = Block.from_dict(item)
                    trust.check_block(blk, self.limits)
                    specs.append(blk)
                    continue
                spec = BlockSpec.from_dict(item)
                limits.check(spec, self.limits)
                specs.append(spec)
            except SpecError as e:
                errors.append({"index": i, "error": str(e)})
        if errors:
            first = errors[0]
            raise ApiError(
                422,
                f"malformed spec {first['index']}: {first['error']}"
                + (f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""),
                errors=errors,
            )
        return specs

    # ---- lookup -----------------------------------------------------------------------------------
    def lookup(self, specs: list[BlockSpec | Block], device: DeviceFingerprint, snapshot: str | None) -> dict[str, Any]:
        results: list[dict[str, Any]] = []
        missed: dict[str, BlockSpec] = {}
        for i, spec in enumerate(specs):
            if isinstance(spec, Block):
                results.append({"index": i, **self._block_lookup(device, spec, snapshot)})
                continue
            answer = self._answer(device, spec, snapshot)
            if answer is None and snapshot is None:
                answer = self._stale(device, spec)
            if answer is None:
                borrowed = (snapshot is None and self._borrowed(device, spec)) or {}
                ragged = borrowed.get("same_kernel", False)  # a smaller batch of a tuned layer: nothing to tune
                key = spec.to_json()
                if key not in missed and not ragged:  # a model repeating a layer counts once per request
                    missed[key] = spec
                    self.misses.add(device, spec)
                answer = {
                    "hit": False,
                    "spec": spec.to_dict(),
                    "spec_digest": spec.digest,
                    "misses": None,
                    "tuning": bool(
                        not ragged
                        and self.worker is not None
                        and self.worker.tune_misses
                        and device.key == self.device.key
                    ),
                    **borrowed,
                }
                self.metrics.lookups.labels("miss").inc()
            else:
                self.metrics.lookups.labels("hit").inc()
            results.append({"index": i, **answer})
        if missed:
            stored = self.store.miss_counts(device, list(missed.values()))
            counts = {k: stored.get(k, 0) + self.misses.unwritten(device.key, k) for k in missed}
            for r, spec in zip(results, specs):
                if not r["hit"] and spec.to_json() in counts:
                    r["misses"] = counts[spec.to_json()]
        return {
            "device": device.digest,
            "snapshot": snapshot,
            "results": results,
            "hits": sum(r["hit"] for r in results),
            "misses": sum(not r["hit"] for r in results),
        }

    def cached_lookup(self, specs: list[BlockSpec | Block], ref: DeviceRef | None, snapshot: str | None) -> dict | None:
        """The lookup answer when the device and every spec's hit are in memory (no database, nothing
        that blocks: the event loop may call it); None otherwise."""
        if ref is None:
            device = self.device
        elif isinstance(ref, str) and not ref.lstrip().startswith("{") and time.monotonic() - self._devices_at < 2.0:
            found = next((d for d in self._devices.values() if d.digest == ref), None)
            if found is None:
                return None
            device = found
        else:
            return None
        ttl = float("inf") if snapshot is not None else self.settings.live_cache_s
        now = time.monotonic()
        results = []
        with self._lock:
            for i, spec in enumerate(specs):
                cached = self._hits.get((device.key, snapshot or "", spec.to_json()))
                if cached is None or now - cached[1] >= ttl:
                    return None
                results.append({"index": i, **cached[0]})
        self.metrics.lookups.labels("hit").inc(len(results))
        return {"device": device.digest, "snapshot": snapshot, "results": results, "hits": len(results), "misses": 0}

    def _block_lookup(self, device: DeviceFingerprint, blk: Block, snapshot: str | None) -> dict[str, Any]:
        """A fused block's answer: its winner (plan and schedules, never source: the client renders them), the
        winner before an upgrade when live (by settings.stale_answers, as for specs), else a miss. A stored
        row whose plan or schedules are not legal for its block (db.errors.UntrustedRecord) is a miss."""
        try:
            answer = self._answer(device, blk, snapshot)
            if answer is None and snapshot is None:
                row = self.store.stale_block_winner(device, blk)
                if row is not None:
                    self.metrics.lookups.labels("stale").inc()
                    answer = self.block_hit(row) if self.settings.stale_answers == "stale" else None
                    if answer is None:
                        return {**self._block_miss(blk), "stale": True}
        except UntrustedRecord as e:
            log.error("%s", e)
            answer = None
        self.metrics.lookups.labels("miss" if answer is None else "hit").inc()
        return answer or self._block_miss(blk)

    @staticmethod
    def _block_miss(blk: Block) -> dict[str, Any]:
        return {"hit": False, "block": blk.to_dict(), "block_digest": blk.digest, "misses": None, "tuning": False}

    def block_hit(self, row: BlockWinnerRow) -> dict[str, Any]:
        """A block winner as the lookup answers it: plan, one schedule per fused step, plan id, timings, numerics,
        provenance (stale when measured before an upgrade)."""
        answer = {
            "hit": True,
            "block": row.block.to_dict(),
            "block_digest": row.block.digest,
            "plan": row.plan.to_dict(),
            "plan_description": row.plan.describe(),
            "schedules": {str(i): s.to_dict() for i, s in sorted(row.schedules.items())},
            "plan_id": row.plan_id,
            **_measurement(row),
        }
        return {**answer, "stale": True} if row.stale else answer

    def _answer(self, device: DeviceFingerprint, spec: BlockSpec | Block, snapshot: str | None) -> dict | None:
        """The hit for (device, spec or block), or None. Snapshot hits are cached for good (they never change),
        live hits for settings.live_cache_s; misses are never cached (each one is counted)."""
        key = (device.key, snapshot or "", spec.to_json())
        now = time.monotonic()
        ttl = float("inf") if snapshot is not None else self.settings.live_cache_s
        if ttl > 0:
            with self._lock:
                cached = self._hits.get(key)
            if cached is not None and now - cached[1] < ttl:
                return cached[0]
        if isinstance(spec, Block):
            brow = self.store.block_winner(device.key, spec, snapshot=snapshot)
            if brow is None:
                return None
            answer = self.block_hit(brow)
        else:
            row = self.store.winner(device.key, spec, snapshot=snapshot)
            if row is None:
                return None
            answer = self.hit(row)
        if ttl > 0:
            with self._lock:
                self._hits[key] = (answer, now)
                while len(self._hits) > 50_000:
                    self._hits.popitem(last=False)
        return answer

    def _stale(self, device: DeviceFingerprint, spec: BlockSpec) -> dict | None:
        """After an upgrade of device's software stack, the winner measured before it, marked stale (or, with
        settings.stale_answers 'default', a stale miss: the client runs the default) while the worker
        re-validates it; not counted as a miss (there is nothing to tune from scratch). Never cached."""
        row = self.store.stale_winner(device, spec)
        if row is None:
            return None
        self.metrics.lookups.labels("stale").inc()
        if self.settings.stale_answers == "stale":
            return {**self.hit(row), "stale": True}
        return {"hit": False, "stale": True, "spec": spec.to_dict(), "spec_digest": spec.digest, "misses": None}

    def _borrowed(self, device: DeviceFingerprint, spec: BlockSpec) -> dict | None:
        """What a miss near a tuned shape (another batch or spatial size) adds: the nearest winner's schedule
        rendered for spec itself (a client re-renders and checks it like any answer before it launches it),
        marked borrowed, with the timings it won by on the other shape (borrowed_from). It stays a miss: it
        is counted, so the worker tunes the exact shape; except when spec is a smaller batch of the winner's
        layer served by the winner's own kernel (same_kernel: the batch is a launch argument), as a ragged last
        batch is: that would only re-tune a kernel the layer already runs."""
        for row in self.store.nearest_winners(device, spec):
            try:
                v = generator.render(spec, row.schedule)
            except (SpecError, ScheduleError):
                continue  # not legal for this shape: the next nearest
            self.metrics.lookups.labels("borrowed").inc()
            return {
                "borrowed": True,
                "same_kernel": v.id == row.variant_id and spec.n < row.spec.n,
                "schedule": v.schedule.to_dict(),
                "variant_id": v.id,
                "source": v.source,
                "launch": launch_of(v),
                "borrowed_from": {
                    "spec": row.spec.to_dict(),
                    "variant_id": row.variant_id,
                    **_measurement(row, trial_id=row.trial_id, job_id=row.job_id),
                },
            }
        return None

    def launch_metadata(self, row: Any) -> dict[str, Any]:
        with self._lock:
            meta = self._launch.get(row.variant_id)
        if meta is None:
            try:
                v = generator.render(row.spec, row.schedule)  # what a client launches: its own rendering
            except (SpecError, ScheduleError) as e:  # e.g. a bundle from a tunerd with more templates
                log.warning("cannot describe the launch of variant %s: %s", row.variant_id, e)
                return {"kernel_name": None, "grid": None, "num_warps": None, "num_stages": None, "error": str(e)}
            meta = launch_of(v)
            with self._lock:
                self._launch[row.variant_id] = meta
                while len(self._launch) > 20_000:
                    self._launch.popitem(last=False)
        return meta

    def hit(self, row: WinnerRow) -> dict[str, Any]:
        """A winner as the lookup answers it: exact source, launch metadata, timings, numerics, provenance."""
        return {
            "hit": True,
            "spec": row.spec.to_dict(),
            "spec_digest": row.spec.digest,
            "schedule": row.schedule.to_dict(),
            "variant_id": row.variant_id,
            "source": row.source,
            "launch": self.launch_metadata(row),
            "speedup_vs_default": row.speedup_vs_default,
            "fraction_of_roofline": row.fraction_of_roofline,
            **_measurement(row, trial_id=row.trial_id, job_id=row.job_id),
        }

    def body_limit(self, scope: dict) -> int:
        if scope.get("path") == f"{API}/bundle":
            return self.settings.max_bundle_bytes
        return self.settings.max_body_bytes


def launch_of(v: generator.Variant) -> dict[str, Any]:
    """What a client needs to launch a rendered variant."""
    return {"kernel_name": v.kernel_name, "grid": list(v.grid), "num_warps": v.num_warps, "num_stages": v.num_stages}


def _measurement(row: WinnerRow | BlockWinnerRow, **ids: Any) -> dict[str, Any]:
    """A winner's timings, numerics and provenance as every answer (conv, block, borrowed) gives them."""
    return {
        "timings": {"median_ms": row.median_ms, "spread_ms": row.spread_ms, "reps": row.reps},
        "numerics": {"max_error": row.max_error},
        "provenance": {
            "device": row.device.describe(),
            "device_digest": row.device.digest,
            "interpreter": row.device.interpreter,
            "generator_version": row.device.generator_version,
            "strategy": row.strategy,
            "measured_at": row.created_at.isoformat(),
            **ids,
            "origin": row.origin,
            "claimed": row.claimed,
            "snapshot": row.snapshot,
        },
    }
