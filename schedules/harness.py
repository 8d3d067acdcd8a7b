"""Harness: measure candidates in isolated worker processes; a candidate can never kill the tuner.

measure(spec, schedule, reps) renders the variant here (a `source_hook` may substitute its
source, which is how tests plant bad kernels), then:
- GPU: compiles it in a pool of worker processes (Triton's JIT warmup fills the on-disk cache;
  `prefetch` queues candidates ahead of time so compiles run in parallel with timing);
  CPU: nothing to compile, the timing worker loads the source (syntax errors show up there);
- the timing worker (one process, spawn context) runs the correctness gate: fresh random
  inputs (seeded per variant), a NaN-poisoned output buffer, the float64 torch reference at
  kernels.reference.tolerance(dtype); then warm-up, L2 flush and CUDA-event timing per
  repetition (wall clock on the CPU interpreter); then checks the output again;
- a timeout kills the worker; a dead worker (segfault, os._exit) or a lost CUDA context is
  replaced by a fresh one for the next candidate. Statuses: ok | wrong-result | compile-error |
  crash | timeout.
Memory: a worker whose resident memory passes `memory_bytes` is killed (the parent samples its RSS
every 0.1 s; status crash), and a spec whose estimated footprint (kernels.limits) exceeds it is not
started. On CPU the worker also caps its own address space (RLIMIT_AS = its size after start-up +
memory_bytes), so an allocation fails inside it before it can outrun the sampling; a CUDA worker
cannot (the CUDA driver reserves far more virtual address space than it uses), so there the RSS
sampling alone bounds host memory and the device bounds its own.
Stopping: `guard(cancel=event, deadline=t)` bounds every measurement started in that context: when
the event is set or the deadline passes, the running worker is killed within 0.1 s and Interrupted
is raised (nothing is recorded for that candidate). The daemon's worker cancels jobs this way; the
tuner puts budget_seconds' deadline on its search.
Workers use the spawn start method, which re-imports the main module: a script that measures
needs the usual `if __name__ == "__main__":` guard (python -m, pytest and consoles are fine).
"""

from __future__ import annotations

import hashlib
import itertools
import multiprocessing as mp
import os
import queue
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, replace
from typing import Any

import torch

from tunerd.kernels import generator, limits, runtime
from tunerd.kernels.generator import Variant
from tunerd.kernels.schedule import Schedule, ScheduleError
from tunerd.kernels.spec import BlockSpec, SpecError

from . import ops
from . import sandbox as _sandbox
from .device import INTERPRETER_NAME
from .trial import COMPILE_ERROR, CRASH, TIMEOUT, Trial

SourceHook = Callable[[Variant], "str | None"]
_spawn_lock = threading.Lock()


class HarnessError(RuntimeError):
    """The harness itself cannot work (a worker process does not start): not a candidate's fault."""


class SandboxDied(Exception):
    pass


class SandboxTimeout(Exception):
    pass


class SandboxOverMemory(Exception):
    pass


