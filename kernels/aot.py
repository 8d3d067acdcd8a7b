"""Ahead-of-time binaries: a variant compiled for a CUDA arch without a GPU, installed where Triton's JIT finds it.

An artifact (Binary) is the part of Triton's own cache group a cache hit reads (the kernel's metadata JSON and
its cubin) plus the keys it is valid for: Triton's cache hash (the directory the JIT looks in), the Triton and
ptxas versions, the arch, and the variant's id and source sha256. It is made by tracing the JIT's own launch
path (JITFunction.run, with a warm-up launch whose compile call is captured) for the variant's launch argument
types on the target, so the ASTSource, options and key are the ones a real launch builds; the capture is then
compiled by triton.compile, whose hash must equal the key computed here.

install() writes an artifact into this process's Triton cache only when the variant was rendered here with the
artifact's source sha256 and the cache key this process computes for it (its own Triton, ptxas, target and
cache-invalidating environment) equals the artifact's: otherwise nothing is written and the JIT compiles as
usual. Binaries cannot be checked by re-rendering: callers install only those a pinned key signed (db.bundle).
Triton's key covers its whole installation (its sources and libtriton), so an artifact serves only clients with
the exporter's exact Triton build. build_or_reuse takes a kept artifact (db.binaries) wherever its key is the one
this process computes, and compiles only the rest.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
import threading
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import triton

from . import runtime
from .generator import Variant, render
from .schedule import Schedule
from .spec import BlockSpec

log = logging.getLogger("tunerd.kernels.aot")

KEPT = ("json", "cubin")  # the group files a cache hit reads: metadata, binary
ARCHES = range(70, 200)  # compute capabilities an arch may name (sm_70 .. sm_199): 80, 89, 90, 100, 120
MAX_FILE_BYTES = 32 << 20  # one cubin or metadata file
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,149}")  # a kernel name, as Triton names its cache files
_HEX64 = re.compile(r"[0-9a-f]{64}")
_lock = threading.Lock()


class AotError(ValueError):
    """A malformed or tampered artifact: nothing of it is installed."""


@dataclass(frozen=True)
class Binary:
    """One variant compiled for one arch: Triton's cache files and the keys under which they are valid."""

    variant_id: str
    source_sha256: str
    arch: int
    triton_version: str
    ptxas_version: str | None
    key: str  # Triton's cache hash: the JIT looks for the kernel in <cache dir>/base32(key)
    env: dict[str, str]  # Triton's cache-invalidating environment variables when it was built (part of the key)
    name: str  # the kernel name: files <name>.json, <name>.cubin, group __grp__<name>.json
    signature: dict[str, str] = field(default_factory=dict)  # launch argument types, for diagnostics
    files: dict[str, bytes] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return sum(len(b) for b in self.files.values())

    def to_portable(self) -> dict[str, Any]:
        d: dict[str, Any] = {k: getattr(self, k) for k in _FIELDS}
        d["files"] = {
            n: {"sha256": hashlib.sha256(b).hexdigest(), "data": base64.b64encode(b).decode()}
            for n, b in sorted(self.files.items())
        }
        return d

    @classmethod
    def from_portable(cls, d: Any, *, max_file_bytes: int = MAX_FILE_BYTES) -> Binary:
        """Decode and check one artifact: fields, file names, sizes and every file's sha256 (AotError)."""
        if not isinstance(d, dict) or set(d) != {*_FIELDS, "files"}:
            keys = sorted(d) if isinstance(d, dict) else type(d).__name__
            raise AotError(f"binary entry must have the fields {sorted({*_FIELDS, 'files'})}, got {keys}")
        for k, types in _FIELDS.items():
            if not isinstance(d[k], types) or isinstance(d[k], bool):
                raise AotError(f"binary field {k!r} has the wrong type ({type(d[k]).__name__})")
        name, vid = d["name"], d["variant_id"]
        if not _NAME.fullmatch(name) or not _HEX64.fullmatch(d["key"]) or not _HEX64.fullmatch(d["source_sha256"]):
            raise AotError(f"binary of variant {vid!r}: malformed kernel name, cache key or source sha256")
        for what in ("signature", "env"):
            if not all(isinstance(k, str) and isinstance(v, str) for k, v in d[what].items()):
                raise AotError(f"binary of variant {vid!r}: malformed {what}")
        files = d["files"]
        expected = {f"{name}.{ext}" for ext in KEPT}
        if not isinstance(files, dict) or set(files) != expected:
            got = sorted(files) if isinstance(files, dict) else type(files).__name__
            raise AotError(f"binary of variant {vid!r} must hold exactly the files {sorted(expected)}, got {got}")
        out: dict[str, bytes] = {}
        for fname, f in files.items():
            if not isinstance(f, dict) or set(f) != {"sha256", "data"} or not isinstance(f["data"], str):
                raise AotError(f"binary of variant {vid!r}: file {fname} is malformed")
            if len(f["data"]) > (max_file_bytes + 2) // 3 * 4:
                raise AotError(f"binary of variant {vid!r}: file {fname} is larger than {max_file_bytes} bytes")
            try:
                data = base64.b64decode(f["data"], validate=True)
            except (binascii.Error, ValueError) as e:
                raise AotError(f"binary of variant {vid!r}: file {fname} is not base64 ({e})") from None
            if hashlib.sha256(data).hexdigest() != f["sha256"]:
                raise AotError(
                    f"binary of variant {vid!r}: file {fname} does not match its sha256 in the signed manifest "
                    "(tampered or corrupted); refusing it"
                )
            out[fname] = data
        return cls(**{k: d[k] for k in _FIELDS}, files=out)


