"""python -m benchmarks.run: tunerd vs torch (cuDNN) and torch.compile on the seed suites, with the roofline.

For each chosen layer of each suite, each pass (fwd, dgrad, wgrad) and dtype, one process times side
by side (benchmarks.timing.compare): tunerd's tuned kernel (schedules.tuner, budget recorded) and its
default schedule, torch's own conv (cuDNN on GPU: channels_last, cudnn.benchmark; ATen on CPU),
torch.compile of the same op and, for fused-epilogue cases, the unfused torch sequence. Every
contender's output is checked against the float64 reference first; a wrong or failing contender is
recorded, never fatal. The device's copy bandwidth and matmul rates are measured in the same run and
each tunerd kernel gets its fraction of the roofline (schedules.cost with the measured rates).
`--e2e` adds training-step times of ResNet-50, MobileNetV2 and ConvNeXt-T: eager, tunerd.patch and
torch.compile. Without CUDA the run is the small interpreter mode, labelled as such.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import math
import platform
import re
import tempfile
import time
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

import tunerd  # noqa: F401  (first: tunerd selects Triton's interpreter on CPU-only machines before triton loads)
from tunerd.db.fingerprint import current
from tunerd.kernels import generator, reference, runtime
from tunerd.kernels import schedule as _sched
from tunerd.kernels.conv import SPEC_DTYPES
from tunerd.kernels.spec import BlockSpec, Epilogue, SpecError
from tunerd.schedules import cost, ops, suites
from tunerd.schedules.device import DeviceLimits
from tunerd.schedules.harness import Harness
from tunerd.schedules.strategies import STRATEGIES
from tunerd.schedules.tuner import tune

from . import networks, report, timing
from .timing import Failure, Timing, TimingConfig, compare, describe_error, device_peaks, synchronize

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
PASSES = ("fwd", "dgrad", "wgrad")
# The fused-epilogue cases: label -> (kernel kind it applies to, the chain)
FUSED_KINDS: dict[str, tuple[str, Epilogue]] = {
    "bias+relu": ("conv", Epilogue(bias=True, activation="relu")),
    "bn+relu+res": ("conv", Epilogue(affine=True, residual="pre", activation="relu")),
    "bias+gelu": ("depthwise", Epilogue(bias=True, activation="gelu")),
}
E2E_MODELS = ("resnet50", "mobilenetv2", "convnext_t")
COMPILE_BACKWARD_SKIP = (
    "Inductor has no convolution-backward template: aten.convolution_backward runs as an "
    "ATen fallback (cuDNN), so torch.compile's dgrad/wgrad is the `torch` contender"
)
COMPILE_CPU_SKIP = (
    "torch.compile is not run in the interpreter mode: Inductor's CPU code is no stand-in for "
    "the GPU comparison and compiles for minutes on this box"
)


@dataclass(frozen=True)
class Pick:
    """One layer of a named case subset: the first unique layer of `suite` that `match` accepts."""

    label: str
    suite: str
    match: Callable[[BlockSpec], bool]


# Named case subsets (--cases NAME): representative layers instead of --suites/--layers.
SUBSETS: dict[str, tuple[Pick, ...]] = {
    # the first GPU run (scripts/gpu-check.sh): each seed family's characteristic layer shapes
    "representative": (
        Pick("ResNet-50 stem 7x7/2", "resnet50", lambda s: s.c == 3),
        Pick("ResNet-50 3x3", "resnet50", lambda s: s.kernel == (3, 3) and s.stride == (1, 1) and s.c == 128),
        Pick("ResNet-50 1x1 reduce", "resnet50", lambda s: s.kernel == (1, 1) and (s.c, s.k) == (512, 128)),
        Pick("ConvNeXt-T dw 7x7", "convnext_t", lambda s: s.kind == "depthwise" and s.c == 192),
        Pick("ConvNeXt-T MLP 1x1 (C->4C)", "convnext_t", lambda s: s.kernel == (1, 1) and (s.c, s.k) == (192, 768)),
        Pick("MobileNetV2 expand 1x1", "mobilenetv2", lambda s: (s.c, s.k) == (24, 144)),
        Pick("MobileNetV2 dw 3x3", "mobilenetv2", lambda s: s.kind == "depthwise" and (s.c, s.stride) == (144, (1, 1))),
        Pick("MobileNetV2 project 1x1", "mobilenetv2", lambda s: (s.c, s.k) == (144, 24)),
        Pick("RepLKNet-31B dw 31x31", "replknet31b", lambda s: s.kernel == (31, 31)),
        Pick("Mamba causal conv1d k4", "mamba_short_conv", lambda s: s.c == 2048 and s.in_size == (4096,)),
        Pick("(2+1)D spatial 1x3x3", "video_2plus1d", lambda s: s.kernel == (1, 3, 3) and (s.c, s.k) == (64, 144)),
        Pick("(2+1)D temporal 3x1x1", "video_2plus1d", lambda s: s.kernel == (3, 1, 1) and (s.c, s.k) == (144, 64)),
    ),
    # the same families at interpreter size (scripts/gpu-check.sh --dry-run, CI)
    "quick": (
        Pick("3x3", "quick", lambda s: s.kernel == (3, 3) and s.groups == 1),
        Pick("causal conv1d", "quick", lambda s: s.ndim == 1),
    ),
}


def resolve(name: str, batch: int | None = None, dtype: str | None = None) -> list[tuple[Pick, int]]:
    """The subset's picks with their suite layer indices; SpecError names a pick that matches no layer."""
    if name not in SUBSETS:
        raise SpecError(f"unknown case subset {name!r}; available: {', '.join(SUBSETS)}")
    out = []
    for pick in SUBSETS[name]:
        specs = suites.suite(pick.suite, batch=batch, dtype=dtype)
        index = next((i for i, s in enumerate(specs) if pick.match(s)), None)
        if index is None:
            raise SpecError(f"case subset {name!r}: no layer of {pick.suite} matches {pick.label!r}")
        out.append((pick, index))
    return out


