"""Block tuning: search fusion plan x tile schedule jointly and keep the fastest correct plan.

tune_block() ranks the block's legal plans with the plan cost model (kernels.plan), takes the
`max_plans` cheapest plus the unfused plan (the baseline), and for each plan searches the tile
schedules of its costliest fused step (modelled) with a registered strategy (schedules.strategies) under its
share of the budget; then, for the winning plan, every other fused step's schedule in turn (costliest first,
the steps already tuned fixed at their best: coordinate descent) under `refine_trials` each. Conv steps run
their default (or looked-up) schedules, 'op' steps are torch.

Every candidate runs in the harness's isolated worker process (schedules.harness.Sandbox: timeouts,
crashes and memory limits replace the worker, never the tuner) through the worker's 'block'
request, answered by handle() here: the worker re-renders the plan's kernels itself, then the same
gate as single convs (fresh seeded inputs, every kernel output NaN-poisoned, float64 torch reference
of the whole block at kernels.reference.tolerance) and timing (worker.time_launches).
"""

from __future__ import annotations

import hashlib
import itertools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from tunerd.kernels import block_reference, fused, reference, trust
from tunerd.kernels.block import Block
from tunerd.kernels.conv import SPEC_DTYPES
from tunerd.kernels.plan import FUSED, Plan, PlanCost, Rates, cost, rank, step_cost, unfused
from tunerd.kernels.schedule import Schedule, ScheduleError

from .device import INTERPRETER_NAME, DeviceLimits
from .strategies import Budget, Measure, make
from .trial import COMPILE_ERROR, OK, WRONG, Trial, best_of


def rates(limits: DeviceLimits) -> Rates:
    """The plan cost model's rates for a device."""
    return Rates(
        dram_bw=limits.dram_bw,
        mma_flops=limits.fp16_flops,
        fp32_mma_flops=limits.fp32_flops,
        fp32_flops=limits.fp32_flops,
        launch_s=limits.launch_s,
    )