_FIELDS: dict[str, Any] = {
    "variant_id": str,
    "source_sha256": str,
    "arch": int,
    "triton_version": str,
    "ptxas_version": (str, type(None)),
    "key": str,
    "env": dict,
    "name": str,
    "signature": dict,
}


def source_sha256(variant: Variant) -> str:
    return hashlib.sha256(variant.source.encode()).hexdigest()


def check_arch(arch: Any) -> int:
    """arch as a CUDA compute capability int (90: sm_90); ValueError for anything else."""
    if not isinstance(arch, int) or isinstance(arch, bool) or arch not in ARCHES:
        raise ValueError(
            f"arch must be a CUDA compute capability written as an int ({ARCHES.start}..{ARCHES.stop - 1}, "
            f"e.g. 80, 89, 90, 100), got {arch!r}"
        )
    return arch


def check(binary: Binary, variant: Variant) -> None:
    """AotError unless binary is of variant (this process's rendering: id and source sha256) and its metadata names
    its own cache key and arch: what can be checked without computing a cache key."""
    if variant.id != binary.variant_id or source_sha256(variant) != binary.source_sha256:
        raise AotError(
            f"binary {binary.key[:16]} claims variant {binary.variant_id} with source sha256 "
            f"{binary.source_sha256[:16]}, which is not this process's rendering of it"
        )
    meta = _metadata(binary)
    if meta.get("hash") != binary.key or (meta.get("target") or {}).get("arch") != binary.arch:
        raise AotError(f"binary of variant {binary.variant_id}: its metadata names another cache key or arch")


def example_args(variant: Variant) -> dict[str, Any]:
    """Launch arguments of the variant's types on the meta device (pointers 16-byte aligned, as the caching
    allocator's are): what its launches specialize on."""
    if isinstance(variant.spec, BlockSpec):
        from .validate import example_args as conv_args

        return conv_args(variant.spec)
    from .fused import meta_args

    return meta_args(variant.spec)


# ---- the JIT's own launch path, traced --------------------------------------------------------------
class _TargetDriver:
    """Triton's active driver while a launch is traced for an explicit target: no GPU is touched."""

    def __init__(self, target: Any) -> None:
        self.target = target

    def get_current_target(self) -> Any:
        return self.target

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0


class _Captured(Exception):
    pass


