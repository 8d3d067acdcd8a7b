"""Schedule: the knobs of one variant, their validity rules and a default heuristic per kind."""

from __future__ import annotations

import functools
import itertools
import json
import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from . import space_to_depth
from .spec import BlockSpec, canonical_json

# Fused depthwise steps (kernels.fused) unroll their innermost tap loop up to this many taps.
UNROLL_TAPS = 16
# Depthwise fwd: at most this many consecutive outputs along the last dim per thread (register blocking).
MAX_BLOCK_W = 16
# reduction order of implicit GEMM: tap-major channel blocks | flattened (tap, c) | wgrad only: the taps of a
# kernel row per program (one accumulator each, every dz tile reused by all of them)
K_ORDERS = ("tap", "flat", "row")
# bool knobs, left out of Schedule.to_dict when off
FLAGS = ("space_to_depth", "l1_load", "tma")


class ScheduleError(ValueError):
    """A schedule that is illegal for its spec (not compile-valid or not meaningful)."""


@dataclass(frozen=True)
class Schedule:
    """Tile and launch knobs.

    conv (implicit GEMM): block_m output pixels x block_n output channels of a group, block_k
      reduction step, group_m swizzle, k_order, split_k (wgrad).
      dgrad: block_m input pixels of a stride phase x block_n input channels, block_k output channels.
      wgrad: block_m output channels x block_n (tap, input channel) columns, block_k pixels per step,
      the pixel axis split split_k ways (k_order 'flat': columns over the flattened (tap, c) axis).
    depthwise (direct): block_m output pixels x block_n channels, fwd: in groups of block_k consecutive
      outputs along the last dim (register blocking, see outputs_per_thread); the rest is unused, except in
      wgrad: block_m pixels per step x block_k taps x block_n channels, pixels split split_k ways.
    space_to_depth (strided small-channel conv fwd, kernels.space_to_depth): the kernel is the stride-1 conv
      over the folded input, and every other knob is that conv's.
    l1_load (multi-tap conv fwd/dgrad): the A operand (input / output-gradient rows, re-read by every tap of a
      window) is loaded L1-allocating (cp.async.ca, SASS LDGSTS.E) rather than L2-only (.cg, LDGSTS.E.BYPASS);
      Triton 3.6 compiles both the same (its pipeliner drops the modifier), 3.9 honors it.
    tma (stride-1 conv fwd on 16-byte channel rows, see tma_applies): both operands by Hopper TMA through
      tensor descriptors made in the kernel (tl.make_tensor_descriptor: Triton >= 3.4; on a GPU the launch
      needs triton.set_allocator for their scratch), out-of-bounds rows and channels zero-filled. 1x1 without
      padding: 2-D [pixels, C/g]. Otherwise a block_m tile is a box of output pixels of one image (tma_box) and
      each tap's A tile the [1, *box, block_k] box of the NHWC input at the window's origin: the zero fill of
      coordinates outside x is the padding.
    split_k (conv fwd and dgrad): the reduction (taps x channel blocks) split split_k ways, program_id(1) =
      group * split_k + split; each split writes its fp32 partial tile, the last to arrive sums them in split
      order (bitwise reproducible) and runs the epilogue once (runtime.kernel_args adds the workspace).
    stream_k (conv fwd and dgrad; 0: off): a persistent grid of stream_k programs (one per resident slot: the
      tuner picks it from the device's SM count, schedules.space.stream_k_programs), each walking a contiguous range
      of the (output tile, reduction step) iteration space. A tile whose steps span programs is summed by the last
      of them to arrive, in program order (deterministic), through the split-K workspace; every tile's epilogue
      runs once. For wave-quantized and small grids. dgrad: the tiles of every stride phase, each walked in steps
      of the largest phase's reduction (clipped to its own).
    """

    block_m: int = 64
    block_n: int = 64
    block_k: int = 32
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 2
    split_k: int = 1
    stream_k: int = 0
    k_order: str = "tap"
    space_to_depth: bool = False
    l1_load: bool = False
    tma: bool = False

    def to_dict(self) -> dict[str, Any]:
        """Field dict; the flags (space_to_depth, l1_load, tma) and stream_k appear only when set, so the keys (and
        ids) of every other schedule never change."""
        d = asdict(self)
        for flag in FLAGS:
            if not d[flag]:
                del d[flag]
        if not d["stream_k"]:
            del d["stream_k"]
        return d

    def to_json(self) -> str:
        return canonical_json(self.to_dict())

    @classmethod
    def from_dict(cls, d: Any) -> Schedule:
        if not isinstance(d, dict):
            raise ScheduleError(f"a schedule must be a JSON object, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        if set(d) - known:
            raise ScheduleError(f"unknown schedule fields: {sorted(set(d) - known)}")
        for name, v in d.items():
            if name == "k_order":
                if v not in K_ORDERS:
                    raise ScheduleError(f"k_order must be one of {K_ORDERS}, got {v!r}")
            elif name in FLAGS:
                if not isinstance(v, bool):
                    raise ScheduleError(f"schedule field {name} must be a bool, got {v!r}")
            elif not isinstance(v, int) or isinstance(v, bool):
                raise ScheduleError(f"schedule field {name} must be an int, got {v!r}")
        return cls(**d)

    @classmethod
    def from_json(cls, text: str) -> Schedule:
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as e:
            raise ScheduleError(f"schedule is not valid JSON: {e}") from None

    def describe(self) -> str:
        return (
            f"{self.block_m}x{self.block_n}x{self.block_k} g{self.group_m} w{self.num_warps} "
            f"s{self.num_stages} sk{self.split_k} {self.k_order}"
            + (" s2d" if self.space_to_depth else "")
            + (" l1" if self.l1_load else "")
            + (" tma" if self.tma else "")
            + (f" streamk{self.stream_k}" if self.stream_k else "")
        )


def is_pow2(v: int) -> bool:
    return v >= 1 and (v & (v - 1)) == 0


def next_pow2(v: int) -> int:
    p = 1
    while p < v:
        p *= 2
    return p


def _clamp_pow2(v: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, next_pow2(max(v, 1))))


