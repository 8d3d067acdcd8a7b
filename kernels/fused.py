"""Fused block kernels and plan execution.

A FusedSpec (block + one fused step of a plan) renders through the generator's Jinja environment
to a Variant, launched by kernels.runtime like any single conv. run_plan() executes a whole plan:
'conv' steps through kernels.conv (the existing kernels and their epilogue), 'op' steps through
block_reference.apply_node in fp32, fused steps through the block templates. Tensors are
[N, C, H, W] at the surface and channels-last in memory; the output is channels-last.

Compile-validity for sm_90 without a GPU: compile_check() (a child process with TRITON_INTERPRET=0,
like kernels.validate), `python -m tunerd.kernels.fused --arch 90 < lines` with one
{"block": ..., "plan": ..., "step": i, "schedule": ...} per line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Any

import torch

from . import conv as _conv
from . import epilogue as _ep
from . import generator, runtime
from .block import GATES, INPUT, Block, Node, Shape
from .block_reference import Params, apply_node
from .block_reference import gate as _gate
from .plan import (
    FUSED,
    GATED,
    POOLING,
    AsppBranch,
    Branch,
    GateParts,
    Plan,
    Step,
    aspp_branches,
    check,
    dw_epilogue,
    gate_parts,
    inception_branches,
    matches,
    mbconv_parts,
    next_pow2,
    pool_pw_parts,
    rank,
    step_outputs,
    tail_epilogue,
)
from .schedule import UNROLL_TAPS, Schedule, ScheduleError, is_pow2
from .spec import BlockSpec, Epilogue, SpecError, canonical_json, conv_spec


@dataclass(frozen=True)
class FusedSpec:
    """One fused launch: a step of kind separable / mlp / convnext / inception / expand_dw / mbconv / se_pw / aspp
    / dw_gate / pw_gate / dw_ln / pw_pool / gate_ep / pool_pw of block (se_pw, gate_ep: the kernel launch; the gate's
    map before it is torch)."""

    block: Block
    step: Step

    def __post_init__(self) -> None:
        if self.step.kind not in FUSED:
            raise SpecError(f"{self.step.kind!r} is not a fused step kind ({FUSED})")
        check_step(self.block, self.step)

    @property
    def nodes(self) -> list[Node]:
        return [self.block.node(n) for n in self.step.nodes]

    @property
    def dtype(self) -> str:
        return self.block.dtype

    def parts(self) -> dict[str, Any]:
        """The step's anatomy: dw (depthwise node, its Epilogue), ln, pw1, mid act, pw (last GEMM node) and
        the tail Epilogue after it."""
        if self.step.kind in ("inception", "aspp", "dw_gate", "pw_gate"):
            raise SpecError(f"{self.describe()} has no GEMM parts (see branches, aspp_branches, gate)")
        names = list(self.step.nodes)
        b = self.block
        out: dict[str, Any] = {"dw": None, "dw_ep": None, "ln": None, "pw1": None, "mid_act": None}
        if self.step.kind in ("expand_dw", "mbconv"):  # + expand, expand_ep (pw None for expand_dw)
            q = mbconv_parts(b, names, self.step.kind)
            assert q is not None
            out.update({k: q[k] for k in ("expand", "expand_ep", "dw", "dw_ep")})
            if self.step.kind == "mbconv":
                out.update(pw=q["pw"], tail=q["tail"], tail_nodes=q["tail_nodes"])
            else:
                out.update(pw=None, tail=q["dw_ep"], tail_nodes=q["dw_nodes"])
            return out
        if self.step.kind == "se_pw":  # + gate
            out.update(gate=b.node(names[0]), pw=b.node(names[1]), tail_nodes=names[2:])
            out["tail"] = tail_epilogue(b, names[2:], out["pw"]["bias"])
            return out
        if self.step.kind == "pw_pool":
            out.update(
                pw=b.node(names[0]), tail_nodes=names[1:], tail=tail_epilogue(b, names[1:], b.node(names[0])["bias"])
            )
            return out
        if self.step.kind == "pool_pw":  # + pool: the average pool the GEMM's A operand loads
            pp = pool_pw_parts(b, names)
            assert pp is not None
            out.update(pool=pp[0], pw=pp[1], tail=pp[2], tail_nodes=names[2:])
            return out
        if self.step.kind == "gate_ep":  # + gate; no GEMM (pw None)
            out.update(gate=b.node(names[0]), pw=None, tail_nodes=names[1:], tail=tail_epilogue(b, names[1:], False))
            return out
        if self.step.kind == "separable":
            i = next(i for i, n in enumerate(names) if i > 0 and b.node(n).op == "conv")
            out.update(dw=b.node(names[0]), dw_ep=dw_epilogue(b, names[:i]), pw=b.node(names[i]))
            out["tail"] = tail_epilogue(b, names[i + 1 :], out["pw"]["bias"])
            out["tail_nodes"] = names[i + 1 :]
            return out
        if self.step.kind in ("convnext", "dw_ln"):
            out.update(dw=b.node(names[0]), dw_ep=Epilogue(bias=b.node(names[0])["bias"]))
            names = names[1:]
        if self.step.kind == "dw_ln":  # the depthwise is the step's conv; no GEMM
            out.update(ln=b.node(names[0]), pw=None, tail=None, tail_nodes=[])
            return out
        out.update(ln=b.node(names[0]), pw1=b.node(names[1]), mid_act=b.node(names[2])["fn"], pw=b.node(names[3]))
        out["tail"] = tail_epilogue(b, names[4:], out["pw"]["bias"])
        out["tail_nodes"] = names[4:]
        return out

    @property
    def branches(self) -> list[Branch]:
        """An inception step's branches in concat order (plan.inception_branches)."""
        out = inception_branches(self.block, list(self.step.nodes))
        if out is None:
            raise SpecError(f"{self.describe()} is not an inception step")
        return out

    @property
    def aspp_branches(self) -> list[AsppBranch]:
        """An aspp step's branches in concat order (plan.aspp_branches)."""
        out = aspp_branches(self.block, list(self.step.nodes))
        if out is None:
            raise SpecError(f"{self.describe()} is not an aspp step")
        return out

    @property
    def gate(self) -> GateParts:
        """A dw_gate / pw_gate step's anatomy (plan.gate_parts)."""
        out = gate_parts(self.block, list(self.step.nodes), self.step.kind)
        if out is None:
            raise SpecError(f"{self.describe()} is not a dw_gate / pw_gate step")
        return out

    @property
    def out_spec(self) -> BlockSpec:
        """The last GEMM (expand_dw: the depthwise; gate_ep: a 1x1 map of the gate's channels) as a single-conv
        spec carrying the step's tail epilogue (epilogue args come from it)."""
        p = self.parts()
        if self.step.kind == "gate_ep":
            s = self.block.shapes[self.step.nodes[0]]
            return conv_spec(
                n=self.block.n, c=s.c, k=s.c, in_size=s.size, kernel=1, dtype=self.dtype, epilogue=p["tail"]
            )
        return self.block.conv_spec(p["pw"] or p["dw"], epilogue=p["tail"])

    @property
    def dw_spec(self) -> BlockSpec | None:
        p = self.parts()
        return None if p["dw"] is None else self.block.conv_spec(p["dw"], epilogue=p["dw_ep"])

    def depthwise(self) -> BlockSpec:
        """dw_spec of a step that has a depthwise conv: SpecError for one without."""
        dw = self.dw_spec
        if dw is None:
            raise SpecError(f"{self.describe()} has no depthwise conv")
        return dw

    @property
    def pixels(self) -> int:
        if self.step.kind in ("inception", "aspp", "dw_gate", "pw_gate"):
            h, w = self.block.shapes[self.step.nodes[-1]].size
            return self.block.n * h * w
        return self.out_spec.out_pixels

    def to_dict(self) -> dict[str, Any]:
        return {"block": self.block.to_dict(), "step": self.step.to_dict()}

    def to_json(self) -> str:
        return canonical_json(self.to_dict())

    def describe(self) -> str:
        return f"{self.step.kind}[{'+'.join(self.step.nodes)}] of {self.block.describe()}"