def compile_off(cfg: Config) -> str:
    """Why the torch.compile contender did not run when cfg.compile is off."""
    return COMPILE_CPU_SKIP if cfg.device == "cpu" else "torch.compile off (--compile off)"


# ---- configuration -------------------------------------------------------------------------------
@dataclass
class Config:
    """Everything a run was asked to do (recorded in the JSON)."""

    small: bool
    device: str
    suites: list[str]
    passes: list[str]
    dtypes: list[str]  # spec dtype names
    layers_per_suite: int
    layers: list[int] | None  # explicit suite indices (overrides layers_per_suite)
    cases: str | None  # a SUBSETS name (overrides suites, layers and layers_per_suite)
    batch: int | None
    fused: bool
    tune_budget: int
    tune_seconds: float
    strategy: str
    seed: int
    time_limit: float
    compile: bool
    compile_mode: str
    n_inputs: int
    timing: TimingConfig
    e2e: bool
    e2e_models: list[str]
    e2e_batch: int
    e2e_size: int
    e2e_width: float
    e2e_blocks: int | None  # blocks per stage (None: the real depths)
    e2e_compile_mode: str
    e2e_share: float  # fraction of the time limit kept for the end-to-end part
    out: str | None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["timing"] = self.timing.to_dict()
        d["tune"] = {
            "strategy": self.strategy,
            "budget_trials": self.tune_budget,
            "budget_seconds": self.tune_seconds,
            "seed": self.seed,
        }
        return d


_csv = timing.csv


def parse_args(argv: list[str] | None = None) -> Config:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--suites", help=f"comma list of {', '.join(suites.SUITES)}")
    p.add_argument("--passes", help="comma list of fwd,dgrad,wgrad")
    p.add_argument("--dtypes", help="comma list of bf16,fp16,fp32")
    p.add_argument(
        "--layers-per-suite",
        type=int,
        help="layers per suite: the middle depthwise, the middle dense, then spread (default 1)",
    )
    p.add_argument("--layers", help="explicit comma list of suite layer indices (overrides --layers-per-suite)")
    p.add_argument(
        "--cases",
        choices=sorted(SUBSETS),
        help="a named subset of representative layers (overrides --suites and --layers)",
    )
    p.add_argument("--batch", type=int, help="batch size for every suite (default: each suite's own)")
    p.add_argument("--no-fused", action="store_true", help="skip the fused-epilogue cases")
    p.add_argument("--tune-budget", type=int, help="tuner trials per spec")
    p.add_argument("--tune-seconds", type=float, help="tuner seconds per spec")
    p.add_argument("--strategy", default="model", help="schedules.strategies name (default: model)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--time-limit", type=float, help="seconds; no new work starts after it, results are written")
    timing.add_args(p)
    p.add_argument("--e2e", action="store_true", help="also time training steps of ResNet-50/MobileNetV2/ConvNeXt-T")
    p.add_argument("--e2e-only", action="store_true", help="only the end-to-end part")
    p.add_argument("--e2e-models", help=f"comma list of {', '.join(E2E_MODELS)}")
    p.add_argument("--e2e-batch", type=int)
    p.add_argument("--e2e-compile-mode", default="default")
    p.add_argument("--e2e-share", type=float, help="fraction of the time limit for the end-to-end part (default 0.45)")
    p.add_argument("--small", action="store_true", help="tiny interpreter-sized run (the default without CUDA)")
    p.add_argument("--full", action="store_true", help="the GPU-sized run even without CUDA (hours on the interpreter)")
    p.add_argument(
        "--out", help="output directory (default: benchmarks/results/<date>-<device>/, a temp dir in small mode)"
    )
    a = p.parse_args(argv)

    cuda = torch.cuda.is_available() and not runtime.interpreting()
    small = a.small or (not cuda and not a.full)
    dtypes = _csv(a.dtypes) or (["fp32", "bf16"] if small else ["bf16", "fp16"])
    if any(d not in DTYPES for d in dtypes):
        p.error(f"dtypes must be among {list(DTYPES)}, got {dtypes}")
    passes = _csv(a.passes) or list(PASSES)
    if any(x not in PASSES for x in passes):
        p.error(f"passes must be among {list(PASSES)}, got {passes}")
    names = _csv(a.suites) or (["quick"] if small else [n for n in suites.SUITES if n != "quick"])
    if a.cases:
        names = list(dict.fromkeys(p.suite for p in SUBSETS[a.cases]))
    if any(n not in suites.SUITES for n in names):
        p.error(f"unknown suite in {names}; available: {list(suites.SUITES)}")
    e2e_models = _csv(a.e2e_models) or list(E2E_MODELS)
    if any(m not in networks.MODELS for m in e2e_models):
        p.error(f"e2e models must be among {list(networks.MODELS)}")
    if a.strategy not in STRATEGIES:
        p.error(f"unknown strategy {a.strategy!r}; choose one of {sorted(STRATEGIES)}")
    layers = [int(v) for v in _csv(a.layers)] if a.layers else ([1, 3] if small and names == ["quick"] else None)
    if a.cases:
        layers = None
    warm, reps, rounds = (0, 1, 2) if small else (3, 10, 5)
    return Config(
        small=small,
        device="cuda" if cuda else "cpu",
        suites=[] if a.e2e_only else names,
        passes=passes,
        dtypes=[DTYPES[d] for d in dtypes],
        layers_per_suite=a.layers_per_suite or 1,
        layers=layers,
        cases=a.cases,
        batch=a.batch,
        fused=not a.no_fused,
        tune_budget=a.tune_budget or (2 if small else 6),
        tune_seconds=a.tune_seconds or (20.0 if small else 8.0),
        strategy=a.strategy,
        seed=a.seed,
        time_limit=a.time_limit or (100.0 if small else 400.0),
        compile=a.compile == "on" or (a.compile == "auto" and cuda),
        compile_mode=a.compile_mode,
        n_inputs=a.inputs or (2 if small else 3),
        timing=timing.config_from_args(a, cuda, warm, reps, rounds),
        e2e=a.e2e or a.e2e_only,
        e2e_models=e2e_models,
        e2e_batch=a.e2e_batch or (2 if small else 64),
        e2e_size=32 if small else 224,
        e2e_width=0.125 if small else 1.0,
        e2e_blocks=1 if small else None,
        e2e_compile_mode=a.e2e_compile_mode,
        e2e_share=1.0 if a.e2e_only else (a.e2e_share or 0.45),
        out=a.out,
    )