def uses_dot(spec: BlockSpec) -> bool:
    return spec.kind == "conv"


def l1_load_applies(spec: BlockSpec) -> bool:
    """Whether a schedule's l1_load means something for spec: a conv fwd or dgrad whose taps re-read its A rows."""
    taps = spec.taps // spec.phases if spec.op == "dgrad" else spec.taps  # dgrad: a stride phase's
    return spec.kind == "conv" and spec.op in ("fwd", "dgrad") and taps > 1


def pointwise(spec: BlockSpec) -> bool:
    """One tap, unit stride, no padding: the forward is a plain GEMM [N*H*W, C/g] x [C/g, K/g]."""
    return spec.taps == 1 and set(spec.stride) == {1} and not spec.has_padding


def tma_applies(spec: BlockSpec) -> bool:
    """Whether TMA descriptors can read spec's forward operands: unit stride (a pointwise GEMM's 2-D rows, or
    NHWC boxes of one image per tap: 3 to 5 dims, TMA's most); rows (C and C/g channels) 16-byte
    aligned, as TMA requires of strides and of each group's base; offsets within int32 (the int32 rendering,
    generator.batch_range); a tensor-core dot (fp32 'ieee' dots run on CUDA cores from registers: staged
    through shared memory they spilled 10 KB on sm_90). Box sizes (<= 256 per dim, >= 16 bytes innermost)
    hold for every compile-valid tile: block_k >= 16, block_m <= 256."""
    if spec.kind != "conv" or spec.op != "fwd" or set(spec.stride) != {1}:
        return False
    if spec.dtype == "float32" and spec.precision != "tf32":
        return False
    largest = max(spec.n * spec.c * math.prod(spec.in_size), spec.out_pixels * spec.k, spec.spanned_elements)
    return all(v * spec.itemsize % 16 == 0 for v in (spec.c, spec.x_pix, spec.cg)) and largest <= 2**31 - 1


