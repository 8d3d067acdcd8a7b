"""The tuning worker: claims tasks from the store's queue and tunes them on this process's device.

One worker runs in every daemon (a background thread). Several daemons may share one database: a
job fans out into one task per spec, the store hands each task to exactly one worker (PostgreSQL:
FOR UPDATE SKIP LOCKED), so the workers of a fleet tune one suite side by side; the worker
heartbeats while it tunes, and any worker requeues tasks whose holder stopped heartbeating. When
the queue is empty the worker tunes the specs clients asked for most and nobody has tuned yet
(the miss queue), for its own device only; before that it compiles ahead of time the kernels a
GET /v1/bundle?arch= found no kept binary of (want_binaries: the store's compile queue, shared by a
fleet and kept across restarts), a bounded batch per step claimed by this worker alone, each kernel
rendered here again from what the row names, and keeps them. Every few minutes an idle worker also
deletes what failed imports left (blobs nobody refers to) and forgets old compile attempts.

A cancelled job (or one requeued away from this worker, or a daemon stopping) ends within seconds:
the measurement that is running is killed (schedules.harness.guard), not left to finish.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import subprocess
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from tunerd.db.errors import JobNotOwned, StoreError, StoreUnavailable
from tunerd.db.fingerprint import DeviceFingerprint
from tunerd.db.fingerprint import current as current_device
from tunerd.schedules.strategies import DEFAULT as DEFAULT_STRATEGY

log = logging.getLogger("tunerd.worker")

# run_job(store, job, device, on_progress) -> result summary; tunerd.tuning.run_job by default. It is called
# once per task, with the task's job narrowed to the task's spec (TaskRow.job).
JobRunner = Callable[[Any, Any, DeviceFingerprint, Callable[[dict], None]], dict]
MAX_AOT_PENDING = 4096  # (kernel, arch) pairs waiting to be compiled ahead of time; more requests wait their turn
MAINTAIN_EVERY_S = 300.0  # how often an idle worker collects unreferenced blobs and forgets old compile attempts


class JobLost(Exception):
    """This worker no longer holds its job (requeued as stale by another worker, or finished elsewhere)."""


class WorkerStopping(Exception):
    """The daemon is shutting down: the job is left to be requeued rather than marked failed."""


def default_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


def _default_runner() -> Callable[..., dict[str, Any]]:
    """tunerd.tuning.run_job: a JobRunner that also takes tune options (harness=...)."""
    from .tuning import run_job

    return run_job


class JobWorker:
    """Claims and runs tuning jobs in a background thread; `run_once` does one step synchronously."""

    def __init__(
        self,
        store: Any,
        device: DeviceFingerprint | None = None,
        *,
        worker_id: str | None = None,
        run_job: JobRunner | None = None,
        poll_s: float = 1.0,
        heartbeat_s: float = 5.0,
        stale_after_s: float = 60.0,
        max_attempts: int | None = 3,
        tune_misses: bool = True,
        miss_strategy: str = DEFAULT_STRATEGY,
        miss_budget_trials: int | None = 16,
        miss_budget_seconds: float | None = 600.0,
        miss_min_count: int = 1,
        miss_retry_s: float = 3600.0,
        trial_memory_bytes: int | None = None,
        trial_timeout_s: float = 120.0,
        verify_claims: bool = True,
        revalidate: bool = True,
        aot_batch: int = 16,
        aot_timeout_s: float = 600.0,
        blob_grace_s: float | None = None,
    ) -> None:
        if stale_after_s <= heartbeat_s:
            raise ValueError(f"stale_after_s ({stale_after_s}) must exceed heartbeat_s ({heartbeat_s})")
        self.store = store
        self.device = device or current_device()
        self.worker_id = worker_id or default_worker_id()
        self._run_job = run_job
        self.poll_s = poll_s
        self.heartbeat_s = heartbeat_s
        self.stale_after_s = stale_after_s
        self.max_attempts = max_attempts
        self.tune_misses = tune_misses
        self.miss_strategy = miss_strategy
        self.miss_budget_trials = miss_budget_trials
        self.miss_budget_seconds = miss_budget_seconds
        self.miss_min_count = miss_min_count
        self.miss_retry_s = miss_retry_s
        self.trial_memory_bytes = trial_memory_bytes
        self.trial_timeout_s = trial_timeout_s
        self._cancel = threading.Event()  # set: stop the current job's measurements now
        self._miss_tried: dict[str, float] = {}  # spec key -> when this worker last queued it from the miss queue
        self.verify_claims = verify_claims  # when idle, re-measure imported timings for this device first
        self._verify_tried: dict[str, float] = {}  # spec key -> when this worker last queued its claims' verify
        self.revalidate = revalidate  # when idle, re-measure winners from before an upgrade of this device
        self._revalidate_tried: dict[str, float] = {}  # spec key -> when this worker last queued its re-validation
        self.aot_batch = aot_batch  # kernels compiled ahead of time per idle step ...
        self.aot_timeout_s = aot_timeout_s  # ... within this wall time
        self.blob_grace_s = blob_grace_s  # unreferenced blobs this young may be a running import's (None: the store's)
        self._maintained = -1e18  # when this worker last collected blobs (time.monotonic)
        self.binaries_pending: int | None = None  # the store's compile queue as this worker last saw it (no query)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.current_job: int | None = None
        self.progress: dict = {}
        self.tasks_done = 0
        self.jobs_done = 0  # jobs whose last task this worker finished
        self.jobs_failed = 0
        self.last_error: str | None = None

    @classmethod
    def from_settings(cls, store: Any, settings: Any, **overrides: Any) -> JobWorker:
        kw = dict(
            worker_id=settings.worker_id,
            poll_s=settings.poll_s,
            heartbeat_s=settings.heartbeat_s,
            stale_after_s=settings.stale_after_s,
            max_attempts=settings.max_attempts,
            tune_misses=settings.tune_misses,
            miss_strategy=settings.miss_strategy,
            miss_budget_trials=settings.miss_budget_trials,
            miss_budget_seconds=settings.miss_budget_seconds,
            miss_min_count=settings.miss_min_count,
            trial_memory_bytes=settings.trial_memory_bytes,
            trial_timeout_s=settings.trial_timeout_s,
            aot_batch=settings.aot_batch,
            aot_timeout_s=settings.aot_timeout_s,
        )
        kw.update(overrides)
        return cls(store, **kw)

    # ---- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name=f"tunerd-worker-{self.worker_id}", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = 10.0) -> None:
        """Stop the loop; a running job's measurement is killed and the job left to be requeued."""
        self._stop.set()
        self._cancel.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def cancel(self, job_id: int) -> bool:
        """Stop the measurements of job_id now if this worker runs it (the store already marked it cancelled)."""
        with self._lock:
            if self.current_job != job_id:
                return False
            self._cancel.set()
            return True

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def status(self) -> dict[str, Any]:
        with self._lock:
            return {
                "worker_id": self.worker_id,
                "device": self.device.describe(),
                "device_digest": self.device.digest,
                "alive": self.alive,
                "current_job": self.current_job,
                "progress": dict(self.progress),
                "tasks_done": self.tasks_done,
                "jobs_done": self.jobs_done,
                "jobs_failed": self.jobs_failed,
                "last_error": self.last_error,
                "binaries_pending": self.binaries_pending,
            }

    def _loop(self) -> None:
        log.info("worker %s started on %s", self.worker_id, self.device.describe())
        while not self._stop.is_set():
            try:
                ran = self.run_once()
            except StoreUnavailable as e:  # the database is down: keep the daemon up and retry
                self._note_error(f"store unavailable: {e}")
                ran = None
            except Exception as e:  # never let the worker thread die
                self._note_error(f"worker step failed: {type(e).__name__}: {e}")
                log.exception("worker step failed")
                ran = None
            if ran is None:
                self._stop.wait(self.poll_s)
        log.info("worker %s stopped", self.worker_id)

    def _note_error(self, msg: str) -> None:
        with self._lock:
            repeated, self.last_error = msg == self.last_error, msg
        log.log(logging.DEBUG if repeated else logging.WARNING, msg)  # a database that stays down logs once

    # ---- one step -------------------------------------------------------------------------
    def run_once(self) -> int | None:
        """Requeue stale tasks (failing those whose workers died max_attempts times), claim one (or queue
        imported claims to verify, winners from before an upgrade to re-validate, or the top miss, and claim
        that) and run it.

        Returns the id of the job whose task ran, or None when there was nothing to do.
        """
        n = self.store.requeue_stale(self.stale_after_s, max_attempts=self.max_attempts)
        if n:
            log.info("requeued %d stale task(s)", n)
        task = self._claim()
        if task is None and self.verify_claims and self._queue_claims():
            task = self._claim()
        if task is None and self.revalidate and self._queue_revalidation():
            task = self._claim()
        if task is None:
            self._maintain()
        if task is None and self._compile_binaries():
            return None
        if task is None and self.tune_misses and self._queue_top_miss():
            task = self._claim()
        if task is None:
            return None
        self.execute(task)
        return task.job_id

    def _claim(self) -> Any:
        from .tuning import job_specs

        return self.store.claim_task(
            self.worker_id, device_key=self.device.key, expand=lambda job: job_specs(job.specs, job.suite)
        )

    def _queue_claims(self) -> bool:
        """Queue a verify job for imported timings on this device never measured here; True if one was queued."""
        from .tuning import VERIFY, claimed_specs

        now = time.monotonic()
        specs = [
            s
            for s in claimed_specs(self.store, self.device)
            if now - self._verify_tried.get(s.to_json(), -1e18) >= self.miss_retry_s
        ]
        if not specs:
            return False
        self._verify_tried.update((s.to_json(), now) for s in specs)
        self.store.enqueue_job(specs=specs, strategy=VERIFY, device_key=self.device.key)
        log.info("queued a verify job for the imported timings of %d spec(s)", len(specs))
        return True

    def _queue_revalidation(self) -> bool:
        """Queue a re-validation job for winners measured on this hardware before an upgrade of its driver,
        CUDA, Triton, torch or generator and not measured since; True if one was queued."""
        from .tuning import REVALIDATE

        now = time.monotonic()
        specs = [
            s
            for s in self.store.stale_specs(self.device, limit=64)
            if now - self._revalidate_tried.get(s.to_json(), -1e18) >= self.miss_retry_s
        ][:16]
        if not specs:
            return False
        self._revalidate_tried.update((s.to_json(), now) for s in specs)
        self.store.enqueue_job(specs=specs, strategy=REVALIDATE, device_key=self.device.key)
        log.info("queued a re-validation job for %d winner(s) from before an upgrade", len(specs))
        return True

    def want_binaries(self, pairs: Sequence[tuple[Any, int]]) -> int:
        """Queue (kernel, arch) pairs, kernels this process rendered (kernels.generator.Variant), in the store for the
        idle workers of the fleet to compile ahead of time and keep; a pair tried within miss_retry_s is not queued
        again, and at most MAX_AOT_PENDING wait. Returns how many pairs wait now."""
        n = int(self.store.want_compiles(list(pairs), limit=MAX_AOT_PENDING, retry_s=self.miss_retry_s))
        with self._lock:
            self.binaries_pending = n
        return n

    def _compile_binaries(self) -> bool:
        """Claim up to aot_batch queued pairs (want_binaries), render each kernel here again from what its row names,
        compile them within aot_timeout_s and keep them; True if any were claimed. A pair is not retried within
        miss_retry_s, whatever the outcome; one whose worker died is claimed again after aot_timeout_s +
        stale_after_s."""
        from tunerd.kernels import aot

        rows = self.store.claim_compiles(
            self.worker_id,
            limit=self.aot_batch,
            stale_s=self.aot_timeout_s + self.stale_after_s,
            max_attempts=self.max_attempts or 3,
        )
        if not rows:
            return False
        by_arch: dict[int, list[Any]] = {}
        for row in rows:
            v = _rendered(row)
            if v is not None:
                by_arch.setdefault(row.arch, []).append(v)
        deadline = time.monotonic() + self.aot_timeout_s
        try:
            for arch, variants in sorted(by_arch.items()):
                left = deadline - time.monotonic()
                try:
                    if left <= 0:
                        raise subprocess.TimeoutExpired("aot", self.aot_timeout_s)
                    built = aot.build_or_reuse(variants, [arch], timeout=left)
                    self.store.add_binaries(built.compiled)
                except (RuntimeError, subprocess.TimeoutExpired) as e:
                    self._note_error(f"compiling {len(variants)} kernel(s) for sm_{arch} ahead of time: {e}")
                    continue
                for err in built.errors:
                    log.warning("no binary (clients compile it): %s", err)
                log.info("compiled and kept %d kernel(s) for sm_%d ahead of time", len(built.compiled), arch)
        finally:
            self.store.finish_compiles(self.worker_id, [r.id for r in rows])
        n = self.store.pending_compiles()
        with self._lock:
            self.binaries_pending = n
        return True

    def _maintain(self) -> None:
        """Every MAINTAIN_EVERY_S: delete blobs nobody refers to (failed imports) older than blob_grace_s, and forget
        compile attempts older than miss_retry_s. Bounded: a batch of each per step."""
        now = time.monotonic()
        if now - self._maintained < MAINTAIN_EVERY_S:
            return
        self._maintained = now
        n = self.store.collect_blobs(self.blob_grace_s)
        m = self.store.prune_compiles(self.miss_retry_s)
        if n or m:
            log.info("collected %d unreferenced blob(s), forgot %d old compile attempt(s)", n, m)

    def _queue_top_miss(self) -> bool:
        """Turn the most requested untuned spec for this device into a job; True if one was queued."""
        now = time.monotonic()
        for miss in self.store.top_misses(limit=50, device=self.device):
            if miss.count < self.miss_min_count:
                break  # ordered by count
            key = miss.spec.to_json()
            if now - self._miss_tried.get(key, -1e18) < self.miss_retry_s:
                continue  # tried recently and still missing: an untunable spec must not loop forever
            self._miss_tried[key] = now
            self.store.enqueue_job(
                specs=[miss.spec],
                strategy=self.miss_strategy,
                budget_trials=self.miss_budget_trials,
                budget_seconds=self.miss_budget_seconds,
                device_key=self.device.key,
            )
            self.store.clear_miss(self.device, miss.spec)
            log.info("queued miss %s (%d lookups)", miss.spec.describe(), miss.count)
            return True
        return False

    def execute(self, task: Any) -> None:
        """Run a claimed task with heartbeats; mark it done or failed. A lost task is left to its new owner."""
        from tunerd.schedules.harness import Interrupted, guard

        job = task.job
        lost = threading.Event()
        with self._lock:
            self.current_job, self.progress = job.id, {}
            self._cancel = threading.Event()
            cancel = self._cancel
        if self._stop.is_set():
            cancel.set()

        def on_progress(progress: dict) -> None:
            with self._lock:
                self.progress = _json_safe(progress)
            if lost.is_set():
                raise JobLost(f"task {task.position} of job {job.id} was taken from worker {self.worker_id}")
            if self._stop.is_set():
                raise WorkerStopping(f"worker {self.worker_id} is stopping")

        beat_stop = threading.Event()
        beater = threading.Thread(
            target=self._heartbeat,
            args=(task.id, beat_stop, lost, cancel),
            daemon=True,
            name=f"tunerd-heartbeat-{job.id}.{task.position}",
        )
        beater.start()
        result: dict | None = None
        error: str | None = None
        harness = None
        try:
            with guard(cancel=cancel):
                if self._run_job is not None:
                    result = self._run_job(self.store, job, self.device, on_progress)
                else:
                    harness = self._harness()
                    result = _default_runner()(self.store, job, self.device, on_progress, harness=harness)
        except (JobLost, WorkerStopping, Interrupted) as e:
            log.warning("job %s task %s abandoned: %s", job.id, task.position, e)
            return
        except Exception as e:  # a failing task never takes the worker down: it is marked failed
            error = f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=8)}"
            log.error("job %s task %s failed: %s: %s", job.id, task.position, type(e).__name__, e)
        finally:
            beat_stop.set()
            beater.join()
            if harness is not None:
                harness.close()
            with self._lock:
                self.current_job = None
        if lost.is_set():
            log.warning("job %s task %s finished after it was requeued; its result is dropped", job.id, task.position)
            return
        self._finish(task, result, error)

    def _finish(self, task: Any, result: dict | None, error: str | None) -> None:
        with self._lock:
            progress = dict(self.progress)
        for attempt in range(5):  # the store may be briefly unavailable; the trials are already saved
            try:
                self.store.heartbeat_task(task.id, self.worker_id, progress)  # the final progress, then the outcome
                settled = self.store.finish_task(task.id, self.worker_id, result=result, error=error)
                break
            except JobNotOwned as e:
                log.warning("job %s task %s: %s", task.job_id, task.position, e)
                return
            except StoreUnavailable as e:
                self._note_error(f"finishing job {task.job_id} task {task.position}: {e}")
                if self._stop.wait(min(30.0, 0.5 * 2**attempt)):
                    return
        else:
            return  # left running: its heartbeat stops, so a worker requeues it
        with self._lock:
            self.tasks_done += 1
            if settled is not None and settled.status == "done":
                self.jobs_done += 1
            elif settled is not None:
                self.jobs_failed += 1
            if error is not None:
                self.last_error = f"job {task.job_id} task {task.position}: {error.splitlines()[0]}"

    def _harness(self) -> Any:
        from tunerd.schedules.harness import Harness

        return Harness(memory_bytes=self.trial_memory_bytes, timeout_s=self.trial_timeout_s)

    def _heartbeat(self, task_id: int, stop: threading.Event, lost: threading.Event, cancel: threading.Event) -> None:
        while not stop.wait(self.heartbeat_s):
            with self._lock:
                progress = dict(self.progress)
            try:
                self.store.heartbeat_task(task_id, self.worker_id, progress)
            except JobNotOwned:  # cancelled or requeued: stop the running measurement now
                lost.set()
                cancel.set()
                return
            except StoreError as e:  # keep beating: the task is ours until the store says otherwise
                self._note_error(f"heartbeat of task {task_id}: {e}")


def _rendered(row: Any) -> Any:
    """This process's rendering of a claimed compile (db.compiles.CompileRow), or None (logged) when the row's kernel
    is past this process's work limits, does not render, or renders as another variant than the row names."""
    from tunerd.kernels import aot, limits, trust
    from tunerd.kernels.block import Block
    from tunerd.kernels.spec import BlockSpec

    try:
        d = row.kernel
        if "spec" in d:
            limits.check(BlockSpec.from_dict(d["spec"]))
        else:
            trust.check_block(Block.from_dict(d["block"]))
        v = aot.rendered(d)
        if v.id != row.variant_id:
            raise ValueError(f"it renders as variant {v.id} here")
        return v
    except Exception as e:  # a row is a claim: whatever it holds, nothing of it but this rendering is compiled
        log.warning("compile of variant %s for sm_%d dropped: %s: %s", row.variant_id, row.arch, type(e).__name__, e)
        return None


def _json_safe(value: Any) -> Any:
    """Progress as the store can keep it: non-finite numbers (an unknown ETA) become None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value