# ---- the device ------------------------------------------------------------------------------------
def fingerprint(device: torch.device) -> dict[str, Any]:
    """Which machine and software stack produced the numbers: the store's fingerprint plus a few extras."""
    fp = current(device).to_dict()
    fp.update(
        python=platform.python_version(),
        cudnn=torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
    )
    if fp["interpreter"]:
        fp["host_cpu"] = platform.processor() or platform.machine()
    return fp


def measured_limits(peaks: dict[str, Any]) -> DeviceLimits:
    """The cost model's device limits with the roofline's two ceilings replaced by this run's measurements:
    copy bandwidth for DRAM, the bf16 matmul rate for fp16/bf16 tensor-core math, fp32 for CUDA-core math."""
    rates = peaks["matmul_tflops"]
    return replace(
        DeviceLimits.detect(),
        dram_bw=peaks["copy_gbps"] * 1e9,
        fp16_flops=rates["bfloat16"] * 1e12,
        fp32_flops=rates["float32"] * 1e12,
    )


def roofline(spec: BlockSpec, medians_ms: dict[str, float | None], limits: DeviceLimits) -> dict[str, Any]:
    """The spec's roofline time, which ceiling binds, and each measured time's fraction of it."""
    t_math = spec.flops / cost.math_rate(spec, limits)
    t_mem = spec.min_bytes / limits.dram_bw
    out: dict[str, Any] = {"roofline_ms": max(t_math, t_mem) * 1e3, "bound": "compute" if t_math >= t_mem else "memory"}
    for name, ms in medians_ms.items():
        out[name] = cost.roofline_fraction(spec, ms / 1e3, limits) if ms else None
    return out


# ---- cases -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    """One spec to time: a suite layer in one pass and dtype, optionally with a fused epilogue."""

    suite: str
    layer: int  # index into suites.suite(name) (the unique plain convs)
    spec: BlockSpec
    fused: str | None  # FUSED_KINDS label
    rank: tuple[int, ...]  # run order: earlier = more important under a time limit
    pick: str | None = None  # the Pick label when the case comes from a named subset

    @property
    def label(self) -> str:
        tail = f" +{self.fused}" if self.fused else ""
        named = f" ({self.pick})" if self.pick else ""
        return f"{self.suite}#{self.layer}{named} {self.spec.op} {self.spec.dtype}{tail}"