def _jit_function(variant: Variant) -> Any:
    """A fresh JITFunction of the variant's own source file (as runtime.load loads it), never an interpreter
    function: its caches are throwaway, and its cache key is the one the JIT of a GPU process computes."""
    from triton import knobs

    path = runtime.source_path(variant)
    if not path.exists() or path.read_text() != variant.source:
        runtime.atomic_write_text(path, variant.source)
    spec = importlib.util.spec_from_file_location(f"tunerd_aot_{variant.id}", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load the generated kernel module {path}")
    module = importlib.util.module_from_spec(spec)
    if not knobs.runtime.interpret:
        spec.loader.exec_module(module)
    else:  # decorate as JIT functions, not interpreter ones: triton.jit reads this setting (restored right after)
        with _lock, knobs.runtime.scope():
            knobs.runtime.interpret = False
            spec.loader.exec_module(module)
    return getattr(module, variant.kernel_name)


@contextlib.contextmanager
def _driver(target: Any) -> Iterator[None]:
    """Trace on target (a stand-in driver: for processes that launch nothing meanwhile), or on the real driver."""
    if target is None:
        yield
        return
    from triton.runtime.driver import driver

    with _lock:
        previous = driver._active
        driver.set_active(_TargetDriver(target))
        try:
            yield
        finally:
            driver._active = previous


def launch_inputs(variant: Variant, args: dict[str, Any] | None = None, target: Any = None) -> tuple[Any, Any, dict]:
    """(ASTSource, target, options) that JITFunction.run hands triton.compile when it launches variant with
    arguments of args' types (default example_args) on target (a GPUTarget; None: this process's GPU)."""
    fn = _jit_function(variant)
    ordered = runtime.bind(fn, runtime.kernel_args(variant, example_args(variant) if args is None else args))
    got: dict[str, Any] = {}

    def capture(src: Any, target: Any = None, options: Any = None, _env_vars: Any = None) -> Any:
        got.update(src=src, target=target, options=dict(options or {}))
        raise _Captured

    with _driver(target):
        from triton.runtime.driver import driver

        fn.device_caches[driver.active.get_current_device()]  # builds the binder, which sets fn.compile
        fn.compile = capture
        with contextlib.suppress(_Captured):
            fn.run(*ordered, grid=(1,), warmup=True, num_warps=variant.num_warps, num_stages=variant.num_stages)
    if not got:
        raise RuntimeError(f"Triton's JIT did not compile variant {variant.id} when traced (a launch hook?)")
    return got["src"], got["target"], got["options"]


def _env() -> dict[str, str]:
    from triton._C.libtriton import get_cache_invalidating_env_vars

    return {str(k): str(v) for k, v in get_cache_invalidating_env_vars().items()}


def compile_key(src: Any, target: Any, options: dict) -> str:
    """The cache hash triton.compile computes for (src, target, options) in this process."""
    from triton._C.libtriton import get_cache_invalidating_env_vars
    from triton.compiler.compiler import make_backend
    from triton.runtime.cache import get_cache_key

    backend = make_backend(target)
    parsed = backend.parse_options(dict(options, **src.parse_options()))
    key = get_cache_key(src, backend, parsed, get_cache_invalidating_env_vars())
    hook = getattr(triton.knobs.runtime, "add_stages_inspection_hook", None)
    if hook is not None:
        key += hook()[0]
    return hashlib.sha256(key.encode()).hexdigest()


def cache_key(variant: Variant, args: dict[str, Any] | None = None, target: Any = None) -> str:
    """The Triton cache hash of launching variant (args' types, default example_args) on target (None: here)."""
    return compile_key(*launch_inputs(variant, args, target))


def _ptxas_version(arch: int) -> str | None:
    try:
        from triton.backends.nvidia.compiler import get_ptxas_version

        return str(get_ptxas_version(arch)).strip().splitlines()[-1]
    except Exception:  # no ptxas: the key still covers it (backend.hash())
        return None


def build(variant: Variant, arch: int = 90, args: dict[str, Any] | None = None) -> Binary:
    """Compile variant for sm_<arch> as the JIT would launch it (no GPU needed) and package the result."""
    from triton.backends.compiler import GPUTarget

    if runtime.interpreting():  # Triton's compiler does not run beside its interpreter: build_all uses children
        raise RuntimeError("aot.build needs a process with TRITON_INTERPRET=0; use aot.build_all")
    src, target, options = launch_inputs(variant, args, GPUTarget("cuda", arch, 32))
    key = compile_key(src, target, options)
    kernel = triton.compile(src, target=target, options=options)
    if kernel.hash != key:
        raise RuntimeError(f"Triton compiled variant {variant.id} under key {kernel.hash}, expected {key}")
    files = {n: Path(p).read_bytes() for n, p in kernel.metadata_group.items() if n.rsplit(".", 1)[-1] in KEPT}
    name = src.name[:150]  # as triton.compile names the files
    if set(files) != {f"{name}.{ext}" for ext in KEPT}:
        raise RuntimeError(f"Triton's cache group of variant {variant.id} lacks {KEPT}: {sorted(files)}")
    return Binary(
        variant_id=variant.id,
        source_sha256=source_sha256(variant),
        arch=arch,
        triton_version=triton.__version__,
        ptxas_version=_ptxas_version(arch),
        key=key,
        env=_env(),
        name=name,
        signature={k: str(v) for k, v in src.signature.items()},
        files=files,
    )


# ---- many variants, in child processes that do not interpret -----------------------------------------
def describe(variant: Variant) -> dict[str, Any]:
    """What renders variant again: (spec, schedule) of a conv, (block, step, schedule) of a fused step."""
    if isinstance(variant.spec, BlockSpec):
        return {"spec": variant.spec.to_dict(), "schedule": variant.schedule.to_dict()}
    fs = variant.spec
    return {"block": fs.block.to_dict(), "step": fs.step.to_dict(), "schedule": variant.schedule.to_dict()}


def rendered(d: dict[str, Any]) -> Variant:
    """This process's rendering of a describe() result."""
    schedule = Schedule.from_dict(d["schedule"])
    if "spec" in d:
        return render(BlockSpec.from_dict(d["spec"]), schedule)
    from .block import Block
    from .fused import FusedSpec
    from .fused import render as render_fused
    from .plan import Step

    step = Step(kind=d["step"]["kind"], nodes=tuple(d["step"]["nodes"]))
    return render_fused(FusedSpec(Block.from_dict(d["block"]), step), schedule)


@dataclass(frozen=True)
class Built:
    """What build_or_reuse made: stored binaries it took, binaries it compiled, and the compile errors."""

    reused: list[Binary]
    compiled: list[Binary]
    errors: list[str]

    @property
    def binaries(self) -> list[Binary]:
        return self.reused + self.compiled


def build_all(
    variants: Iterable[Variant], arches: Sequence[int], jobs: int | None = None, timeout: float = 3600.0
) -> tuple[list[Binary], list[str]]:
    """Binaries of every variant for every arch, and one message per (variant, arch) that failed to compile."""
    built = build_or_reuse(variants, arches, jobs=jobs, timeout=timeout)
    return built.binaries, built.errors


def build_or_reuse(
    variants: Iterable[Variant],
    arches: Sequence[int],
    stored: Mapping[tuple[str, int], Collection[Binary]] | None = None,
    *,
    jobs: int | None = None,
    timeout: float = 3600.0,
) -> Built:
    """Binaries of every variant for every arch. A (variant, arch) with a stored binary whose Triton cache key
    equals the one this process computes for it (its Triton, ptxas and cache-invalidating environment, as install
    computes it) takes that binary; the rest are compiled in child processes with TRITON_INTERPRET=0 (an
    interpreting process cannot run Triton's compiler), up to `jobs` of them (default: one per core), each
    re-rendering its variants from (spec, schedule); `timeout` bounds each child."""
    from triton.backends.compiler import GPUTarget

    reused: list[Binary] = []
    todo: list[dict[str, Any]] = []
    for v in dict((v.id, v) for v in variants).values():
        for a in arches:
            candidates = (stored or {}).get((v.id, a), ())
            key = _key_or_none(v, GPUTarget("cuda", a, 32)) if candidates else None
            hit = next((b for b in candidates if b.key == key), None)
            if hit is not None:
                reused.append(hit)
            else:
                todo.append(describe(v) | {"id": v.id, "arch": a})
    compiled, errors = _compile_in_children(todo, jobs, timeout)
    return Built(reused, compiled, errors)


def _key_or_none(variant: Variant, target: Any) -> str | None:
    try:
        return cache_key(variant, target=target)
    except Exception as e:  # no key, no reuse: the child compiling it reports what is wrong
        log.debug("no Triton cache key for variant %s here (%s): compiling it", variant.id, e)
        return None


def _compile_in_children(
    items: list[dict[str, Any]], jobs: int | None, timeout: float
) -> tuple[list[Binary], list[str]]:
    if not items:
        return [], []
    jobs = max(1, min(jobs or os.cpu_count() or 1, len(items)))
    shares = [items[i * len(items) // jobs : (i + 1) * len(items) // jobs] for i in range(jobs)]
    env = dict(os.environ, TRITON_INTERPRET="0")  # else this environment: its cache-invalidating variables count
    binaries: list[Binary] = []
    errors: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        procs = []
        for i, share in enumerate(shares):
            path = Path(tmp) / f"share{i}.jsonl"
            path.write_text("".join(json.dumps(d) + "\n" for d in share))
            with path.open() as stdin:
                cmd = [sys.executable, "-m", "tunerd.kernels.aot"]
                pipe = subprocess.PIPE
                procs.append(subprocess.Popen(cmd, stdin=stdin, stdout=pipe, stderr=pipe, env=env))
        try:
            for p, share in zip(procs, shares):
                out, err = p.communicate(timeout=timeout)
                got = [json.loads(line) for line in out.splitlines() if line.startswith(b"{")]
                if p.returncode != 0 or len(got) != len(share):
                    tail = err.decode(errors="replace")[-4000:]
                    raise RuntimeError(f"ahead-of-time compiler failed (exit {p.returncode}):\n{tail}")
                for d in got:
                    if d.get("error"):
                        errors.append(f"variant {d['id']} for sm_{d['arch']}: {d['error']}")
                    else:
                        binaries.append(Binary.from_portable(d["binary"]))
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
    return binaries, errors


def _build_line(d: dict[str, Any]) -> dict[str, Any]:
    out = {"id": d["id"], "arch": d["arch"]}
    try:
        v = rendered(d)
        if v.id != d["id"]:
            raise RuntimeError(f"renders as variant {v.id} here")
        return out | {"binary": build(v, int(d["arch"])).to_portable()}
    except Exception as e:  # the compiler's own message is the useful part
        return out | {"error": f"{type(e).__name__}: {str(e)[-800:]}"}


def main() -> int:
    """Child of build_or_reuse: one describe() line (with id and arch) in, one JSON result line out."""
    if runtime.interpreting():
        raise SystemExit("tunerd.kernels.aot compiles: run it with TRITON_INTERPRET=0")
    for line in sys.stdin:
        if line.strip():
            print(json.dumps(_build_line(json.loads(line))), flush=True)
    return 0


# ---- install -----------------------------------------------------------------------------------------
def _group_dir(key: str) -> Path | None:
    """Where the JIT looks for key: <Triton cache dir>/base32(key); None under a non-file cache manager."""
    from triton import knobs
    from triton.runtime.cache import FileCacheManager, _base32

    if (knobs.cache.manager_class or FileCacheManager) is not FileCacheManager or not knobs.cache.dir:
        return None
    return Path(knobs.cache.dir) / _base32(key)


def installed(binary: Binary) -> bool:
    """Whether the JIT of this process would find binary's kernel in its cache (a hit, no compile)."""
    d = _group_dir(binary.key)
    if d is None:
        return False
    try:
        paths = json.loads((d / f"__grp__{binary.name}.json").read_text())["child_paths"].values()
    except (OSError, ValueError, KeyError, AttributeError):
        return False
    return all(Path(p).exists() for p in paths)


def install(binary: Binary, variant: Variant, args: dict[str, Any] | None = None, target: Any = None) -> bool:
    """Install binary into this process's Triton cache for variant, this process's rendering; True when the JIT
    will find it. False (logged at debug, nothing written) when the source or the Triton cache key this process
    computes for launching variant on target (None: this GPU) differs from the artifact's."""
    if variant.id != binary.variant_id or source_sha256(variant) != binary.source_sha256:
        log.debug("binary %s is not this process's rendering of variant %s: not installed", binary.key, variant.id)
        return False
    key = cache_key(variant, args, target)
    if key != binary.key:
        log.debug(
            "binary of variant %s (Triton %s, sm_%d, environment %s) has cache key %s, this process (Triton %s, "
            "environment %s) computes %s: not installed, the JIT compiles it",
            variant.id,
            binary.triton_version,
            binary.arch,
            binary.env,
            binary.key[:16],
            triton.__version__,
            _env(),
            key[:16],
        )
        return False
    d = _group_dir(key)
    if d is None:
        log.debug("Triton's cache is not a local directory: binary of variant %s not installed", variant.id)
        return False
    if installed(binary):
        return True
    check(binary, variant)
    # children first, the group last (each write atomic): a reader sees no group or a complete one
    for fname, data in sorted(binary.files.items()):
        runtime.atomic_write_bytes(d / fname, data)
    group = {"child_paths": {fname: str(d / fname) for fname in sorted(binary.files)}}
    runtime.atomic_write_text(d / f"__grp__{binary.name}.json", json.dumps(group))
    return True


def _metadata(binary: Binary) -> dict[str, Any]:
    try:
        meta = json.loads(binary.files[f"{binary.name}.json"])
    except (KeyError, UnicodeDecodeError, ValueError) as e:
        raise AotError(f"binary of variant {binary.variant_id}: its metadata is not JSON ({e})") from None
    if not isinstance(meta, dict):
        raise AotError(f"binary of variant {binary.variant_id}: its metadata is not a JSON object")
    return meta


if __name__ == "__main__":
    from tunerd.kernels.aot import main as _main

    sys.exit(_main())
