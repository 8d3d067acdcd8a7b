"""Generator: (BlockSpec, Schedule) -> Variant, i.e. Triton source text plus its launch metadata.

Same spec + schedule -> byte-identical source -> the same content hash (the variant id).
Each (kind, op) has one Template: a Jinja2 file, a context builder and a grid function.
Conv templates take the batch size as the launch argument `n` (Template.batch_arg): they render from the spec
with n = 1 and its BatchRange (int32 or int64 offsets), so every batch size of a layer shares one source, one
id and one compiled kernel; the grid stays per spec.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import cached_property, lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import jinja2

from . import epilogue as _ep
from . import schedule as _sched
from . import space_to_depth
from .schedule import Schedule
from .spec import BlockSpec, SpecError, canonical_json

if TYPE_CHECKING:
    from .fused import FusedSpec

GENERATOR_VERSION = "0.4.0"
INT32_LIMIT = 2**31 - 1
# The batch size as a launch argument of the templates that take it (Template.batch_arg): one source, and so one
# compile, serves every n of a BatchRange.
BATCH_ARG = "n"
_BATCH_LINE = re.compile(r"^# batch: +(\d+) <= n(?: <= (\d+))? \((int32|int64) offsets", re.MULTILINE)


@dataclass(frozen=True)
class BatchRange:
    """The batch sizes lo <= n <= hi (hi None: no bound) that one rendering serves: int32 offsets while every
    tensor's element offsets fit, int64 beyond."""

    lo: int
    hi: int | None
    i64: bool

    def __contains__(self, n: object) -> bool:
        return isinstance(n, int) and self.lo <= n and (self.hi is None or n <= self.hi)

    def describe(self) -> str:
        bound = f" <= {self.hi}" if self.hi is not None else ""
        return f"{self.lo} <= n{bound} ({'int64' if self.i64 else 'int32'} offsets; n is a launch argument)"


def batch_range(spec: BlockSpec) -> BatchRange:
    """The batch range whose rendering serves spec.n: n <= INT32_LIMIT // (the largest tensor's elements per
    image) with int32 offsets, the int64 form above that (its derived sizes are computed in int64 too)."""
    per_image = spec.spanned_per_image  # a channel-slice view spans its wider buffer
    cap = INT32_LIMIT // per_image
    return BatchRange(1, cap, False) if spec.n <= cap else BatchRange(cap + 1, None, True)


SpecT = TypeVar("SpecT", bound="BlockSpec | FusedSpec")


@dataclass(frozen=True)
class Variant(Generic[SpecT]):
    """One generated kernel: spec + schedule + the exact source and how to launch it."""

    spec: SpecT  # a single conv's BlockSpec, or kernels.fused.FusedSpec
    schedule: Schedule
    source: str
    kernel_name: str
    grid: tuple[int, ...]

    @cached_property
    def id(self) -> str:
        return source_id(self.source)

    @cached_property
    def batch(self) -> BatchRange | None:
        """The batch sizes this source serves, as its header states them (None: n is compiled in)."""
        m = _BATCH_LINE.search(self.source, 0, 2000)
        if m is None:
            return None
        return BatchRange(int(m.group(1)), int(m.group(2)) if m.group(2) else None, m.group(3) == "int64")

    @property
    def num_warps(self) -> int:
        return self.schedule.num_warps

    @property
    def num_stages(self) -> int:
        return self.schedule.num_stages


@dataclass(frozen=True)
class Template:
    """A (kind, op)'s Jinja2 file, context builder and grid. batch_arg: the kernel takes the batch size as its
    launch argument `n`; its context is built from the spec with n = 1 (batch_free) and must not use n, and
    it gets the BatchRange as v.batch (v.i64 its offset width). Otherwise the context sees the real spec."""

    file: str
    context: Callable[[BlockSpec, Schedule], dict[str, Any]]
    grid: Callable[[BlockSpec, Schedule], tuple[int, ...]]
    batch_arg: bool = False


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _prod(xs) -> int:
    out = 1
    for v in xs:
        out *= v
    return out


class Context(dict):
    """Template context with attribute access (v.BM rather than v['BM'])."""

    __getattr__ = dict.__getitem__