# ---- the space of one fused step ---------------------------------------------------------------
def space(fs: fused.FusedSpec, max_candidates: int | None = 32) -> list[Schedule]:
    """Legal schedules of a fused step, the default first, then by tile size (largest first)."""
    m = fs.pixels
    top_m = max(16, min(128, fused.next_pow2(m)))
    ms = [v for v in (16, 32, 64, 128) if v <= top_m]
    if fs.step.kind == "dw_ln":  # pixels per program (every channel on chip), warps from the tile
        cands = [fused.default_schedule(fs)]
        for bm in (1, 2, 4, 8, 16, 32, 64):
            if bm <= fused.next_pow2(m):
                cands.append(fused.dw_ln_schedule(fs, bm))
        legal = []
        for s in dict.fromkeys(cands):
            try:
                legal.append(fused.resolve(fs, s))
            except ScheduleError:
                continue
        return legal[:max_candidates] if max_candidates else legal
    if fs.step.kind == "inception":  # pixel tile x channel tile (per branch, capped at its slice)
        ns = [v for v in (16, 32, 64) if v <= max(16, fused.next_pow2(max(b.size for b in fs.branches)))]
        ks = [16]
    elif fs.step.kind == "expand_dw":  # pixels of one image x hidden channels per program
        top_m = max(16, min(128, fused.next_pow2(m // fs.block.n)))
        ms = [v for v in (16, 32, 64, 128) if v <= top_m]
        ns = [16]
        ks = [v for v in (16, 32, 64) if v <= max(16, fused.next_pow2(fs.out_spec.k))]
    elif fs.step.kind == "aspp":  # pixels x one branch's output channels, input channels per GEMM step
        src = fs.block.node(next(b.head for b in fs.aspp_branches if b.conv)).inputs[0]
        ns = [v for v in (16, 32, 64, 128) if v <= max(16, fused.next_pow2(max(b.size for b in fs.aspp_branches)))]
        ks = [v for v in (16, 32, 64) if v <= max(16, fused.next_pow2(fs.block.shapes[src].c))]
    elif fs.step.kind == "mbconv":  # pixels x output channels, hidden channels per chunk
        ns = [v for v in (16, 32, 64, 128) if v <= max(16, fused.next_pow2(fs.out_spec.k))]
        ks = [v for v in (16, 32, 64) if v <= max(16, fused.next_pow2(fs.depthwise().k))]
    elif fs.step.kind in ("separable", "se_pw", "pw_pool", "pool_pw", "gate_ep"):  # gate_ep: no reduction
        out = fs.out_spec
        ns = [v for v in (16, 32, 64, 128) if v <= max(16, fused.next_pow2(out.k))]
        ks = [16] if fs.step.kind == "gate_ep" else [v for v in (16, 32, 64) if v <= max(16, fused.next_pow2(out.c))]
        if fused.pooled_output(fs):  # pixels of one image per program
            ms = [v for v in (16, 32, 64, 128) if v <= max(16, min(128, fused.next_pow2(m // fs.block.n)))]
    elif fs.step.kind in ("dw_gate", "pw_gate"):  # pixels x depthwise channels; pixels x GEMM outputs, inputs per step
        conv = fs.block.conv_spec(fs.block.node(fs.gate.conv))
        lo, hi = fused.gate_channels(fs) if fs.step.kind == "dw_gate" else (0, conv.k)
        ns = [v for v in (16, 32, 64, 128) if v <= max(16, fused.next_pow2(hi - lo))]
        ks = [16] if fs.step.kind == "dw_gate" else [v for v in (16, 32, 64) if v <= max(16, fused.next_pow2(conv.c))]
    else:
        ns = [16]
        ks = [v for v in (16, 32, 64) if v <= max(16, fused.next_pow2(fs.block.shapes[fs.step.nodes[-1]].c * 4))]
    cands = [fused.default_schedule(fs)]
    for bm, bn, bk, w in itertools.product(reversed(ms), reversed(ns), reversed(ks), (4, 8)):
        s = Schedule(block_m=bm, block_n=bn, block_k=bk, group_m=1, num_warps=w, num_stages=2)
        try:
            cands.append(fused.resolve(fs, s))
        except ScheduleError:
            continue
    cands = list(dict.fromkeys(fused.resolve(fs, s) for s in cands))
    return cands[:max_candidates] if max_candidates else cands


def predict(fs: fused.FusedSpec, s: Schedule, limits: DeviceLimits) -> float:
    """Modelled seconds of one fused launch under s: the strategies' prior. Tiles are padded to whole
    blocks (tile quantization), programs run in waves over the SMs, and a separable step re-reads its
    input and recomputes its depthwise tile once per output-channel tile."""
    m, item = fs.pixels, fs.block.itemsize
    progs_m = fused._cdiv(m, s.block_m)
    mma_rate = limits.fp32_flops if fs.dtype == "float32" else limits.fp16_flops
    if fs.step.kind == "inception":  # padded channel tiles, taps on CUDA cores, each slice read once
        bcs = [min(s.block_n, fused.next_pow2(b.size)) for b in fs.branches]
        tiles = [
            (fused._cdiv(b.size, bc) * bc, fs.block.conv_spec(fs.block.node(b.conv)).taps if b.conv else 0)
            for b, bc in zip(fs.branches, bcs)
        ]
        progs = progs_m * fused.grid(fs, s)[1]
        work = progs_m * s.block_m * sum(2 * cpad * taps for cpad, taps in tiles) / limits.fp32_flops
        nbytes = 2 * m * sum(cpad for cpad, _ in tiles) * item
        waves = fused._cdiv(progs, limits.sm_count)
        return (
            limits.launch_s
            + max(nbytes / limits.dram_bw, waves * (work / progs) * limits.sm_count)
            + waves * limits.wave_s
        )
    if fs.step.kind == "aspp":  # every branch's GEMM over taps x input channels; the input read once
        brs = fs.aspp_branches
        c = fs.block.shapes[fs.block.node(next(b.head for b in brs if b.conv)).inputs[0]].c
        cpad = fused._cdiv(c, s.block_k) * s.block_k
        bns = [max(16, min(s.block_n, fused.next_pow2(b.size))) for b in brs]
        progs = fused.grid(fs, s)[0]
        taps = [fs.block.conv_spec(fs.block.node(b.head)).taps if b.conv else 0 for b in brs]
        work = (
            progs_m
            * s.block_m
            * sum(fused._cdiv(b.size, bn) * bn * t * cpad * 2 for b, bn, t in zip(brs, bns, taps))
            / mma_rate
        )
        nbytes = (m * c + m * sum(b.size for b in brs)) * item
        t_math = fused._cdiv(progs, limits.sm_count) * (work / progs) * limits.sm_count
        return (
            limits.launch_s + max(nbytes / limits.dram_bw, t_math) + fused._cdiv(progs, limits.sm_count) * limits.wave_s
        )
    if fs.step.kind in ("dw_gate", "pw_gate"):  # padded tiles of the depthwise taps / the GEMM; the step's bytes
        conv = fs.block.conv_spec(fs.block.node(fs.gate.conv))
        progs = fused.grid(fs, s)[0]
        if fs.step.kind == "dw_gate":
            lo, hi = fused.gate_channels(fs)
            work = progs_m * s.block_m * fused._cdiv(hi - lo, s.block_n) * s.block_n * 2 * conv.taps / limits.fp32_flops
        else:
            cpad = fused._cdiv(conv.c, s.block_k) * s.block_k
            work = progs * s.block_m * s.block_n * cpad * 2 / mma_rate
        nbytes = step_cost(fs.block, fs.step).bytes
        t_math = fused._cdiv(progs, limits.sm_count) * (work / progs) * limits.sm_count
        return (
            limits.launch_s + max(nbytes / limits.dram_bw, t_math) + fused._cdiv(progs, limits.sm_count) * limits.wave_s
        )
    out = fs.out_spec
    if fs.step.kind in ("expand_dw", "mbconv"):  # the expand GEMM recomputed per tap, per output-channel tile
        dw = fs.depthwise()
        p = fs.parts()
        cx = fs.block.shapes[fs.nodes[0].inputs[0]].c
        ex = 2 * dw.taps * fused._cdiv(cx, 16) * 16 / mma_rate if p["expand"] is not None else 0.0
        per_ch = ex + 2 * dw.taps / limits.fp32_flops  # seconds per (pixel, hidden channel) at the chip's rate
        if fs.step.kind == "expand_dw":
            tiles_k = fused._cdiv(dw.k, s.block_k)
            tpi = fused._cdiv(m // fs.block.n, s.block_m)
            progs = fs.block.n * tpi * tiles_k
            work = progs * s.block_m * s.block_k * per_ch
            nbytes = (tiles_k * fs.block.n * cx * math.prod(dw.in_size) + m * dw.k) * item
        else:
            tiles_n = fused._cdiv(out.k, s.block_n)
            progs = progs_m * tiles_n
            hpad = fused._cdiv(dw.k, s.block_k) * s.block_k
            work = progs * s.block_m * hpad * (per_ch + 2 * s.block_n / mma_rate)
            nbytes = (tiles_n * fs.block.n * cx * math.prod(dw.in_size) + m * out.k) * item
    elif fs.step.kind == "dw_ln":  # padded channel rows through every tap and the norm's passes; the step's bytes
        progs = progs_m
        work = progs * s.block_m * s.block_n * (2 * fs.depthwise().taps + 8) / limits.fp32_flops
        nbytes = step_cost(fs.block, fs.step).bytes
    elif fs.step.kind == "gate_ep":  # elementwise over padded tiles; the step's bytes
        progs = fused.grid(fs, s)[0]
        work = progs * s.block_m * s.block_n * 8 / limits.fp32_flops
        nbytes = step_cost(fs.block, fs.step).bytes
    elif fs.step.kind in ("se_pw", "pw_pool", "pool_pw"):  # the (gated, pooled) A operand re-read per channel tile
        tiles_n = fused._cdiv(out.k, s.block_n)
        progs = fused.grid(fs, s)[0]
        cpad = fused._cdiv(out.c, s.block_k) * s.block_k
        window = fs.parts()["pool"]["kernel"] ** 2 if fs.step.kind == "pool_pw" else 0  # window sums, CUDA cores
        work = progs * s.block_m * cpad * (2 * s.block_n / mma_rate + window / limits.fp32_flops)
        a_elems = fs.block.n * out.c * math.prod(fs.block.shapes[fs.nodes[0].inputs[0]].size) if window else m * out.c
        nbytes = (tiles_n * a_elems + m * out.k) * item
    elif fs.step.kind == "separable":
        tiles_n = fused._cdiv(out.k, s.block_n)
        progs = progs_m * tiles_n
        cpad = fused._cdiv(out.c, s.block_k) * s.block_k
        dw = fs.depthwise()
        work = progs * s.block_m * cpad * (2 * s.block_n / mma_rate + 2 * dw.taps / limits.fp32_flops)
        nbytes = (tiles_n * dw.n * dw.c * math.prod(dw.in_size) + m * out.k) * item
    else:
        p = fs.parts()
        hid = fs.block.shapes[p["pw1"].name].c
        cp, kp = fused.next_pow2(fs.block.shapes[p["ln"].name].c), fused.next_pow2(out.k)
        hpad = fused._cdiv(hid, s.block_k) * s.block_k
        progs = progs_m
        work = (
            progs
            * s.block_m
            * (2 * hpad * (cp + kp) / mma_rate + (2 * fs.dw_spec.taps * cp / limits.fp32_flops if fs.dw_spec else 0.0))
        )
        nbytes = (m * (out.c + out.k) + hid * (out.c + out.k)) * item
    # work is in seconds at the whole chip's rate; one program at a time per SM runs at 1/sm_count of it
    t_math = fused._cdiv(progs, limits.sm_count) * (work / progs) * limits.sm_count
    return limits.launch_s + max(nbytes / limits.dram_bw, t_math) + fused._cdiv(progs, limits.sm_count) * limits.wave_s


def searched_step(plan: Plan, block: Block | None = None) -> int | None:
    """The step whose schedule a plan's search varies (None: nothing to vary): with the block, its fused step
    of the highest modelled cost (expand_dw | se_pw searches the expand_dw launch), else the first fused step."""
    fused_steps = [i for i, s in enumerate(plan.steps) if s.kind in FUSED]
    if not fused_steps or block is None:
        return fused_steps[0] if fused_steps else None
    costs = cost(block, plan).steps
    return max(fused_steps, key=lambda i: (costs[i].seconds, -i))


# ---- measuring one (plan, schedules) in the worker ---------------------------------------------
def handle(msg: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """The worker's answer to {"kind": "block", block, plan, schedules, reps, warmup, flush_l2, seed}."""
    from . import sandbox as _sandbox

    t0 = time.perf_counter()
    try:
        block = Block.from_dict(msg["block"])
        plan = Plan.from_dict(block, msg["plan"])
        schedules = {int(i): Schedule.from_dict(s) for i, s in msg["schedules"].items()}
        fused.variants(block, plan, schedules)  # render (and so check) every kernel before any input exists
    except (ValueError, KeyError) as e:
        return {"status": COMPILE_ERROR, "error": _sandbox.describe(e), "seconds": time.perf_counter() - t0}
    tol = reference.tolerance(block.dtype)
    try:
        gen = torch.Generator(device=device)
        gen.manual_seed(int(msg["seed"]))
        params = fused.random_params(block, device, gen)
        x = torch.randn((block.n, block.c, *block.in_size), generator=gen, device=device)
        x = x.to(SPEC_DTYPES[block.dtype])
        ref = block_reference.block(block, params, x)
    except Exception as e:  # not the candidate's doing
        return {"status": "crash", "error": f"setting up inputs failed: {_sandbox.describe(e)}"}
    try:
        got = fused.run_plan(block, params, x, plan, schedules, poison=True)
        _sync(device)
        rel, mx = reference.rel_error(got, ref), _sandbox.max_abs_error(got, ref)
        if not rel < tol:
            return {
                "status": WRONG,
                "rel_error": rel,
                "max_error": mx,
                "error": f"relative error {rel:.3g} exceeds the {block.dtype} tolerance {tol:g}",
            }
        box: dict[str, torch.Tensor] = {}

        def launch() -> None:
            box["y"] = fused.run_plan(block, params, x, plan, schedules)

        times = _sandbox.time_launches(launch, device, int(msg["reps"]), int(msg["warmup"]), bool(msg["flush_l2"]))
        rel2 = reference.rel_error(box["y"], ref)
        if not rel2 < tol:
            return {
                "status": WRONG,
                "rel_error": rel2,
                "max_error": _sandbox.max_abs_error(box["y"], ref),
                "error": f"output changed across repetitions: relative error {rel2:.3g} after timing",
            }
    except Exception as e:
        return _sandbox.failure(e, device)
    t = sorted(times)

    def pick(q: float) -> float:
        return t[min(len(t) - 1, int(q * (len(t) - 1) + 0.5))]

    return {
        "status": OK,
        "median_ms": pick(0.5),
        "p10_ms": pick(0.1),
        "p90_ms": pick(0.9),
        "reps": len(t),
        "rel_error": max(rel, rel2),
        "max_error": mx,
        "seconds": time.perf_counter() - t0,
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass(frozen=True)
class BlockTrial:
    """One measured (plan, schedules) of a block; `trial` carries status, timings and numerics
    (its variant_id hashes the plan and every kernel's source, its source holds them all)."""

    plan: Plan
    schedules: dict[int, Schedule]
    trial: Trial
    modelled: PlanCost

    def to_dict(self) -> dict[str, Any]:
        return {
            "plan": self.plan.to_dict(),
            "plan_description": self.plan.describe(),
            "schedules": {str(i): s.to_dict() for i, s in self.schedules.items()},
            "modelled_bytes": self.modelled.bytes,
            "modelled_seconds": self.modelled.seconds,
            **{k: v for k, v in self.trial.to_dict().items() if k not in ("schedule", "source")},
        }


class BlockHarness:
    """Measures (block, plan, schedules) in one isolated worker process (see the module doc)."""

    def __init__(
        self,
        *,
        device: str | None = None,
        reps: int | None = None,
        warmup: int | None = None,
        timeout_s: float = 300.0,
        startup_timeout_s: float = 300.0,
        flush_l2: bool = True,
        seed: int = 0,
        threads: int = 1,
    ) -> None:
        from . import harness as _harness

        if device is None:
            device = "cuda" if torch.cuda.is_available() and not fused.runtime.interpreting() else "cpu"
        gpu = torch.device(device).type == "cuda"
        self.device = device
        self.device_name = torch.cuda.get_device_name(device) if gpu else INTERPRETER_NAME
        self.reps = reps if reps is not None else (50 if gpu else 3)
        self.warmup = warmup if warmup is not None else (5 if gpu else 0)
        self.timeout_s = timeout_s
        self.flush_l2 = flush_l2
        self.seed = seed
        self._harness = _harness
        self._sandbox = _harness.Sandbox(device, threads, startup_timeout_s)

    def measure(self, block: Block, plan: Plan, schedules: dict[int, Schedule], reps: int | None = None) -> Trial:
        t0 = time.monotonic()
        try:
            variants = fused.variants(block, plan, schedules)
        except ValueError as e:  # ScheduleError / SpecError
            return Trial(
                schedule=Schedule(),
                variant_id="",
                source="",
                status=COMPILE_ERROR,
                error=str(e),
                device=self.device_name,
                seconds=time.monotonic() - t0,
            )
        vid = plan_variant_id(plan, variants)
        seed = int(hashlib.sha256(f"{self.seed}:{block.digest}".encode()).hexdigest()[:8], 16)
        msg = {
            "kind": "block",
            "block": block.to_dict(),
            "plan": plan.to_dict(),
            "schedules": {str(i): s.to_dict() for i, s in schedules.items()},
            "reps": reps or self.reps,
            "warmup": self.warmup,
            "flush_l2": self.flush_l2,
            "seed": seed,
        }
        reply = self._harness.isolated_request(self._sandbox, msg, self.timeout_s)
        i = searched_step(plan, block)
        return Trial.from_reply(
            reply,
            schedule=schedules.get(i, Schedule()) if i is not None else Schedule(),
            variant_id=vid,
            source="".join(f"# ---- kernel {n}: {v.kernel_name}\n{v.source}" for n, v in enumerate(variants)),
            device=self.device_name,
            seconds=time.monotonic() - t0,
        )

    def close(self) -> None:
        self._sandbox.stop()

    def __enter__(self) -> BlockHarness:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


plan_variant_id = trust.plan_id  # content hash of a plan and the exact sources of its kernels (a block winner's id)


# ---- the search ------------------------------------------------------------------------------
@dataclass
class BlockTuneResult:
    block: Block
    best: BlockTrial | None
    trials: list[BlockTrial]
    default: BlockTrial  # the planner's first choice under default schedules
    baseline: BlockTrial  # the unfused plan
    ranked: list[PlanCost]
    device: str = ""
    strategy: str = ""
    seconds: float = 0.0
    statuses: dict[str, int] = field(default_factory=dict)

    @property
    def speedup_vs_unfused(self) -> float | None:
        if self.best is None or not self.baseline.trial.ok:
            return None
        return self.baseline.trial.cost / self.best.trial.cost

    def to_dict(self) -> dict[str, Any]:
        return {
            "block": self.block.to_dict(),
            "best": self.best.to_dict() if self.best else None,
            "plan": self.best.plan.describe() if self.best else None,
            "trials": [t.to_dict() for t in self.trials],
            "default": self.default.to_dict(),
            "baseline": self.baseline.to_dict(),
            "ranked": [c.to_dict() for c in self.ranked],
            "speedup_vs_unfused": self.speedup_vs_unfused,
            "device": self.device,
            "strategy": self.strategy,
            "seconds": self.seconds,
            "statuses": self.statuses,
        }


def _best(trials: list[BlockTrial]) -> BlockTrial | None:
    """The fastest correct trial (schedules.trial.best_of), or None."""
    ok = [t for t in trials if t.trial.ok]
    best_trial = best_of([t.trial for t in ok])
    return next((t for t in ok if t.trial is best_trial), None)


def tune_block(
    block: Block,
    *,
    strategy: str = "exhaustive",
    budget_trials: int | None = None,
    budget_seconds: float | None = None,
    max_plans: int = 3,
    seed: int = 0,
    harness: BlockHarness | None = None,
    limits: DeviceLimits | None = None,
    reps: int | None = None,
    max_candidates: int | None = 32,
    on_trial: Callable[[BlockTrial], None] | None = None,
    refine_trials: int | None = None,
) -> BlockTuneResult:
    """Tune block over plan x schedule; see the module doc. budget_trials is shared out evenly over the plans
    searched (the unfused baseline and each plan's default schedule are always measured); refine_trials
    (default: a plan's share) bounds the search of each further fused step of the winning plan (0: none)."""
    t0 = time.monotonic()
    limits = limits or DeviceLimits.detect()
    r = rates(limits)
    ranked = rank(block, r)
    base = unfused(block)
    chosen = [c.plan for c in ranked[: max(1, max_plans)]]
    if base not in chosen:
        chosen.append(base)
    cost_of = {c.plan: c for c in ranked}
    own = harness is None
    harness = harness or BlockHarness(seed=seed)
    full = reps or harness.reps
    trials: list[BlockTrial] = []

    def measure_with(plan: Plan, i: int | None, fixed: dict[int, Schedule] | None = None) -> Measure:
        def measure(schedule: Schedule, reps: int) -> Trial:
            scheds = dict(fixed or {}) if i is None else {**(fixed or {}), i: schedule}
            t = harness.measure(block, plan, scheds, reps)
            bt = BlockTrial(plan=plan, schedules=scheds, trial=t, modelled=cost_of[plan])
            trials.append(bt)
            if on_trial is not None:
                on_trial(bt)
            return t

        return measure

    try:
        per_plan = None if budget_trials is None else max(1, budget_trials // len(chosen))
        for plan in chosen:
            i = searched_step(plan, block)
            measure = measure_with(plan, i)
            default = fused.default_schedule(fused.FusedSpec(block, plan.steps[i])) if i is not None else Schedule()
            measure(default, full)  # every plan's default schedule, so plans compare on equal terms
            if i is None or per_plan == 1:
                continue
            left = None if budget_seconds is None else max(1e-3, budget_seconds - (time.monotonic() - t0))
            cands = [s for s in space(fused.FusedSpec(block, plan.steps[i]), max_candidates) if s != default]
            fs = fused.FusedSpec(block, plan.steps[i])
            strat = make(strategy, seed=seed, reps=full, prior=lambda sch, fs=fs: predict(fs, sch, limits))
            strat.search(cands, measure, Budget(trials=None if per_plan is None else per_plan - 1, seconds=left))
            if budget_seconds is not None and time.monotonic() - t0 > budget_seconds:
                break
        best = _best(trials)
        if best is not None and refine_trials != 0:  # the winning plan's other fused steps, one at a time
            searched = searched_step(best.plan, block)
            costs = cost(block, best.plan).steps
            others = sorted(
                (j for j, st in enumerate(best.plan.steps) if st.kind in FUSED and j != searched),
                key=lambda j: (-costs[j].seconds, j),
            )
            for j in others:
                if budget_seconds is not None and time.monotonic() - t0 > budget_seconds:
                    break
                fixed = dict(best.schedules)
                fs = fused.FusedSpec(block, best.plan.steps[j])
                cands = [c for c in space(fs, max_candidates) if c != fixed.get(j, fused.default_schedule(fs))]
                fixed.pop(j, None)
                left = None if budget_seconds is None else max(1e-3, budget_seconds - (time.monotonic() - t0))
                n = refine_trials if refine_trials is not None else per_plan
                strat = make(strategy, seed=seed, reps=full, prior=lambda sch, fs=fs: predict(fs, sch, limits))
                strat.search(cands, measure_with(best.plan, j, fixed), Budget(trials=n, seconds=left))
                best = _best(trials) or best
        if best is not None and best.trial.reps < full:  # a short-run winner is confirmed at full length
            fixed = dict(best.schedules)  # all of them: the step searched last is re-set from fixed
            last = max(fixed) if fixed else None
            measure_with(best.plan, last, fixed)(fixed[last] if last is not None else best.trial.schedule, full)
            best = _best(trials)
    finally:
        if own:
            harness.close()
    statuses: dict[str, int] = {}
    for t in trials:
        statuses[t.trial.status] = statuses.get(t.trial.status, 0) + 1
    first = next(t for t in trials if t.plan == chosen[0])
    baseline = next(t for t in trials if t.plan == base)
    return BlockTuneResult(
        block=block,
        best=best,
        trials=trials,
        default=first,
        baseline=baseline,
        ranked=ranked,
        device=harness.device_name,
        strategy=strategy,
        seconds=time.monotonic() - t0,
        statuses=statuses,
    )
