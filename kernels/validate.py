"""Compile-validity: build variants for a real CUDA target (Triton compiler + ptxas), no GPU needed.

The interpreter accepts code a GPU compiler rejects, so this is the check that matters for
CPU-only development. Triton's language module is patched in interpreter mode, so compiling
happens in a child process with TRITON_INTERPRET=0:

    python -m tunerd.kernels.validate --arch 90 < variants.jsonl   # {"spec": {...}, "schedule": {...}} per line
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from . import sass
from .generator import Variant, reduction_steps, render
from .schedule import Schedule
from .spec import BlockSpec

_DT = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def example_args(spec: BlockSpec) -> dict[str, Any]:
    """Kernel arguments of the right types on the meta device (shapes do not matter to the compiler)."""
    from . import conv as _conv  # local: conv imports runtime, which imports triton

    dt = _DT[spec.dtype]

    def t(dtype: torch.dtype = dt, rank: int = 1) -> torch.Tensor:
        return torch.empty((1,) * rank, dtype=dtype, device="meta")

    e = spec.epilogue
    ep = _conv.EpilogueArgs(
        bias=t() if e.bias else None,
        scale=t(torch.float32) if e.affine else None,
        shift=t(torch.float32) if e.affine else None,
        residual=t(rank=spec.ndim + 2) if e.residual else None,
        layer_scale=t(torch.float32) if e.layer_scale else None,
        activation=e.activation,
        residual_mode=e.residual or "post",
    )
    args = {"x_ptr": t(), "w_ptr": t(), "UPCAST": False}
    if not e.stats_only:
        args["out_ptr"] = t()
    if e.save_z:
        args["z_ptr"] = t()
    if e.stats:
        args["stats_ptr"] = t(torch.float32)
    args.update(_conv.epilogue_kernel_args(spec, ep, torch.device("meta")))
    if spec.op == "fwd":
        return args
    from . import backward  # local, one way: backward never imports this module

    return backward.example_args(spec, args)


_RESOURCES = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)")
_GLOBAL_ACCESS = re.compile(r"\b(ld|st)\.global(?:\.\w+)*?(?:\.v(\d))?\.(?:b|f|u|s)(\d+)")
_CP_ASYNC = re.compile(  # cp.async.cg.shared.global [dst], [src], bytes
    r"\bcp\.async\.c[ag]\.shared\.global(?:\.\w+)*\s+\[[^\]]*\],\s*\[[^\]]*\],\s*(0x[0-9a-fA-F]+|\d+)"
)
# the tensor-core instruction a tl.dot became, newest first: sm_100 tcgen05, sm_90 wgmma, sm_80 mma.sync
_MMA_KINDS = (("tcgen05.mma", "tcgen05"), ("wgmma.mma_async", "wgmma"), ("mma.sync", "mma.sync"))


def mma_kind(ptx: str) -> str:
    """The MMA kind in the PTX: "tcgen05", "wgmma" or "mma.sync"; "fma" when none (CUDA cores)."""
    return next((kind for needle, kind in _MMA_KINDS if needle in ptx), "fma")


def resources(kernel: Any, steps: int | None = None) -> dict[str, Any]:
    """What the compiled kernel costs and uses, read from its cubin (cuobjdump) and PTX: registers per
    thread, spill bytes (stack + local), the MMA its dots became (see mma_kind), cp.async copies
    (software pipelining) and the widest of them, and the widest plain global load/store in bytes
    (vectorization; 0 when every read is a cp.async copy), and the main loop's SASS mix (kernels.sass.mix;
    steps: the reduction's step count, which measures a loop the compiler unrolled whole)."""
    import triton

    out: dict[str, Any] = {"regs": None, "spill_bytes": None}
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    cubin = kernel.asm.get("cubin")
    if tool.exists() and cubin:
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(cubin)
            f.flush()
            usage = subprocess.run([str(tool), "--dump-resource-usage", f.name], capture_output=True, text=True)
        m = _RESOURCES.search(usage.stdout)
        if m:
            out.update(regs=int(m.group(1)), spill_bytes=int(m.group(2)) + int(m.group(3)))
    out.update(sass.mix(sass.disassemble(cubin, tool), steps) if cubin else {"loop_sass": None})
    ptx = kernel.asm.get("ptx", "")
    widest = {"ld": 0, "st": 0}
    for op, vec, bits in _GLOBAL_ACCESS.findall(ptx):
        widest[op] = max(widest[op], int(vec or 1) * int(bits) // 8)
    copies = [int(b, 0) for b in _CP_ASYNC.findall(ptx)]
    out.update(
        mma=mma_kind(ptx),
        cp_async=len(copies),
        max_copy_bytes=max(copies, default=0),
        max_load_bytes=widest["ld"],
        max_store_bytes=widest["st"],
    )
    return out


def compile_one(variant: Variant, arch: int = 90) -> dict[str, Any]:
    from . import runtime

    try:
        k = runtime.aot_compile(variant, example_args(variant.spec), arch=arch)
        steps = reduction_steps(variant.spec, variant.schedule)
        return {"id": variant.id, "ok": True, "shared": int(k.metadata.shared), "error": None, **resources(k, steps)}
    except Exception as e:  # the compiler's own message is the useful part
        return {"id": variant.id, "ok": False, "shared": None, "error": f"{type(e).__name__}: {str(e)[-800:]}"}


def compile_check(
    variants: Iterable[Variant], arch: int = 90, timeout: float = 900.0, jobs: int | None = None
) -> list[dict[str, Any]]:
    """Compile each variant for sm_<arch> in child processes (up to `jobs`, by default one per core, each
    taking a contiguous share); one result dict per variant, in order."""
    variants = list(variants)
    jobs = max(1, min(jobs or os.cpu_count() or 1, len(variants) // 8 or 1))
    fusion = os.environ.get("TRITON_DEFAULT_FP_FUSION", "1")
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION=fusion)
    shares = [variants[i * len(variants) // jobs : (i + 1) * len(variants) // jobs] for i in range(jobs)]
    with tempfile.TemporaryDirectory() as tmp:
        procs = []
        for i, share in enumerate(shares):
            path = Path(tmp) / f"share{i}.jsonl"
            path.write_text(
                "".join(json.dumps({"spec": v.spec.to_dict(), "schedule": v.schedule.to_dict()}) + "\n" for v in share)
            )
            with path.open() as stdin:
                procs.append(
                    subprocess.Popen(
                        [sys.executable, "-m", "tunerd.kernels.validate", "--arch", str(arch)],
                        stdin=stdin,
                        stdout=subprocess.PIPE,
                        stderr=subprocess.PIPE,
                        text=True,
                        env=env,
                    )
                )
        results: list[dict[str, Any]] = []
        try:
            for p, share in zip(procs, shares):
                out, err = p.communicate(timeout=timeout)
                if p.returncode != 0:
                    raise RuntimeError(f"compile checker failed (exit {p.returncode}):\n{err[-4000:]}")
                got = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
                if len(got) != len(share):
                    raise RuntimeError(f"compile checker returned {len(got)} results for {len(share)} variants")
                results += got
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", type=int, default=90)
    ns = ap.parse_args(argv)
    for line in sys.stdin:
        if not line.strip():
            continue
        d = json.loads(line)
        v = render(BlockSpec.from_dict(d["spec"]), Schedule.from_dict(d["schedule"]))
        print(json.dumps(compile_one(v, ns.arch)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