class Interrupted(Exception):
    """A measurement stopped from outside (reason 'cancelled' or 'deadline'); its worker was killed."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"measurement interrupted: {reason}")
        self.reason = reason


@dataclass(frozen=True)
class Guard:
    """What stops the measurements started in a context: a cancel event, a deadline (time.monotonic())."""

    cancel: tuple[threading.Event, ...] = ()
    deadline: float | None = None

    def check(self) -> None:
        if any(e.is_set() for e in self.cancel):
            raise Interrupted("cancelled")
        if self.deadline is not None and time.monotonic() >= self.deadline:
            raise Interrupted("deadline")


# The default is a frozen no-limit guard, never mutated.
_guard: ContextVar[Guard] = ContextVar("tunerd_measure_guard", default=Guard())  # noqa: B039


@contextmanager
def guard(*, cancel: threading.Event | None = None, deadline: float | None = None) -> Iterator[Guard]:
    """Measurements started in this context end within 0.1 s once cancel is set or deadline passes
    (their worker is killed, Interrupted raised). Nested guards combine: any event, the earliest deadline."""
    outer = _guard.get()
    deadlines = [d for d in (outer.deadline, deadline) if d is not None]
    g = Guard(
        cancel=outer.cancel + ((cancel,) if cancel is not None else ()), deadline=min(deadlines) if deadlines else None
    )
    token = _guard.set(g)
    try:
        yield g
    finally:
        _guard.reset(token)


def default_memory_bytes() -> int:
    """Half of this machine's physical memory: a measurement worker's default memory limit."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def resident_bytes(pid: int) -> int | None:
    """Resident memory of a process (Linux /proc), or None where that cannot be read."""
    try:
        with open(f"/proc/{pid}/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def exit_reason(code: int | None) -> str:
    if code is None:
        return "no exit code"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


class Sandbox:
    """One spawned worker process and its pipe."""

    def __init__(self, device: str, threads: int, startup_timeout_s: float, memory_bytes: int | None = None) -> None:
        self.device = device
        self.threads = threads
        self.startup_timeout_s = startup_timeout_s
        self.memory_bytes = memory_bytes
        self.process: Any = None
        self.conn: Any = None

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.is_alive()

    def start(self) -> None:
        ctx = mp.get_context("spawn")
        parent, child = ctx.Pipe()
        self.process = ctx.Process(
            target=_sandbox.serve,
            args=(child, self.device, self.threads, self.memory_bytes),
            daemon=True,
            name="tunerd-measure",
        )
        with _spawn_lock:  # the child inherits os.environ at start: choose the interpreter for CPU runs
            saved = os.environ.get("TRITON_INTERPRET")
            if self.device == "cpu":
                os.environ["TRITON_INTERPRET"] = "1"
            else:
                os.environ.pop("TRITON_INTERPRET", None)
            # Ctrl-C reaches the whole process group: the child starts with SIGINT ignored (kept across exec,
            # so its start-up imports print no traceback either); stopping it is the parent's job
            sigint = signal.signal(signal.SIGINT, signal.SIG_IGN) if _main_thread() else None
            try:
                self.process.start()
            except BaseException:
                self.process = None
                raise
            finally:
                if sigint is not None:
                    signal.signal(signal.SIGINT, sigint)
                if saved is None:
                    os.environ.pop("TRITON_INTERPRET", None)
                else:
                    os.environ["TRITON_INTERPRET"] = saved
        child.close()
        self.conn = parent
        g, end = _guard.get(), time.monotonic() + self.startup_timeout_s
        while not parent.poll(max(0.0, min(0.1, end - time.monotonic()))):  # start-up is interruptible too
            try:
                g.check()
            except Interrupted:
                self.kill()
                raise
            if time.monotonic() >= end:
                self.kill()
                raise HarnessError(f"measurement worker did not start within {self.startup_timeout_s:.0f}s")
        try:
            hello = parent.recv()
        except EOFError:
            self.process.join(5)
            code = self.process.exitcode
            self.kill()
            raise HarnessError(f"measurement worker died while starting ({exit_reason(code)})") from None
        if not hello.get("ready"):
            self.kill()
            raise HarnessError(f"measurement worker refused to start: {hello.get('error')}")

    def request(self, msg: dict[str, Any], timeout_s: float) -> dict[str, Any]:
        """Send one request; SandboxTimeout if no reply in time, SandboxDied if the process ended,
        SandboxOverMemory past memory_bytes resident, Interrupted when the context's guard says stop."""
        g = _guard.get()
        g.check()
        if not self.alive:
            self.start()
        try:
            self.conn.send(msg)
            self._wait(timeout_s, g)
            return self.conn.recv()
        except (EOFError, BrokenPipeError, ConnectionResetError, OSError):
            self.process.join(5)
            code = self.process.exitcode
            self.kill()
            raise SandboxDied(exit_reason(code)) from None

    def _wait(self, timeout_s: float, g: Guard, tick_s: float = 0.1) -> None:
        """Wait for the reply in ticks, checking the guard, the timeout and the worker's memory."""
        end = time.monotonic() + timeout_s
        while not self.conn.poll(max(0.0, min(tick_s, end - time.monotonic()))):
            g.check()
            if time.monotonic() >= end:
                raise SandboxTimeout()
            limit = self.memory_bytes
            rss = resident_bytes(self.process.pid) if limit else None
            if limit is not None and rss is not None and rss > limit:
                raise SandboxOverMemory(
                    f"resident memory {rss / 2**20:,.0f} MiB passed the limit of {limit / 2**20:,.0f} MiB"
                )

    def kill(self) -> None:
        if self.process is not None:
            if self.process.is_alive():
                self.process.kill()
            self.process.join(10)
        if self.conn is not None:
            self.conn.close()
        self.process = self.conn = None

    def stop(self) -> None:
        """Ask the worker to exit, then make sure it did."""
        if self.alive:
            try:
                self.conn.send(None)
                self.process.join(5)
            except (BrokenPipeError, OSError):
                pass
        self.kill()


def isolated_request(w: Sandbox, msg: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    """A worker's reply, or a timeout/crash reply after which the worker is replaced next time."""
    try:
        reply = w.request(msg, timeout_s)
    except Interrupted:
        w.kill()
        raise
    except SandboxTimeout:
        w.kill()
        return {"status": TIMEOUT, "error": f"no result within {timeout_s:g}s: worker killed and replaced"}
    except SandboxOverMemory as m:
        w.kill()
        return {"status": CRASH, "error": f"worker killed: {m}"}
    except SandboxDied as d:
        return {"status": CRASH, "error": f"worker process died ({d}) running this candidate; replaced"}
    if reply.get("fatal"):
        w.kill()
    return reply


class CompilePool:
    """GPU compiles in parallel worker processes; results keyed by variant id.

    Queue entries are (priority, sequence, vid, msg): the unique sequence number keeps entries
    from ever comparing their payloads. Prefetched jobs run in submission order; a job a caller
    is waiting for jumps the queue.
    """

    def __init__(
        self,
        n: int,
        device: str,
        threads: int,
        startup_timeout_s: float,
        timeout_s: float,
        memory_bytes: int | None = None,
    ) -> None:
        self._queue: queue.PriorityQueue = queue.PriorityQueue()
        self._done: dict[str, threading.Event] = {}
        self._started: set[str] = set()
        self._results: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()
        self._seq = itertools.count()
        self._timeout_s = timeout_s
        self._workers = [Sandbox(device, threads, startup_timeout_s, memory_bytes) for _ in range(n)]
        self._threads = [threading.Thread(target=self._run, args=(w,), daemon=True) for w in self._workers]
        for t in self._threads:
            t.start()

    def submit(self, vid: str, msg: dict[str, Any], urgent: bool = False) -> None:
        with self._lock:
            queued = vid in self._done
            if queued and (not urgent or vid in self._started):
                return
            self._done.setdefault(vid, threading.Event())
        # an urgent re-submit adds a front copy; whichever copy is taken first runs, the other is skipped
        self._queue.put((0 if urgent else 1, next(self._seq), vid, msg))

    def result(self, vid: str) -> dict[str, Any]:
        g = _guard.get()
        while not self._done[vid].wait(0.1):
            g.check()
        return self._results[vid]

    def _run(self, w: Sandbox) -> None:
        while True:
            _, _, vid, msg = self._queue.get()
            if vid is None:
                w.stop()
                return
            with self._lock:
                if vid in self._started:
                    continue
                self._started.add(vid)
            try:
                reply = isolated_request(w, msg, self._timeout_s)
            except Exception as e:  # a worker that cannot start: fail this job, never the waiting caller
                w.kill()
                reply = {"status": CRASH, "error": f"compile worker failed: {type(e).__name__}: {e}"}
            self._results[vid] = reply
            self._done[vid].set()

    def close(self) -> None:
        """Stop after the compiles in progress; queued prefetches are dropped."""
        for _ in self._threads:
            self._queue.put((-1, next(self._seq), None, None))
        for t in self._threads:
            t.join(30)
        for w in self._workers:
            w.kill()


class Harness:
    """Measures (spec, schedule) candidates; see the module doc.

    device: "cuda" / "cuda:N" or "cpu" (the interpreter); default: CUDA when usable, else CPU.
    reps / warmup: default repetitions (GPU 50 / 5, CPU 3 / 0: the gate run warms the interpreter).
    timeout_s: per-candidate limit on the gate + timing (and on each compile).
    compile_workers: parallel compile processes (GPU default: min(8, cpus - 1); CPU default 0:
      the timing worker loads the source itself).
    source_hook: Variant -> replacement source or None (tests plant broken kernels with it).
    seed: inputs of each candidate come from a generator seeded by (seed, variant id).
    memory_bytes: resident memory one worker may use (default: half the machine's memory).
    """

    def __init__(
        self,
        *,
        device: str | None = None,
        reps: int | None = None,
        warmup: int | None = None,
        timeout_s: float = 60.0,
        startup_timeout_s: float = 300.0,
        flush_l2: bool = True,
        compile_workers: int | None = None,
        source_hook: SourceHook | None = None,
        seed: int = 0,
        threads: int = 1,
        memory_bytes: int | None = None,
    ) -> None:
        if device is None:
            device = "cuda" if torch.cuda.is_available() and not runtime.interpreting() else "cpu"
        dev = torch.device(device)
        if dev.type not in ("cuda", "cpu"):
            raise ValueError(f"device must be cuda or cpu, got {device!r}")
        if dev.type == "cuda" and runtime.interpreting():
            raise ValueError("TRITON_INTERPRET=1 is set in this process: CUDA measurement needs compiled kernels")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s}")
        gpu = dev.type == "cuda"
        self.device = str(dev)
        self.device_name = torch.cuda.get_device_name(dev) if gpu else INTERPRETER_NAME
        self.reps = reps if reps is not None else (50 if gpu else 3)
        self.warmup = warmup if warmup is not None else (5 if gpu else 0)
        if self.reps < 1 or self.warmup < 0:
            raise ValueError("reps must be >= 1 and warmup >= 0")
        self.timeout_s = timeout_s
        self.flush_l2 = flush_l2
        self.source_hook = source_hook
        self.seed = seed
        self.memory_bytes = memory_bytes if memory_bytes is not None else default_memory_bytes()
        if self.memory_bytes < 64 << 20:
            raise ValueError(f"memory_bytes must be at least 64 MiB, got {self.memory_bytes}")
        if compile_workers is None:
            compile_workers = max(1, min(8, (os.cpu_count() or 2) - 1)) if gpu else 0
        self._pool = (
            CompilePool(compile_workers, self.device, threads, startup_timeout_s, timeout_s, self.memory_bytes)
            if compile_workers > 0
            else None
        )
        self._timing = Sandbox(self.device, threads, startup_timeout_s, self.memory_bytes)

    # ---- variants ---------------------------------------------------------------------
    def variant(self, spec: BlockSpec, schedule: Schedule) -> Variant:
        """The exact variant measured for (spec, schedule): rendered, then the source hook applied."""
        v = generator.render(spec, schedule)
        limits.check_source(v.source)
        if self.source_hook is not None:
            src = self.source_hook(v)
            if src is not None and src != v.source:
                v = replace(v, source=src)
        return v

    def _message(self, v: Variant, kind: str, reps: int | None) -> dict[str, Any]:
        seed = int(hashlib.sha256(f"{self.seed}:{v.id}".encode()).hexdigest()[:8], 16)
        return {
            "kind": kind,
            "spec": v.spec.to_dict(),
            "schedule": v.schedule.to_dict(),
            "source": v.source,
            "kernel_name": v.kernel_name,
            "grid": list(v.grid),
            "reps": reps or self.reps,
            "warmup": self.warmup,
            "flush_l2": self.flush_l2,
            "seed": seed,
        }

    # ---- measuring --------------------------------------------------------------------
    def prefetch(self, spec: BlockSpec, schedules: Iterable[Schedule]) -> None:
        """Queue compiles of candidates that will be measured soon (GPU; a no-op without a pool)."""
        if self._pool is None:
            return
        for s in schedules:
            try:
                v = self.variant(spec, s)
            except (ScheduleError, SpecError):
                continue
            self._pool.submit(v.id, self._message(v, "compile", None))

    def measure(self, spec: BlockSpec, schedule: Schedule, reps: int | None = None) -> Trial:
        """Compile, gate and time one candidate. Never raises for a candidate's failure; raises
        SpecError for a spec the harness cannot gate (an unbound op or gradient chain)."""
        ops.check(spec)
        t0 = time.monotonic()
        try:
            v = self.variant(spec, schedule)
        except (ScheduleError, SpecError) as e:
            return Trial(
                schedule=schedule,
                variant_id="",
                source="",
                status=COMPILE_ERROR,
                error=str(e),
                device=self.device_name,
                seconds=time.monotonic() - t0,
            )
        need = limits.estimated_bytes(spec)
        if need > self.memory_bytes:  # would only be killed halfway: do not start it
            return self._trial(
                v,
                {
                    "status": CRASH,
                    "error": f"needs about {need / 2**20:,.0f} MiB, more than the "
                    f"measurement memory limit of {self.memory_bytes / 2**20:,.0f} MiB",
                },
                t0,
            )
        if self._pool is not None:
            self._pool.submit(v.id, self._message(v, "compile", None), urgent=True)
            compiled = self._pool.result(v.id)
            if compiled["status"] != "compiled":
                return self._trial(v, compiled, t0)
        reply = isolated_request(self._timing, self._message(v, "measure", reps), self.timeout_s)
        return self._trial(v, reply, t0)

    def _trial(self, v: Variant, reply: dict[str, Any], t0: float) -> Trial:
        return Trial.from_reply(
            reply,
            schedule=v.schedule,
            variant_id=v.id,
            source=v.source,
            device=self.device_name,
            seconds=time.monotonic() - t0,
        )

    # ---- lifecycle --------------------------------------------------------------------
    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None
        self._timing.stop()

    def __enter__(self) -> Harness:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
