"""Cost model: resources (shared memory, registers) and predicted time of one schedule.

An analytical prior, not a substitute for measurement ("FLOPs do not predict latency"): it
ranks candidates for the model-guided strategies, caps oversized spaces, and gives each winner
its fraction of the roofline.

GPU model, per kernel launch:
- programs = output tiles x groups (x split_k); the reduction is padded to whole block_k steps,
  output tiles to whole block_m x block_n tiles (tile quantization is paid as extra math; a k x k tma fwd
  tiles each image in pixel boxes, kernels.schedule.tma_box); a split fwd / dgrad reduction (split_k) runs
  split_k times the programs with 1/split_k of the steps each, and writes and re-reads fp32 partials; a stream-K
  fwd (stream_k programs) an equal share of all tiles' steps per program, plus about one partial tile each;
- math time: padded FLOPs at the dtype's peak (tensor cores for fp16/bf16/tf32, CUDA cores for
  fp32 'ieee' and direct depthwise kernels), scaled by wave quantization (programs per resident
  slot, rounded up) and a small-tile/few-warp efficiency; direct depthwise fwd kernels issue-bound:
  times the instructions issued per FFMA (direct_issue_per_fma: loads and 16-bit widening);
- memory time: bytes each program loads (the tiling's re-reads: every output tile re-reads its
  input rows and weight columns) against L2 bandwidth, and compulsory DRAM bytes (plus L2 misses
  when the working set exceeds L2) against DRAM bandwidth;
- pipelining overlaps math and memory by 1 - 1/num_stages; each wave adds a fixed latency (stream-K: each
  tile segment a program runs, about tiles / programs + 1);
- l1_load (L1-allocating A loads) and tma (tensor-descriptor loads) are not modelled beyond tma's pixel
  boxes: L1 hit rates and TMA's gain are unmeasured (no GPU timings yet), so their variants tie with their
  pointer-path twins where the tiles agree and measurement decides.

Interpreter model (DeviceLimits.interpreted): programs x (per-program cost + reduction steps x
per-step cost, growing with tile elements), since the interpreter runs programs one by one in
Python and numpy, with overheads per operation far above the arithmetic.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace

from tunerd.kernels import space_to_depth
from tunerd.kernels.schedule import Schedule, gemm_tiles, outputs_per_thread, vector_rows
from tunerd.kernels.spec import BlockSpec

from .device import DeviceLimits


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class GemmView:
    """The implicit-GEMM shape of a conv pass: m x n outputs per group, reduced over taps x inner.

    fwd:   output pixels x K/g, over (taps, C/g);
    dgrad: input pixels of one stride phase x C/g, over (the phase's taps, K/g); phases run as
           extra program groups;
    wgrad: K/g x C/g per tap (columns taps x C/g), reduced over the output pixels (split_k ways).
    A tap-major loop runs taps x cdiv(inner, block_k) steps, a flat one cdiv(taps x inner, block_k).
    """

    m: int
    n: int
    inner: int
    taps: int
    groups: int

    @property
    def red(self) -> int:
        return self.inner * self.taps


def _prod(xs: Iterable[int]) -> int:
    out = 1
    for v in xs:
        out *= v
    return out


def phases(spec: BlockSpec) -> int:
    """Stride phases of a backward-data pass (1 for a unit stride)."""
    return _prod(spec.stride)


def phase_pixels(spec: BlockSpec) -> int:
    """Input pixels of the largest stride phase."""
    return spec.n * _prod(cdiv(i, s) for i, s in zip(spec.in_size, spec.stride))


def gemm_view(spec: BlockSpec) -> GemmView:
    """The GEMM a conv kernel of spec's op runs (see GemmView)."""
    if spec.op == "dgrad":
        return GemmView(
            m=phase_pixels(spec),
            n=spec.cg,
            inner=spec.kg,
            taps=max(1, spec.taps // phases(spec)),
            groups=spec.groups * phases(spec),
        )
    if spec.op == "wgrad":
        return GemmView(m=spec.kg, n=spec.cg, inner=spec.out_pixels, taps=spec.taps, groups=spec.groups)
    return GemmView(m=spec.out_pixels, n=spec.kg, inner=spec.cg, taps=spec.taps, groups=spec.groups)


def direct_pixels(spec: BlockSpec) -> int:
    """Pixels a direct (depthwise) kernel tiles: a stride phase's input pixels for dgrad, else the output's."""
    return phase_pixels(spec) if spec.op == "dgrad" else spec.out_pixels


def direct_channels(spec: BlockSpec) -> int:
    """Channels a direct kernel tiles: input channels for dgrad, else output channels."""
    return spec.c if spec.op == "dgrad" else spec.k


def direct_groups(spec: BlockSpec, width: int) -> int:
    """Groups of `width` consecutive outputs along the last dim that a depthwise fwd kernel tiles."""
    return spec.n * _prod(spec.out_size[:-1]) * cdiv(spec.out_size[-1], width)


def direct_columns(spec: BlockSpec, width: int) -> int:
    """Distinct input columns one kernel row of a group of `width` outputs reads (each loaded once)."""
    kw, st, dl = spec.kernel[-1], spec.stride[-1], spec.dilation[-1]
    return len({r * st + t * dl for r in range(width) for t in range(kw)})


@dataclass(frozen=True)
class Work:
    """What one launch does, per program and per reduction step (elements, not bytes)."""

    programs: int
    steps: int  # reduction iterations of one program
    step_flops: float
    step_loads: float  # elements loaded per step
    out_elems: int  # elements one program writes
    step_elems: int  # elements of the tiles one step touches (the interpreter's cost driver)


def kernel_view(spec: BlockSpec, s: Schedule) -> tuple[BlockSpec, Schedule]:
    """The (spec, schedule) the kernel runs: a space_to_depth schedule runs the folded stride-1 conv."""
    if s.space_to_depth:
        return space_to_depth.rewrite(spec), replace(s, space_to_depth=False)
    return spec, s


def work(spec: BlockSpec, s: Schedule) -> Work:
    """Programs, steps and per-step work of spec under s, following each template's tiling."""
    spec, s = kernel_view(spec, s)
    bm, bn, bk = s.block_m, s.block_n, s.block_k
    if spec.kind == "depthwise":
        if spec.op == "wgrad":  # [bm pixels, bk taps, bn channels] products summed over pixels
            progs = s.split_k * cdiv(spec.k, bn) * cdiv(spec.taps, bk)
            steps = cdiv(cdiv(spec.out_pixels, bm), s.split_k)
            return Work(progs, steps, 2.0 * bm * bk * bn, bm * bn * (bk + 1), bk * bn, bm * bn * (bk + 1))
        if spec.op == "fwd":  # a step: one tap into one of the r accumulators of [bm / r, bn] (register blocking)
            r, kw = outputs_per_thread(spec, s), spec.kernel[-1]
            rows = bm // r  # groups per program
            loads = (rows * bn * direct_columns(spec, r) + kw * bn) / (kw * r)  # each column and weight once a row
            progs = cdiv(direct_groups(spec, r), rows) * cdiv(spec.k, bn)
            return Work(progs, spec.taps * r, 2.0 * rows * bn, loads, bm * bn, int(rows * bn + loads))
        progs = cdiv(direct_pixels(spec), bm) * cdiv(direct_channels(spec), bn) * phases(spec)
        steps = max(1, spec.taps // phases(spec))
        return Work(progs, steps, 2.0 * bm * bn, bm * bn + bn, bm * bn, 2 * bm * bn)
    g = gemm_view(spec)
    if spec.op == "wgrad":
        rt = wgrad_row_taps(spec, s)  # 'row': one dz tile [bm, bk] feeds rt dots of [bk, bn]
        cols = g.taps // rt * cdiv(g.n, bn) if s.k_order != "flat" else cdiv(g.taps * g.n, bn)
        progs = cdiv(g.m, bm) * cols * g.groups * s.split_k
        steps = cdiv(cdiv(g.inner, bk), s.split_k)
        loads = (bm + rt * bn) * bk
        # split-K: each program writes its partial; the last of a tile's splits reads them all and writes the sum
        out = rt * bm * bn * (2 if s.split_k > 1 else 1)
        return Work(progs, steps, 2.0 * bm * bn * bk * rt, loads, out, loads + rt * bm * bn)
    # fwd (a k x k tma tiles each image in pixel boxes: schedule.gemm_tiles) and dgrad (groups x phases)
    progs = (gemm_tiles(spec, s) if spec.op == "fwd" else cdiv(g.m, bm) * cdiv(g.n, bn)) * g.groups
    steps = cdiv(g.red, bk) if s.k_order == "flat" else g.taps * cdiv(g.inner, bk)
    out = bm * bn
    if s.split_k > 1:  # each split writes its fp32 partial, the last reads all of them and writes the tile
        progs, steps = progs * s.split_k, cdiv(steps, s.split_k)
        out = int(bm * bn * (8 / spec.itemsize + 1 / s.split_k))
    elif s.stream_k:  # stream_k programs, an equal share of the tile-steps each; about one split tile per program,
        # its fp32 partial written and read once
        tiles, total = progs, progs * steps
        progs, steps = min(s.stream_k, total), cdiv(total, s.stream_k)
        out = int(bm * bn * (tiles / progs + 8 / spec.itemsize))
    return Work(progs, steps, 2.0 * bm * bn * bk, (bm + bn) * bk, out, bm * bk + bk * bn + bm * bn)


def wgrad_row_taps(spec: BlockSpec, s: Schedule) -> int:
    """Taps (accumulators) per program of a conv wgrad: a kernel row's with k_order 'row', else 1."""
    return spec.kernel[-1] if s.k_order == "row" and spec.op == "wgrad" and spec.kind == "conv" else 1


def reduction_steps(spec: BlockSpec, s: Schedule) -> int:
    """Iterations of the reduction loop one program runs."""
    return work(spec, s).steps


def programs(spec: BlockSpec, s: Schedule) -> int:
    """Programs (thread blocks) one launch runs."""
    return work(spec, s).programs


def smem_bytes(spec: BlockSpec, s: Schedule) -> int:
    """Shared memory a compiled variant needs, an upper bound fitted to Triton's sm_90 output
    (benchmarks.static checks it against the compiler).

    Implicit GEMM: with 16-byte-aligned pointers (torch's allocations, and what the JIT specializes on)
    the pipeliner's cp.async ring keeps num_stages copies of the A (block_m x block_k) and B
    (block_k x block_n) operand tiles; the epilogue's layout conversion of the output tile (fp32 for
    wgrad's split-K partials) reuses that space, so the larger of the two counts. Direct depthwise
    kernels need only layout-conversion scratch, plus wgrad's cross-warp sums (Triton 3.6 stages the
    whole [bm, bk, bn] product tile there).
    """
    spec, s = kernel_view(spec, s)
    if spec.kind == "depthwise":
        if spec.op == "wgrad":  # Triton 3.6 stages the [bm, bk, bn] product's reduction in shared memory
            return max(s.block_k * s.block_n * 4 + 512 * s.num_warps, s.block_m * s.block_k * s.block_n)
        return 128 * s.num_warps
    item, rt = spec.itemsize, wgrad_row_taps(spec, s)
    operands = max(1, s.num_stages) * (s.block_m * s.block_k + rt * s.block_k * s.block_n) * item
    epilogue = s.block_m * s.block_n * (4 if spec.op == "wgrad" else item)
    return max(operands, epilogue) + (8 * max(1, s.num_stages) if s.tma else 0)  # TMA: an mbarrier per stage


def registers_per_thread(spec: BlockSpec, s: Schedule) -> int:
    """32-bit registers per thread, fitted to sm_90 builds of the suites (benchmarks.static): the fp32
    accumulator, ~32 for addressing, and the operands. Vector-aligned implicit GEMM stages its operands
    in shared memory (cp.async), so they cost little; scalar loads (unaligned channel rows, flattened
    gathers) stage through registers, one copy per pipeline stage in flight. A direct depthwise kernel
    keeps its input tiles of the unrolled taps live, about 1.5 registers per output besides the sum; the
    register-blocked fwd kernel (groups of r outputs along the last dim) one input column and the weights of
    the last r taps, and a few more on long rows (31x31: +24)."""
    spec, s = kernel_view(spec, s)
    threads = 32 * s.num_warps
    acc = s.block_m * s.block_n / threads * wgrad_row_taps(spec, s)
    if spec.kind == "depthwise" and spec.op == "wgrad":  # the [bm, bk, bn] product tile, [bk, bn] sums
        return int((s.block_m + 1) * s.block_k * s.block_n / threads + s.block_m * s.block_n / threads + 32)
    if spec.kind == "depthwise" and spec.op == "fwd":
        r = outputs_per_thread(spec, s)
        if r == 1:
            return int(3 * acc + 48)
        return int((2.5 if spec.itemsize == 2 else 3.0) * acc + 16 + max(0, spec.kernel[-1] - 7))
    if spec.kind == "depthwise":
        return int(2.5 * acc + 40)
    a, b = s.block_m * s.block_k / threads, s.block_k * s.block_n / threads
    if vector_rows(spec) and s.k_order == "tap":
        return int(acc + 0.25 * a + 0.35 * b + 32)
    return int(acc + (a + b) * max(1, s.num_stages - 1) + 32)


def blocks_per_sm(regs_per_thread: int, smem: int, num_warps: int, limits: DeviceLimits) -> int:
    """Programs resident per SM (at least 1), limited by shared memory, registers and threads. Registers
    are allocated per warp in units of 256 (8 per thread), as the hardware does."""
    threads = 32 * num_warps
    by_smem = limits.smem_per_sm // smem if smem else limits.max_blocks_per_sm
    regs = -(-max(1, regs_per_thread) // 8) * 8 * threads
    by_regs = limits.regs_per_sm // regs
    by_threads = limits.max_threads_per_sm // threads
    return max(1, min(by_smem, by_regs, by_threads, limits.max_blocks_per_sm))


def occupancy(spec: BlockSpec, s: Schedule, limits: DeviceLimits) -> int:
    """Programs resident per SM by the model's own register and shared-memory estimates."""
    return blocks_per_sm(registers_per_thread(spec, s), smem_bytes(spec, s), s.num_warps, limits)


def math_rate(spec: BlockSpec, limits: DeviceLimits) -> float:
    """Peak FLOP/s of the unit spec's kernels use (tensor cores, or CUDA cores for fp32 ieee / direct)."""
    if spec.kind == "depthwise":
        return limits.fp32_flops
    if spec.dtype == "float32":
        return limits.tf32_flops if spec.precision == "tf32" else limits.fp32_flops
    return limits.fp16_flops


@dataclass(frozen=True)
class Estimate:
    """Predicted time of one schedule and the terms it came from."""

    seconds: float
    programs: int
    waves: int
    occupancy: int
    padded_flops: float
    l2_bytes: float
    dram_bytes: float
    t_math: float
    t_mem: float
    t_issue: float = 0.0  # implicit GEMM: instruction issue of the main loop (gemm_loop_sass)


def _aligned(channels: int, itemsize: int) -> bool:
    return channels * itemsize % 16 == 0


def gemm_loop_sass(spec: BlockSpec, s: Schedule) -> float:
    """SASS instructions per main-loop iteration of an implicit GEMM kernel, per thread. A least-squares fit
    to the committed sm_90 audit (benchmarks/results/2026-12-01-static-sm90-triton3.9.0, 282 conv rows:
    median error 11%, 90th percentile 29%): a base per op, ~3 per operand element a thread loads scalar in
    tap order (unaligned channel rows), ~21 per element of the flattened (tap, channel) gather of a fwd
    (the stems: each element decodes its own tap), ~5 per 16-byte cp.async chunk."""
    spec, s = kernel_view(spec, s)
    threads = 32 * s.num_warps
    elems = (s.block_m + wgrad_row_taps(spec, s) * s.block_n) * s.block_k / threads
    item = spec.itemsize
    if spec.op == "fwd":
        aligned = _aligned(spec.cg, item)
    elif spec.op == "dgrad":
        aligned = _aligned(spec.kg, item)
    else:
        aligned = _aligned(spec.cg, item) and _aligned(spec.kg, item)
    base = 55.5 + {"fwd": 0.0, "dgrad": 32.8, "wgrad": 22.1}[spec.op]
    if s.k_order == "flat":
        if spec.op == "fwd":
            return base + 21.3 * s.block_m * s.block_k / threads
        return base + 3.1 * elems
    if not aligned:
        return base + 3.0 * elems
    return base + 5.1 * elems * item / 16


def estimate(spec: BlockSpec, s: Schedule, limits: DeviceLimits) -> Estimate:
    """The cost model's breakdown for (spec, schedule) on limits' device."""
    if s.space_to_depth:  # the folded conv, after a torch pass that reads x and writes the folded copy
        folded = space_to_depth.rewrite(spec)
        e = estimate(folded, replace(s, space_to_depth=False), limits)
        copy = spec.itemsize * (spec.n * spec.c * _prod(spec.in_size) + folded.n * folded.c * _prod(folded.in_size))
        extra = limits.launch_s + (0.0 if limits.interpreted else copy / limits.dram_bw)
        return replace(e, seconds=e.seconds + extra, dram_bytes=e.dram_bytes + copy)
    w = work(spec, s)
    progs, steps = w.programs, w.steps
    item = spec.itemsize
    tile_flops = w.step_flops * steps
    loads = w.step_loads * steps * item
    out_tile = w.out_elems * item * (2 if spec.epilogue.residual else 1)
    padded_flops = tile_flops * progs
    l2 = (loads + out_tile) * progs
    if limits.interpreted:
        secs = progs * (
            limits.program_s
            + limits.element_s * w.out_elems
            + steps * (limits.step_s + limits.element_s * w.step_elems)
        )
        return Estimate(secs, progs, progs, 1, padded_flops, l2, float(spec.min_bytes), secs, 0.0)

    occ = occupancy(spec, s, limits)
    slots = limits.sm_count * occ
    waves = cdiv(progs, slots)
    # Each resident program gets 1/occ of its SM's rate; quantization: `waves` full rounds.
    sm_rate = math_rate(spec, limits) / limits.sm_count
    t_math = waves * occ * tile_flops / sm_rate / _tile_efficiency(spec, s)
    if spec.kind == "depthwise" and spec.op == "fwd":
        t_math *= direct_issue_per_fma(spec, s)
    dram = float(spec.min_bytes) * (1.0 + _l2_miss(spec, s, limits))
    if spec.kind == "depthwise":
        # channel-contiguous rows: a row narrower than a 32-byte sector wastes the rest
        sector = min(1.0, s.block_n * item / 32.0)
        t_mem = max(dram / limits.dram_bw, l2 / (4.0 * limits.l2_bw)) / sector  # taps re-read through L1
    else:
        t_mem = max(dram / limits.dram_bw, l2 / limits.l2_bw)
    t_issue = 0.0
    if spec.kind == "conv":  # warp instructions issued at 4 per SM cycle (the fp32 FMA rate / 64)
        issue_rate = limits.fp32_flops / 64 / limits.sm_count
        t_issue = waves * occ * steps * gemm_loop_sass(spec, s) * s.num_warps / issue_rate
        t_math = max(t_math, t_issue)
    overlap = 1.0 - 1.0 / max(1, s.num_stages) if spec.kind == "conv" else 0.5
    body = max(t_math, t_mem) + (1.0 - overlap) * min(t_math, t_mem)
    fills = float(waves)  # pipeline fills and drains, one per wave
    if s.stream_k:  # a program runs its share of tiles one after another, each segment filling the pipeline
        fills = programs(spec, replace(s, stream_k=0)) / progs + 1.0
    secs = limits.launch_s + fills * limits.wave_s + body
    return Estimate(secs, progs, waves, occ, padded_flops, l2, dram, t_math, t_mem, t_issue)


def direct_issue_per_fma(spec: BlockSpec, s: Schedule) -> float:
    """Instructions a depthwise fwd kernel issues per FFMA (CUDA cores issue one instruction per lane per
    clock, so the FMA rate is divided by this). Each loaded element costs about 0.75 (load, zero fill of
    masked lanes, addressing) plus 1.5 to widen a 16-bit value to fp32; per FMA a row loads
    columns / (taps x r) input elements and 1 / (r x groups per thread) weights. Fitted to sm_90 SASS
    (benchmarks.static): 7x7 bf16 r=8 1.84 (FFMA share 54%), 31x31 r=8 1.55, r=16 1.37; r=1 about 4."""
    r, kw = outputs_per_thread(spec, s), spec.kernel[-1]
    vec = max(1, 16 // spec.itemsize)
    rows = max(1.0, s.block_m // r * s.block_n / (32 * s.num_warps * vec))  # groups each thread holds
    per_load = 0.75 + (1.5 if spec.itemsize == 2 else 0.0)
    return 1.0 + per_load * (direct_columns(spec, r) / (kw * r) + 1.0 / (r * rows))


def _tile_efficiency(spec: BlockSpec, s: Schedule) -> float:
    """Fraction of peak one program reaches: small MMA tiles and starved or crowded warps lose."""
    elems = s.block_m * s.block_n
    per_thread = elems / (32 * s.num_warps)
    warp_eff = min(1.0, per_thread / 8.0) ** 0.5 * min(1.0, 64.0 / per_thread) ** 0.3
    if spec.kind == "depthwise":
        return max(0.05, warp_eff)
    return max(0.05, min(1.0, elems / (128.0 * 128.0)) ** 0.35 * min(1.0, s.block_k / 32.0) ** 0.3 * warp_eff)


def _l2_miss(spec: BlockSpec, s: Schedule, limits: DeviceLimits) -> float:
    """Extra DRAM traffic (fraction of compulsory) when re-read operands fall out of L2."""
    working = spec.min_bytes
    if working <= limits.l2_bytes // 2:
        return 0.0
    swizzled = spec.kind == "conv" and s.group_m > 1
    return 0.15 if swizzled else 0.5


def predict(spec: BlockSpec, s: Schedule, limits: DeviceLimits) -> float:
    """Predicted seconds of one launch."""
    return estimate(spec, s, limits).seconds


def roofline_seconds(spec: BlockSpec, limits: DeviceLimits) -> float:
    """Lower bound: compulsory bytes at DRAM bandwidth or useful FLOPs at the dtype's peak."""
    return max(spec.flops / math_rate(spec, limits), spec.min_bytes / limits.dram_bw)


def roofline_fraction(spec: BlockSpec, seconds: float, limits: DeviceLimits) -> float:
    """Fraction of the roofline a measured time reaches (1.0 = at the bound)."""
    if not seconds > 0:
        raise ValueError(f"seconds must be positive, got {seconds!r}")
    return roofline_seconds(spec, limits) / seconds
