"""python -m benchmarks.compiles: kernel compiles of training runs, with the batch size a launch argument.

Before generator 0.4.0 every conv kernel baked its batch size in (and its header named the whole spec), so each
batch size of a layer was its own source and its own JIT compile: the ragged last batch of an epoch, or an
evaluation batch size, compiled every layer again. Now the batch is the kernel argument `n`: one source per
layer, pass and schedule serves every batch of its range (kernels.generator.BatchRange).

The count (no kernel runs, any size): the conv layers of ResNet-50 at each training resolution, over an
epoch's batch sizes [batch] * k + [ragged], forward, dgrad and wgrad, rendered as the runtime renders them.
`without` is what 0.3.0 compiled: one kernel per distinct (spec with n, schedule). `with, default per batch` is
the distinct sources of the default heuristic, which sizes tiles per batch; `with (runtime)` is what the
runtime launches: a smaller batch of a layer without an answer of its own runs the schedule the layer's
largest batch ran (a tuned winner or its default; kernels.conv.choose_variant), so the ragged batch compiles
nothing.

--run checks the count against the runtime: a small ResNet-style net's convs run forward and backward through
the default path on Triton's interpreter over the same batch pattern, counting kernels loaded
(kernels.runtime.compiles).

--aot counts the JIT compiles of the first training step of patched ResNet-50 and ConvNeXt-T (bfloat16) with
and without ahead-of-time binaries (kernels.aot; `tunerd export --arch 90`). The step runs on the CPU with every
kernel launch recorded instead of run (which kernels launch, with which argument types, is all a count needs;
UPCAST is set as on a GPU). `without`: the distinct Triton cache keys those launches specialize on for sm_90,
each a JIT compile on a fresh cache. `with`: the binaries of the step's kernels are built as export builds them
(child processes, Triton's compiler and ptxas, no GPU), installed into a fresh Triton cache as a client installs
them (its own re-rendering and key check), then triton.compile is called for each launch's own ASTSource: a hit
is counted by kernels.runtime.compiles() (jit_cache_hits), a launch whose key has no binary is a compile.

    python -m benchmarks.compiles --batch 256 --images 1281167 --resolutions 128,160,192,224,256
    python -m benchmarks.compiles --run
    python -m benchmarks.compiles --aot --batch 32 --resolutions 224
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import tunerd  # noqa: F401  (first: tunerd selects Triton's interpreter on CPU-only machines before triton loads)
from benchmarks import networks
from tunerd.kernels import aot, generator, runtime
from tunerd.kernels.backward import Needs, conv_backward
from tunerd.kernels.conv import EpilogueArgs, forget_layer_schedules, make_spec, run_forward
from tunerd.kernels.schedule import Schedule, default
from tunerd.kernels.spec import BlockSpec
from tunerd.schedules.suites import model_specs

OPS = ("fwd", "dgrad", "wgrad")


def layer_specs(model: str, resolution: int, width: float = 1.0, blocks: int | None = None) -> list[BlockSpec]:
    """The unique forward conv specs (batch 1, bfloat16) of a networks model at resolution x resolution."""
    net = networks.build(model, width=width, device="meta", blocks_per_stage=blocks).eval()
    x = torch.empty(1, 3, resolution, resolution, device="meta")
    return [s.with_(dtype="bfloat16") for s in model_specs(net, x)]


def count(layers: dict[int, list[BlockSpec]], batches: list[int]) -> dict[str, int]:
    """Compiles of running every layer (per resolution) at each batch size: see the module doc."""
    full = max(batches)
    without: set[tuple[BlockSpec, Schedule]] = set()
    with_default: set[str] = set()
    with_pinned: set[str] = set()
    for specs in layers.values():
        for spec in specs:
            for op in OPS:
                pinned = default(spec.with_(n=full, op=op))
                for n in dict.fromkeys(batches):
                    s = spec.with_(n=n, op=op)
                    v = generator.render(s)
                    without.add((s, v.schedule))
                    with_default.add(v.id)
                    with_pinned.add(generator.render(s, pinned).id)
    return {
        "without (0.3.0)": len(without),
        "with, default per batch": len(with_default),
        "with (runtime)": len(with_pinned),
    }


def run(layers: dict[int, list[BlockSpec]], batches: list[int]) -> dict[str, Any]:
    """Run every layer's forward, dgrad and wgrad at each batch through the default path (fp32, interpreter)."""
    forget_layer_schedules()
    before = runtime.compiles()["loaded"]
    t0 = time.perf_counter()
    for specs in layers.values():
        for spec in specs:
            for n in batches:
                x = torch.randn(n, spec.c, *spec.in_size)
                w = torch.randn(spec.k, spec.cg, *spec.kernel) / (spec.cg * spec.taps) ** 0.5
                ep = EpilogueArgs()
                s = make_spec(x, w, spec.ndim, spec.stride, spec.padding, spec.dilation, spec.groups, ep)
                y = run_forward(s, x, w, ep).y
                conv_backward(torch.randn_like(y), x, w, s, ep, None, Needs())
    return {"loaded": runtime.compiles()["loaded"] - before, "seconds": round(time.perf_counter() - t0, 1)}


