"""Launch runtime: load generated source once per variant id, bind arguments by name, launch.

CUDA tensors run the compiled kernel; CPU tensors run the same kernel through Triton's
interpreter. Source files live in a content-addressed cache directory, written atomically.
Conv kernels take the batch size as their launch argument `n` (generator.BatchRange): every batch
of a layer shares one source, one loaded kernel and one JIT compile; compiles() counts them.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import math
import os
import re
import sys
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import triton

from . import capture
from .generator import BATCH_ARG, Variant
from .schedule import gemm_tiles
from .spec import SpecError

_lock = threading.Lock()
_loaded: dict[str, Any] = {}  # variant id -> JITFunction, or InterpretedFunction when interpreting
_loads = 0  # kernel sources loaded by this process (distinct variant ids), never reset
_jit = {"jit_compiles": 0, "jit_cache_hits": 0}  # triton.compile calls: compiled, or found in Triton's cache

_TRITON_TYPES = {
    torch.float32: "fp32",
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.int32: "i32",
    torch.int64: "i64",
    torch.uint8: "u8",
}


def cache_dir() -> Path:
    """Where generated kernel sources are kept: $TUNERD_CACHE_DIR/kernels or ~/.cache/tunerd/kernels."""
    root = os.environ.get("TUNERD_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "tunerd"
    )
    return Path(root) / "kernels"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write data so that readers see the old file or the whole new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def source_path(variant: Variant) -> Path:
    return cache_dir() / f"{variant.kernel_name}_{variant.id}.py"


def load(variant: Variant) -> Any:
    """The JITFunction of a variant, compiled from its exact source (cached by id)."""
    with _lock:
        fn = _loaded.get(variant.id)
        if fn is not None:
            return fn
        path = source_path(variant)
        if not path.exists() or path.read_text() != variant.source:
            atomic_write_text(path, variant.source)
        mod_name = f"tunerd_generated_{variant.id}"
        spec = importlib.util.spec_from_file_location(mod_name, path)
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot load the generated kernel module {path}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[mod_name] = module  # triton resolves globals through the module
        spec.loader.exec_module(module)
        fn = getattr(module, variant.kernel_name)
        _loaded[variant.id] = fn
        global _loads
        _loads += 1
        return fn


def compiles() -> dict[str, int]:
    """What this process has built so far: `loaded`, the distinct kernel sources (variant ids) loaded, each a
    JIT function; `binaries`, the compiled GPU binaries Triton's JIT holds for them (one per specialization and
    device; 0 on the interpreter, which compiles nothing); `jit_compiles` and `jit_cache_hits`, the calls of
    triton.compile in this process (any kernel's) that compiled, or found the binary in Triton's cache (an
    installed ahead-of-time binary: kernels.aot). Counters only grow: compare two readings."""
    with _lock:
        fns = list(_loaded.values())
        counts = {"loaded": _loads, **_jit}
    binaries = 0
    for fn in fns:
        for cache in getattr(fn, "device_caches", {}).values():  # Triton: device -> (kernel cache, ...)
            binaries += len(cache[0])
    return {**counts, "binaries": binaries}


def _count_compile(_chained: Any = None, **event: Any) -> None:
    """Triton's compilation listener (called by triton.compile on a compile and on a cache hit): count, then
    pass the event on to the listener installed before this one."""
    with _lock:
        _jit["jit_cache_hits" if event.get("cache_hit") else "jit_compiles"] += 1
    if _chained is not None:
        _chained(**event)


if hasattr(triton.knobs.compilation, "listener"):  # Triton >= 3.4
    triton.knobs.compilation.listener = functools.partial(_count_compile, triton.knobs.compilation.listener)


@functools.lru_cache(maxsize=1)
def _check_interpreter() -> None:
    """Triton < 3.7's interpreter turns 1-element arrays into Python ints, which numpy >= 2.4 refuses:
    every dynamic loop bound would fail deep inside the interpreter. Say so up front."""
    import numpy as np

    version = lambda v: tuple(int(x) for x in re.findall(r"\d+", v)[:2])  # noqa: E731
    if version(triton.__version__) < (3, 7) and version(np.__version__) >= (2, 4):
        raise RuntimeError(
            f"Triton {triton.__version__}'s interpreter does not work with numpy {np.__version__}: "
            "install 'numpy<2.4' or triton >= 3.7 to run kernels on the CPU"
        )


def interpreting() -> bool:
    """True when this process runs Triton kernels through the interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def is_interpreted(device: torch.device) -> bool:
    return device.type == "cpu"


def bind(fn: Any, args: dict[str, Any]) -> list[Any]:
    """Order args by the kernel's own parameter names; refuse missing or unknown names."""
    names = list(fn.arg_names)
    missing = [n for n in names if n not in args]
    extra = [n for n in args if n not in names]
    if missing or extra:
        raise TypeError(f"kernel arguments do not match: missing {missing}, unexpected {extra}")
    return [args[n] for n in names]


def workspace_sizes(variant: Variant) -> tuple[int, int] | None:
    """(fp32 partial elements, int32 counters) of a conv fwd or dgrad variant whose reduction is split
    (schedule.split_k > 1): one block_m x block_n partial tile per program of the grid (whose axis 1 counts the
    splits) and one arrival counter per output tile; or of a stream-K fwd or dgrad (two partial tiles per program,
    a counter per tile of every group and phase); None for every other variant."""
    spec, s = variant.spec, variant.schedule
    if getattr(spec, "kind", None) != "conv" or getattr(spec, "op", None) not in ("fwd", "dgrad"):
        return None
    if getattr(s, "stream_k", 0):  # two slots per program (its first and last tile's partials), a counter per tile
        phases = spec.phases if spec.op == "dgrad" else 1
        return 2 * s.stream_k * s.block_m * s.block_n, gemm_tiles(spec, s) * spec.groups * phases
    if s.split_k == 1:
        return None
    programs = math.prod(variant.grid)
    return programs * s.block_m * s.block_n, programs // s.split_k


class _Workspace:
    """One (device, stream)'s split-K buffers, grown as needed: partials (torch.empty: each split writes its tile
    before the sum reads it) and counters, zeroed once when allocated and left zeroed by every kernel that
    completes. suspect: a launch that used them raised, so they are zeroed before the next use."""

    def __init__(self) -> None:
        self.partials: torch.Tensor | None = None
        self.counters: torch.Tensor | None = None
        self.suspect = False


_WORKSPACES_MAX = 32  # (device, stream) entries kept; an evicted one's memory returns to its stream's pool
_workspaces: OrderedDict[tuple[str, int | None, int], _Workspace] = OrderedDict()
_ws_lock = threading.Lock()
_ws_stats = {"allocations": 0, "zeroed_after_failure": 0, "repaired": 0}


def _stream_key(device: torch.device) -> tuple[str, int | None, int] | None:
    """The cache key of the stream a launch on device runs on; None when the workspace must not be cached: the
    meta device (AOT compiles), or a CUDA graph being captured (its allocations belong to the graph's pool)."""
    if device.type == "cuda":
        index = torch.cuda.current_device() if device.index is None else device.index
        with torch.cuda.device(index):
            if torch.cuda.is_current_stream_capturing():
                return None
            return ("cuda", index, torch.cuda.current_stream().cuda_stream)
    # the interpreter runs a launch in the calling thread: a thread is a CPU stream
    return ("cpu", None, threading.get_ident()) if device.type == "cpu" else None


def _workspace(key: tuple[str, int | None, int], device: torch.device, elements: int, tiles: int) -> _Workspace:
    """key's workspace holding at least elements partials and tiles zeroed counters (call under _ws_lock)."""
    ws = _workspaces.pop(key, None) or _Workspace()
    _workspaces[key] = ws  # most recently used last
    while len(_workspaces) > _WORKSPACES_MAX:
        _workspaces.popitem(last=False)
    if elements and (ws.partials is None or ws.partials.numel() < elements):
        ws.partials = torch.empty(
            max(elements, 2 * (0 if ws.partials is None else ws.partials.numel())), dtype=torch.float32, device=device
        )
        _ws_stats["allocations"] += 1
    if ws.counters is None or ws.counters.numel() < tiles:
        # grown zeroed; a suspect old buffer is dropped whole
        ws.counters = torch.zeros(
            max(tiles, 2 * (0 if ws.counters is None else ws.counters.numel())), dtype=torch.int32, device=device
        )
        ws.suspect = False
        _ws_stats["allocations"] += 1
    if ws.suspect:
        ws.counters.zero_()
        ws.suspect = False
        _ws_stats["zeroed_after_failure"] += 1
    if device.type == "cpu":  # free to verify off the GPU; the CUDA path never reads them (no device sync)
        with capture.allow_host_sync("interpreter workspace check"):
            dirty = bool(ws.counters.any())
        if dirty:
            ws.counters.zero_()
            _ws_stats["repaired"] += 1
    return ws


def split_workspace(variant: Variant, args: dict[str, Any]) -> dict[str, torch.Tensor]:
    """ws_ptr and cnt_ptr of a split conv fwd or dgrad variant (workspace_sizes; none for other variants), on the
    device of its tensors. Cached per (device, stream), so a launch costs no allocation and no memset: launches
    on one stream run in order and each leaves the counters zeroed; launches on another stream get their own.
    A launch that raised marks its stream's counters suspect (launch), and they are zeroed before their next use;
    CPU (interpreter) launches also verify them zero before each use. Under CUDA graph capture, and on the meta
    device, fresh buffers (the zeroing is captured with the graph)."""
    sizes = workspace_sizes(variant)
    if sizes is None:
        return {}
    elements, tiles = sizes
    device = next(t.device for t in args.values() if isinstance(t, torch.Tensor))
    key = _stream_key(device)
    if key is None:
        return {
            "ws_ptr": torch.empty(elements, dtype=torch.float32, device=device),
            "cnt_ptr": torch.zeros(tiles, dtype=torch.int32, device=device),
        }
    with _ws_lock:
        ws = _workspace(key, device, elements, tiles)
        assert ws.partials is not None and ws.counters is not None
        return {"ws_ptr": ws.partials[:elements], "cnt_ptr": ws.counters[:tiles]}


def arrival_counters(device: torch.device, count: int) -> torch.Tensor:
    """count zeroed int32 arrival counters for a kernel's in-kernel split sum (wgrad's), from the same per-(device,
    stream) cache as split_workspace: no allocation and no memset per launch; fresh ones under CUDA graph capture
    and on the meta device."""
    key = _stream_key(device)
    if key is None:
        return torch.zeros(count, dtype=torch.int32, device=device)
    with _ws_lock:
        ws = _workspace(key, device, 0, count)
        assert ws.counters is not None
        return ws.counters[:count]


def _mark_suspect(device: torch.device) -> None:
    """After a launch on device's current stream raised: its cached counters may be left non-zero."""
    key = _stream_key(device)
    with _ws_lock:
        ws = _workspaces.get(key) if key is not None else None
        if ws is not None:
            ws.suspect = True


def verify_workspaces() -> int:
    """Check every cached split-K counter buffer is zero (a device sync per CUDA stream) and zero those that are
    not; returns how many were repaired. For a CUDA application to call after it caught a launch error."""
    repaired = 0
    with _ws_lock:
        for ws in _workspaces.values():
            if ws.counters is not None and bool(ws.counters.any()):
                ws.counters.zero_()
                repaired += 1
        _ws_stats["repaired"] += repaired
    return repaired


def workspace_stats() -> dict[str, int]:
    """Counts since start: buffer allocations, zeroings after a failed launch, repaired non-zero counters."""
    with _ws_lock:
        return {**_ws_stats, "cached": len(_workspaces)}


def clear_workspaces() -> None:
    """Drop every cached split-K workspace."""
    with _ws_lock:
        _workspaces.clear()


def kernel_args(variant: Variant, args: dict[str, Any]) -> dict[str, Any]:
    """args plus the launch's batch size `n` (the variant's spec.n) for a kernel that takes it, checked against
    the batch range its source was rendered for (int32 offsets hold only up to its bound), and a split
    reduction's workspace (split_workspace) unless args bring their own."""
    if "ws_ptr" not in args:
        args = {**args, **split_workspace(variant, args)}
    batch = variant.batch
    if batch is None:
        return args
    n = getattr(variant.spec, "n", None)
    if n not in batch:
        raise SpecError(
            f"batch size {n} is outside the batch range {batch.describe()} of variant {variant.id}: render the "
            "variant for this spec (generator.render) instead of reusing another batch's"
        )
    return {**args, BATCH_ARG: n}


def launch(variant: Variant, args: dict[str, Any], device: torch.device) -> None:
    """Run the variant on device: compiled on CUDA, Triton's interpreter on CPU."""
    args = kernel_args(variant, args)
    if device.type == "cuda":
        if interpreting():
            raise RuntimeError("CUDA tensors given while TRITON_INTERPRET=1: unset it to run compiled kernels")
        fn = load(variant)
        if getattr(variant.schedule, "tma", False):
            _tma_allocator()
        with torch.cuda.device(device), _failure_marks(args, device):  # Triton launches on the current device
            fn[variant.grid](*bind(fn, args), num_warps=variant.num_warps, num_stages=variant.num_stages)
    elif device.type == "cpu":
        if not interpreting():
            raise RuntimeError(
                "CPU tensors run through Triton's interpreter, which must be chosen before triton is "
                "imported: set TRITON_INTERPRET=1 in the environment (tunerd does this itself on "
                "machines without CUDA)"
            )
        _check_interpreter()
        fn = load(variant)
        with _failure_marks(args, device):
            fn[variant.grid](*bind(fn, args))
    else:
        raise RuntimeError(f"unsupported device {device}: tunerd runs on CUDA, or on CPU through the interpreter")


@contextlib.contextmanager
def _failure_marks(args: dict[str, Any], device: torch.device) -> Iterator[None]:
    """Marks the stream's cached arrival counters suspect when the launch in the block raises and used them
    (split_workspace, arrival_counters)."""
    try:
        yield
    except BaseException:
        if "cnt_ptr" in args:
            _mark_suspect(device)
        raise


def _tma_scratch(size: int, alignment: int, stream: int | None) -> torch.Tensor:
    """Global scratch for the TMA descriptors a kernel makes (tl.make_tensor_descriptor), on the current device."""
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _tma_allocator() -> None:
    """Before a TMA variant's launch: install _tma_scratch as Triton's allocator unless one is set (Triton's default
    refuses: descriptors made in a kernel need global scratch). Triton keeps it per thread (a ContextVar)."""
    try:
        from triton.runtime._allocation import NullAllocator, _allocator

        if not isinstance(_allocator.get(), NullAllocator):
            return  # the application's own, or ours from an earlier launch in this thread
    except ImportError:  # another Triton layout: set ours
        pass
    triton.set_allocator(_tma_scratch)


def signature_of(args: dict[str, Any]) -> tuple[dict[str, str], dict[str, Any]]:
    """Triton signature types and constexprs for AOT compilation; tensors may live on the meta device."""
    sig: dict[str, str] = {}
    const: dict[str, Any] = {}
    for name, v in args.items():
        if isinstance(v, torch.Tensor):
            sig[name] = "*" + _TRITON_TYPES[v.dtype]
        elif isinstance(v, bool) or name.isupper():
            sig[name] = "constexpr"
            const[name] = v
        elif isinstance(v, int):  # not specialized on its value: as do_not_specialize (the batch n) compiles it
            sig[name] = "i32"
        elif isinstance(v, float):
            sig[name] = "fp32"
        else:
            raise TypeError(f"cannot type kernel argument {name}={v!r}")
    return sig, const


def aot_compile(variant: Variant, args: dict[str, Any], arch: int = 90) -> Any:
    """Compile a variant for a CUDA target without a GPU (Triton's compiler and ptxas only).

    Proves the source is compile-valid for real hardware, which the interpreter does not check.
    """
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    fn = load(variant)
    if not isinstance(fn, JITFunction):  # interpreting: compile the same Python function
        fn = JITFunction(fn.fn)
    ordered = dict(zip(fn.arg_names, bind(fn, kernel_args(variant, args))))
    sig, const = signature_of(ordered)
    # pointers 16-byte aligned, as the JIT specializes them for torch's allocations: the vector
    # loads, cp.async and wgmma paths a real launch gets depend on it
    attrs = {(i,): [["tt.divisibility", 16]] for i, t in enumerate(sig.values()) if t.startswith("*")}
    src = ASTSource(fn=fn, signature=sig, constexprs=const, attrs=attrs)
    return triton.compile(
        src,
        target=GPUTarget("cuda", arch, 32),
        options={"num_warps": variant.num_warps, "num_stages": variant.num_stages},
    )