def spread(n: int, k: int) -> list[int]:
    """k indices spread evenly over range(n), first and last included (the middle one when k == 1)."""
    if k >= n:
        return list(range(n))
    if k == 1:
        return [n // 2]
    return sorted({round(i * (n - 1) / (k - 1)) for i in range(k)})


def pick_layers(specs: list[BlockSpec], k: int) -> list[int]:
    """k suite layers: the middle depthwise layer, the middle dense one, then others spread over the suite."""
    order = []
    for kind in ("depthwise", "conv"):
        of_kind = [i for i, s in enumerate(specs) if s.kind == kind]
        if of_kind:
            order.append(of_kind[len(of_kind) // 2])
    order += spread(len(specs), len(specs) if k >= len(specs) else k + 2)
    return list(dict.fromkeys(order))[:k]


def plan(cfg: Config) -> list[Case]:
    """All cases, most important first: the first dtype before the others; within a dtype the first layer's
    forward, then its backward passes, the fused cases, later layers; suites round-robin within each tier.
    A named subset (cfg.cases) puts every pick in the first tier, in the subset's order."""
    cases: list[Case] = []
    chosen: dict[str, list[tuple[int, int, str | None]]] = {}  # suite -> (layer, order, pick label)
    if cfg.cases:
        for order, (pick, li) in enumerate(resolve(cfg.cases, cfg.batch)):
            chosen.setdefault(pick.suite, []).append((li, order, pick.label))
    for si, name in enumerate(cfg.suites):
        for di, dtype in enumerate(cfg.dtypes):
            specs = suites.suite(name, batch=cfg.batch, dtype=dtype)
            layers = cfg.layers or pick_layers(specs, cfg.layers_per_suite)
            labelled = chosen.get(name) or [(i, si, None) for i in layers if 0 <= i < len(specs)]
            picks = [li for li, _, _ in labelled]
            for j, (li, order, label) in enumerate(labelled):
                for pi, op in enumerate(cfg.passes):
                    first = j == 0 or cfg.cases is not None
                    tier = (0 if op == "fwd" else 1) if first else 3 + 2 * (j - 1) + (op != "fwd")
                    cases.append(Case(name, li, specs[li].with_(op=op), None, (di, tier, pi, order), label))
            if cfg.fused and "fwd" in cfg.passes:
                for ki, (label, (kind, ep)) in enumerate(FUSED_KINDS.items()):
                    # a chosen layer of the right kind, else (not for a named subset) the suite's middle one
                    of_kind = [i for i in range(len(specs)) if specs[i].kind == kind]
                    middle = of_kind[len(of_kind) // 2] if of_kind and not cfg.cases else None
                    li = next((i for i in picks if i in of_kind), middle)
                    if li is not None:
                        cases.append(Case(name, li, specs[li].with_(epilogue=ep), label, (di, 2, ki, si)))
    return sorted(cases, key=lambda c: c.rank)


# ---- inputs and contenders -------------------------------------------------------------------------
Run = Callable[[int], torch.Tensor]  # a contender: does the timed work on input set i, returns its result


@dataclass(frozen=True)
class Skip:
    reason: str


def channels_last(t: Any) -> Any:
    """Activations and weights in channels-last memory (NCL tensors with C innermost for conv1d)."""
    if not isinstance(t, torch.Tensor) or t.dim() < 3:
        return t
    if t.dim() == 4:
        return t.contiguous(memory_format=torch.channels_last)
    if t.dim() == 5:
        return t.contiguous(memory_format=torch.channels_last_3d)
    return t.transpose(1, 2).contiguous().transpose(1, 2)


def make_sets(spec: BlockSpec, n: int, device: torch.device, seed: int) -> list[dict[str, Any]]:
    """n input sets from the harness's own op binding (channels-last), seeded per spec."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed * 1_000_003 + zlib.crc32(spec.key.encode()))
    ops.check(spec)
    make = ops.binding(spec.op).make_inputs
    return [{k: channels_last(v) for k, v in make(spec, device, gen).items()} for _ in range(n)]


def tunerd_contender(
    spec: BlockSpec, schedule: _sched.Schedule, sets: list[dict[str, Any]], device: torch.device
) -> Run:
    """The generated kernel launched on prepared arguments, plus what its op's result needs (wgrad: the
    split-K sum). Not timed: tunerd.functional's Python (rendering, weight packing); --e2e includes it."""
    b = ops.binding(spec.op)
    variant = generator.render(spec, schedule)
    outs = [b.output(variant, inp) for inp in sets]
    args = [b.kernel_args(variant, inp, out) for inp, out in zip(sets, outs)]

    def run(i: int) -> torch.Tensor:
        runtime.launch(variant, args[i], device)
        return b.result(variant, sets[i], outs[i])

    return run


def symmetric_padding(spec: BlockSpec) -> tuple[tuple[int, ...], tuple[slice, ...] | None]:
    """torch takes symmetric padding: pad max(low, high) and keep the window of the exact output
    (the causal-conv idiom). Raises SpecError where a stride makes the window inexact."""
    pads = tuple(max(p) for p in spec.padding)
    if all(lo == hi for lo, hi in spec.padding):
        return pads, None
    window = [slice(None), slice(None)]
    for (lo, _), p, st, out in zip(spec.padding, pads, spec.stride, spec.out_size):
        if (p - lo) % st:
            raise SpecError(f"asymmetric padding {spec.padding} with stride {spec.stride} has no torch equivalent")
        off = (p - lo) // st
        window.append(slice(off, off + out))
    return pads, tuple(window)


_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_ACT: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu,
    "relu6": F.relu6,
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda v: F.gelu(v, approximate="tanh"),
    "hardswish": F.hardswish,
    "sigmoid": torch.sigmoid,
}


def _per_channel(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t.to(like.dtype).reshape((1, -1) + (1,) * (like.dim() - 2))


def torch_forward(spec: BlockSpec) -> Callable[..., torch.Tensor]:
    """The op as a torch user writes it: F.convNd (bias included) then the epilogue in idiomatic ops."""
    pads, window = symmetric_padding(spec)
    conv, ep = _CONV[spec.ndim], spec.epilogue
    if ep.activation is not None and ep.activation not in _ACT:
        raise SpecError(f"no torch idiom for activation {ep.activation!r} in the benchmark")

    def forward(
        x: torch.Tensor,
        w: torch.Tensor,
        bias: torch.Tensor | None = None,
        scale: torch.Tensor | None = None,
        shift: torch.Tensor | None = None,
        residual: torch.Tensor | None = None,
        gamma: torch.Tensor | None = None,
    ) -> torch.Tensor:
        y = conv(x, w, bias, spec.stride, pads, spec.dilation, spec.groups)
        if window is not None:
            y = y[window]
        if ep.affine:
            y = torch.addcmul(_per_channel(shift, y), y, _per_channel(scale, y))
        if ep.residual == "pre":
            y = y + residual
        if ep.activation is not None:
            y = _ACT[ep.activation](y)
        if ep.layer_scale:
            y = y * _per_channel(gamma, y)
        if ep.residual == "post":
            y = y + residual
        return y

    return forward


def _torch_layout(t: Any, spec: BlockSpec) -> Any:
    """torch gets its preferred layout: channels_last for 2D/3D (as given), contiguous NCL for conv1d."""
    return t.contiguous() if isinstance(t, torch.Tensor) and spec.ndim == 1 and t.dim() == 3 else t


def torch_backward(spec: BlockSpec, sets: list[dict[str, Any]], device: torch.device) -> Run:
    """cuDNN's (ATen's) dgrad or wgrad alone: aten.convolution_backward with only that output requested."""
    pads, window = symmetric_padding(spec)
    nd = spec.ndim
    dtype = sets[0]["dy"].dtype
    sym_out = [
        (spec.in_size[d] + 2 * pads[d] - spec.dilation[d] * (spec.kernel[d] - 1) - 1) // spec.stride[d] + 1
        for d in range(nd)
    ]

    def dy_sym(dy: torch.Tensor) -> torch.Tensor:  # dy embedded in the symmetric conv's output (zeros outside)
        if window is None:
            return _torch_layout(dy, spec)
        full = torch.zeros((spec.n, spec.k, *sym_out), dtype=dtype, device=device)
        full[window] = dy
        return _torch_layout(channels_last(full), spec)

    dys = [dy_sym(s["dy"]) for s in sets]
    xs = [_torch_layout(s["x"], spec) for s in sets]
    ws = [_torch_layout(s["w"], spec) for s in sets]
    mask = [spec.op == "dgrad", spec.op == "wgrad", False]
    which = 0 if spec.op == "dgrad" else 1

    def run(i: int) -> torch.Tensor:
        return torch.ops.aten.convolution_backward(
            dys[i],
            xs[i],
            ws[i],
            None,
            list(spec.stride),
            list(pads),
            list(spec.dilation),
            False,
            [0] * nd,
            spec.groups,
            mask,
        )[which]

    return run


def torch_contenders(
    spec: BlockSpec, sets: list[dict[str, Any]], cfg: Config, device: torch.device
) -> dict[str, Run | Skip | Failure]:
    """torch (plain cases), torch_unfused (fused cases) and torch_compile of the same op."""
    out: dict[str, Run | Skip | Failure] = {}
    if spec.op != "fwd":
        out["torch"] = torch_backward(spec, sets, device)
        out["torch_compile"] = Skip(COMPILE_BACKWARD_SKIP if cfg.compile else compile_off(cfg))
        return out
    forward = torch_forward(spec)
    names = ("x", "w", "bias", "scale", "shift", "residual", "layer_scale")
    vectors = ("scale", "shift", "layer_scale")
    # per-channel vectors in the activation dtype up front, as a model's parameters would be
    targs = [
        [_torch_layout(s[k].to(s["x"].dtype) if k in vectors and k in s else s.get(k), spec) for k in names]
        for s in sets
    ]
    out["torch_unfused" if not spec.epilogue.is_identity else "torch"] = lambda i: forward(*targs[i])
    if not cfg.compile:
        out["torch_compile"] = Skip(compile_off(cfg))
        return out
    try:
        torch._dynamo.reset()  # one compiled op at a time: no cache-size fallbacks to eager
        compiled = torch.compile(forward, mode=cfg.compile_mode, dynamic=False)
        out["torch_compile"] = lambda i: compiled(*targs[i])
    except Exception as e:
        out["torch_compile"] = Failure("setup", describe_error(e))
    return out


# ---- measuring ----------------------------------------------------------------------------------------
def measure(
    contenders: dict[str, Run | Skip | Failure],
    ref: torch.Tensor | None,
    tol: float,
    n_inputs: int,
    device: torch.device,
    tcfg: TimingConfig,
) -> dict[str, dict[str, Any]]:
    """First call of each contender (timed: it compiles), its check against ref (without one: finite), then
    side-by-side timing."""
    results: dict[str, dict[str, Any]] = {}
    live: dict[str, Callable[[int], Any]] = {}
    for name, c in contenders.items():
        if isinstance(c, Skip):
            results[name] = {"status": "skipped", "reason": c.reason}
            continue
        if isinstance(c, Failure):
            results[name] = c.to_dict()
            continue
        t0 = time.perf_counter()
        try:
            ret = c(0)
            synchronize(device)
            first = time.perf_counter() - t0
            info: dict[str, Any] = {"first_call_s": first}
            if ref is not None:
                info["rel_error"] = reference.rel_error(ret, ref)
                if not info["rel_error"] < tol:
                    results[name] = {"status": "wrong-result", "tolerance": tol, **info}
                    continue
            elif not torch.isfinite(ret).all():
                results[name] = {"status": "wrong-result", "error": "non-finite output", **info}
                continue
        except Exception as e:  # compile errors, unsupported shapes, OOM: recorded per contender
            results[name] = {"status": "error", "stage": "first call", "error": describe_error(e)}
            continue
        results[name] = info
        live[name] = c
    for name, t in compare(live, n_inputs, device, tcfg).items():
        results[name] = (
            {"status": "ok", **t.to_dict(), **results[name]}
            if isinstance(t, Timing)
            else {**t.to_dict(), **results[name]}
        )
    return {name: results[name] for name in contenders}


def tune_spec(spec: BlockSpec, cfg: Config, harness: Harness) -> tuple[_sched.Schedule | None, dict[str, Any]]:
    """schedules.tuner on this spec within the stated budget: (best schedule or None, what the tuner did)."""
    t0 = time.perf_counter()
    try:
        r = tune(
            spec,
            strategy=cfg.strategy,
            budget_trials=cfg.tune_budget,
            budget_seconds=cfg.tune_seconds,
            seed=cfg.seed,
            harness=harness,
        )
    except Exception as e:
        return None, {"error": describe_error(e), "seconds": time.perf_counter() - t0}
    info = {
        "seconds": r.seconds,
        "candidates": r.candidates,
        "measured": r.measured,
        "statuses": r.statuses,
        "speedup_vs_default": r.speedup_vs_default,
        "default_schedule": r.default_trial.schedule.to_dict(),
        "best_schedule": r.best.schedule.to_dict() if r.best else None,
        "best_median_ms": r.best.median_ms if r.best else None,
        "default_median_ms": r.default_trial.median_ms,
    }
    if r.best is None:
        info["error"] = "no candidate passed the correctness gate"
    return (r.best.schedule if r.best else None), info


def run_case(case: Case, cfg: Config, device: torch.device, harness: Harness, limits: DeviceLimits) -> dict[str, Any]:
    spec = case.spec
    doc: dict[str, Any] = {
        "suite": case.suite,
        "layer": case.layer,
        "pick": case.pick,
        "name": spec.describe(),
        "pass": spec.op,
        "dtype": spec.dtype,
        "fused": case.fused is not None,
        "epilogue": case.fused,
        "spec": spec.to_dict(),
        "flops": spec.flops,
        "min_bytes": spec.min_bytes,
    }
    t0 = time.perf_counter()
    try:
        sets = make_sets(spec, cfg.n_inputs, device, cfg.seed)
        ref = ops.binding(spec.op).reference(spec, sets[0])
    except Exception as e:
        doc.update(error=describe_error(e), contenders={}, speedups={}, seconds=time.perf_counter() - t0)
        return doc
    schedule, doc["tune"] = tune_spec(spec, cfg, harness)
    contenders: dict[str, Run | Skip | Failure] = {}
    try:
        contenders["tunerd_tuned"] = (
            tunerd_contender(spec, schedule, sets, device)
            if schedule is not None
            else Failure("tune", doc["tune"].get("error", "no tuned schedule"))
        )
    except Exception as e:
        contenders["tunerd_tuned"] = Failure("setup", describe_error(e))
    try:
        contenders["tunerd_default"] = tunerd_contender(spec, _sched.default(spec), sets, device)
    except Exception as e:
        contenders["tunerd_default"] = Failure("setup", describe_error(e))
    try:
        contenders.update(torch_contenders(spec, sets, cfg, device))
    except Exception as e:
        contenders["torch_unfused" if case.fused else "torch"] = Failure("setup", describe_error(e))
    doc["contenders"] = measure(contenders, ref, reference.tolerance(spec.dtype), cfg.n_inputs, device, cfg.timing)
    doc["speedups"] = report.case_speedups(doc)
    doc["roofline"] = roofline(spec, {n: report.median_ms(doc, n) for n in report.TUNERD}, limits)
    doc["seconds"] = time.perf_counter() - t0
    return doc


# ---- end to end -------------------------------------------------------------------------------------
def e2e_model(name: str, cfg: Config, device: torch.device) -> dict[str, Any]:
    """Training-step time (forward + backward + SGD) of one model: eager, tunerd.patch, torch.compile."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    n_classes = 1000 if not cfg.small else 10
    gen = torch.Generator(device=device)
    gen.manual_seed(cfg.seed)
    xs = [
        torch.randn(cfg.e2e_batch, 3, cfg.e2e_size, cfg.e2e_size, generator=gen, device=device)
        .to(dtype)
        .contiguous(memory_format=torch.channels_last)
        for _ in range(2)
    ]
    ys = [torch.randint(0, n_classes, (cfg.e2e_batch,), generator=gen, device=device) for _ in range(2)]
    notes: dict[str, str] = {}

    def contender(kind: str) -> Run:
        torch.manual_seed(cfg.seed)
        model = (
            networks.build(
                name,
                width=cfg.e2e_width,
                num_classes=n_classes,
                device=device,
                dtype=dtype,
                blocks_per_stage=cfg.e2e_blocks,
            )
            .to(memory_format=torch.channels_last)
            .train()
        )
        fwd: Callable[[torch.Tensor], torch.Tensor] = model
        if kind == "tunerd":
            rep = tunerd.patch(model)
            notes[kind] = f"{len(rep.swapped)} convs swapped, {len(rep.fused)} fused with BN, {len(rep.left)} left"
        if kind == "torch_compile":
            torch._dynamo.reset()
            fwd = torch.compile(model, mode=cfg.e2e_compile_mode)
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

        def step(i: int) -> torch.Tensor:
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(fwd(xs[i]), ys[i])
            loss.backward()
            opt.step()
            return loss.detach()

        return step

    contenders: dict[str, Run | Skip | Failure] = {}
    for kind in ("eager", "tunerd", "torch_compile"):
        if kind == "torch_compile" and not cfg.compile:
            contenders[kind] = Skip(compile_off(cfg))
            continue
        try:
            contenders[kind] = contender(kind)
        except Exception as e:
            contenders[kind] = Failure("setup", describe_error(e))
    tcfg = TimingConfig(
        warmup=0 if cfg.small else 2,
        reps=1 if cfg.small else 3,
        rounds=1 if cfg.small else 3,
        flush_bytes=cfg.timing.flush_bytes,
    )
    res = measure(contenders, None, math.inf, 2, device, tcfg)
    for kind, note in notes.items():
        res[kind]["note"] = note
    return {
        "model": name,
        "batch": cfg.e2e_batch,
        "input": f"{cfg.e2e_size}x{cfg.e2e_size}",
        "dtype": str(dtype).removeprefix("torch."),
        "width": cfg.e2e_width,
        "blocks_per_stage": cfg.e2e_blocks,
        "compile_mode": cfg.e2e_compile_mode,
        "schedules": "default heuristic (no tuned winners loaded)",
        "contenders": res,
    }


# ---- the run ------------------------------------------------------------------------------------------
def output_dir(cfg: Config, dev: dict[str, Any]) -> Path:
    if cfg.out:
        return Path(cfg.out)
    if cfg.small:
        return Path(tempfile.mkdtemp(prefix="tunerd-bench-"))
    slug = re.sub(r"[^a-z0-9]+", "-", dev["name"].lower()).strip("-")
    base = Path(__file__).resolve().parent / "results" / f"{_dt.date.today():%Y-%m-%d}-{slug}"
    path, i = base, 1
    while path.exists():
        i += 1
        path = base.with_name(f"{base.name}-{i}")
    return path


def _log(t0: float, msg: str) -> None:
    print(f"[{time.perf_counter() - t0:6.0f}s] {msg}", flush=True)


def _contenders_line(results: dict[str, dict[str, Any]]) -> str:
    return ", ".join(
        f"{name} {r['median_ms']:.4g}ms" if r.get("status") == "ok" else f"{name} {r.get('status')}"
        for name, r in results.items()
    )


def _case_line(doc: dict[str, Any]) -> str:
    if doc.get("error"):
        return f"error: {doc['error']}"
    s = doc["speedups"]
    key = "tuned_vs_unfused" if doc["fused"] else "tuned_vs_torch"
    extra = [f"{k} {s[k]:.2f}x" for k in (key, "tuned_vs_compile") if s.get(k)]
    roof = doc["roofline"].get("tunerd_tuned")
    if roof:
        extra.append(f"roofline {100 * roof:.0f}%")
    return _contenders_line(doc["contenders"]) + (" | " + ", ".join(extra) if extra else "")


def _checkpoint(doc: dict[str, Any], t0: float, out_dir: Path) -> None:
    """Rewrite results.json and report.md: a run killed from outside still leaves what it measured."""
    doc["summary"] = report.summarize(doc["cases"])
    doc["elapsed_s"] = time.perf_counter() - t0
    report.write(doc, out_dir, final=False)


def _estimate(past: list[float]) -> float:
    return sum(past) / len(past) if past else 0.0


def run_e2e(doc: dict[str, Any], cfg: Config, device: torch.device, t0: float, deadline: float, out_dir: Path) -> None:
    """End-to-end models in order; one whose estimated time (the mean so far) would pass the deadline is skipped."""
    took: list[float] = []
    for name in cfg.e2e_models:
        if time.perf_counter() - t0 + _estimate(took) > deadline:
            doc["e2e"].append({"model": name, "contenders": {}, "skipped": f"time limit ({deadline:.0f}s for e2e)"})
            _log(t0, f"e2e {name}: not run (time limit)")
            continue
        _log(t0, f"e2e {name}: batch {cfg.e2e_batch}, {cfg.e2e_size}x{cfg.e2e_size}, eager / tunerd.patch / compile")
        t1 = time.perf_counter()
        doc["e2e"].append(e2e_model(name, cfg, device))
        took.append(time.perf_counter() - t1)
        _log(t0, "    " + _contenders_line(doc["e2e"][-1]["contenders"]))
        torch._dynamo.reset()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        _checkpoint(doc, t0, out_dir)


def run_layers(
    doc: dict[str, Any],
    cfg: Config,
    device: torch.device,
    limits: DeviceLimits,
    t0: float,
    deadline: float,
    out_dir: Path,
) -> None:
    """The planned cases in priority order until the deadline; what it cuts is listed in doc["stopped"]."""
    cases = plan(cfg)
    if not cases:
        return
    _log(
        t0,
        f"plan: {len(cases)} cases over {len(cfg.suites)} suites in priority order (first dtype first; "
        "forward, backward, fused, more layers); the time limit cuts the tail, listed as not run",
    )
    spent: dict[str, list[float]] = {}
    harness = Harness(device=cfg.device, seed=cfg.seed)
    try:
        for i, case in enumerate(cases):
            if time.perf_counter() - t0 + _estimate(spent.get(case.spec.op, [])) > deadline:
                doc["stopped"] = {
                    "reason": f"time limit ({deadline:.0f}s)",
                    "cases_not_run": len(cases) - i,
                    "not_run": [c.label for c in cases[i:]],
                }
                _log(t0, f"time limit reached: {len(cases) - i} cases not run")
                break
            _log(t0, f"[{i + 1}/{len(cases)}] {case.label}: {case.spec.describe()}")
            cdoc = run_case(case, cfg, device, harness, limits)
            spent.setdefault(case.spec.op, []).append(cdoc["seconds"])
            doc["cases"].append(cdoc)
            _log(t0, f"    {_case_line(cdoc)}")
            _checkpoint(doc, t0, out_dir)
    finally:
        harness.close()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    cfg = parse_args(argv)
    t0 = time.perf_counter()
    device = torch.device(cfg.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        # fp32 is compared as tunerd's default 'ieee' precision: no TF32 in cuDNN or cuBLAS either
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    dev = fingerprint(device)
    out_dir = output_dir(cfg, dev)
    interp = dev["interpreter"]
    doc: dict[str, Any] = {
        "schema": "tunerd-benchmark/1",
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": dev,
        "labels": {"torch": "torch CPU conv (ATen)" if interp else "cuDNN"},
        "note": (
            "Triton interpreter results on CPU: they prove the benchmark runs; they are not GPU numbers."
            if interp
            else "GPU results"
        ),
        "config": cfg.to_dict(),
        "peaks": {},
        "cases": [],
        "e2e": [],
        "summary": {},
        "stopped": None,
        "elapsed_s": 0.0,
    }
    _log(t0, f"tunerd benchmark on {dev['name']} -> {out_dir}")
    if interp:
        _log(t0, "interpreter mode: every Triton kernel runs in Python; numbers are not GPU numbers")

    peak_cfg = (
        TimingConfig(warmup=1, reps=5, rounds=1, flush_bytes=0)
        if interp
        else TimingConfig(warmup=3, reps=10, rounds=2, flush_bytes=0)
    )
    doc["peaks"] = device_peaks(
        device,
        [torch.float32, *(SPEC_DTYPES[d] for d in cfg.dtypes)],
        peak_cfg,
        copy_bytes=(64 << 20) if interp else (1 << 30),
        matmul_size=512 if interp else 8192,
    )
    limits = measured_limits(doc["peaks"])
    _log(
        t0,
        f"peaks: copy {doc['peaks']['copy_gbps']:.1f} GB/s, matmul "
        + ", ".join(f"{k} {v:.2f} TFLOP/s" for k, v in doc["peaks"]["matmul_tflops"].items()),
    )

    if cfg.e2e:  # the big indivisible units first, within their share; the small layer cases fill the rest
        run_e2e(doc, cfg, device, t0, cfg.time_limit * cfg.e2e_share, out_dir)
    run_layers(doc, cfg, device, limits, t0, cfg.time_limit, out_dir)
    doc["summary"] = report.summarize(doc["cases"])
    doc["elapsed_s"] = time.perf_counter() - t0
    paths = report.write(doc, out_dir, final=True)
    _log(t0, "wrote " + ", ".join(paths.values()))
    print(report.summary_text(doc), flush=True)
    return doc


if __name__ == "__main__":
    main()