def stream_k_applies(spec: BlockSpec) -> bool:
    """Whether a schedule's stream_k means something for spec: an implicit-GEMM conv fwd or dgrad."""
    return spec.kind == "conv" and spec.op in ("fwd", "dgrad")


def tma_box(spec: BlockSpec, block_m: int) -> tuple[int, ...]:
    """The output pixels of a k x k tma tile: a box of one image, powers of two per spatial dim with product
    block_m, the one that pads the output least (56x56 at 64: 8x8, none), then the widest rows."""
    return _box(spec.out_size, block_m)


@functools.lru_cache(maxsize=4096)
def _box(out_size: tuple[int, ...], block_m: int) -> tuple[int, ...]:
    best: tuple[tuple[int, tuple[int, ...]], tuple[int, ...]] | None = None
    for box in itertools.product(*[[1 << e for e in range(block_m.bit_length())]] * len(out_size)):
        if math.prod(box) != block_m:
            continue
        key = (math.prod(_cdiv(o, b) * b for o, b in zip(out_size, box)), tuple(-b for b in reversed(box)))
        if best is None or key < best[0]:
            best = (key, box)
    assert best is not None
    return best[1]


def gemm_tiles(spec: BlockSpec, s: Schedule) -> int:
    """Output tiles of one group of a conv fwd (block_m pixels, or a k x k tma's pixel boxes of each image, x
    block_n channels) or of one group and stride phase of a conv dgrad (the largest phase's): the grid's axis 0."""
    if spec.op == "dgrad":
        return _cdiv(spec.phase_pixels, s.block_m) * _cdiv(spec.cg, s.block_n)
    rows = _cdiv(spec.out_pixels, s.block_m)
    if s.tma and not pointwise(spec):
        rows = spec.n * math.prod(_cdiv(o, b) for o, b in zip(spec.out_size, tma_box(spec, s.block_m)))
    return rows * _cdiv(spec.kg, s.block_n)