def geometry(spec: BlockSpec, s: Schedule) -> dict[str, Any]:
    """Shape constants every template shares: NHWC strides and window geometry. XP, YP, RP, DYP: pixel strides of
    x, the output, the residual and dy (C, K, K, K unless a tensor is a channel slice: BlockSpec.x_pixel_stride ...)."""
    nd = spec.ndim
    sx = [spec.x_pix * _prod(spec.in_size[d + 1 :]) for d in range(nd)]
    largest = max(spec.n * spec.c * _prod(spec.in_size), spec.out_pixels * spec.k, spec.spanned_elements)
    return dict(
        ndim=nd,
        dims=list(range(nd)),
        N=spec.n,
        C=spec.c,
        K=spec.k,
        CG=spec.cg,
        KG=spec.kg,
        G=spec.groups,
        IN=list(spec.in_size),
        OUT=list(spec.out_size),
        KS=list(spec.kernel),
        ST=list(spec.stride),
        PAD=[p[0] for p in spec.padding],
        DIL=list(spec.dilation),
        TAPS=spec.taps,
        M=spec.out_pixels,
        SX=sx,
        SXN=spec.x_pix * _prod(spec.in_size),
        XP=spec.x_pix,
        YP=spec.out_pix,
        RP=spec.res_pix,
        DYP=spec.dy_pix,
        views=spec.pixel_strides,
        padded=spec.has_padding,
        i64=largest > INT32_LIMIT,
        STREAMK=s.stream_k,  # stream-K programs (conv fwd), 0: off
        BM=s.block_m,
        BN=s.block_n,
        BK=s.block_k,
        GROUP_M=s.group_m,
        ep=spec.epilogue,
        BF16=spec.dtype == "bfloat16",
        ep_args=_ep.arg_names(spec.epilogue),
        act=activation(spec.epilogue.activation),
    )


def activation(name: str | None, grad: bool = False) -> Callable[[str], str]:
    """A template's act(var) (grad: act_grad(var)): activation `name` (or its derivative) as a Triton expression
    on var. Templates call it only under an epilogue that has an activation."""

    def expr(var: str) -> str:
        if name is None:
            raise SpecError("a template applied an activation its epilogue does not have")
        return (_ep.activation_grad_expr if grad else _ep.activation_expr)(name, var)

    return expr


AXES = {1: ("L",), 2: ("H", "W"), 3: ("D", "H", "W")}  # spatial axis letters in constant names
# (tensor, constant name, its dense stride's name) of the pixel strides of channel-slice views
_PIXEL_NAMES = (("x", "X_PIX", "C"), ("out", "OUT_PIX", "K"), ("res", "RES_PIX", "K"), ("dy", "DY_PIX", "K"))


