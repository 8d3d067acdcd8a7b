"""Launch runtime: load generated source once per variant id, bind arguments by name, launch.

CUDA tensors run the compiled kernel; CPU tensors run the same kernel through Triton's
interpreter. Source files live in a content-addressed cache directory, written atomically.
Conv kernels take the batch size as their launch argument `n` (generator.BatchRange): every batch
of a layer shares one source, one loaded kernel and one JIT compile; compiles() counts them.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import os
import re
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

import torch
import triton

from .generator import BATCH_ARG, Variant
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


def split_workspace(variant: Variant, args: dict[str, Any]) -> dict[str, torch.Tensor]:
    """ws_ptr and cnt_ptr of a conv fwd or dgrad variant whose reduction is split (schedule.split_k > 1; none
    otherwise), on the device of its tensors: the fp32 partial tiles [programs, block_m * block_n] (one per
    program of the grid, whose axis 1 counts the splits) and one zeroed int32 arrival counter per output tile,
    which the kernel leaves zeroed."""
    spec, s = variant.spec, variant.schedule
    if s.split_k == 1 or getattr(spec, "kind", None) != "conv" or getattr(spec, "op", None) not in ("fwd", "dgrad"):
        return {}
    device = next(t.device for t in args.values() if isinstance(t, torch.Tensor))
    programs = math.prod(variant.grid)
    return {
        "ws_ptr": torch.empty(programs * s.block_m * s.block_n, dtype=torch.float32, device=device),
        "cnt_ptr": torch.zeros(programs // s.split_k, dtype=torch.int32, device=device),
    }


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
        with torch.cuda.device(device):  # Triton launches on the current device: make it the tensors'
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
        fn[variant.grid](*bind(fn, args))
    else:
        raise RuntimeError(f"unsupported device {device}: tunerd runs on CUDA, or on CPU through the interpreter")


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
