"""Schedule space: the legal knobs of one spec's family and op, pruned before anything compiles.

Enumeration (per kind):
- conv (implicit GEMM; fwd, dgrad per stride phase, wgrad): block_m x block_n x block_k in powers
  of two (16..256, 16..256, 16..128), num_warps 2/4/8, num_stages 2/3/4, group_m 1/8, k_order
  tap/flat (wgrad also row: a kernel row's taps per program), split_k 1..32 (wgrad; fwd and dgrad only for
  tilings whose grid is smaller than the SM count, see `order`); multi-tap fwd and dgrad also l1_load
  (L1-allocating A loads) where the installed Triton keeps the modifier (l1_load_honored); stride-1 fwd on
  16-byte rows also tma (tensor-descriptor loads) where Triton has them (tma_supported), not on the interpreter;
  fwd and dgrad, not on the interpreter, also stream_k (one program per resident slot) for tilings whose grid
  quantizes badly and where the cost model prices it >= 10% faster than the tiling unsplit (stream_k_programs),
  with split_k 1, group_m 8, no tma;
- depthwise (direct): block_m pixels (4..1024) x block_n channels (4..128), num_warps 1/2/4/8; fwd
  in groups of block_k = 1/2/4/8/16 consecutive outputs along the last dim (register blocking, <= the row);
  wgrad: block_m pixels per step (16..256) x block_k taps (1..32) x block_n channels, split_k.

Pruning rules, in order (each candidate is dropped by the first rule it breaks; `Space.pruned`
counts them):
- `problem`: tiles no larger than the problem (block <= next_pow2(extent), at least the minimum);
- `order`: flat k_order only for multi-tap specs whose channel groups do not fill a block_k step
  (C/g < 64 or not a multiple of 64); group_m varies only when there are several tiles both ways;
  num_stages no more than the reduction's steps + 1; split_k keeps >= 2 block_k steps per split; a fwd or
  dgrad split only where the unsplit grid has fewer programs than the device has SMs and the split one 1/2 to 2
  per SM (split_candidate), with group_m 8 only (one wave: the swizzle does not matter);
- `check`: kernels.schedule.check (powers of two, tl.dot dims >= 16, tile <= 256x256);
- `smem`: cost.smem_bytes (fitted to Triton's sm_90 output) <= limits.smem_per_block;
- `registers`: cost.registers_per_thread <= limits.max_regs_per_thread (would spill);
- `warps`: at least 4 accumulator elements per thread (idle warps otherwise);
- `duplicate`: the same canonical schedule (kernels.schedule.canonical) seen before; on the
  interpreter also the same tiles with other launch knobs (num_warps, num_stages, group_m and
  l1_load do not change what the interpreter executes), so CPU spaces hold one variant per tile shape;
- strided small-channel stems (kernels.space_to_depth) also get every schedule of their folded stride-1
  conv, with space_to_depth set (pruned by the same rules, on the folded conv);
- `cap`: when more than `max_candidates` (default 256) survive, keep the cost model's best
  variant of every tile shape (block_m, block_n, block_k, k_order, split_k), then fill up with
  the best-predicted remaining ones (enumeration order is kept).
Sizes (H100 profile, the SEEDS suites): 36-2716 legal after the rules, median ~1000-1300 for
dense/grouped layers, 439 for depthwise fwd (46 on 7-wide toy rows); 256 or fewer after the cap.
Interpreter profile: 4-188.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from functools import cache

import triton

from tunerd.kernels import schedule as _sched
from tunerd.kernels import space_to_depth
from tunerd.kernels.schedule import Schedule, ScheduleError, next_pow2
from tunerd.kernels.spec import BlockSpec

from . import cost
from .device import DeviceLimits

CONV_M = (16, 32, 64, 128, 256)
CONV_N = (16, 32, 64, 128, 256)
CONV_K = (16, 32, 64, 128)
CONV_WARPS = (4, 8, 2)  # preferred value first: the interpreter keeps the first legal one
CONV_STAGES = (3, 2, 4)
GROUP_M = (8, 1)
SPLIT_K = (1, 2, 4, 8, 16, 32)
DW_M = (4, 8, 16, 32, 64, 128, 256, 512, 1024)
DW_N = (4, 8, 16, 32, 64, 128)
DW_WARPS = (4, 2, 8, 1)
DW_W = (8, 4, 16, 2, 1)  # depthwise fwd: outputs per thread along the last dim (block_k); 1: flat pixel tiles
DW_WGRAD_M = (16, 32, 64, 128, 256)  # depthwise wgrad: pixels per reduction step
DW_TAPS = (1, 2, 4, 8, 16, 32)  # depthwise wgrad: taps per program
DEFAULT_MAX_CANDIDATES = 256
MIN_ACC_PER_THREAD = 4

RULES = ("problem", "order", "check", "smem", "registers", "warps", "duplicate", "cap")


@dataclass
class Space:
    """The candidates of one spec on one device, and how many were pruned by each rule."""

    spec: BlockSpec
    limits: DeviceLimits
    candidates: list[Schedule]
    pruned: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.candidates)


def space(
    spec: BlockSpec, limits: DeviceLimits | None = None, max_candidates: int | None = DEFAULT_MAX_CANDIDATES
) -> list[Schedule]:
    """Legal, pruned, deduplicated schedules for spec (see the module doc for the rules)."""
    return build(spec, limits, max_candidates).candidates


def build(
    spec: BlockSpec, limits: DeviceLimits | None = None, max_candidates: int | None = DEFAULT_MAX_CANDIDATES
) -> Space:
    """Enumerate and prune; max_candidates=None keeps every legal schedule."""
    if max_candidates is not None and max_candidates < 1:
        raise ValueError(f"max_candidates must be >= 1 or None, got {max_candidates}")
    limits = limits or DeviceLimits.detect()
    pruned = {r: 0 for r in RULES}
    out: list[Schedule] = []
    seen: set[Schedule] = set()
    seen_tiles: set[tuple] = set()
    gen = _depthwise(spec) if spec.kind == "depthwise" else _conv(spec, limits)
    if space_to_depth.applies(spec):  # stems: also every schedule of the folded stride-1 conv
        folded = ((replace(s, space_to_depth=True), rule) for s, rule in _conv(space_to_depth.rewrite(spec), limits))
        gen = itertools.chain(gen, folded)
    for s, rule in gen:
        rule = rule or _resource_rule(spec, s, limits)
        if rule is None:
            s = _sched.canonical(spec, s)
            tiles = tile_shape(s)  # all the interpreter runs: it ignores the launch knobs
            if s in seen or (limits.interpreted and tiles in seen_tiles):
                rule = "duplicate"
            else:
                seen.add(s)
                seen_tiles.add(tiles)
                out.append(s)
                continue
        pruned[rule] += 1
    if max_candidates is not None and len(out) > max_candidates:
        keep = _capped(spec, out, limits, max_candidates)
        pruned["cap"] = len(out) - max_candidates
        out = [s for i, s in enumerate(out) if i in keep]
    return Space(spec=spec, limits=limits, candidates=out, pruned=pruned)


def tile_shape(s: Schedule) -> tuple:
    """What a schedule computes, without its launch knobs (num_warps, num_stages, group_m, l1_load, stream_k)."""
    return (s.block_m, s.block_n, s.block_k, s.k_order, s.split_k, s.space_to_depth)


def _capped(spec: BlockSpec, cands: list[Schedule], limits: DeviceLimits, n: int) -> set[int]:
    """Indices to keep: the best-predicted variant of every tile shape first (so a cost-model error
    about launch knobs cannot drop a tiling), then the best-predicted of the rest."""
    ranked = sorted(range(len(cands)), key=lambda i: (cost.predict(spec, cands[i], limits), i))
    first: dict[tuple, int] = {}
    for i in ranked:
        first.setdefault(tile_shape(cands[i]), i)
    keep = sorted(first.values(), key=ranked.index)[:n]
    chosen = set(keep)
    keep += [i for i in ranked if i not in chosen][: n - len(keep)]
    return set(keep)


def _resource_rule(spec: BlockSpec, s: Schedule, limits: DeviceLimits) -> str | None:
    """The first of check / smem / registers / warps that s breaks, or None."""
    try:
        _sched.check(spec, s)
    except ScheduleError:
        return "check"
    if cost.smem_bytes(spec, s) > limits.smem_per_block:
        return "smem"
    if cost.registers_per_thread(spec, s) > limits.max_regs_per_thread:
        return "registers"
    if s.block_m * s.block_n < 32 * s.num_warps * MIN_ACC_PER_THREAD and s.num_warps > min(_warps(spec)):
        return "warps"
    return None


def _warps(spec: BlockSpec) -> tuple[int, ...]:
    return DW_WARPS if spec.kind == "depthwise" else CONV_WARPS


def _cap(extent: int, lo: int) -> int:
    """Largest useful power-of-two tile for an extent: next_pow2(extent), at least lo."""
    return max(lo, next_pow2(extent))


Candidate = tuple[Schedule, "str | None"]  # a schedule and the enumeration rule it breaks, if any


def split_candidate(spec: BlockSpec, s: Schedule, limits: DeviceLimits) -> bool:
    """Whether a fwd / dgrad split s.split_k > 1 is worth a candidate: the unsplit grid leaves SMs idle (fewer
    programs than SMs, late ResNet stages at small batch) and the split grid fills them, with 1/2 to 2 programs
    per SM (at most two splits per tiling: the space stays small), each split with >= 2 block_k steps."""
    base = replace(s, split_k=1)
    programs, sms = cost.programs(spec, base), limits.sm_count
    return (
        programs < sms
        and sms < 2 * programs * s.split_k <= 4 * sms
        and cost.reduction_steps(spec, base) >= 2 * s.split_k
    )


STREAM_K_GAIN = 0.9  # a stream-K candidate must be modelled at most this fraction of its tiling's unsplit time


def stream_k_programs(spec: BlockSpec, s: Schedule, limits: DeviceLimits) -> int:
    """The stream-K grid worth a candidate for s's tiling (0: none): one program per resident slot (SMs x
    occupancy), where the tile grid quantizes badly: fewer tiles than slots, or at most 4 waves with a part-empty
    last (160 tiles on 132 SMs), each program still runs >= 2 reduction steps, and the cost model prices it at
    most STREAM_K_GAIN of the same tiling unsplit (a fix-up that buys less is not worth a compile and a timing)."""
    base = replace(s, split_k=1, stream_k=0)
    slots = limits.sm_count * cost.occupancy(spec, base, limits)
    tiles = cost.programs(spec, base)
    if tiles % slots == 0 or tiles > 4 * slots or tiles * cost.reduction_steps(spec, base) < 2 * slots:
        return 0
    if cost.predict(spec, replace(base, stream_k=slots), limits) > STREAM_K_GAIN * cost.predict(spec, base, limits):
        return 0
    return slots


def _conv(spec: BlockSpec, limits: DeviceLimits) -> Iterator[Candidate]:
    interpreted = limits.interpreted
    stream_k = _sched.stream_k_applies(spec) and not interpreted  # a GPU option (wave quantization)
    g = cost.gemm_view(spec)
    wgrad = spec.op == "wgrad"
    # the flat order helps when one tap's channels (columns for wgrad) do not fill whole block_k steps
    flat_extent = g.n if wgrad else g.inner
    flat_ok = g.taps > 1 and (flat_extent < 64 or flat_extent % 64 != 0)
    k_orders: tuple[str, ...] = ("tap", "flat") if flat_ok else ("tap",)
    if wgrad and spec.kernel[-1] > 1:  # a kernel row's taps per program, each dz tile reused by all of them
        k_orders += ("row",)
    splits = SPLIT_K if wgrad or not interpreted else (1,)  # fwd / dgrad: small grids only (split_candidate)
    l1_loads = (False, True) if _sched.l1_load_applies(spec) and l1_load_honored() else (False,)
    # TMA: a GPU path (the interpreter runs it, no faster)
    tmas = (False, True) if _sched.tma_applies(spec) and tma_supported() and not interpreted else (False,)
    for bm, bn, bk, order, split in itertools.product(CONV_M, CONV_N, CONV_K, k_orders, splits):
        flat = order == "flat"
        if wgrad:  # columns: (tap, C/g) tiles; reduction: the pixels of one split
            n_extent, k_extent = (g.taps * g.n if flat else g.n), cost.cdiv(g.inner, split)
        else:
            n_extent, k_extent = g.n, (g.red if flat else g.inner)
        base = Schedule(block_m=bm, block_n=bn, block_k=bk, k_order=order, split_k=split)
        if bm > _cap(g.m, 16) or bn > _cap(n_extent, 16) or bk > _cap(k_extent, 16):
            yield base, "problem"
            continue
        # (a k x k tma tiles in pixel boxes, never fewer programs than without: split_candidate checks it again)
        if split > 1 and (k_extent < 2 * bk if wgrad else not split_candidate(spec, base, limits)):
            yield base, "order"
            continue
        steps = cost.reduction_steps(spec, base)
        swizzle = cost.cdiv(g.m, bm) > 1 and cost.cdiv(n_extent, bn) > 1
        for warps, stages, group, l1, tma in itertools.product(CONV_WARPS, CONV_STAGES, GROUP_M, l1_loads, tmas):
            s = replace(base, num_warps=warps, num_stages=stages, group_m=group, l1_load=l1, tma=tma)
            # a split grid (<= 2 programs per SM) runs in about one wave: no swizzle order to choose
            if (group != GROUP_M[0] and (not swizzle or (split > 1 and not wgrad))) or stages > steps + 1:
                yield s, "order"
            elif split > 1 and tma and not split_candidate(spec, s, limits):
                yield s, "order"
            else:
                yield s, None
                if stream_k and split == 1 and not tma and group == GROUP_M[0]:
                    programs = stream_k_programs(spec, s, limits)
                    if programs:
                        yield replace(s, stream_k=programs), None


@cache
def l1_load_honored() -> bool:
    """Whether the installed Triton keeps a pipelined load's cache modifier: 3.9 turns l1_load's A loads into
    cp.async.ca (SASS LDGSTS.E), 3.6 drops it (.cg, LDGSTS.E.BYPASS, the same code as without it)."""
    major, minor = (int(p) for p in triton.__version__.split(".")[:2])
    return (major, minor) >= (3, 9)


def tma_supported() -> bool:
    """Whether the installed Triton makes tensor descriptors in a kernel (tl.make_tensor_descriptor, 3.4+: sm_90
    UTMALDG under 3.6 and 3.9); else only the pointer path is offered."""
    return hasattr(triton.language, "make_tensor_descriptor")


def _depthwise(spec: BlockSpec) -> Iterator[Candidate]:
    if spec.op == "wgrad":
        yield from _depthwise_wgrad(spec)
        return
    pixels, channels = cost.direct_pixels(spec), cost.direct_channels(spec)
    # fwd: block_k consecutive outputs along the last dim per thread (register blocking), at most the row;
    # 1 (flat pixel tiles) with BatchNorm statistics (see kernels.schedule.outputs_per_thread)
    fwd = spec.op == "fwd"
    widths = (Schedule.block_k,) if not fwd else (1,) if spec.epilogue.stats else DW_W
    for bm, bn, bw, warps in itertools.product(DW_M, DW_N, widths, DW_WARPS):
        s = Schedule(block_m=bm, block_n=bn, block_k=bw, group_m=1, num_warps=warps, num_stages=1)
        extent = cost.direct_groups(spec, bw) * bw if fwd else pixels  # groups of bw outputs per row
        too_big = bm > _cap(extent, 8) or bn > _cap(channels, 8) or (fwd and bw > min(bm, _cap(spec.out_size[-1], 1)))
        too_small = bm < min(8, _cap(extent, 1)) or bn < min(8, _cap(channels, 1))
        yield s, ("problem" if too_big or too_small else None)


def _depthwise_wgrad(spec: BlockSpec) -> Iterator[Candidate]:
    """block_m pixels per step x block_k taps x block_n channels, pixels split split_k ways."""
    for bm, bn, bt, split, warps in itertools.product(DW_WGRAD_M, DW_N, DW_TAPS, SPLIT_K, DW_WARPS):
        s = Schedule(block_m=bm, block_n=bn, block_k=bt, group_m=1, num_warps=warps, num_stages=1, split_k=split)
        per_split = cost.cdiv(spec.out_pixels, split)
        too_big = bm > _cap(per_split, 16) or bn > _cap(spec.k, 8) or bt > _cap(spec.taps, 1)
        too_small = bn < min(8, _cap(spec.k, 1))
        if too_big or too_small:
            yield s, "problem"
        elif split > 1 and per_split < 2 * bm:
            yield s, "order"
        else:
            yield s, None