def named(g: dict[str, Any], spec: BlockSpec, extra: Sequence[tuple[str, Any, Any]] = ()) -> dict[str, Any]:
    """Named compile-time shape constants for a geometry context g (see geometry).

    Adds `consts`, [(name, value, literal)] that _common.constants renders at the top of the kernel as
    `NAME: tl.constexpr = value` (value may be an expression of earlier names; literal is what it equals), and
    `sym`, g with its shape keys replaced by those names: templates write `{{ sh.OUT[d] }}` and get `H_OUT`
    (with sh = v.sym) or 56 (with sh = v). `extra` appends template-specific (name, value, literal) rows.
    The names are constexpr, so the compiled code is the same as with literals. The batch size is the launch
    argument n (sh.N): rows with literal None (M = n * H_OUT * W_OUT and what derives from it) are computed
    per launch, after the constexpr rows.
    """
    ax = AXES[spec.ndim]
    dims = range(spec.ndim)
    consts: list[tuple[str, Any, Any]] = [
        ("C", g["C"], g["C"]),
        ("K", g["K"], g["K"]),
        ("GROUPS", g["G"], g["G"]),
        ("CG", "C // GROUPS", g["CG"]),
        ("KG", "K // GROUPS", g["KG"]),
    ]
    for key, fmt in (("IN", "{}_IN"), ("OUT", "{}_OUT"), ("KS", "K{}"), ("ST", "STRIDE_{}"), ("PAD", "PAD_{}")):
        consts += [(fmt.format(ax[d]), g[key][d], g[key][d]) for d in dims]
    consts += [(f"DIL_{ax[d]}", g["DIL"][d], g["DIL"][d]) for d in dims]
    # pixel strides of channel-slice views (spec.x_pixel_stride ...): named only when set, so dense renders keep
    # C and K
    views = g.get("views", {})
    pix = {t: name if views.get(t) else dense for t, name, dense in _PIXEL_NAMES}
    consts += [(name, views[t], views[t]) for t, name, _ in _PIXEL_NAMES if views.get(t)]
    consts += [
        ("TAPS", " * ".join(f"K{a}" for a in ax), g["TAPS"]),
        ("M", " * ".join([BATCH_ARG] + [f"{a}_OUT" for a in ax]), None),
        ("SX_N", " * ".join([f"{a}_IN" for a in ax] + [pix["x"]]), g["SXN"]),
    ]
    consts += [(f"SX_{ax[d]}", " * ".join([f"{a}_IN" for a in ax[d + 1 :]] + [pix["x"]]), g["SX"][d]) for d in dims]
    consts += [("BLOCK_M", g["BM"], g["BM"]), ("BLOCK_N", g["BN"], g["BN"]), ("BLOCK_K", g["BK"], g["BK"])]
    consts += [("GROUP_M", g["GROUP_M"], g["GROUP_M"])]
    consts += list(extra)
    consts = [r for r in consts if r[2] is not None] + [r for r in consts if r[2] is None]
    sym = Context(g)
    sym.update(
        N=BATCH_ARG,
        C="C",
        K="K",
        CG="CG",
        KG="KG",
        IN=[f"{a}_IN" for a in ax],
        OUT=[f"{a}_OUT" for a in ax],
        KS=[f"K{a}" for a in ax],
        ST=[f"STRIDE_{a}" for a in ax],
        PAD=[f"PAD_{a}" for a in ax],
        DIL=[f"DIL_{a}" for a in ax],
        TAPS="TAPS",
        M="M",
        SXN="SX_N",
        SX=[f"SX_{a}" for a in ax],
        XP=pix["x"],
        YP=pix["out"],
        RP=pix["res"],
        DYP=pix["dy"],
        BM="BLOCK_M",
        BN="BLOCK_N",
        BK="BLOCK_K",
        GROUP_M="GROUP_M",
        # products of names: output pixel strides, pixels per image, tap strides of the packed weight
        SO=[" * ".join(f"{a}_OUT" for a in ax[d + 1 :]) or "1" for d in dims],
        OPIX=" * ".join(f"{a}_OUT" for a in ax),
        TS=[" * ".join(f"K{a}" for a in ax[d + 1 :]) or "1" for d in dims],
    )
    sym.update({name: name for name, _, _ in extra})
    return dict(consts=consts, sym=sym)


def _grad_geometry(spec: BlockSpec, s: Schedule) -> dict[str, Any]:
    """Shared context of backward templates: geometry plus the plan of the chain's gradient."""
    g = geometry(spec, s)
    ep = spec.epilogue
    plan = _ep.grad_plan(ep, spec.op)
    g.update(
        gep=ep,
        plan=plan,
        # dy a channel slice: z and the residual (dense) are addressed apart from it (grad_tile's zoffs)
        z_apart=spec.dy_pixel_stride is not None and (plan.load_z or "res_ptr" in plan.params),
        SPLIT=s.split_k,
        act_grad=activation(ep.activation, grad=True),
        SO=[_prod(spec.out_size[d + 1 :]) for d in range(spec.ndim)],
        OPIX=_prod(spec.out_size),
        TS=[_prod(spec.kernel[d + 1 :]) for d in range(spec.ndim)],
        dot_kw=f', input_precision="{spec.precision}"' if spec.dtype == "float32" else "",
    )
    return g


def _select(var: str, values: list[int]) -> str:
    """Triton expression picking values[var] for a small runtime index (a literal when all agree)."""
    if all(v == values[0] for v in values):
        return str(values[0])
    expr = str(values[-1])
    for i in range(len(values) - 2, -1, -1):
        expr = f"tl.where({var} == {i}, {values[i]}, {expr})"
    return expr