def check_step(block: Block, step: Step) -> None:
    if not matches(block, step):
        raise SpecError(f"step {step.kind}[{'+'.join(step.nodes)}] is not a legal {step.kind} kernel for this block")


# ---- schedules -----------------------------------------------------------------------------
def _clamp_pow2(v: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, next_pow2(max(v, 1))))


def default_schedule(fs: FusedSpec) -> Schedule:
    """Tiles sized to the problem. separable: block_m pixels x block_n output channels, block_k channels per
    depthwise/GEMM step. mlp/convnext: block_m pixels (all channels on chip), block_k hidden channels per chunk."""
    m = fs.pixels
    bm = _clamp_pow2(m, 16, 64)
    if fs.step.kind == "inception":  # no GEMM, block_k unused. Spill-free on sm_90 (fused.compile_check,
        # InceptionNeXt-T): <= 8 elements per thread per [pixels, channels] tile, as the unrolled 11-tap band
        # keeps every tap's load in flight
        bc = _clamp_pow2(max(b.size for b in fs.branches), 16, 32)
        conv_tile = bm * max((min(bc, next_pow2(b.size)) for b in fs.branches if b.conv), default=1)
        return Schedule(
            block_m=bm, block_n=bc, block_k=16, group_m=1, num_warps=min(8, max(4, conv_tile // 256)), num_stages=1
        )
    wide16 = 32 if fs.dtype == "float32" else 64  # operand tile width along a reduction: half in fp32
    if fs.step.kind == "dw_ln":  # block_m pixels x every channel (block_n = padded C), block_k unused
        return dw_ln_schedule(fs, min(_clamp_pow2(m, 1, 64), max(1, DW_LN_TILE // dw_ln_row(fs))))
    if fs.step.kind == "dw_gate":  # block_m pixels (in runs of dw_gate_run along a row) x block_n depthwise
        # channels, block_k unused. sm_90 (compile_check, HorNet-T stage 3): 64 x 32 on 4 warps, 64 registers, no
        # spills, FMA 39% (bf16) / 57% (fp32) of the tap loop's SASS; wider tiles add registers, not FMA share
        lo, hi = gate_channels(fs)
        return Schedule(
            block_m=bm, block_n=_clamp_pow2(hi - lo, 16, 32), block_k=16, group_m=1, num_warps=4, num_stages=1
        )
    if fs.step.kind == "expand_dw":  # block_k hidden channels per program, block_n unused
        hid, pq = fs.out_spec.k, fs.out_spec.out_pixels // fs.block.n
        return Schedule(
            block_m=_clamp_pow2(pq, 16, 64),
            block_n=16,
            block_k=_clamp_pow2(hid, 16, wide16),
            group_m=1,
            num_warps=4,
            num_stages=1,
        )
    if fs.step.kind == "aspp":  # block_n output channels of one branch per program, block_k input channels per step
        bn = _clamp_pow2(max(b.size for b in fs.aspp_branches), 16, 64)
        bk = _clamp_pow2(fs.block.shapes[fs.block.node(fs.aspp_branches[0].head).inputs[0]].c, 16, wide16)
        return Schedule(block_m=bm, block_n=bn, block_k=bk, group_m=1, num_warps=4, num_stages=2)
    if fs.step.kind == "mbconv":  # block_k hidden channels per chunk
        spec = fs.out_spec
        bn = _clamp_pow2(spec.k, 16, 128)
        bk = 16 if fs.dtype == "float32" else 32
        warps = 8 if bm * bn >= 128 * 64 else 4
        return Schedule(block_m=bm, block_n=bn, block_k=bk, group_m=1, num_warps=warps, num_stages=1)
    if fs.step.kind == "pw_gate":  # the GEMM's tiles; the gate is loaded in its epilogue
        spec = fs.block.conv_spec(fs.block.node(fs.gate.conv))
        bn = _clamp_pow2(spec.k, 16, 128)
        bk = _clamp_pow2(spec.c, 16, 32 if spec.itemsize == 4 or spec.c > 256 else 64)
        # fp32 (CUDA-core dots) 64 x 64 on 4 warps: 186 registers on sm_90 where the reduction is one step; 48 on 8
        warps = 8 if bm * bn >= (64 * 64 if spec.itemsize == 4 else 128 * 64) else 4
        return Schedule(block_m=bm, block_n=bn, block_k=bk, group_m=1, num_warps=warps)
    if fs.step.kind == "gate_ep":  # elementwise: block_m pixels x block_n channels, block_k unused
        return Schedule(
            block_m=bm, block_n=_clamp_pow2(fs.out_spec.k, 16, 64), block_k=16, group_m=1, num_warps=4, num_stages=1
        )
    if fs.step.kind in ("separable", "se_pw", "pw_pool", "pool_pw"):
        spec = fs.out_spec
        if pooled_output(fs):  # tiles hold pixels of one image (the pool's partial sums are per image)
            bm = _clamp_pow2(spec.out_pixels // spec.n, 16, 64)
        bn = _clamp_pow2(spec.k, 16, 128)
        bk = _clamp_pow2(spec.c, 16, 32 if spec.itemsize == 4 or spec.c > 256 else 64)
        warps = 8 if bm * bn >= 128 * 64 else 4
        if fs.step.kind == "pool_pw" and spec.itemsize == 4 and bm * bn >= 64 * 64:
            warps = 8  # fp32 64 x 64 with a 3x3 window's offsets on 4 warps: 255 registers, spilled on sm_90
        return Schedule(block_m=bm, block_n=bn, block_k=bk, group_m=1, num_warps=warps, num_stages=2)
    # spill-free on sm_90 (benchmarks: fused.compile_check): 16-bit rows of <= 128 channels take 64-row wgmma
    # tiles, 256-channel rows 32; fp32 (CUDA-core dots) half that, with 16 hidden channels per chunk
    wide = max(next_pow2(fs.block.shapes[fs.parts()["ln"].name].c), next_pow2(fs.out_spec.k)) >= 256
    if fs.dtype == "float32":
        top, bh = (16 if wide else 32), 16
    else:
        top, bh = (32 if wide else 64), 32
    return Schedule(block_m=min(bm, top), block_n=16, block_k=bh, group_m=1, num_warps=8, num_stages=2)


DW_LN_TILE = 2048  # elements of a dw_ln program's [pixels, channels] fp32 tile by default: 16 a thread on 4 warps


def dw_ln_row(fs: FusedSpec) -> int:
    """The padded channels of a dw_ln program's row: its block_n."""
    return next_pow2(fs.block.shapes[fs.step.nodes[0]].c)


def dw_ln_schedule(fs: FusedSpec, block_m: int) -> Schedule:
    """A dw_ln schedule of block_m pixels per program; warps so each thread holds <= 16 elements of the tile, at most
    8 (sm_90, ConvNeXt-T stages 3-4: <= 143 registers, no spills; 32 elements a thread on 4 warps, or 16 warps
    (capped at 128 registers), spilled)."""
    warps = min(8, max(4, block_m * dw_ln_row(fs) // (32 * 16)))
    return Schedule(block_m=block_m, block_n=dw_ln_row(fs), block_k=16, group_m=1, num_warps=warps, num_stages=1)


def canonical(fs: FusedSpec, s: Schedule) -> Schedule:
    s = replace(s, group_m=1, split_k=1, k_order="tap")
    if fs.step.kind == "dw_ln":
        return replace(s, block_n=dw_ln_row(fs), block_k=16, num_stages=1)
    if fs.step.kind in ("inception", "dw_gate", "gate_ep"):
        return replace(s, block_k=16)
    return (
        s
        if fs.step.kind in ("separable", "mbconv", "se_pw", "aspp", "pw_gate", "pw_pool", "pool_pw")
        else replace(s, block_n=16)
    )


def check_schedule(fs: FusedSpec, s: Schedule) -> None:
    """ScheduleError unless s is compile-valid for fs (powers of two, tl.dot dims >= 16, bounded tiles)."""
    for name in ("block_m", "block_n", "block_k", "num_warps"):
        v = getattr(s, name)
        if not isinstance(v, int) or not is_pow2(v):
            raise ScheduleError(f"{name}={v!r} must be a power of two")
        if name != "num_warps" and v < 16 and not (fs.step.kind == "dw_ln" and name == "block_m"):  # no tl.dot
            raise ScheduleError(f"{name}={v} is below tl.dot's minimum of 16")
    if s.num_warps > 16 or s.num_stages < 1:
        raise ScheduleError("num_warps must be <= 16 and num_stages >= 1")
    if s.block_m * s.block_n > 256 * 256 or s.block_m * s.block_k > 256 * 128:
        raise ScheduleError("tile larger than 256x256 (outputs) or 256x128 (operand) elements")
    if fs.step.kind == "dw_ln":
        per_thread = 16 if s.num_warps <= 4 else 32  # fp32 tile elements: sm_90 spilled beyond (and on 16 warps)
        if s.num_warps > 8 or s.block_m * s.block_n > per_thread * 32 * s.num_warps:
            raise ScheduleError(
                f"dw_ln: block_m={s.block_m} x {s.block_n} channels on {s.num_warps} warps: over 8 warps or over "
                f"{per_thread} fp32 elements per thread"
            )
    if fs.step.kind in ("mlp", "convnext"):
        cp = next_pow2(fs.block.shapes[fs.parts()["ln"].name].c)
        kp = next_pow2(fs.out_spec.k)
        if s.block_m * max(cp, kp) > 128 * 256:
            raise ScheduleError(f"block_m={s.block_m} x {max(cp, kp)} on-chip channels exceeds 32768 elements")


def resolve(fs: FusedSpec, schedule: Schedule | dict | None) -> Schedule:
    if schedule is None:
        s = default_schedule(fs)
    elif isinstance(schedule, dict):
        s = Schedule.from_dict(schedule)
    elif isinstance(schedule, Schedule):
        s = schedule
    else:
        raise ScheduleError(f"schedule must be a Schedule, a dict or None, got {type(schedule).__name__}")
    s = canonical(fs, s)
    check_schedule(fs, s)
    return s


# ---- rendering -----------------------------------------------------------------------------
TEMPLATE_FILES = {
    "expand_dw": "block_mbconv.py.j2",
    "mbconv": "block_mbconv.py.j2",
    "se_pw": "block_gated_pw.py.j2",
    "pw_pool": "block_gated_pw.py.j2",
    "pool_pw": "block_gated_pw.py.j2",
    "gate_ep": "block_gate_ep.py.j2",
    "aspp": "block_aspp.py.j2",
    "separable": "block_separable.py.j2",
    "mlp": "block_mlp.py.j2",
    "convnext": "block_mlp.py.j2",
    "inception": "block_inception.py.j2",
    "dw_gate": "block_gnconv.py.j2",
    "pw_gate": "block_gnconv.py.j2",
    "dw_ln": "block_dw_ln.py.j2",
}
_DW_ARGS = (("bias", "dw_bias_ptr"), ("affine", "dw_scale_ptr"), ("affine", "dw_shift_ptr"))


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _inception_context(fs: FusedSpec, s: Schedule) -> dict[str, Any]:
    """Per-branch constants: slice start/size, output offset, channel tile, filter geometry and [bn] [act]."""
    h, w = fs.block.shapes[fs.step.nodes[-1]].size
    branches, args, t0 = [], [], 0
    for i, br in enumerate(fs.branches):
        bc = min(s.block_n, next_pow2(br.size))
        d: dict[str, Any] = dict(
            i=i,
            START=br.start,
            OUT0=br.out_start,
            SIZE=br.size,
            BC=bc,
            T0=t0,
            END=t0 + _cdiv(br.size, bc),
            conv=br.conv is not None,
        )
        t0 = d["END"]
        if br.conv is None:
            d["desc"] = f"identity: channels [{br.start}, {br.start + br.size})"
        else:
            spec = fs.block.conv_spec(fs.block.node(br.conv))
            ep = dw_epilogue(fs.block, [br.conv, *br.tail])
            if ep is None:
                raise SpecError(f"branch {br.conv} of {fs.describe()} has no depthwise epilogue")
            d.update(
                KS=list(spec.kernel),
                DIL=list(spec.dilation),
                PAD=[p[0] for p in spec.padding],
                padded=[p != (0, 0) for p in spec.padding],
                ep=ep,
                act=generator.activation(ep.activation),
                desc=f"{'+'.join((br.conv, *br.tail))}: dw {'x'.join(map(str, spec.kernel))} on channels "
                f"[{br.start}, {br.start + br.size})",
            )
            args += [f"w{i}_ptr"] + [
                f"{k}{i}_ptr" for k, on in (("b", ep.bias), ("s", ep.affine), ("t", ep.affine)) if on
            ]
        branches.append(d)
    return {
        "M": fs.pixels,
        "H": h,
        "W": w,
        "BM": s.block_m,
        "branches": branches,
        "args": args,
        "desc": " | ".join(b["desc"].split(":")[0] for b in branches),
        "tiles": t0,
    }


_EX_ARGS = (("bias", "ex_bias_ptr"), ("affine", "ex_scale_ptr"), ("affine", "ex_shift_ptr"))


def _step_input(fs: FusedSpec) -> Shape:
    return fs.block.shapes[fs.nodes[0].inputs[0]]


def _dot_kw(fs: FusedSpec) -> str:
    return ', input_precision="ieee"' if fs.dtype == "float32" else ""


def _mbconv_context(fs: FusedSpec, s: Schedule) -> dict[str, Any]:
    """expand_dw / mbconv: the depthwise geometry with the step input's strides, the expand and depthwise
    epilogues, and for mbconv the project GEMM's (through the shared epilogue macro)."""
    p = fs.parts()
    dw = fs.dw_spec
    assert dw is not None
    src = _step_input(fs)
    ex_ep = p["expand_ep"] or Epilogue()
    g = generator.geometry(dw, s)
    out = fs.out_spec
    g.update(
        kind=fs.step.kind,
        project=fs.step.kind == "mbconv",
        expand=p["expand"] is not None,
        CX=src.c,
        CB=_clamp_pow2(src.c, 16, 32),
        HID=dw.k,
        SX=[src.size[1] * src.c, src.c],
        SXN=src.c * src.size[0] * src.size[1],
        # unrolled taps keep each tap's expand GEMM in flight: spills on sm_90, so only a plain depthwise unrolls
        static=[False, dw.kernel[1] <= UNROLL_TAPS and p["expand"] is None],
        ex_ep=ex_ep,
        ex_args=["we_ptr", *(name for flag, name in _EX_ARGS if getattr(ex_ep, flag))]
        if p["expand"] is not None
        else [],
        ex_act=generator.activation(ex_ep.activation),
        ex_desc="+".join(n for n in fs.step.nodes[: fs.step.nodes.index(p["dw"].name)][1:]) or "nothing",
        dw_ep=p["dw_ep"],
        dw_args=[name for flag, name in _DW_ARGS if getattr(p["dw_ep"], flag)],
        dw_act=generator.activation(p["dw_ep"].activation),
        dot_kw=_dot_kw(fs),
        i64=g["i64"] or src.c * fs.block.n * src.size[0] * src.size[1] > generator.INT32_LIMIT,
    )
    i = fs.step.nodes.index(p["dw"].name)
    dw_nodes = [
        n
        for n in fs.step.nodes[i + 1 :]
        if p["pw"] is None or fs.step.nodes.index(n) < fs.step.nodes.index(p["pw"].name)
    ]
    g["dw_desc"] = "+".join(dw_nodes) or "nothing"
    if fs.step.kind == "expand_dw":
        pq = dw.out_pixels // dw.n
        g.update(
            PQ=pq,
            TPI=_cdiv(pq, s.block_m),
            NPID_K=_cdiv(dw.k, s.block_k),
            pool=pooled_output(fs),
            ep=Epilogue(),
            ep_args=[],
        )
        return g
    g.update(
        K=out.k,
        ep=out.epilogue,
        ep_args=_ep.arg_names(out.epilogue),
        act=generator.activation(out.epilogue.activation),
        NPID_N=_cdiv(out.k, s.block_n),
        pool=False,
    )
    return g


def pooled_output(fs: FusedSpec) -> bool:
    """Whether an expand_dw / pw_pool / pool_pw step also writes its output's per-image partial sums (it feeds an
    se / eca gate; a pw_pool step always does)."""
    return fs.step.kind in POOLING and any(fs.block.node(c).op in GATES for c in fs.block.consumers(fs.step.nodes[-1]))


def _gated_context(fs: FusedSpec, s: Schedule) -> dict[str, Any]:
    """se_pw: the gated GEMM; pw_pool: the plain GEMM over tiles of one image, with the pool's partial sums;
    pool_pw: the GEMM whose A operand averages each output pixel's window of the step input (avg: its geometry),
    tiled per image when it writes a gate's sums; gate_ep: the elementwise gate and epilogue chain."""
    p = fs.parts()
    out = fs.out_spec
    src = _step_input(fs)
    pq = out.out_pixels // out.n
    pool = p.get("pool")
    avg = None
    if pool is not None:
        avg = dict(
            H=src.size[0],
            W=src.size[1],
            P=out.in_size[0],
            Q=out.in_size[1],
            KS=pool["kernel"],
            S=pool["stride"],
            PAD=pool["padding"],
            count_pad=pool["count_include_pad"],
        )
    return dict(
        M=out.out_pixels,
        PQ=pq,
        TPI=_cdiv(pq, s.block_m),
        C=out.c,
        K=out.k,
        BM=s.block_m,
        BN=s.block_n,
        BK=s.block_k,
        NPID_N=_cdiv(out.k, s.block_n),
        gated=fs.step.kind == "se_pw",
        pool=pooled_output(fs),
        avg=avg,
        gate=p["gate"].op.upper() if p.get("gate") is not None else None,
        desc="+".join(fs.step.nodes),
        round_gate=bool(p["tail_nodes"]),
        BF16=fs.dtype == "bfloat16",
        ep=out.epilogue,
        ep_args=_ep.arg_names(out.epilogue),
        act=generator.activation(out.epilogue.activation),
        dot_kw=_dot_kw(fs),
        i64=max(out.out_pixels * out.k, fs.block.n * src.c * src.size[0] * src.size[1]) > generator.INT32_LIMIT,
    )


def _aspp_context(fs: FusedSpec, s: Schedule) -> dict[str, Any]:
    """Per-branch constants: output offset, channel tile, filter geometry and [bias] [bn] [act]."""
    b = fs.block
    h, w = b.shapes[fs.step.nodes[-1]].size
    src = b.shapes[b.node(next(br.head for br in fs.aspp_branches if br.conv)).inputs[0]]
    ct = b.shapes[fs.step.nodes[-1]].c
    branches, args, t0 = [], [], 0
    for i, br in enumerate(fs.aspp_branches):
        bn = max(16, min(s.block_n, next_pow2(br.size)))
        d: dict[str, Any] = dict(i=i, OUT0=br.out_start, SIZE=br.size, BN=bn, T0=t0, END=t0 + _cdiv(br.size, bn))
        d["conv"] = br.conv
        t0 = d["END"]
        if br.conv:
            spec = b.conv_spec(b.node(br.head))
            ep = dw_epilogue(b, [br.head, *br.tail])
            assert ep is not None
            d.update(
                KS=list(spec.kernel),
                DIL=list(spec.dilation),
                PAD=[q[0] for q in spec.padding],
                padded=[q != (0, 0) for q in spec.padding],
                TAPS=spec.taps,
                ep=ep,
                act=generator.activation(ep.activation),
                desc=f"{'+'.join((br.head, *br.tail))}: conv {'x'.join(map(str, spec.kernel))} dilation "
                f"{spec.dilation[0]} -> channels [{br.out_start}, {br.out_start + br.size})",
            )
            args += [f"w{i}_ptr"] + [
                f"{k}{i}_ptr" for k, on in (("b", ep.bias), ("s", ep.affine), ("t", ep.affine)) if on
            ]
        else:
            d["desc"] = f"{br.head}: broadcast -> channels [{br.out_start}, {br.out_start + br.size})"
            args.append(f"p{i}_ptr")
        branches.append(d)
    return {
        "M": fs.pixels,
        "H": h,
        "W": w,
        "C": src.c,
        "CT": ct,
        "BM": s.block_m,
        "BK": s.block_k,
        "TILES": t0,
        "branches": branches,
        "args": args,
        "desc": " | ".join(br.head for br in fs.aspp_branches),
        "BF16": fs.dtype == "bfloat16",
        "dot_kw": _dot_kw(fs),
        "i64": max(fs.pixels * ct, b.n * src.c * h * w) > generator.INT32_LIMIT,
    }


def gate_channels(fs: FusedSpec) -> tuple[int, int]:
    """The depthwise channels [lo, hi) a dw_gate step computes: those of its gate and of its second output."""
    g = fs.gate
    lo, hi = g.start, g.start + g.size
    if g.written is not None:
        lo, hi = min(lo, g.written[0]), max(hi, g.written[1])
    return lo, hi


def _gnconv_context(fs: FusedSpec, s: Schedule) -> dict[str, Any]:
    """dw_gate: the depthwise geometry, its input slice, scale, gate and written channel ranges; pw_gate: the
    GEMM's sizes and the gate slice."""
    g, b = fs.gate, fs.block
    spec = b.conv_spec(b.node(g.conv))
    h, w = b.shapes[fs.step.nodes[-1]].size
    src, partner = b.shapes[g.src], b.shapes[g.partner]
    ctx: dict[str, Any] = dict(
        kind=fs.step.kind,
        M=fs.pixels,
        H=h,
        W=w,
        BM=s.block_m,
        BN=s.block_n,
        BIAS=b.node(g.conv)["bias"],
        G=g.size,
        GS=g.start,
        CP=partner.c,
        PS=g.partner_start,
        BF16=fs.dtype == "bfloat16",
        desc=f"{'+'.join(fs.step.nodes)}: {g.value}[{g.start}:{g.start + g.size}] * "
        f"{g.partner}[{g.partner_start}:{g.partner_start + g.size}]",
        i64=fs.pixels * max(src.c, partner.c, spec.k) > generator.INT32_LIMIT,
    )
    if fs.step.kind == "pw_gate":
        ctx.update(C=spec.c, K=spec.k, BK=s.block_k, NPID_N=_cdiv(spec.k, s.block_n), dot_kw=_dot_kw(fs))
        return ctx
    lo, hi = gate_channels(fs)
    r = dw_gate_run(fs)
    (kh, kw), (dh, dw), pw = spec.kernel, spec.dilation, spec.padding[1][0]
    # input column ow0 + col feeds output ow0 + r through tap k1 when col = r + k1 * dw - pw
    cols = [
        (j - pw, [(i, (j - i) // dw) for i in range(r) if (j - i) % dw == 0 and 0 <= (j - i) // dw < kw])
        for j in range(r + (kw - 1) * dw)
    ]
    ctx.update(
        CX=src.c,
        XS=g.src_start,
        CD=spec.k,
        KS=[kh, kw],
        DIL=[dh, dw],
        PAD=[spec.padding[0][0], pw],
        R=r,
        WG=_cdiv(w, r),
        MG=b.n * h * _cdiv(w, r),
        BP=s.block_m // r,
        cols=[(col, taps) for col, taps in cols if taps],
        SCALE=repr(float(g.scale)) if g.scale != 1.0 else None,
        write=g.written,
        LO=lo,
        HI=hi,
        NPID_C=_cdiv(hi - lo, s.block_n),
    )
    return ctx


def dw_gate_run(fs: FusedSpec) -> int:
    """Consecutive outputs along a row that one dw_gate program's pixel group computes from shared input columns."""
    return min(4, next_pow2(fs.block.shapes[fs.step.nodes[-1]].size[1]))


def _dw_ln_context(fs: FusedSpec, s: Schedule) -> dict[str, Any]:
    """dw_ln: the depthwise geometry, its bias and the LayerNorm's eps."""
    p = fs.parts()
    dw = fs.depthwise()
    g = generator.geometry(dw, s)
    g.update(
        CP=dw_ln_row(fs),
        bias=p["dw_ep"].bias,
        EPS=repr(float(p["ln"]["eps"])),
        # unrolled taps keep every tap's [pixels, channels] load in flight: only while the tile is small
        unroll=dw.kernel[1] <= UNROLL_TAPS and s.block_m * s.block_n <= 32 * s.num_warps * 16,
        desc="+".join(fs.step.nodes),
        i64=g["i64"] or dw.out_pixels * dw.k > generator.INT32_LIMIT,
    )
    return g


def _context(fs: FusedSpec, s: Schedule) -> dict[str, Any]:
    if fs.step.kind == "dw_ln":
        return _dw_ln_context(fs, s)
    if fs.step.kind in ("dw_gate", "pw_gate"):
        return _gnconv_context(fs, s)
    if fs.step.kind == "inception":
        return _inception_context(fs, s)
    if fs.step.kind in ("expand_dw", "mbconv"):
        return _mbconv_context(fs, s)
    if fs.step.kind in ("se_pw", "pw_pool", "pool_pw", "gate_ep"):
        return _gated_context(fs, s)
    if fs.step.kind == "aspp":
        return _aspp_context(fs, s)
    p = fs.parts()
    out = fs.out_spec
    dot_kw = ', input_precision="ieee"' if fs.dtype == "float32" else ""
    dw = fs.dw_spec
    if dw is not None:
        g = generator.geometry(dw, s)
        g.update(
            static=[False, dw.kernel[1] <= UNROLL_TAPS],
            dw_ep=p["dw_ep"],
            dw_args=[name for flag, name in _DW_ARGS if getattr(p["dw_ep"], flag)],
            dw_act=generator.activation(p["dw_ep"].activation),
        )
    else:
        g = {"M": out.out_pixels, "BM": s.block_m, "BN": s.block_n, "BK": s.block_k, "i64": False}
    g.update(
        K=out.k,
        ep=out.epilogue,
        ep_args=_ep.arg_names(out.epilogue),
        dot_kw=dot_kw,
        act=generator.activation(out.epilogue.activation),
        i64=g["i64"] or max(out.out_pixels * out.k, out.out_pixels * out.c) > generator.INT32_LIMIT,
    )
    if fs.step.kind == "separable":
        pw = fs.step.nodes.index(p["pw"].name)
        g.update(C=out.c, NPID_N=_cdiv(out.k, s.block_n), dw_desc="+".join(fs.step.nodes[1:pw]) or "nothing")
        return g
    c = fs.block.shapes[p["ln"].name].c
    g.update(
        dw=dw is not None,
        C=c,
        CP=next_pow2(c),
        HID=fs.block.shapes[p["pw1"].name].c,
        BH=s.block_k,
        KP=next_pow2(out.k),
        EPS=repr(float(p["ln"]["eps"])),
        b1=p["pw1"]["bias"],
        mid_act=p["mid_act"],
        mid_act_expr=_ep.activation_expr(p["mid_act"], "h"),
    )
    return g


def kernel_name(fs: FusedSpec) -> str:
    return f"tunerd_block_{fs.step.kind}"


def grid(fs: FusedSpec, s: Schedule) -> tuple[int, ...]:
    m = _cdiv(fs.pixels, s.block_m)
    if fs.step.kind == "expand_dw":  # (image, pixel tile of the image, channel tile), flattened
        pq = fs.pixels // fs.block.n
        return (fs.block.n * _cdiv(pq, s.block_m) * _cdiv(fs.out_spec.k, s.block_k),)
    if fs.step.kind == "aspp":
        return (m * sum(_cdiv(b.size, max(16, min(s.block_n, next_pow2(b.size)))) for b in fs.aspp_branches),)
    if fs.step.kind in ("pw_pool", "pool_pw") and pooled_output(fs):
        # (image, pixel tile of the image, channel tile), channel tiles fastest
        pq = fs.pixels // fs.block.n
        return (fs.block.n * _cdiv(pq, s.block_m) * _cdiv(fs.out_spec.k, s.block_n),)
    if fs.step.kind in ("mbconv", "se_pw", "gate_ep", "pool_pw"):
        return (m * _cdiv(fs.out_spec.k, s.block_n),)
    if fs.step.kind == "dw_gate":  # (pixel tile of row runs, depthwise channel tile), channel tiles fastest
        lo, hi = gate_channels(fs)
        r = dw_gate_run(fs)
        h, w = fs.block.shapes[fs.step.nodes[-1]].size
        return (_cdiv(fs.block.n * h * _cdiv(w, r), s.block_m // r) * _cdiv(hi - lo, s.block_n),)
    if fs.step.kind == "pw_gate":
        return (m * _cdiv(fs.block.shapes[fs.step.nodes[-1]].c, s.block_n),)
    if fs.step.kind == "inception":
        return (m, sum(_cdiv(b.size, min(s.block_n, next_pow2(b.size))) for b in fs.branches))
    return (m * _cdiv(fs.out_spec.k, s.block_n),) if fs.step.kind == "separable" else (m,)


def render(fs: FusedSpec, schedule: Schedule | dict | None = None) -> generator.Variant[FusedSpec]:
    """Triton source of a fused step under schedule (default heuristic when None); cached."""
    if schedule is None or isinstance(schedule, Schedule):
        return _render(fs, _resolved(fs, schedule))
    return _render(fs, resolve(fs, schedule))


@lru_cache(maxsize=1024)
def _resolved(fs: FusedSpec, schedule: Schedule | None) -> Schedule:
    return resolve(fs, schedule)


@lru_cache(maxsize=1024)
def fused_spec(block: Block, step: Step) -> FusedSpec:
    """FusedSpec(block, step), checked once per pair (run_plan builds one per fused step on every call)."""
    return FusedSpec(block, step)


@lru_cache(maxsize=512)
def _render(fs: FusedSpec, s: Schedule) -> generator.Variant[FusedSpec]:
    ctx = generator.Context(_context(fs, s))
    name = kernel_name(fs)
    ctx.update(
        name=name, generator_version=generator.GENERATOR_VERSION, spec_json=fs.to_json(), schedule_json=s.to_json()
    )
    source = generator.environment().get_template(TEMPLATE_FILES[fs.step.kind]).render(v=ctx)
    source = "\n".join(line.rstrip() for line in source.splitlines()) + "\n"
    return generator.Variant(spec=fs, schedule=s, source=source, kernel_name=name, grid=grid(fs, s))


# ---- arguments -----------------------------------------------------------------------------
def _vec(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.float32).contiguous()


def _gemm_weight(w: torch.Tensor) -> torch.Tensor:
    """1x1 conv weight [K, C, 1, 1] -> GEMM B operand [C, K], contiguous (cached per weight and version)."""
    return _conv.cached_pack(w, "gemm_b", lambda d: d.reshape(d.shape[0], d.shape[1]).t().contiguous())


def _bn_vectors(block: Block, names: Iterable[str], params: Params) -> tuple[torch.Tensor, torch.Tensor] | None:
    bn = next((n for n in names if block.node(n).op == "bn"), None)
    return None if bn is None else (_vec(params[f"{bn}.scale"]), _vec(params[f"{bn}.shift"]))


def gate_of(fs: FusedSpec, params: Params, x: torch.Tensor, pool: torch.Tensor | None = None) -> torch.Tensor:
    """An se_pw / gate_ep step's gate [N, C] (fp32, contiguous) of its input x: the gate's map
    (block_reference.gate) of the per-channel means, from pool ([N, tiles, C] partial sums an expand_dw / pw_pool
    step wrote) or x itself."""
    nd = fs.nodes[0]
    pooled = pool.sum(dim=1) / (x.shape[2] * x.shape[3]) if pool is not None else x.float().mean(dim=(2, 3))
    return _gate(nd, pooled.float(), params).float().contiguous()


def pool_buffer(fs: FusedSpec, s: Schedule, device: torch.device) -> torch.Tensor:
    """The [N, tiles per image, C] fp32 partial sums an expand_dw / pw_pool step under s writes beside its output."""
    pq = fs.pixels // fs.block.n
    return torch.empty((fs.block.n, _cdiv(pq, s.block_m), fs.out_spec.k), dtype=torch.float32, device=device)


def fused_args(
    fs: FusedSpec,
    params: Params,
    vals: dict[str, torch.Tensor],
    out: torch.Tensor,
    pool: torch.Tensor | None = None,
    gate: torch.Tensor | None = None,
) -> dict[str, Any]:
    """Kernel arguments of a fused step; vals holds the [N, C, H, W] tensors computed so far. pool: the partial
    sums buffer an expand_dw step feeding a gate writes (pool_buffer); gate: an se_pw step's gate (gate_of,
    computed from its input when None)."""
    if fs.step.kind == "inception":  # out: the [N, H, W, C] buffer; the kernel reads x's slices in place
        return inception_args(fs, params, vals[fs.nodes[0].inputs[0]], out.permute(0, 3, 1, 2))
    if fs.step.kind == "aspp":
        return aspp_args(fs, params, vals, out)
    if fs.step.kind in ("dw_gate", "pw_gate"):
        return gnconv_args(fs, params, vals, out)
    if fs.step.kind in ("expand_dw", "mbconv", "se_pw", "pw_pool", "pool_pw"):
        return _mbconv_args(fs, params, vals, out, pool, gate)
    if fs.step.kind == "gate_ep":
        return gate_ep_args(fs, params, vals, out, gate)
    p = fs.parts()
    first = fs.nodes[0]
    x = vals[first.inputs[0]]
    args: dict[str, Any] = {"x_ptr": _conv.to_channels_last(x.detach()), "out_ptr": out, "UPCAST": _conv.upcast(x)}
    if p["dw"] is not None:
        dw = p["dw"].name
        args["wd_ptr"] = _conv.pack_weight(fs.depthwise(), params[f"{dw}.weight"])
        if p["dw_ep"].bias:
            args["dw_bias_ptr"] = _vec(params[f"{dw}.bias"])
        if p["dw_ep"].affine:
            bn = next(n for n in fs.step.nodes[1:] if fs.block.node(n).op == "bn")
            args["dw_scale_ptr"], args["dw_shift_ptr"] = _vec(params[f"{bn}.scale"]), _vec(params[f"{bn}.shift"])
    if fs.step.kind == "dw_ln":
        ln = p["ln"].name
        return {**args, "ln_w_ptr": _vec(params[f"{ln}.weight"]), "ln_b_ptr": _vec(params[f"{ln}.bias"])}
    if fs.step.kind == "separable":
        args["w_ptr"] = _gemm_weight(params[f"{p['pw'].name}.weight"])
    else:
        ln, pw1, pw2 = p["ln"].name, p["pw1"].name, p["pw"].name
        args.update(
            ln_w_ptr=_vec(params[f"{ln}.weight"]),
            ln_b_ptr=_vec(params[f"{ln}.bias"]),
            w1_ptr=_gemm_weight(params[f"{pw1}.weight"]),
            w2_ptr=_gemm_weight(params[f"{pw2}.weight"]),
        )
        if p["pw1"]["bias"]:
            args["b1_ptr"] = _vec(params[f"{pw1}.bias"])
    ep = epilogue_args(fs.block, p["pw"], p["tail_nodes"], params, vals)
    args.update(_conv.epilogue_kernel_args(fs.out_spec, ep, x.device))
    return args


def _mbconv_args(
    fs: FusedSpec,
    params: Params,
    vals: dict[str, torch.Tensor],
    out: torch.Tensor,
    pool: torch.Tensor | None,
    gate: torch.Tensor | None,
) -> dict[str, Any]:
    """Arguments of expand_dw / mbconv / se_pw / pw_pool / pool_pw steps (see fused_args; pool_pw reads the pool's
    input)."""
    p = fs.parts()
    b = fs.block
    x = vals[fs.nodes[0].inputs[0]]
    args: dict[str, Any] = {"x_ptr": _conv.to_channels_last(x.detach())}
    if fs.step.kind == "se_pw":
        args["gate_ptr"] = gate if gate is not None else gate_of(fs, params, x)
    if p.get("expand") is not None:
        ex = p["expand"].name
        args["we_ptr"] = _gemm_weight(params[f"{ex}.weight"])
        if p["expand_ep"].bias:
            args["ex_bias_ptr"] = _vec(params[f"{ex}.bias"])
        bn = _bn_vectors(b, fs.step.nodes[1 : fs.step.nodes.index(p["dw"].name)], params)
        if bn is not None:
            args["ex_scale_ptr"], args["ex_shift_ptr"] = bn
    if p["dw"] is not None:
        dw = p["dw"].name
        args["wd_ptr"] = _conv.pack_weight(fs.depthwise(), params[f"{dw}.weight"])
        if p["dw_ep"].bias:
            args["dw_bias_ptr"] = _vec(params[f"{dw}.bias"])
        end = fs.step.nodes.index(p["pw"].name) if p["pw"] is not None else len(fs.step.nodes)
        bn = _bn_vectors(b, fs.step.nodes[fs.step.nodes.index(dw) + 1 : end], params)
        if bn is not None:
            args["dw_scale_ptr"], args["dw_shift_ptr"] = bn
    if p["pw"] is not None:
        args["w_ptr"] = _gemm_weight(params[f"{p['pw'].name}.weight"])
    args["out_ptr"] = out
    if pooled_output(fs):
        if pool is None:
            raise SpecError(f"{fs.describe()} writes its gate's pool: pass pool=fused.pool_buffer(...)")
        args["pool_ptr"] = pool
    if fs.step.kind != "expand_dw":
        ep = epilogue_args(b, p["pw"], p["tail_nodes"], params, vals)
        args.update(_conv.epilogue_kernel_args(fs.out_spec, ep, x.device))
    args["UPCAST"] = _conv.upcast(x)
    return args


def gate_ep_args(
    fs: FusedSpec, params: Params, vals: dict[str, torch.Tensor], out: torch.Tensor, gate: torch.Tensor | None
) -> dict[str, Any]:
    """Arguments of a gate_ep step: the gate's input y, its gate [N, C] (gate_of, from y when None), out and the
    epilogue chain's tensors (the shortcut of an add)."""
    nd = fs.nodes[0]
    y = vals[nd.inputs[0]]
    p = fs.parts()
    args: dict[str, Any] = {
        "y_ptr": _conv.to_channels_last(y.detach()),
        "gate_ptr": gate if gate is not None else gate_of(fs, params, y),
        "out_ptr": out,
    }
    ep = epilogue_args(fs.block, nd, p["tail_nodes"], params, vals)
    args.update(_conv.epilogue_kernel_args(fs.out_spec, ep, y.device))
    args["UPCAST"] = _conv.upcast(y)
    return args


def _nhwc(name: str, t: torch.Tensor, write: bool = False) -> torch.Tensor:
    """[N, C, H, W] -> its [N, H, W, C] buffer: a view of a channels-last tensor (copied otherwise, unless the
    kernel writes it: SpecError)."""
    buf = t.permute(0, 2, 3, 1)
    if buf.is_contiguous():
        return buf
    if write:
        raise SpecError(f"{name} must be a contiguous channels-last tensor to be written in place")
    return buf.detach().contiguous()


def gnconv_args(fs: FusedSpec, params: Params, vals: dict[str, torch.Tensor], out: torch.Tensor) -> dict[str, Any]:
    """Arguments of a dw_gate / pw_gate step: the conv's source, its weight [and bias], the gate's partner tensor,
    out (the product's [N, H, W, C] buffer) and, for a dw_gate step with a second output, that node's tensor in
    vals (allocated channels-last by run_plan) as d_ptr."""
    g, b = fs.gate, fs.block
    conv = b.node(g.conv)
    x = vals[g.src]
    args: dict[str, Any] = {"x_ptr": _nhwc(g.src, x.detach())}
    if fs.step.kind == "dw_gate":
        args["wd_ptr"] = _conv.pack_weight(b.conv_spec(conv), params[f"{conv.name}.weight"])
    else:
        args["w_ptr"] = _gemm_weight(params[f"{conv.name}.weight"])
    if conv["bias"]:
        args["bias_ptr"] = _vec(params[f"{conv.name}.bias"])
    args.update(g_ptr=_nhwc(g.partner, vals[g.partner].detach()), out_ptr=out)
    if fs.step.kind == "dw_gate" and g.written is not None:
        args["d_ptr"] = _nhwc(g.value, vals[g.value], write=True)
    args["UPCAST"] = _conv.upcast(x)
    return args


def aspp_args(fs: FusedSpec, params: Params, vals: dict[str, torch.Tensor], out: torch.Tensor) -> dict[str, Any]:
    """Arguments of an aspp step: the shared input, out the [N, H, W, C] concat buffer, per conv branch its packed
    weight [K, taps, C] and [bias] [bn] vectors, per broadcast branch its [N, size] vector."""
    b = fs.block
    brs = fs.aspp_branches
    x = vals[b.node(next(br.head for br in brs if br.conv)).inputs[0]]
    args: dict[str, Any] = {"x_ptr": _conv.to_channels_last(x.detach()), "out_ptr": out}
    for i, br in enumerate(brs):
        nd = b.node(br.head)
        if not br.conv:
            args[f"p{i}_ptr"] = vals[nd.inputs[0]].detach().reshape(b.n, br.size).contiguous()
            continue
        args[f"w{i}_ptr"] = _conv.pack_weight(b.conv_spec(nd), params[f"{nd.name}.weight"])
        if nd["bias"]:
            args[f"b{i}_ptr"] = _vec(params[f"{nd.name}.bias"])
        bn = _bn_vectors(b, br.tail, params)
        if bn is not None:
            args[f"s{i}_ptr"], args[f"t{i}_ptr"] = bn
    args["UPCAST"] = _conv.upcast(x)
    return args


def _cl_strides(name: str, t: torch.Tensor, shape: tuple[int, ...]) -> tuple[int, int, int]:
    """(s_n, s_h, s_w) of a channels-last [N, C, H, W] view (channel stride 1), else SpecError."""
    if tuple(t.shape) != shape:
        raise SpecError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
    if t.stride(1) != 1 and shape[1] > 1:
        raise SpecError(f"{name} must be a channels-last view (channel stride 1), got strides {t.stride()}")
    return t.stride(0), t.stride(2), t.stride(3)


def inception_args(fs: FusedSpec, params: Params, x: torch.Tensor, out: torch.Tensor) -> dict[str, Any]:
    """Arguments of an inception step: x (the splits' source) and out (the concat) are [N, C, H, W] channels-last
    views, e.g. channel slices of larger tensors; neither is copied."""
    b = fs.block
    src = b.shapes[fs.nodes[0].inputs[0]]
    dst = b.shapes[fs.step.nodes[-1]]
    sx = _cl_strides("inception input", x, (b.n, src.c, *src.size))
    so = _cl_strides("inception output", out, (b.n, dst.c, *dst.size))
    args: dict[str, Any] = {"x_ptr": x.detach(), "out_ptr": out}
    for i, br in enumerate(fs.branches):
        if br.conv is None:
            continue
        spec = b.conv_spec(b.node(br.conv))
        args[f"w{i}_ptr"] = _conv.pack_weight(spec, params[f"{br.conv}.weight"])
        if b.node(br.conv)["bias"]:
            args[f"b{i}_ptr"] = _vec(params[f"{br.conv}.bias"])
        bn = next((n for n in br.tail if b.node(n).op == "bn"), None)
        if bn is not None:
            args[f"s{i}_ptr"], args[f"t{i}_ptr"] = _vec(params[f"{bn}.scale"]), _vec(params[f"{bn}.shift"])
    args.update(sx_n=sx[0], sx_h=sx[1], sx_w=sx[2], so_n=so[0], so_h=so[1], so_w=so[2])
    return args


def run_inception(
    fs: FusedSpec,
    params: Params,
    x: torch.Tensor,
    out: torch.Tensor | None = None,
    schedule: Schedule | dict | None = None,
) -> torch.Tensor:
    """One inception launch: x the splits' source and out the concat, [N, C, H, W] channels-last views (out
    allocated when None, e.g. a channel slice of a larger buffer to write into in place); returns out."""
    if fs.step.kind != "inception":
        raise SpecError(f"{fs.describe()} is not an inception step")
    if _conv.TORCH_DTYPES.get(x.dtype) != fs.dtype:
        raise SpecError(f"input dtype {x.dtype} does not match the block's {fs.dtype}")
    if out is None:
        dst = fs.block.shapes[fs.step.nodes[-1]]
        out = _conv.new_channels_last((fs.block.n, dst.c, *dst.size), x.dtype, x.device)
    elif out.dtype != x.dtype or out.device != x.device:
        raise SpecError(f"out must be {x.dtype} on {x.device}, got {out.dtype} on {out.device}")
    runtime.launch(render(fs, schedule), inception_args(fs, params, x, out), x.device)
    return out


def epilogue_args(
    block: Block, gemm: Node, tail: list[str], params: Params, vals: dict[str, torch.Tensor]
) -> _conv.EpilogueArgs:
    """Runtime tensors of the epilogue chain formed by a conv/GEMM node and the tail nodes after it."""
    bias = gemm.op == "conv" and gemm["bias"]  # a gate (gate_ep) has none
    ep = tail_epilogue(block, tail, bias)
    if ep is None:
        raise SpecError(f"nodes {tail} after {gemm.name} do not form an epilogue chain")
    args = _conv.EpilogueArgs(
        bias=params.get(f"{gemm.name}.bias") if bias else None,
        activation=ep.activation,
        residual_mode=ep.residual or "post",
    )
    prev = gemm.name
    for name in tail:
        nd = block.node(name)
        if nd.op == "bn":
            args.scale, args.shift = params[f"{name}.scale"], params[f"{name}.shift"]
        elif nd.op == "scale":
            args.layer_scale = params[f"{name}.gamma"]
        elif nd.op == "add":
            args.residual = vals[nd.inputs[1] if nd.inputs[0] == prev else nd.inputs[0]]
        prev = name
    return args


# ---- execution -----------------------------------------------------------------------------
def check_inputs(block: Block, params: Params, x: torch.Tensor) -> None:
    """SpecError unless x and params are what block describes."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"input must be a torch.Tensor, got {type(x).__name__}")
    want = (block.n, block.c, *block.in_size)
    if tuple(x.shape) != want:
        raise SpecError(f"block input must have shape {want}, got {tuple(x.shape)}")
    if _conv.TORCH_DTYPES.get(x.dtype) != block.dtype:
        raise SpecError(f"block input dtype {x.dtype} does not match the block's {block.dtype}")
    shapes = block.param_shapes()
    missing = sorted(set(shapes) - set(params))
    extra = sorted(set(params) - set(shapes))
    if missing or extra:
        raise SpecError(f"block parameters do not match: missing {missing}, unexpected {extra}")
    for k, shape in shapes.items():
        t = params[k]
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape:
            raise SpecError(
                f"parameter {k} must be a tensor of shape {shape}, got "
                f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}"
            )
        if t.device != x.device:
            raise SpecError(f"parameter {k} is on {t.device} but the input is on {x.device}")
        if k.endswith(".weight") and block.node(k.split(".")[0]).op == "conv" and t.dtype != x.dtype:
            raise SpecError(f"conv weight {k} dtype {t.dtype} does not match the input's {x.dtype}")


def _channels_last(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last)


def _is_cl_view(t: torch.Tensor) -> bool:
    """A 4-D view whose channels are contiguous (channels-last, or a channel slice of such a tensor)."""
    return t.dim() == 4 and (t.stride(1) == 1 or t.shape[1] == 1)


def run_plan(
    block: Block,
    params: Params,
    x: torch.Tensor,
    plan: Plan | None = None,
    schedules: dict[int, Schedule] | None = None,
    poison: bool = False,
) -> torch.Tensor:
    """The block's output [N, K, P, Q] (channels-last memory) under plan (the planner's best when None).

    schedules: step index -> Schedule for conv and fused steps (defaults otherwise). poison fills every
    buffer a kernel writes with NaN first (the correctness gate), the gate pools' partial sums included.
    An expand_dw / pw_pool step feeding an se / eca gate leaves its partial sums for the se_pw / gate_ep step
    that applies it; a dw_gate step also writes the depthwise value's channels that later steps read
    (plan.step_outputs)."""
    check_inputs(block, params, x)
    plan = plan or rank(block)[0].plan
    check(block, plan)
    schedules = schedules or {}
    vals: dict[str, torch.Tensor] = {INPUT: x if _is_cl_view(x) else _channels_last(x)}
    pools: dict[str, torch.Tensor] = {}  # node -> the per-image partial sums its expand_dw step wrote
    for i, step in enumerate(plan.steps):
        first = block.node(step.nodes[0])
        out_shape = block.shapes[step.nodes[-1]]
        full = (block.n, out_shape.c, *out_shape.size)
        if step.kind == "op" and first.op == "split":  # a view, as torch.split gives
            y = vals[first.inputs[0]][:, first["start"] : first["start"] + first["size"]]
        elif step.kind == "op":
            ins = [vals[n].float() for n in first.inputs]
            y = _channels_last(apply_node(first, ins, params).to(x.dtype))
        else:
            y = _conv.new_channels_last(full, x.dtype, x.device)
            if poison:
                y.fill_(float("nan"))
            buf = _conv.to_channels_last(y)
            if step.kind == "conv":
                spec = block.conv_spec(first)
                ep = epilogue_args(block, first, list(step.nodes[1:]), params, vals)
                _conv.conv_forward(
                    vals[first.inputs[0]],
                    params[f"{first.name}.weight"],
                    2,
                    stride=spec.stride,
                    padding=spec.padding,
                    dilation=spec.dilation,
                    groups=spec.groups,
                    ep=ep,
                    schedule=schedules.get(i),
                    out=buf,
                )
            else:
                fs = fused_spec(block, step)
                v = render(fs, schedules.get(i))
                for name in step_outputs(block, step)[:-1]:  # a dw_gate's depthwise value, read by later steps
                    shape = block.shapes[name]
                    vals[name] = _conv.new_channels_last((block.n, shape.c, *shape.size), x.dtype, x.device)
                    if poison:
                        vals[name].fill_(float("nan"))
                pool = gate = None
                if pooled_output(fs):
                    pool = pool_buffer(fs, v.schedule, x.device)
                    if poison:
                        pool.fill_(float("nan"))
                elif step.kind in GATED:
                    src = first.inputs[0]
                    gate = gate_of(fs, params, vals[src], pools.get(src))
                runtime.launch(v, fused_args(fs, params, vals, buf, pool, gate), x.device)
                if pool is not None:
                    pools[step.nodes[-1]] = pool
        vals[step.nodes[-1]] = y
    return vals[block.nodes[-1].name]


def variants(
    block: Block, plan: Plan, schedules: dict[int, Schedule] | None = None
) -> list[generator.Variant[BlockSpec] | generator.Variant[FusedSpec]]:
    """The variant each kernel step of plan launches ('op' steps launch none)."""
    schedules = schedules or {}
    out: list[generator.Variant[BlockSpec] | generator.Variant[FusedSpec]] = []
    for i, step in enumerate(plan.steps):
        if step.kind == "conv":
            nd = block.node(step.nodes[0])
            ep = tail_epilogue(block, list(step.nodes[1:]), nd["bias"])
            out.append(generator.render(block.conv_spec(nd, epilogue=ep), schedules.get(i)))
        elif step.kind in FUSED:
            out.append(render(FusedSpec(block, step), schedules.get(i)))
    return out


def random_params(
    block: Block, device: torch.device | str = "cpu", generator_: torch.Generator | None = None
) -> Params:
    """Fresh parameters of a block: conv weights ~ N(0, 1/fan_in) in the block dtype, BN scale in [0.5, 1.5],
    everything else ~ N(0, 1) (fp32), so every term of every node matters in tests and the tuner's gate."""
    dt = _conv.SPEC_DTYPES[block.dtype]
    out: Params = {}
    for key, shape in block.param_shapes().items():
        name, p = key.split(".")
        nd = block.node(name)
        if nd.op == "conv" and p == "weight":
            fan = shape[1] * shape[2] * shape[3]
            out[key] = (torch.randn(shape, generator=generator_, device=device) * fan**-0.5).to(dt)
        elif nd.op == "conv":
            out[key] = torch.randn(shape, generator=generator_, device=device).to(dt) * 0.5
        elif p == "scale" and nd.op == "bn":
            out[key] = torch.rand(shape, generator=generator_, device=device) + 0.5
        elif nd.op == "se" and p in ("w1", "w2"):
            out[key] = torch.randn(shape, generator=generator_, device=device) * shape[1] ** -0.5
        elif nd.op == "ln" and p == "weight":
            out[key] = torch.rand(shape, generator=generator_, device=device) + 0.5
        else:
            out[key] = torch.randn(shape, generator=generator_, device=device) * 0.5
    return out


# ---- compile-validity for sm_90 (no GPU) ---------------------------------------------------------
def meta_args(fs: FusedSpec) -> dict[str, Any]:
    """Kernel arguments on the meta device (types matter to the compiler, not shapes)."""
    block = fs.block
    dt = _conv.SPEC_DTYPES[block.dtype]
    meta = torch.device("meta")
    params = {
        k: torch.empty(
            s,
            dtype=dt if k.endswith(".weight") and block.node(k.split(".")[0]).op == "conv" else torch.float32,
            device=meta,
        )
        for k, s in block.param_shapes().items()
    }
    vals = {
        n: torch.empty((block.n, s.c, *s.size), dtype=dt, device=meta, memory_format=torch.channels_last)
        for n, s in block.shapes.items()
    }
    if fs.step.kind == "inception":
        s = block.shapes[fs.step.nodes[-1]]
        return fused_args(fs, params, vals, torch.empty((block.n, *s.size, s.c), dtype=dt, device=meta))
    out = torch.empty((1,), dtype=dt, device=meta)
    vec = torch.empty((1,), dtype=torch.float32, device=meta)
    args = fused_args(fs, params, vals, out, vec if pooled_output(fs) else None, vec)
    args["UPCAST"] = False
    return args


def _compile_line(d: dict[str, Any], arch: int) -> dict[str, Any]:
    from . import validate

    block = Block.from_dict(d["block"])
    plan = Plan.from_dict(block, d["plan"])
    fs = FusedSpec(block, plan.steps[d["step"]])
    v = render(fs, Schedule.from_dict(d["schedule"]))
    try:
        k = runtime.aot_compile(v, meta_args(fs), arch=arch)
        return {"id": v.id, "ok": True, "shared": int(k.metadata.shared), "error": None, **validate.resources(k)}
    except Exception as e:  # the compiler's own message is the useful part
        return {"id": v.id, "ok": False, "shared": None, "error": f"{type(e).__name__}: {str(e)[-800:]}"}


def compile_check(
    items: Iterable[tuple[Block, Plan, int, Schedule | None]], arch: int = 90, timeout: float = 900.0
) -> list[dict[str, Any]]:
    """Compile fused steps (block, plan, step index, schedule) for sm_<arch> in a child process with
    TRITON_INTERPRET=0; per item {"id", "ok", "shared", "error", "regs", "spill_bytes", "mma", ...}."""
    lines = []
    for block, plan, i, s in items:
        fs = FusedSpec(block, plan.steps[i])
        lines.append(
            json.dumps(
                {"block": block.to_dict(), "plan": plan.to_dict(), "step": i, "schedule": resolve(fs, s).to_dict()}
            )
        )
    env = dict(
        os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION=os.environ.get("TRITON_DEFAULT_FP_FUSION", "1")
    )
    p = subprocess.run(
        [sys.executable, "-m", "tunerd.kernels.fused", "--arch", str(arch)],
        input="\n".join(lines),
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        check=False,
    )
    if p.returncode != 0:
        raise RuntimeError(f"fused compile checker failed (exit {p.returncode}):\n{p.stderr[-4000:]}")
    got = [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")]
    if len(got) != len(lines):
        raise RuntimeError(f"fused compile checker returned {len(got)} results for {len(lines)} kernels")
    return got


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", type=int, default=90)
    ns = ap.parse_args(argv)
    for line in sys.stdin:
        if line.strip():
            print(json.dumps(_compile_line(json.loads(line), ns.arch)), flush=True)
    return 0


if __name__ == "__main__":
    from tunerd.kernels.fused import main as _main

    sys.exit(_main())
