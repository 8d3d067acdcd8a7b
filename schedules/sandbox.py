"""Sandbox: the isolated process that compiles, checks and times one variant at a time.

Started by schedules.harness through a multiprocessing spawn context; it talks over a Pipe:
it sends {"ready": ...} once, then answers each request dict with one reply dict. Whatever a
candidate does here (raise, segfault, os._exit, loop forever, corrupt the CUDA context), the
parent sees a reply, a dead pipe or silence, and replaces this process.
"""

from __future__ import annotations

import os
import signal
import time
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

import numpy as np
import torch

from tunerd.kernels import reference, runtime
from tunerd.kernels.generator import Variant
from tunerd.kernels.schedule import Schedule
from tunerd.kernels.spec import BlockSpec

from . import ops
from .trial import COMPILE_ERROR, CRASH, OK, WRONG

L2_FLUSH_BYTES = 256 * 2**20  # larger than any current L2: writing it evicts the kernel's data
_flush_buffer: torch.Tensor | None = None


def serve(conn: Connection, device: str, threads: int, memory_bytes: int | None = None) -> None:
    """Process entry point: answer requests until the parent sends None or goes away."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle (harness.Sandbox.start)
    torch.set_num_threads(max(1, threads))
    dev = torch.device(device)
    if dev.type == "cpu" and not runtime.interpreting():
        conn.send({"ready": False, "error": "TRITON_INTERPRET is not set in the worker: CPU runs need it"})
        return
    if dev.type == "cuda" and dev.index is not None:
        torch.cuda.set_device(dev)
    if dev.type == "cpu" and memory_bytes:
        cap_address_space(memory_bytes)
    conn.send({"ready": True, "pid": os.getpid()})
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        reply = handle(msg, dev)
        conn.send(reply)
        if reply.get("fatal"):  # the CUDA context is unusable: this process cannot measure again
            os._exit(70)


def cap_address_space(memory_bytes: int) -> None:
    """Let this process map at most memory_bytes beyond what it has mapped now (RLIMIT_AS): a larger
    allocation fails here, as a MemoryError or a torch allocation error, instead of exhausting the machine.
    CPU only: a CUDA process reserves far more address space than it uses (see schedules.harness)."""
    try:
        import resource

        with open("/proc/self/statm", "rb") as f:
            mapped = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        cap = mapped + memory_bytes
        if hard != resource.RLIM_INFINITY:
            cap = min(cap, hard)
        resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    except (ImportError, OSError, ValueError):  # not Linux: the parent's resident-memory sampling still applies
        pass


def handle(msg: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Answer one request: {"kind": "compile" | "measure", spec, schedule, source, ...}."""
    if msg["kind"] == "block":  # a whole block plan: schedules.blocks renders, gates and times it here
        from .blocks import handle as handle_block

        return handle_block(msg, device)
    t0 = time.perf_counter()
    spec = BlockSpec.from_dict(msg["spec"])
    variant = Variant(
        spec=spec,
        schedule=Schedule.from_dict(msg["schedule"]),
        source=msg["source"],
        kernel_name=msg["kernel_name"],
        grid=tuple(msg["grid"]),
    )
    try:
        fn = runtime.load(variant)
        if msg["kind"] == "compile" and device.type == "cuda":
            _precompile(fn, variant, device)
    except Exception as e:  # syntax errors, a missing kernel, Triton compile errors
        return {"status": COMPILE_ERROR, "error": describe(e), "seconds": time.perf_counter() - t0}
    if msg["kind"] == "compile":
        return {"status": "compiled", "seconds": time.perf_counter() - t0}
    reply = measure(variant, msg, device)
    reply["seconds"] = time.perf_counter() - t0
    return reply


def _precompile(fn: Any, variant: Variant, device: torch.device) -> None:
    """Compile for the GPU without running: Triton's JIT warmup writes its on-disk cache."""
    from tunerd.kernels import validate

    args = {
        k: (torch.empty(1, dtype=v.dtype, device=device) if isinstance(v, torch.Tensor) else v)
        for k, v in validate.example_args(variant.spec).items()
    }
    fn.warmup(
        *runtime.bind(fn, runtime.kernel_args(variant, args)),
        grid=variant.grid,
        num_warps=variant.num_warps,
        num_stages=variant.num_stages,
    )