def split_steps(spec: BlockSpec, s: Schedule) -> int:
    """Reduction steps of one conv fwd / dgrad program before splitting (dgrad: its largest phase's)."""
    if spec.op == "dgrad":
        # the largest stride phase's taps: along each dim, the taps of one residue modulo stride / gcd
        steps = (st // math.gcd(st, d) for st, d in zip(spec.stride, spec.dilation))
        taps, inner = math.prod(_cdiv(k, st) for k, st in zip(spec.kernel, steps)), spec.kg
    else:
        taps, inner = spec.taps, spec.cg
    return _cdiv(taps * inner, s.block_k) if s.k_order == "flat" else taps * _cdiv(inner, s.block_k)


def kernel_spec(spec: BlockSpec, s: Schedule) -> BlockSpec:
    """The spec whose kernel the schedule runs: the folded stride-1 conv under space_to_depth, else spec."""
    return space_to_depth.rewrite(spec) if s.space_to_depth else spec


def canonical(spec: BlockSpec, s: Schedule) -> Schedule:
    """Reset knobs the spec's template does not read, so equal effective schedules render equal source."""
    if s.space_to_depth:
        if not space_to_depth.applies(spec):
            return canonical(spec, replace(s, space_to_depth=False))
        return replace(canonical(space_to_depth.rewrite(spec), replace(s, space_to_depth=False)), space_to_depth=True)
    if s.l1_load and not l1_load_applies(spec):
        s = replace(s, l1_load=False)
    if s.tma and not tma_applies(spec):
        s = replace(s, tma=False)
    if s.stream_k and not stream_k_applies(spec):
        s = replace(s, stream_k=0)
    if s.tma:  # TMA boxes load A in tap order, no cache modifier
        s = replace(s, k_order="tap", l1_load=False)
    if spec.kind == "depthwise":
        if spec.op == "wgrad":
            s = replace(s, group_m=1, k_order="tap")
        elif spec.op == "fwd":
            s = replace(s, block_k=outputs_per_thread(spec, s), group_m=1, split_k=1, k_order="tap")
        else:
            s = replace(s, block_k=Schedule.block_k, group_m=1, split_k=1, k_order="tap")
    else:
        if spec.taps == 1 or (s.k_order == "row" and spec.kernel[-1] == 1):  # one tap (per row): the same loop
            s = replace(s, k_order="tap")
    return s


def outputs_per_thread(spec: BlockSpec, s: Schedule) -> int:
    """Depthwise fwd register blocking: block_k consecutive outputs along the last dim per group, at most
    MAX_BLOCK_W, block_m and the row's width (rounded up to a power of two). 1 (flat tiles of block_m
    pixels) with BatchNorm statistics, whose partial sums are per block_m consecutive pixels."""
    if spec.epilogue.stats:
        return 1
    return max(1, min(s.block_k, s.block_m, MAX_BLOCK_W, next_pow2(spec.out_size[-1])))


def check(spec: BlockSpec, s: Schedule) -> None:
    """Raise ScheduleError unless the schedule is compile-valid Triton for this spec."""
    if s.space_to_depth:
        if not space_to_depth.applies(spec):
            raise ScheduleError(
                "space_to_depth folds strided 2-d forward convs with few input channels (kernels.space_to_depth), "
                f"not {spec.describe()}"
            )
        return check(space_to_depth.rewrite(spec), replace(s, space_to_depth=False))
    for name in ("block_m", "block_n", "block_k", "num_warps"):
        v = getattr(s, name)
        if not isinstance(v, int) or not is_pow2(v):
            raise ScheduleError(f"{name}={v!r} must be a power of two")
    if s.num_warps > 32:
        raise ScheduleError("num_warps must be <= 32")
    if s.num_stages < 1 or s.group_m < 1 or s.split_k < 1:
        raise ScheduleError("num_stages, group_m and split_k must be >= 1")
    if s.k_order not in K_ORDERS:
        raise ScheduleError(f"k_order must be one of {K_ORDERS}")
    if s.k_order == "row" and (spec.kind != "conv" or spec.op != "wgrad"):
        raise ScheduleError("k_order 'row' (several taps per program) is a conv wgrad order")
    if s.l1_load and not l1_load_applies(spec):
        raise ScheduleError("l1_load (L1-allocating A loads) is an option of multi-tap conv fwd and dgrad")
    if s.tma and not tma_applies(spec):
        raise ScheduleError("tma (tensor-descriptor loads) is an option of stride-1 conv fwd on 16-byte rows")
    if s.tma and spec.epilogue.stats and not pointwise(spec):
        box = tma_box(spec, s.block_m)
        if any(o % b for o, b in zip(spec.out_size, box)):  # stats rows assume full tiles but the last
            raise ScheduleError(f"tma with BatchNorm statistics needs pixel boxes {box} that tile {spec.out_size}")
    if uses_dot(spec):
        for name in ("block_m", "block_n", "block_k"):
            if getattr(s, name) < 16:
                raise ScheduleError(f"{name}={getattr(s, name)} is below tl.dot's minimum of 16")
    if s.block_m * s.block_n > 256 * 256:
        raise ScheduleError("tile larger than 256x256 elements")
    if s.split_k > 1024:
        raise ScheduleError("split_k must be <= 1024")
    if s.split_k > 1 and spec.kind == "conv" and spec.op != "wgrad":
        steps = split_steps(spec, s)
        if s.split_k > steps:
            raise ScheduleError(f"split_k={s.split_k} exceeds the {steps} reduction steps of block_k={s.block_k}")
        programs = gemm_tiles(spec, s) * spec.groups * (spec.phases if spec.op == "dgrad" else 1) * s.split_k
        if programs * s.block_m * s.block_n > 2**31 - 1:
            raise ScheduleError("split_k's fp32 partials exceed int32 offsets: split only small grids")
    if s.stream_k:
        if s.stream_k < 0 or s.stream_k > 4096:
            raise ScheduleError(f"stream_k={s.stream_k} must be 0 (off) or 1..4096 programs")
        if not stream_k_applies(spec) or s.split_k > 1 or s.tma:
            raise ScheduleError("stream_k is an option of conv fwd and dgrad without split_k or tma")
        tiles = gemm_tiles(spec, s) * spec.groups * (spec.phases if spec.op == "dgrad" else 1)
        if tiles * split_steps(spec, s) > 2**31 - 1 or 2 * s.stream_k * s.block_m * s.block_n > 2**31 - 1:
            raise ScheduleError("stream_k's iteration space or partials exceed int32")
    if spec.kind == "depthwise" and spec.op == "wgrad" and s.block_m * s.block_n * s.block_k > 32768:
        raise ScheduleError("depthwise wgrad tile block_m * block_k * block_n exceeds 32768 elements")


def default(spec: BlockSpec) -> Schedule:
    """A schedule sized to the problem, used when no tuned winner is known."""
    if spec.kind == "depthwise":
        return {"fwd": _default_depthwise, "dgrad": _default_depthwise_dgrad, "wgrad": _default_depthwise_wgrad}[
            spec.op
        ](spec)
    return {"fwd": _default_conv, "dgrad": _default_conv_dgrad, "wgrad": _default_conv_wgrad}[spec.op](spec)


# Programs that keep an H100 (132 SMs) busy: split-K aims for this many.
_FILL = 264


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def vector_rows(spec: BlockSpec) -> bool:
    """Whether every channel row an implicit GEMM reads starts 16-byte aligned (C, K and their per-group
    counts), so its loads vectorize and the pipeliner can use cp.async. Otherwise (C=3 stems, C=45 video
    layers) each element is its own scalar load with its own address in registers."""
    step = 16 // spec.itemsize
    return all(v % step == 0 for v in (spec.c, spec.k, spec.cg, spec.kg))


def _gemm_tiles(m: int, n: int, red: int, itemsize: int, scalar: bool = False) -> tuple[int, int, int, int]:
    """block_m, block_n, block_k, num_warps of an implicit GEMM with these extents.

    128x128 tiles (two warpgroups) where they still give two waves on an H100, 64- or 128-row tiles with
    one warpgroup otherwise. With scalar loads (gathers, unaligned rows) the operand tiles stay within
    32 elements per thread: beyond that sm_90 builds spill (checked by benchmarks.static)."""
    block_n = _clamp_pow2(n, 16, 128)
    tiles_128 = _cdiv(m, 128) * _cdiv(n, block_n)
    block_m = 128 if tiles_128 >= _FILL and (block_n <= 64 or not scalar) else 64
    if m < 64:
        block_m = _clamp_pow2(m, 16, 64)
    block_k = _clamp_pow2(red, 16, 32 if scalar or itemsize == 4 else 64)
    return block_m, block_n, block_k, _warps(block_m, block_n, block_k, scalar)


def _warps(block_m: int, block_n: int, block_k: int, scalar: bool) -> int:
    """Two warpgroups for 128x128 tiles; with scalar loads, enough warps for <= 32 operand elements each."""
    warps = 8 if block_m * block_n >= 128 * 128 else 4
    return 8 if scalar and (block_m + block_n) * block_k > 32 * 32 * warps else warps


def _split(programs: int, steps: int) -> int:
    """Power-of-two split of a reduction of `steps` block steps so about _FILL programs run, >= 4 steps each."""
    split = max(1, min(64, next_pow2(max(1, _FILL // max(programs, 1)))))
    return max(1, min(split, next_pow2(steps // 4 + 1) // 2))


def _default_conv(spec: BlockSpec) -> Schedule:
    if space_to_depth.applies(spec):
        # stems: 16-byte rows and a quarter of the taps (sm_90, bf16: ResNet's 7x7 s2 162 -> 90 registers,
        # 2-byte gathers -> 16-byte cp.async; MobileNet's 3x3 s2 696 -> 504 SASS; ConvNeXt's 4x4 s4 632 -> 408)
        return replace(_default_conv(space_to_depth.rewrite(spec)), space_to_depth=True)
    m, n, _ = spec.gemm_shape()
    # Small channel groups (stems, C=3) reduce over the flattened (tap, channel) axis.
    flat = spec.cg < 16 and spec.taps > 1
    bm, bn, bk, warps = _gemm_tiles(
        m, n, spec.cg * spec.taps if flat else spec.cg, spec.itemsize, scalar=flat or not vector_rows(spec)
    )
    bm, warps = _stats_tile(spec, bm, bn, warps)
    return Schedule(
        block_m=bm, block_n=bn, block_k=bk, group_m=8, num_warps=warps, num_stages=3, k_order="flat" if flat else "tap"
    )


def _stats_tile(spec: BlockSpec, block_m: int, block_n: int, warps: int) -> tuple[int, int]:
    """block_m, num_warps of a fwd whose epilogue gathers BatchNorm statistics and stores a 16-bit output: at most
    32 fp32 sums per thread (more warps up to 8, then fewer rows). At 64 per thread sm_90 builds spilled
    (255 registers + 8 bytes, Triton 3.9: RepVGG's stacked 3x3 stats conv, bf16/fp16); at 32, 143-158, none."""
    e = spec.epilogue
    if not e.stats or e.stats_only or spec.itemsize != 2:
        return block_m, warps
    while block_m * block_n > 32 * 32 * warps:
        if warps < 8:
            warps *= 2
        else:
            block_m //= 2
    return block_m, warps


def _default_conv_dgrad(spec: BlockSpec) -> Schedule:
    # GEMM per stride phase: input pixels x C/g, reduced over K/g x (the phase's taps)
    phase_taps = max(1, spec.taps // spec.phases)
    flat = spec.kg < 16 and phase_taps > 1
    bm, bn, bk, warps = _gemm_tiles(
        spec.phase_pixels,
        spec.cg,
        spec.kg * phase_taps if flat else spec.kg,
        spec.itemsize,
        scalar=flat or not vector_rows(spec),
    )
    return Schedule(
        block_m=bm, block_n=bn, block_k=bk, group_m=8, num_warps=warps, num_stages=3, k_order="flat" if flat else "tap"
    )


def _default_conv_wgrad(spec: BlockSpec) -> Schedule:
    # GEMM K/g x (taps, C/g) reduced over the output pixels, split to fill the GPU. Kernel rows of 2-3 taps
    # go to one program of two warpgroups (k_order 'row': each dz tile feeds every tap of the row; 3x3 64->64
    # on sm_90: 169 SASS per step for 3 taps, 75 registers, vs 144 for one).
    flat = spec.cg < 16 and spec.taps > 1
    row = not flat and spec.itemsize == 2 and 1 < spec.kernel[-1] <= 3 and spec.kg <= 64 and spec.cg <= 64
    scalar = flat or not vector_rows(spec)
    cols = spec.cg * spec.taps if flat else spec.cg
    bm, bn = _clamp_pow2(spec.kg, 16, 128), _clamp_pow2(cols, 16, 128)
    bk = _clamp_pow2(spec.out_pixels, 16, 64 if spec.itemsize == 2 and not scalar else 32)
    per_tile = 1 if flat else spec.taps // spec.kernel[-1] if row else spec.taps
    tiles = _cdiv(spec.kg, bm) * _cdiv(cols, bn) * per_tile * spec.groups
    return Schedule(
        block_m=bm,
        block_n=bn,
        block_k=bk,
        group_m=8,
        num_warps=8 if row else _warps(bm, bn, bk, scalar),
        num_stages=3,
        split_k=_split(tiles, _cdiv(spec.out_pixels, bk)),
        k_order="flat" if flat else "row" if row else "tap",
    )


def _default_depthwise(spec: BlockSpec) -> Schedule:
    """Register-blocked: groups of 8 consecutive outputs along the last dim (4 if strided, fewer on narrower
    rows; 1, flat pixel tiles, with BatchNorm statistics), a channel tile that divides K where one >= 8
    exists (96 -> 32), 4 warps and 32 fp32 sums per thread: <= 128 registers and no spills up to 31x31 on
    sm_90 (benchmarks.static)."""
    block_n = next((b for b in (32, 16, 8) if spec.k % b == 0), _clamp_pow2(spec.k, 1, 32))
    # strided rows share fewer input columns between outputs: 4 (a 112-wide 3x3 s2 spills a register at 8);
    # one tap per kernel row shares none, so a row of <= MAX_BLOCK_W is one group (14-wide k11x1: half the
    # index math per output, loop FMA share 27% -> 30%, and no spill under ptxas 12.9, which spilled at 8)
    per_group = 8 if spec.stride[-1] == 1 else 4
    if spec.kernel[-1] == 1 and spec.out_size[-1] <= MAX_BLOCK_W:
        per_group = MAX_BLOCK_W
    width = outputs_per_thread(spec, Schedule(block_m=MAX_BLOCK_W, block_k=per_group))
    groups = spec.out_pixels // spec.out_size[-1] * _cdiv(spec.out_size[-1], width)
    g = max(1, min(4096 // (block_n * width), next_pow2(groups)))
    warps = max(1, min(4, g * block_n // 128))
    return Schedule(block_m=g * width, block_n=block_n, block_k=width, group_m=1, num_warps=warps, num_stages=1)


def _default_depthwise_dgrad(spec: BlockSpec) -> Schedule:
    block_n = _clamp_pow2(spec.c, 1, 64)
    block_m = min(max(8, min(256, 4096 // block_n)), _clamp_pow2(spec.phase_pixels, 1, 256))
    return Schedule(
        block_m=block_m, block_n=block_n, group_m=1, num_warps=4 if block_m * block_n >= 2048 else 2, num_stages=1
    )


def _default_depthwise_wgrad(spec: BlockSpec) -> Schedule:
    block_n = _clamp_pow2(spec.k, 1, 32)
    block_t = _clamp_pow2(spec.taps, 1, 16)
    block_m = min(max(8, min(64, 8192 // (block_n * block_t))), _clamp_pow2(spec.out_pixels, 1, 64))
    programs = _cdiv(spec.k, block_n) * _cdiv(spec.taps, block_t)
    return Schedule(
        block_m=block_m,
        block_n=block_n,
        block_k=block_t,
        group_m=1,
        # one program of channels and taps (few channels; the split is all the parallelism): 2 warps, 128
        # products per thread, so each cross-warp sum over pixels serves twice the work (sm_90: 3x3 C=32 and
        # 1x11 C=12 loop SASS per product 6.1 -> 5.6 and 13.3 -> 8.3 (Triton 3.6); at 4 warps ptxas 12.9
        # (Triton 3.9) spilled 8 bytes there)
        num_warps=2 if programs == 1 else 4,
        num_stages=1,
        split_k=_split(programs, _cdiv(spec.out_pixels, block_m)),
    )


def resolve(spec: BlockSpec, schedule: Schedule | dict | None) -> Schedule:
    """Explicit schedule (validated) or the default; always canonical."""
    if schedule is None:
        s = default(spec)
    elif isinstance(schedule, dict):
        s = Schedule.from_dict(schedule)
    elif isinstance(schedule, Schedule):
        s = schedule
    else:
        raise ScheduleError(f"schedule must be a Schedule, a dict or None, got {type(schedule).__name__}")
    s = canonical(spec, s)
    check(spec, s)
    return s