def first_step(model: str, batch: int, resolution: int) -> list[tuple[generator.Variant, dict[str, Any]]]:
    """(variant, launch arguments) of every kernel launch of the first training step (forward, backward) of the
    patched bfloat16 model, recorded instead of run; UPCAST as on a GPU (False)."""
    from tunerd.patching import patch

    launches: list[tuple[generator.Variant, dict[str, Any]]] = []

    def record(variant: generator.Variant, args: dict[str, Any], device: torch.device) -> None:
        launches.append((variant, {**args, **({"UPCAST": False} if "UPCAST" in args else {})}))

    net = networks.build(model, dtype=torch.bfloat16).train()
    patch(net)
    launch, runtime.launch = runtime.launch, record
    try:
        net(torch.randn(batch, 3, resolution, resolution, dtype=torch.bfloat16)).float().sum().backward()
    finally:
        runtime.launch = launch
    return launches


def aot_count(model: str, batch: int, resolution: int, arch: int, jobs: int | None = None) -> dict[str, Any]:
    """JIT compiles of the first step without and with the step's binaries installed (see the module doc)."""
    from triton import compile as triton_compile
    from triton.backends.compiler import GPUTarget

    target = GPUTarget("cuda", arch, 32)
    launches = first_step(model, batch, resolution)
    inputs = {}  # Triton cache key -> (variant, the JIT's compile inputs for that launch)
    for v, args in launches:
        src, tgt, options = aot.launch_inputs(v, args, target)
        inputs.setdefault(aot.compile_key(src, tgt, options), (v, (src, tgt, options)))
    variants = {v.id: v for v, _ in inputs.values()}
    t0 = time.perf_counter()
    binaries, errors = aot.build_all(variants.values(), [arch], jobs=jobs)
    build_s = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        previous = os.environ.get("TRITON_CACHE_DIR")
        os.environ["TRITON_CACHE_DIR"] = str(Path(tmp) / "client-triton-cache")  # the client's, fresh
        try:
            installed = sum(aot.install(b, variants[b.variant_id], target=target) for b in binaries)
            before = runtime.compiles()
            compiles = 0
            present = {b.key for b in binaries if aot.installed(b)}
            for key, (_, (src, tgt, options)) in inputs.items():
                if key in present:
                    triton_compile(src, target=tgt, options=options)  # a cache hit: counted by the listener
                else:
                    compiles += 1  # no binary for this launch's key: the JIT would compile it
            after = runtime.compiles()
        finally:
            if previous is None:
                os.environ.pop("TRITON_CACHE_DIR", None)
            else:
                os.environ["TRITON_CACHE_DIR"] = previous
    return {
        "launches": len(launches),
        "kernels (variants)": len(variants),
        "jit compiles without binaries": len(inputs),
        "jit compiles with binaries": compiles + after["jit_compiles"] - before["jit_compiles"],
        "jit cache hits with binaries": after["jit_cache_hits"] - before["jit_cache_hits"],
        "binaries": len(binaries),
        "installed": installed,
        "binary bytes": sum(b.size for b in binaries),
        "build seconds (this box, the JIT time avoided)": round(build_s, 1),
        "build errors": errors,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet50", choices=sorted(networks.MODELS))
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--images", type=int, default=1281167, help="images per epoch (ImageNet-1k train by default)")
    p.add_argument("--resolutions", default="128,160,192,224,256")
    p.add_argument("--run", action="store_true", help="also run a small net on the interpreter (see the doc)")
    p.add_argument("--aot", action="store_true", help="first-step JIT compiles with and without binaries (see the doc)")
    p.add_argument("--arch", type=int, default=90, help="with --aot: the CUDA arch the binaries are built for")
    a = p.parse_args(argv)
    if a.aot:
        res = int(a.resolutions.split(",")[-1])
        out_aot = {"batch": a.batch, "resolution": res, "arch": a.arch, "dtype": "bfloat16"}
        for model in ("resnet50", "convnext_t"):
            out_aot[model] = aot_count(model, a.batch, res, a.arch)
            print(json.dumps({model: out_aot[model]}), file=sys.stderr, flush=True)  # progress
        print(json.dumps(out_aot, indent=1))
        return 0
    resolutions = [int(r) for r in a.resolutions.split(",")]
    steps, ragged = divmod(a.images, a.batch)
    batches = [a.batch] * steps + ([ragged] if ragged else [])
    out: dict[str, Any] = {"model": a.model, "batches": f"[{a.batch}] * {steps} + [{ragged}]"}
    for name, res in (("one resolution", resolutions[-2:-1] or resolutions), ("all resolutions", resolutions)):
        layers = {r: layer_specs(a.model, r) for r in res}
        out[f"{name} {res}"] = {"layers": sum(map(len, layers.values())), **count(layers, batches)}
    if a.run:
        small = {
            r: [s.with_(dtype="float32") for s in layer_specs("resnet50", r, 1 / 16, 1)] for r in (32, 40, 48, 56, 64)
        }
        pattern = [4, 4, 3]
        out["run: resnet50 width 1/16, 1 block per stage, [4, 4, 3], 32..64 px"] = {
            "predicted": count(small, pattern),
            "measured": run(small, pattern),
        }
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
