"""Compile-validity: build variants for a real CUDA target (Triton compiler + ptxas), no GPU needed.

The interpreter accepts code a GPU compiler rejects, so this is the check that matters for
CPU-only development. Triton's language module is patched in interpreter mode, so compiling
happens in a child process with TRITON_INTERPRET=0:

    python -m kernels.validate --arch 90 < variants.jsonl   # {"spec": {...}, "schedule": {...}} per line
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from typing import Any, Iterable

import torch

from .generator import Variant, render
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
    ep = _conv.EpilogueArgs(bias=t() if e.bias else None, scale=t(torch.float32) if e.affine else None,
                            shift=t(torch.float32) if e.affine else None,
                            residual=t(rank=spec.ndim + 2) if e.residual else None,
                            gamma=t(torch.float32) if e.layer_scale else None,
                            activation=e.activation, residual_mode=e.residual or "post")
    args = {"x_ptr": t(), "w_ptr": t(), "out_ptr": t(), "UPCAST": False}
    if e.save_z:
        args["z_ptr"] = t()
    if e.stats:
        args["stats_ptr"] = t(torch.float32)
    args.update(_conv.epilogue_kernel_args(spec, ep, torch.device("meta")))
    if spec.op != "fwd":
        from . import backward  # noqa: F401  (registers the backward ops' EXAMPLE_ARGS)
    extra = EXAMPLE_ARGS.get(spec.op)
    return extra(spec, args) if extra else args


# Backward ops register how their arguments differ from the forward ones.
EXAMPLE_ARGS: dict[str, Any] = {}


def compile_one(variant: Variant, arch: int = 90) -> dict[str, Any]:
    from . import runtime

    try:
        k = runtime.aot_compile(variant, example_args(variant.spec), arch=arch)
        return {"id": variant.id, "ok": True, "shared": int(k.metadata.shared), "error": None}
    except Exception as e:  # the compiler's own message is the useful part
        return {"id": variant.id, "ok": False, "shared": None, "error": f"{type(e).__name__}: {str(e)[-800:]}"}


def compile_check(variants: Iterable[Variant], arch: int = 90, timeout: float = 900.0) -> list[dict[str, Any]]:
    """Compile each variant for sm_<arch> in a child process; one result dict per variant, in order."""
    variants = list(variants)
    lines = "".join(json.dumps({"spec": v.spec.to_dict(), "schedule": v.schedule.to_dict()}) + "\n" for v in variants)
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION=os.environ.get("TRITON_DEFAULT_FP_FUSION", "1"))
    proc = subprocess.run([sys.executable, "-m", "kernels.validate", "--arch", str(arch)], input=lines,
                          capture_output=True, text=True, env=env, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"compile checker failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    if len(results) != len(variants):
        raise RuntimeError(f"compile checker returned {len(results)} results for {len(variants)} variants")
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
    # run as kernels.validate, not __main__, so registrations into EXAMPLE_ARGS (kernels.backward) are seen
    from kernels.validate import main as _main

    sys.exit(_main())