def measure(variant: Variant, msg: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Correctness gate on fresh inputs and a poisoned buffer, then timing."""
    spec = variant.spec
    tol = reference.tolerance(spec.dtype)
    try:
        b = ops.binding(spec.op)
        gen = torch.Generator(device=device)
        gen.manual_seed(int(msg["seed"]))
        inp = b.make_inputs(spec, device, gen)
        out = b.output(variant, inp)
        args = b.kernel_args(variant, inp, out)
        ref = b.reference(spec, inp)
    except Exception as e:  # not the candidate's doing (memory, a binding bug): report, keep serving
        return {"status": CRASH, "error": f"setting up inputs failed: {describe(e)}"}

    def launch() -> None:
        runtime.launch(variant, args, device)

    try:
        launch()
        _sync(device)
        got = b.result(variant, inp, out)
        rel, mx = reference.rel_error(got, ref), max_abs_error(got, ref)
        if not rel < tol:
            return {
                "status": WRONG,
                "rel_error": rel,
                "max_error": mx,
                "error": f"relative error {rel:.3g} exceeds the {spec.dtype} tolerance {tol:g}",
            }
        times = time_launches(launch, device, int(msg["reps"]), int(msg["warmup"]), bool(msg["flush_l2"]))
        # the buffer now holds the last repetition: it must still be right (races, stale state)
        got = b.result(variant, inp, out)
        rel2 = reference.rel_error(got, ref)
        if not rel2 < tol:
            return {
                "status": WRONG,
                "rel_error": rel2,
                "max_error": max_abs_error(got, ref),
                "error": f"output changed across repetitions: relative error {rel2:.3g} after timing",
            }
    except Exception as e:
        return failure(e, device)
    p10, p50, p90 = (float(v) for v in np.percentile(np.asarray(times), [10, 50, 90]))
    return {
        "status": OK,
        "median_ms": p50,
        "p10_ms": p10,
        "p90_ms": p90,
        "reps": len(times),
        "rel_error": max(rel, rel2),
        "max_error": mx,
    }


def time_launches(
    launch: Callable[[], None], device: torch.device, reps: int, warmup: int, flush_l2: bool
) -> list[float]:
    """Milliseconds per launch: CUDA events around each launch after an L2 flush on GPU.

    On the CPU interpreter: the worker process's CPU time per launch, which other processes
    competing for the cores (a shared box) do not inflate the way they inflate wall time.
    """
    for _ in range(warmup):
        launch()
    if device.type != "cuda":
        times = []
        for _ in range(reps):
            t0 = time.process_time()
            launch()
            times.append((time.process_time() - t0) * 1e3)
        return times
    global _flush_buffer
    if flush_l2 and _flush_buffer is None:
        _flush_buffer = torch.empty(L2_FLUSH_BYTES // 4, dtype=torch.int32, device=device)
    flush = _flush_buffer
    torch.cuda.synchronize(device)
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for i in range(reps):
        if flush is not None and flush_l2:
            flush.zero_()
        starts[i].record()
        launch()
        ends[i].record()
    torch.cuda.synchronize(device)
    return [s.elapsed_time(e) for s, e in zip(starts, ends)]


def max_abs_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    diff = (out.detach().to(torch.float64).cpu() - ref.detach().to(torch.float64).cpu()).abs()
    return float(diff.max()) if torch.isfinite(diff).all() else float("inf")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def failure(e: Exception, device: torch.device) -> dict[str, Any]:
    """A launch that raised: compile-time failures vs run-time crashes; flag a dead CUDA context."""
    status = COMPILE_ERROR if isinstance(e, compile_errors()) else CRASH
    reply: dict[str, Any] = {"status": status, "error": describe(e)}
    if device.type == "cuda":
        try:
            torch.cuda.synchronize(device)
        except Exception as sticky:  # illegal address etc. poison the context for good
            reply.update(status=CRASH, fatal=True, error=f"{describe(e)}; CUDA context lost: {describe(sticky)}")
    return reply


def compile_errors() -> tuple[type, ...]:
    """Triton's compile-time exception types present in this Triton version (3.6 .. 3.9)."""
    from triton.compiler import errors as compiler_errors
    from triton.runtime import errors as runtime_errors

    names = (("CompilationError", compiler_errors), ("OutOfResources", runtime_errors), ("PTXASError", runtime_errors))
    return tuple(getattr(mod, name) for name, mod in names if hasattr(mod, name))


def describe(e: BaseException) -> str:
    """Exception type and message, plus the innermost frame for context (bounded length)."""
    tb = traceback.extract_tb(e.__traceback__)
    where = f" (at {tb[-1].filename}:{tb[-1].lineno})" if tb else ""
    return f"{type(e).__name__}: {str(e)[-1500:]}{where}"