def _phases(spec: BlockSpec) -> dict[str, Any]:
    """Stride-phase decomposition of dgrad, per spatial dim.

    Input coordinate i receives dz[o] * w[t] only where i + pad = o * stride + t * dilation. Split the
    input by phase ph = (i + pad) % stride: the phase's pixels are i = i0 + j * stride (j < cnt), and
    exactly the taps t = t0 + a * step (a < nt, step = stride / gcd(stride, dilation)) reach them,
    from o = q + j - a * stepo (stepo = dilation / gcd). Every multiply hits a real dz element.
    """
    nd = spec.ndim
    tab: dict[str, list] = {k: [] for k in ("I0", "CNT", "CNTS", "T0", "NT", "Q")}
    step, stepo, ntmax = [], [], []
    for d in range(nd):
        st, dl, p, ks, n_in = spec.stride[d], spec.dilation[d], spec.padding[d][0], spec.kernel[d], spec.in_size[d]
        gcd = math.gcd(st, dl)
        step.append(st // gcd)
        stepo.append(dl // gcd)
        rows = []
        for ph in range(st):
            i0 = (ph - p) % st
            cnt = max(0, _cdiv(n_in - i0, st))
            taps = [t for t in range(ks) if (t * dl) % st == ph]
            t0 = taps[0] if taps else 0
            q = (i0 + p - t0 * dl) // st if taps else 0
            rows.append((i0, cnt, max(cnt, 1), t0, len(taps), q))  # CNTS: a safe divisor
        for key, col in zip(("I0", "CNT", "CNTS", "T0", "NT", "Q"), zip(*rows)):
            tab[key].append(_select(f"ph{d}", list(col)))
        ntmax.append(max(r[4] for r in rows))
    # a phase tap (a_0, a_1, ...) as one bit index: sum a_d * BITS[d], BITS[d] = prod NTMAX[d + 1:]
    bits = [_prod(ntmax[d + 1 :]) for d in range(nd)]
    return dict(PH=spec.phases, STEP=step, STEPO=stepo, MMAX=spec.phase_pixels, NTMAX=ntmax, BITS=bits, **tab)


def a_load_kw(s: Schedule) -> str:
    """Extra tl.load arguments of an implicit GEMM's A operand: L1-allocating under l1_load (cp.async.ca)."""
    return ', cache_modifier=".ca"' if s.l1_load else ""


def _conv_fwd_context(spec: BlockSpec, s: Schedule) -> dict[str, Any]:
    g = geometry(spec, s)
    pointwise = spec.taps == 1 and all(v == 1 for v in spec.stride) and not spec.has_padding
    dot_kw = f', input_precision="{spec.precision}"' if spec.dtype == "float32" else ""
    g.update(
        NPID_N=_cdiv(spec.kg, s.block_n),
        NCB=_cdiv(spec.cg, s.block_k),
        KTOT=spec.cg * spec.taps,
        k_order=s.k_order,
        pointwise=pointwise,
        dot_kw=dot_kw,
        # tap order: per-row tap validity as bits of one word (more taps: per-step index math)
        tap_bits=32 if spec.taps <= 32 else 64 if spec.taps <= 64 else 0,
        hoisted=s.k_order == "tap" and not pointwise and (spec.taps <= 64 or not spec.has_padding),
        k_full=spec.cg % s.block_k == 0,  # no partial channel block: no channel mask
        n_full=spec.kg % s.block_n == 0,
        a_load=a_load_kw(s),
        tma=s.tma and pointwise,  # 2-D descriptors
        SPLIT=s.split_k,
        ranged=s.split_k > 1 or s.stream_k > 0,  # the reduction runs steps lo..hi
    )
    # tma, k x k: a tile is a box of output pixels of one image (schedule.tma_box), boxes counted per image
    box = _sched.tma_box(spec, s.block_m) if s.tma and not pointwise else None
    ax = AXES[spec.ndim]
    g.update(tma_box=box, BOX=[f"BOX_{a}" for a in ax], BOXES_D=[f"BOXES_{a}" for a in ax])
    extra: list[tuple[str, Any, Any]] = [
        ("NPID_M", f"{BATCH_ARG} * BOXES" if box else "(M + BLOCK_M - 1) // BLOCK_M", None),
        ("NPID_N", "(KG + BLOCK_N - 1) // BLOCK_N", g["NPID_N"]),
        ("NCB", "(CG + BLOCK_K - 1) // BLOCK_K", g["NCB"]),
        ("KTOT", "CG * TAPS", g["KTOT"]),
    ]
    if box:
        counts = [_cdiv(o, b) for o, b in zip(spec.out_size, box)]
        extra += [(f"BOX_{a}", b, b) for a, b in zip(ax, box)]
        extra += [(f"BOXES_{a}", f"({a}_OUT + BOX_{a} - 1) // BOX_{a}", c) for a, c in zip(ax, counts)]
        extra.append(("BOXES", " * ".join(f"BOXES_{a}" for a in ax), _prod(counts)))
    steps = ("(KTOT + BLOCK_K - 1) // BLOCK_K", _cdiv(g["KTOT"], s.block_k))
    if s.k_order != "flat":
        steps = ("TAPS * NCB", spec.taps * g["NCB"])
    if s.split_k > 1:
        extra += [("SPLIT", s.split_k, s.split_k), ("STEPS", *steps)]
        extra.append(("CHUNK", "(STEPS + SPLIT - 1) // SPLIT", _cdiv(steps[1], s.split_k)))
    elif s.stream_k:
        extra += [("STREAMK", s.stream_k, s.stream_k), ("STEPS", *steps)]
    g.update(named(g, spec, extra))
    return g


def _conv_fwd_grid(spec: BlockSpec, s: Schedule) -> tuple[int, ...]:
    """(output tiles (schedule.gemm_tiles), groups x split_k); stream-K: (its programs, 1)."""
    if s.stream_k:
        return (s.stream_k, 1)
    return (_sched.gemm_tiles(spec, s), spec.groups * s.split_k)


def _depthwise_fwd_context(spec: BlockSpec, s: Schedule) -> dict[str, Any]:
    """Register blocking along the last dim: a group is R = block_k consecutive outputs of one row. Output r
    takes tap t from input column r * stride + t * dilation of the group's window, so a kernel row loads each
    distinct column once (COLS: column -> its (r, t) uses, in column order); weight t is loaded at its first
    use, column t * dilation. BW_MAX: the last group's first window column (columns past the row need masks)."""
    g = geometry(spec, s)
    last = spec.ndim - 1
    r_out, kw, st, dl = s.block_k, spec.kernel[last], spec.stride[last], spec.dilation[last]
    uses: dict[int, list[tuple[int, int]]] = {}
    for r in range(r_out):
        for t in range(kw):
            uses.setdefault(r * st + t * dl, []).append((r, t))
    gw = _cdiv(spec.out_size[last], r_out)
    g.update(
        MULT=spec.k // spec.c,
        R=r_out,
        G=s.block_m // r_out,
        GW=gw,
        NG=f"{BATCH_ARG} * {_prod(spec.out_size[:last]) * gw}",  # groups of the batch
        KW=kw,
        COLS=sorted(uses.items()),
        WNEW={j: [t for t in range(kw) if t * dl == j] for j in uses},
        BW_MAX=(gw - 1) * r_out * st - spec.padding[last][0],
        N_MASK=spec.k % s.block_n != 0,
    )
    return g


def _depthwise_fwd_grid(spec: BlockSpec, s: Schedule) -> tuple[int, ...]:
    last = spec.ndim - 1
    groups = spec.n * _prod(spec.out_size[:last]) * _cdiv(spec.out_size[last], s.block_k)
    return (_cdiv(groups, s.block_m // s.block_k), _cdiv(spec.k, s.block_n))


def _conv_dgrad_context(spec: BlockSpec, s: Schedule) -> dict[str, Any]:
    g = _grad_geometry(spec, s)
    g.update(_phases(spec))
    g.update(
        NPID_N=_cdiv(spec.cg, s.block_n),
        NKB=_cdiv(spec.kg, s.block_k),
        k_order=s.k_order,
        k_full=spec.kg % s.block_k == 0,  # no partial output-channel block: no channel mask
        c_full=spec.cg % s.block_n == 0,
        a_load=a_load_kw(s),
        ranged=s.split_k > 1 or s.stream_k > 0,  # the reduction runs steps lo..hi
    )
    ntaps = _prod(g["NTMAX"])  # per-row tap validity as bits of one word (more taps: per-step index math)
    g.update(tap_bits=32 if ntaps <= 32 else 64 if ntaps <= 64 else 0)
    extra = [
        ("PH_PIX", g["MMAX"], g["MMAX"]),  # the largest phase's pixels per image
        ("NPID_N", "(CG + BLOCK_N - 1) // BLOCK_N", g["NPID_N"]),
        ("NKB", "(KG + BLOCK_K - 1) // BLOCK_K", g["NKB"]),
        ("NPID_M", f"({BATCH_ARG} * PH_PIX + BLOCK_M - 1) // BLOCK_M", None),
    ]
    if s.split_k > 1:
        extra.append(("SPLIT", s.split_k, s.split_k))
    elif s.stream_k:  # the walk's steps per tile: the largest phase's
        ntmax = _prod(g["NTMAX"])
        steps = ("TAPS_MAX * NKB", ntmax * g["NKB"])
        if s.k_order == "flat":
            steps = ("(TAPS_MAX * KG + BLOCK_K - 1) // BLOCK_K", _cdiv(ntmax * spec.kg, s.block_k))
        extra += [("PHASES", spec.phases, spec.phases), ("TAPS_MAX", ntmax, ntmax)]
        extra += [("STREAMK", s.stream_k, s.stream_k), ("STEPS", *steps)]
    g.update(named(g, spec, extra))
    return g


def _conv_dgrad_grid(spec: BlockSpec, s: Schedule) -> tuple[int, ...]:
    """(tiles of the largest phase (schedule.gemm_tiles), groups x split_k, phases); stream-K: (its programs, 1, 1)."""
    if s.stream_k:
        return (s.stream_k, 1, 1)
    return (_sched.gemm_tiles(spec, s), spec.groups * s.split_k, spec.phases)


def _wgrad_cols(spec: BlockSpec, s: Schedule) -> int:
    """Column tiles of the wgrad GEMM: taps ('tap') or kernel rows ('row') x channel blocks, or the flattened
    (tap, c) axis."""
    if s.k_order == "tap":
        return spec.taps * _cdiv(spec.cg, s.block_n)
    if s.k_order == "row":
        return spec.taps // spec.kernel[-1] * _cdiv(spec.cg, s.block_n)
    return _cdiv(spec.taps * spec.cg, s.block_n)


# wgrad_pixel_tile plans for this batch, with at most this many images per tile (n is a launch argument, so the
# tile cannot depend on it: small batches waste at most the tile's other images)
WGRAD_TILE_BATCH, WGRAD_TILE_IMAGES = 32, 2


def wgrad_pixel_tile(spec: BlockSpec, block_k: int) -> tuple[int, ...]:
    """The wgrad reduction step's pixel tile (images, *output dims), powers of two with product block_k and at
    most WGRAD_TILE_IMAGES images: the one that pads the pixel space of WGRAD_TILE_BATCH images least (ResNet's
    56 = 7 x 8: no padding), then the widest rows. Independent of n: one source serves every batch."""
    extents = (WGRAD_TILE_BATCH, *spec.out_size)
    best: tuple[tuple[int, tuple[int, ...]], tuple[int, ...]] | None = None  # ((padded pixels, -widths), tile)
    for t in itertools.product(*[[1 << e for e in range(block_k.bit_length())]] * len(extents)):
        if _prod(t) != block_k or t[0] > WGRAD_TILE_IMAGES:
            continue
        key = (_prod([_cdiv(e, b) * b for e, b in zip(extents, t)]), tuple(-b for b in reversed(t)))
        if best is None or key < best[0]:
            best = (key, t)
    assert best is not None
    return best[1]


def _conv_wgrad_context(spec: BlockSpec, s: Schedule) -> dict[str, Any]:
    g = _grad_geometry(spec, s)
    tile = wgrad_pixel_tile(spec, s.block_k)
    counts = [_cdiv(e, b) for e, b in zip(spec.out_size, tile[1:])]  # tiles along each output dim
    g.update(
        NPID_M=_cdiv(spec.kg, s.block_m),
        NPID_N=_wgrad_cols(spec, s),
        NCB=_cdiv(spec.cg, s.block_n),
        k_order=s.k_order,
        RT=spec.kernel[-1] if s.k_order == "row" else 1,  # taps per program
        RED_ROWS=max(1, min(s.block_m, 256 * s.num_warps // s.block_n)),  # split-K sum: 8 fp32 per thread
        KTOT=spec.taps * spec.cg,
        # the pixel tile (TILE: images, *dims); exact axes need no pixel mask (images: one per tile)
        TILE=list(tile),
        EXACT=[tile[0] == 1] + [e % b == 0 for e, b in zip(spec.out_size, tile[1:])],
    )
    ax = ("N", *AXES[spec.ndim])
    extents = (BATCH_ARG, *[f"{a}_OUT" for a in ax[1:]])
    extra = [
        ("NPID_M", "(KG + BLOCK_M - 1) // BLOCK_M", g["NPID_M"]),
        ("NPID_N", g["NPID_N"], g["NPID_N"]),
        ("NCB", "(CG + BLOCK_N - 1) // BLOCK_N", g["NCB"]),
        ("KTOT", "TAPS * CG", g["KTOT"]),
        ("SPLIT", g["SPLIT"], g["SPLIT"]),
        ("RED_ROWS", g["RED_ROWS"], g["RED_ROWS"]),
        *[(f"TILE_{a}", b, b) for a, b in zip(ax, tile)],
        *[(f"TILES_{a}", f"({e} + TILE_{a} - 1) // TILE_{a}", c) for a, e, c in zip(ax[1:], extents[1:], counts)],
        ("TILES_N", f"({BATCH_ARG} + TILE_N - 1) // TILE_N", None),
        ("STEPS", " * ".join(f"TILES_{a}" for a in ax), None),
        ("CHUNK", "(STEPS + SPLIT - 1) // SPLIT", None),
    ]
    if tile[0] > 1:  # the steps of whole image tiles (no image mask)
        extra.append(("FULL_STEPS", " * ".join([f"({BATCH_ARG} // TILE_N)", *[f"TILES_{a}" for a in ax[1:]]]), None))
    g.update(PT=[f"TILE_{a}" for a in ax], PTS=[f"TILES_{a}" for a in ax])
    g.update(named(g, spec, extra))
    return g


def _conv_wgrad_grid(spec: BlockSpec, s: Schedule) -> tuple[int, ...]:
    return (_cdiv(spec.kg, s.block_m) * _wgrad_cols(spec, s), spec.groups, s.split_k)


def _depthwise_dgrad_context(spec: BlockSpec, s: Schedule) -> dict[str, Any]:
    g = _grad_geometry(spec, s)
    g.update(_phases(spec))
    g.update(MULT=spec.k // spec.c, N=BATCH_ARG)
    return g


def _depthwise_dgrad_grid(spec: BlockSpec, s: Schedule) -> tuple[int, ...]:
    return (_cdiv(spec.phase_pixels, s.block_m), _cdiv(spec.c, s.block_n), spec.phases)


def _depthwise_wgrad_context(spec: BlockSpec, s: Schedule) -> dict[str, Any]:
    g = _grad_geometry(spec, s)
    g.update(MULT=spec.k // spec.c, BT=s.block_k)
    return g


def _depthwise_wgrad_grid(spec: BlockSpec, s: Schedule) -> tuple[int, ...]:
    return (s.split_k, _cdiv(spec.k, s.block_n), _cdiv(spec.taps, s.block_k))


TEMPLATES: dict[tuple[str, str], Template] = {
    ("conv", "fwd"): Template("conv_fwd.py.j2", _conv_fwd_context, _conv_fwd_grid, True),
    ("depthwise", "fwd"): Template("depthwise_fwd.py.j2", _depthwise_fwd_context, _depthwise_fwd_grid, True),
    ("conv", "dgrad"): Template("conv_dgrad.py.j2", _conv_dgrad_context, _conv_dgrad_grid, True),
    ("conv", "wgrad"): Template("conv_wgrad.py.j2", _conv_wgrad_context, _conv_wgrad_grid, True),
    ("depthwise", "dgrad"): Template("depthwise_dgrad.py.j2", _depthwise_dgrad_context, _depthwise_dgrad_grid, True),
    ("depthwise", "wgrad"): Template("depthwise_wgrad.py.j2", _depthwise_wgrad_context, _depthwise_wgrad_grid, True),
}


def register(kind: str, op: str, template: Template) -> None:
    """Add or replace a (kind, op) template (e.g. a new family from outside this module)."""
    TEMPLATES[(kind, op)] = template
    clear_render_cache()


def clear_render_cache() -> None:
    """Forget rendered variants and sources (after a template, limit or version setting changed)."""
    _render.cache_clear()
    _source.cache_clear()


@lru_cache(maxsize=1)
def environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(Path(__file__).parent / "templates")),
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        undefined=jinja2.StrictUndefined,
        autoescape=False,
    )
    env.filters["rstrip"] = str.rstrip  # a macro's output ends without a newline: its call site's line ends it
    return env


def kernel_name(spec: BlockSpec) -> str:
    return f"tunerd_{spec.kind}{spec.ndim}d_{spec.op}"


def source_id(source: str) -> str:
    """A variant's id: the content hash of its exact source."""
    return hashlib.sha256(source.encode()).hexdigest()[:24]


def _template(spec: BlockSpec) -> Template:
    tpl = TEMPLATES.get((spec.kind, spec.op))
    if tpl is None:
        raise SpecError(f"no generator for kind={spec.kind!r} op={spec.op!r}")
    return tpl


def render(spec: BlockSpec, schedule: Schedule | dict | None = None) -> Variant[BlockSpec]:
    """Render the Triton source for spec under schedule (default heuristic when None).

    Cached per (spec, canonical schedule): conv calls on the hot path do not re-run Jinja.
    """
    _template(spec)
    return _render(spec, _sched.resolve(spec, schedule))


@lru_cache(maxsize=8192)
def batch_free(spec: BlockSpec) -> BlockSpec:
    """The form a batch_arg template renders spec from: n = 1 (n is its launch argument, so every batch of the
    spec's BatchRange gets the same source, id and compiled kernel)."""
    return spec.with_(n=1)


def batch_free_json(spec: BlockSpec) -> str:
    """The spec's canonical JSON without n: the spec a batch_arg template's header names."""
    return canonical_json({k: v for k, v in spec.to_dict().items() if k != "n"})


@lru_cache(maxsize=4096)
def _render(spec: BlockSpec, s: Schedule) -> Variant[BlockSpec]:
    if s.space_to_depth:  # the folded stride-1 conv's kernel (kernels.space_to_depth), the same source and id
        folded = _render(space_to_depth.rewrite(spec), replace(s, space_to_depth=False))
        return Variant(spec=spec, schedule=s, source=folded.source, kernel_name=folded.kernel_name, grid=folded.grid)
    tpl = _template(spec)
    name = kernel_name(spec)
    if tpl.batch_arg:
        source = _source(tpl, batch_free(spec), s, name, batch_range(spec))
    else:
        source = _source(tpl, spec, s, name, None)
    return Variant(spec=spec, schedule=s, source=source, kernel_name=name, grid=tpl.grid(spec, s))


@lru_cache(maxsize=1024)
def _source(tpl: Template, spec: BlockSpec, s: Schedule, name: str, batch: BatchRange | None) -> str:
    """The rendered text; with a batch range, spec is batch_free and its header spec omits n."""
    ctx = Context(tpl.context(spec, s))
    ctx.update(name=name, generator_version=GENERATOR_VERSION, spec_json=spec.to_json(), schedule_json=s.to_json())
    if batch is not None:
        ctx.update(
            spec_json=batch_free_json(spec),
            batch=batch.describe(),
            i64=batch.i64,
        )
    source = environment().get_template(tpl.file).render(v=ctx)
    return "\n".join(line.rstrip() for line in source.splitlines()) + "\n"


def reduction_steps(spec: BlockSpec, s: Schedule) -> int | None:
    """Steps of an implicit-GEMM fwd or dgrad reduction loop (the first phase's for a strided dgrad); None for
    other kernels, and for split-K / stream-K ones (their bounds are runtime values: never unrolled whole). The SASS
    audit needs it when the compiler unrolled the loop whole (kernels.sass.mix)."""
    if s.space_to_depth:
        return reduction_steps(space_to_depth.rewrite(spec), replace(s, space_to_depth=False))
    if spec.kind != "conv" or spec.op not in ("fwd", "dgrad") or s.split_k > 1 or s.stream_k:
        return None
    if spec.op == "dgrad":
        return _prod(_phases(spec)["NTMAX"]) * _cdiv(spec.kg, s.block_k) if s.k_order == "tap" else None
    if s.tma and _sched.pointwise(spec):
        return _cdiv(spec.cg, s.block_k)
    return spec.taps * _cdiv(spec.cg, s.block_k) if s.k_order == "tap" else _cdiv(spec.cg * spec.taps, s.block_k)
