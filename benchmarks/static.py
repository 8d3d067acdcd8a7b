"""python -m benchmarks.static: what each suite kernel costs on a real GPU target, from the compiler alone.

No GPU needed. Every unique layer of the chosen suites, in each pass and dtype, is rendered with its
default schedule (and, with --top K, the cost model's K best candidates) and compiled for sm_<arch> by
Triton and ptxas (kernels.validate). From the cubin and PTX it records registers per thread, spill
bytes, shared memory, which MMA the dot became (wgmma, mma.sync or none), cp.async pipelining and the
widest global load/store, next to what the cost model (schedules.cost) predicted for the same
variant. The result is a compile-time audit, not a timing: it finds spilling defaults, scalar loads
and dots that miss the tensor cores before any device time is spent, and measures how well the
model's register and shared-memory estimates hold.

    python -m benchmarks.static --suites resnet50,convnext_t --passes fwd --top 4

Writes static.json (every row) and static.md (summary and flagged rows) to --out, by default
benchmarks/results/<date>-static-sm<arch>-triton<version>/.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import statistics
import time
from pathlib import Path
from typing import Any

import triton

import tunerd  # noqa: F401  (first: tunerd selects Triton's interpreter on CPU-only machines before triton loads)
from tunerd.kernels import fused, generator, plan
from tunerd.kernels.runtime import atomic_write_text
from tunerd.kernels.schedule import Schedule, uses_dot, vector_rows
from tunerd.kernels.spec import BlockSpec
from tunerd.kernels.validate import compile_check
from tunerd.schedules import cost, space, suites
from tunerd.schedules.block_suites import BLOCK_SUITES, block_suite
from tunerd.schedules.device import DeviceLimits

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
SASS_KEYS = (
    "sass",
    "tma",
    "loop_sass",
    "loop_unrolled",
    "loop_mma",
    "loop_fma",
    "loop_mma_share",
    "loop_fma_share",
    "loop_idiv",
)


def variants(
    names: list[str], passes: list[str], dtypes: list[str], top: int, limits: DeviceLimits
) -> list[tuple[str, int, str, generator.Variant]]:
    """(suite, layer, which schedule, variant) for every unique layer, pass and dtype; defaults first."""
    out: list[tuple[str, int, str, generator.Variant]] = []
    for name in names:
        for dtype in dtypes:
            for li, fwd in enumerate(suites.suite(name, dtype=dtype)):
                for op in passes:
                    spec = fwd.with_(op=op)
                    default = generator.render(spec)
                    out.append((name, li, "default", default))
                    if top:
                        ranked = sorted(space.space(spec, limits), key=lambda s: cost.predict(spec, s, limits))
                        picks = [s for s in ranked if s != default.schedule][:top]
                        out += [(name, li, f"model#{i + 1}", generator.render(spec, s)) for i, s in enumerate(picks)]
    return out


def mma_kind(spec: BlockSpec, r: dict[str, Any]) -> str:
    return r["mma"] if uses_dot(spec) else "direct"


def flags(spec: BlockSpec, r: dict[str, Any]) -> list[str]:
    """What in a compiled variant costs speed on the device."""
    out = []
    if r["spill_bytes"]:
        out.append(f"spills {r['spill_bytes']} B")
    if uses_dot(spec) and r["mma"] == "fma":
        out.append("dot on CUDA cores")
    # direct (depthwise) kernels: 8-byte vectors, 4 channels per thread and output column, coalesce fully
    if r["max_load_bytes"] < (16 if uses_dot(spec) else 8) and not r["cp_async"] and vector_rows(spec):
        out.append("scalar loads on aligned rows")
    return out


def row(
    suite: str, layer: int, which: str, v: generator.Variant, r: dict[str, Any], limits: DeviceLimits
) -> dict[str, Any]:
    spec, s = v.spec, v.schedule
    d: dict[str, Any] = {
        "suite": suite,
        "layer": layer,
        "which": which,
        "spec": spec.describe(),
        "spec_key": spec.key,
        "schedule": s.to_dict(),
        "variant": v.id,
        "ok": r["ok"],
        "error": r["error"],
    }
    if not r["ok"]:
        return d
    est = {
        "regs": cost.registers_per_thread(spec, s),
        "shared": cost.smem_bytes(spec, s),
        "occupancy": cost.occupancy(spec, s, limits),
    }
    d.update(
        {k: r[k] for k in ("regs", "spill_bytes", "shared", "cp_async", "max_load_bytes", "max_store_bytes")}
        | {k: r.get(k) for k in SASS_KEYS},
        mma=mma_kind(spec, r),
        vector_rows=vector_rows(spec),
        occupancy=cost.blocks_per_sm(r["regs"], r["shared"], s.num_warps, limits) if r["regs"] else None,
        estimate=est,
        flags=flags(spec, r),
    )
    return d


def _median(values: list[Any]) -> float | None:
    got = [v for v in values if v is not None]
    return statistics.median(got) if got else None


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per suite and pass: counts of each finding; overall: how the cost model's estimates held."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        op = r["spec"].split()[1]
        groups.setdefault(f"{r['suite']} {op}", []).append(r)
        groups.setdefault(f"all {op}", []).append(r)
    table = {}
    for key, rs in groups.items():
        ok = [r for r in rs if r["ok"]]
        mmas = [r["mma"] for r in ok]
        table[key] = {
            "variants": len(rs),
            "compile_errors": len(rs) - len(ok),
            "spilling": sum(bool(r["spill_bytes"]) for r in ok),
            "wgmma": mmas.count("wgmma"),
            "mma_sync": mmas.count("mma.sync"),
            "fma": mmas.count("fma"),
            "direct": mmas.count("direct"),
            "cp_async": sum(bool(r["cp_async"]) for r in ok),
            "scalar_loads": sum(r["max_load_bytes"] < 16 and not r["cp_async"] for r in ok),
            "median_regs": statistics.median([r["regs"] for r in ok]) if ok else None,
            "median_loop_sass": _median([r.get("loop_sass") for r in ok]),
            "median_loop_fma_share": _median([r.get("loop_fma_share") for r in ok]),
            "loop_idiv": sum(bool(r.get("loop_idiv")) for r in ok),
            "tma": sum(bool(r.get("tma")) for r in ok),
            "flagged": sum(bool(r["flags"]) for r in ok),
        }
    measured = [r for r in rows if r["ok"] and r["regs"]]
    ratios = [r["estimate"]["regs"] / r["regs"] for r in measured]
    model = {
        "variants": len(measured),
        "regs_estimate_over_actual": {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}
        if ratios
        else None,
        "shared_upper_bound_holds": sum(r["estimate"]["shared"] >= r["shared"] for r in measured),
        "occupancy_exact": sum(r["estimate"]["occupancy"] == r["occupancy"] for r in measured),
        "occupancy_over": sum(r["estimate"]["occupancy"] > r["occupancy"] for r in measured),
    }
    return {"groups": table, "model": model}


def markdown(doc: dict[str, Any]) -> str:
    s = doc["summary"]
    lines = [
        f"# Static sm_{doc['arch']} audit (compile only, no GPU timings)",
        "",
        f"Triton {doc['triton']}, {len(doc['rows'])} variants, {doc['elapsed_s']:.0f} s. "
        "Registers, spills and shared memory come from the cubin (cuobjdump), the rest from the PTX.",
        "",
        "Main loop: the innermost loop with the most MMA/FMA instructions in the SASS (kernels.sass); "
        "loop SASS is its instruction count per iteration, FMA share the FFMA/HFMA2 part of it, "
        "idiv the variants with a runtime integer division in it, TMA the variants with TMA loads.",
        "",
        "| suite pass | variants | errors | spilling | wgmma | mma.sync | fma dot | direct | cp.async | "
        "scalar loads | median regs | median loop SASS | median loop FMA share | idiv | TMA | flagged |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key, g in sorted(s["groups"].items(), key=lambda kv: (kv[0].startswith("all"), kv[0])):
        lines.append(
            f"| {key} | {g['variants']} | {g['compile_errors']} | {g['spilling']} | {g['wgmma']} | "
            f"{g['mma_sync']} | {g['fma']} | {g['direct']} | {g['cp_async']} | {g['scalar_loads']} | "
            f"{g['median_regs']} | {g.get('median_loop_sass')} | {g.get('median_loop_fma_share')} | "
            f"{g.get('loop_idiv')} | {g.get('tma')} | {g['flagged']} |"
        )
    m = s["model"]
    lines += ["", "## Cost model vs compiler", ""]
    if m["regs_estimate_over_actual"]:
        q = m["regs_estimate_over_actual"]
        lines.append(
            f"- registers: estimate / actual median {q['median']:.2f} (min {q['min']:.2f}, "
            f"max {q['max']:.2f}) over {m['variants']} variants"
        )
    lines += [
        f"- shared memory: the estimate is an upper bound for {m['shared_upper_bound_holds']} of {m['variants']}",
        f"- occupancy (blocks per SM): estimate exact for {m['occupancy_exact']}, too high for {m['occupancy_over']}",
        "",
    ]
    if doc.get("blocks"):
        lines += [
            "## Fused block steps (planner's plan, default schedule)",
            "",
            "| suite#block | dtype | step | regs | spills | shared | mma | loop SASS | loop FMA share |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in doc["blocks"]:
            if not r["ok"]:
                lines.append(f"| {r['where']} | {r['dtype']} | {r['step']} | compile error: {r['error'][:100]} |")
                continue
            lines.append(
                f"| {r['where']} | {r['dtype']} | {r['step']} | {r['regs']} | {r['spill_bytes']} | {r['shared']} | "
                f"{r['mma']} | {r.get('loop_sass')} | {r.get('loop_fma_share')} |"
            )
        lines.append("")
    flagged = [r for r in doc["rows"] if not r["ok"] or r["flags"]]
    lines += ["## Flagged variants", ""]
    if not flagged:
        lines.append("None.")
    else:
        lines += ["| suite#layer | spec | schedule | regs | shared | mma | findings |", "|---|---|---|---|---|---|---|"]
        for r in flagged:
            sched = Schedule.from_dict(r["schedule"]).describe()
            what = r["error"][:120] if not r["ok"] else "; ".join(r["flags"])
            lines.append(
                f"| {r['suite']}#{r['layer']} {r['which']} | {r['spec']} | {sched} | {r.get('regs')} | "
                f"{r.get('shared')} | {r.get('mma')} | {what} |"
            )
    return "\n".join(lines) + "\n"


def block_rows(names: list[str], dtypes: list[str], arch: int) -> list[dict[str, Any]]:
    """Every fused step of the planner's plan for each distinct block of the block suites, compiled with its
    default schedule (kernels.fused.compile_check); conv steps are single-conv variants audited above."""
    todo: list[tuple[str, Any, Any, int]] = []
    seen: set[tuple[str, int]] = set()
    for name in names:
        for dt in dtypes:
            for e in block_suite(name, batch=32, dtype=dt):
                p = plan.best(e.block)
                for i, step in enumerate(p.steps):
                    if step.kind in plan.FUSED and (e.block.key, i) not in seen:
                        seen.add((e.block.key, i))
                        todo.append((f"{name}#{e.name}", e.block, p, i))
    if not todo:
        return []
    print(f"compiling {len(todo)} fused block steps for sm_{arch} ...", flush=True)
    results = fused.compile_check([(b, p, i, None) for _, b, p, i in todo], arch=arch)
    out = []
    for (where, b, p, i), r in zip(todo, results):
        step = p.steps[i]
        d = {
            "where": where,
            "block": b.describe(),
            "dtype": b.dtype,
            "step": f"{step.kind}[{'+'.join(step.nodes)}]",
            **r,
        }
        d["flags"] = [f"spills {r['spill_bytes']} B"] if r.get("spill_bytes") else []
        out.append(d)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m benchmarks.static", description=__doc__.split("\n\n")[0])
    p.add_argument("--suites", help=f"comma list of {', '.join(suites.SUITES)} (default: all but quick)")
    p.add_argument("--passes", default="fwd,dgrad,wgrad")
    p.add_argument("--dtypes", default="bf16", help="comma list of bf16,fp16,fp32")
    p.add_argument("--arch", type=int, default=90)
    p.add_argument("--top", type=int, default=0, help="also the cost model's K best candidates per spec")
    p.add_argument(
        "--blocks",
        default=",".join(BLOCK_SUITES),
        help=f"block suites whose fused steps (planner's plan, default schedule) are audited too: comma list of "
        f"{', '.join(BLOCK_SUITES)}; '' for none",
    )
    p.add_argument("--out", help="output directory")
    a = p.parse_args(argv)
    block_names = [n for n in a.blocks.split(",") if n]
    if unknown := [n for n in block_names if n not in BLOCK_SUITES]:
        p.error(f"unknown block suites {unknown}; available: {list(BLOCK_SUITES)}")
    names = [n for n in (a.suites or "").split(",") if n] or [n for n in suites.SUITES if n != "quick"]
    if unknown := [n for n in names if n not in suites.SUITES]:
        p.error(f"unknown suites {unknown}; available: {list(suites.SUITES)}")
    passes = [x for x in a.passes.split(",") if x]
    if bad := [x for x in passes if x not in ("fwd", "dgrad", "wgrad")]:
        p.error(f"unknown passes {bad}")
    if bad := [x for x in a.dtypes.split(",") if x not in DTYPES]:
        p.error(f"unknown dtypes {bad}; choose from {list(DTYPES)}")
    dtypes = [DTYPES[x] for x in a.dtypes.split(",")]
    limits = DeviceLimits.h100()
    t0 = time.perf_counter()
    todo = variants(names, passes, dtypes, a.top, limits)
    print(f"compiling {len(todo)} variants for sm_{a.arch} (Triton {triton.__version__}) ...", flush=True)
    results = compile_check([v for *_, v in todo], arch=a.arch, timeout=max(900.0, 5.0 * len(todo)))
    rows = [row(s, li, which, v, r, limits) for (s, li, which, v), r in zip(todo, results)]
    fused_rows = block_rows(block_names, dtypes, a.arch)
    doc = {
        "arch": a.arch,
        "triton": triton.__version__,
        "limits": limits.name,
        "date": f"{_dt.date.today()}",
        "config": {"suites": names, "passes": passes, "dtypes": dtypes, "top": a.top, "blocks": block_names},
        "elapsed_s": time.perf_counter() - t0,
        "rows": rows,
        "blocks": fused_rows,
    }
    doc["summary"] = summarize(rows)
    out = (
        Path(a.out)
        if a.out
        else (
            Path(__file__).resolve().parent
            / "results"
            / f"{_dt.date.today():%Y-%m-%d}-static-sm{a.arch}-triton{triton.__version__}"
        )
    )
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "static.json", json.dumps(doc, indent=1) + "\n")
    atomic_write_text(out / "static.md", markdown(doc))
    print(markdown(doc).split("\n## Flagged")[0])
    print(f"wrote {out / 'static.json'} and {out / 'static.md'}")
    return doc


if __name__ == "__main__":
    main()
