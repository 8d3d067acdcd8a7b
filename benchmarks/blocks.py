"""python -m benchmarks.blocks: fused blocks vs eager torch (cuDNN + separate ops) and torch.compile.

One representative block per block suite (tunerd.schedules.block_suites: the entry that moves the most of its
network's modelled HBM traffic, count x unfused bytes), plus ECA-Net's MobileNetV2 block, each forward
(`fwd`) and forward + backward of a random upstream gradient (`fwd+bwd`), per dtype. Contenders, in one
process on the same input sets, timed side by side by benchmarks.timing.compare:

  tunerd         the block under its plan (kernels.fused.run_plan; fwd+bwd: kernels.block_autograd): the
                 planner's default plan on default schedules, or with --tune-budget the plan and schedules
                 schedules.blocks.tune_block picked (the case records which)
  eager          the block as a torch user writes it: F.conv2d (cuDNN on GPU, channels_last), eval
                 F.batch_norm, idiomatic activations, the other nodes as kernels.block_reference defines them
  torch_compile  torch.compile of that eager function (skipped in the interpreter mode)
  *_graph        fwd on CUDA: each of those replayed from CUDA graphs, the device time without host overhead

Module cases (MODULE_SUITES: repvgg_a0) are timm modules whose training form tunerd runs module based
(tunerd.blocks.rep_block: BatchNorm on batch statistics, kernels.reparam.train_forward), timed the same way:

  tunerd         rep_block's auto form (the modelled cheapest of combine / merged / the block's own forward)
  tunerd_<form>  each forced form: tunerd_combine (stats conv + elementwise combine), tunerd_merged (stats conv +
                 a conv of the statistics-merged weight); the form 'eager' is the eager contender itself
  eager          the timm module's own forward (cuDNN on GPU, channels_last); torch_compile: torch.compile of it

CUDA-graph cases (GRAPH_SUITES: cuda_graphs, GPU only, forward only; in the default suites with CUDA) are timm
modules at batch 1 in eval without gradients, where launches dominate:

  tunerd              tunerd.patch(module): its kernels launched from Python call by call
  tunerd_cuda_graphs  tunerd.patch(module, cuda_graphs=True): each patched conv and fused block replays a CUDA graph
                      captured for the input's signature (tunerd.graphs; the case records captures and fallbacks)
  eager               the timm module's own forward; torch_compile: torch.compile of it

Every contender's output (and for fwd+bwd the gradients of the input and every parameter) is checked against
the float64 oracle first; a failing or wrong contender is recorded, never fatal. Beside the times: the modelled
HBM bytes and launches of the fused plan vs the unfused (eager) plan (kernels.plan.cost; forward only), and
speedups vs eager and vs torch.compile with geometric means per suite. Without CUDA the run is the small
interpreter mode on tiny blocks, labelled as such: its times mean nothing, its bytes do.
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import math
import re
import tempfile
import time
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

import tunerd  # noqa: F401  (first: tunerd selects Triton's interpreter on CPU-only machines before triton loads)
from tunerd.kernels import block as B
from tunerd.kernels import block_autograd, block_reference, fused, reference, runtime
from tunerd.kernels.block import Block, Node
from tunerd.kernels.conv import SPEC_DTYPES
from tunerd.kernels.plan import Plan, PlanCost, cost, rank, unfused
from tunerd.kernels.schedule import Schedule
from tunerd.schedules import block_suites
from tunerd.schedules.blocks import BlockHarness, tune_block
from tunerd.schedules.strategies import STRATEGIES

from . import report, timing
from .run import _ACT, COMPILE_CPU_SKIP, DTYPES, Skip, _log, fingerprint
from .timing import Failure, Timing, TimingConfig, compare, describe_error, synchronize

PASSES = ("fwd", "fwd+bwd")
CONTENDERS = ("tunerd", "eager", "torch_compile")
FORM_CONTENDERS = ("tunerd_combine", "tunerd_merged")  # module cases: the forced training forms
GRAPH_CONTENDERS = ("tunerd_cuda_graphs",)  # CUDA-graph cases: tunerd.patch(..., cuda_graphs=True)
GRAPHED = {"tunerd": "tunerd_graph", "eager": "eager_graph", "torch_compile": "compile_graph"}  # fwd, CUDA only
# speedup metric -> (contender, tunerd's contender it is divided by); graph_*: device time, no host overhead
METRICS = {
    "vs_eager": ("eager", "tunerd"),
    "vs_compile": ("torch_compile", "tunerd"),
    "graph_vs_eager": ("eager_graph", "tunerd_graph"),
    "graph_vs_compile": ("compile_graph", "tunerd_graph"),
    "cuda_graphs_vs_patched": ("tunerd", "tunerd_cuda_graphs"),
}
GRAD_FACTOR, GRAD_CEILING = 4.0, 0.5  # a gradient's error bound (grad_bound)
Params = dict[str, torch.Tensor]
Outputs = tuple[torch.Tensor, ...]  # the block output, then (fwd+bwd) the gradients of x and every parameter
Run = Callable[[int], Outputs]


# ---- the blocks -------------------------------------------------------------------------------------------
def _eca_mobilenetv2(n: int, dtype: str) -> list[block_suites.Entry]:
    """ECA-Net's MobileNetV2 (ECA after the depthwise conv): stage 3's repeated block, 32 ch at 28 x 28."""
    blk = B.mbconv(
        n=n, c=32, k=32, in_size=(28, 28), expansion=6, se_ratio=None, act="relu6", attention="eca", dtype=dtype
    )
    return [block_suites.Entry("stage3.1", blk, 2)]


# every block suite, plus ECA (no suite of its own in schedules.block_suites)
SUITES: dict[str, Callable[[int, str], list[block_suites.Entry]]] = {
    **block_suites.BLOCK_SUITES,
    "eca_mobilenetv2": _eca_mobilenetv2,
}

# the interpreter mode: each suite's block family at a size Triton's interpreter runs in a second
SMALL: dict[str, Callable[[str], Block]] = {
    "convnext_t": lambda dt: B.convnext(n=1, c=16, in_size=(8, 8), dtype=dt),
    "efficientnet_b0": lambda dt: B.mbconv(
        n=1, c=16, k=16, in_size=(8, 8), expansion=2, kernel=5, act="silu", dtype=dt
    ),
    "mobilenetv2": lambda dt: B.mbconv(
        n=1, c=16, k=16, in_size=(8, 8), expansion=2, se_ratio=None, act="relu6", dtype=dt
    ),
    "inceptionnext_t": lambda dt: B.inception_dw(n=1, c=32, in_size=(8, 8), dtype=dt),
    "deeplabv3_aspp": lambda dt: B.aspp(n=1, c=16, in_size=(8, 8), k=16, rates=(2, 3), dtype=dt),
    "hornet_t": lambda dt: B.gnconv(n=1, c=16, in_size=(8, 8), order=3, scale=1 / 3, dtype=dt),
    "ecaresnet50d": lambda dt: B.bottleneck(  # a stride-2 block: ResNet-D's average-pool shortcut too
        n=1, c=16, k=32, width=8, in_size=(9, 9), stride=2, avg_down=True, dtype=dt
    ),
    "eca_mobilenetv2": lambda dt: B.mbconv(
        n=1, c=16, k=16, in_size=(8, 8), expansion=2, se_ratio=None, act="relu6", attention="eca", dtype=dt
    ),
}


@dataclass(frozen=True)
class ModuleEntry:
    """A module case's block: make() builds it (fp32, random init) for an input of x_shape."""

    name: str
    kind: str  # e.g. "RepVggBlock c48->96 s2"
    make: Callable[[], torch.nn.Module]
    x_shape: tuple[int, int, int, int]
    count: int  # how many blocks of the network have this shape
    dtype: str = "float32"

    @property
    def key(self) -> str:
        return f"{self.name} {self.x_shape} {self.dtype}"

    def describe(self) -> str:
        n, _, h, w = self.x_shape
        return f"{self.kind} n{n} @{h}x{w} {self.dtype}"


_SCHEMAS: list[torch.library.Library] = []


def _byobnet() -> Any:
    """timm.models.byobnet; where torchvision's compiled ops did not load over this torch build (a CPU box), its two
    schemas are declared first, as tests/models_zoo.py does (timm imports torchvision)."""
    try:
        import timm.models.byobnet as byob
    except RuntimeError as e:
        if "torchvision::" not in str(e):
            raise
        lib = torch.library.Library("torchvision", "DEF")
        for name in ("nms", "qnms"):
            lib.define(f"{name}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _SCHEMAS.append(lib)  # the schemas live as long as the library object
        import timm.models.byobnet as byob
    return byob


def _rep_vgg_block(c: int, k: int, stride: int) -> tuple[str, Callable[[], torch.nn.Module]]:
    return f"RepVggBlock c{c}->{k} s{stride}", lambda: _byobnet().RepVggBlock(c, k, 3, stride=stride)


def _repvgg_a0(n: int, dtype: str) -> list[ModuleEntry]:
    """timm repvgg_a0's RepVggBlocks at 224 x 224 (widths 48, 96, 192, 1280; depths 2, 4, 14, 1; each stage's
    first block stride 2 without identity, the rest 3x3 + 1x1 + identity BN)."""
    out = []
    c, size = 48, 112
    for i, (k, depth) in enumerate(((48, 2), (96, 4), (192, 14), (1280, 1)), 1):
        out.append(ModuleEntry(f"stage{i}.0", *_rep_vgg_block(c, k, 2), (n, c, size, size), 1, dtype))
        c, size = k, size // 2
        if depth > 1:
            out.append(ModuleEntry(f"stage{i}.1", *_rep_vgg_block(k, k, 1), (n, k, size, size), depth - 1, dtype))
    return out


MODULE_SUITES: dict[str, Callable[[int, str], list[ModuleEntry]]] = {"repvgg_a0": _repvgg_a0}
SMALL_MODULES: dict[str, Callable[[str], ModuleEntry]] = {
    "repvgg_a0": lambda dt: ModuleEntry("small", *_rep_vgg_block(8, 8, 1), (2, 8, 5, 5), 1, dt),
}


def _cuda_graph_modules(dtype: str) -> list[ModuleEntry]:
    """Launch-bound inference: a ConvNeXt block (one fused plan) and a ResNet basic block (conv + BN fused convs)
    at batch 1, 56 x 56."""

    def convnext() -> torch.nn.Module:
        from timm.models.convnext import ConvNeXtBlock

        return ConvNeXtBlock(96)

    def basic() -> torch.nn.Module:
        from timm.models.resnet import BasicBlock

        return BasicBlock(64, 64)

    return [
        ModuleEntry("convnext_block", "ConvNeXtBlock c96", convnext, (1, 96, 56, 56), 1, dtype),
        ModuleEntry("resnet_basic", "BasicBlock c64", basic, (1, 64, 56, 56), 1, dtype),
    ]


GRAPH_SUITES: dict[str, Callable[[str], list[ModuleEntry]]] = {"cuda_graphs": _cuda_graph_modules}


def representative_modules(entries: list[ModuleEntry], k: int) -> list[ModuleEntry]:
    """The k entries that move the most activation traffic (count x input elements)."""
    return sorted(entries, key=lambda e: -e.count * math.prod(e.x_shape))[:k]


def representative(entries: list[block_suites.Entry], k: int) -> list[block_suites.Entry]:
    """The k entries that move the most of the network's modelled HBM traffic (count x unfused bytes)."""
    weight = {e.name: e.count * cost(e.block, unfused(e.block)).bytes for e in entries}
    return sorted(entries, key=lambda e: -weight[e.name])[:k]


# ---- configuration ----------------------------------------------------------------------------------------
@dataclass
class Config:
    """Everything a run was asked to do (recorded in the JSON)."""

    small: bool
    device: str
    suites: list[str]
    passes: list[str]
    dtypes: list[str]  # spec dtype names
    blocks_per_suite: int
    batch: int
    tune_budget: int  # 0: the planner's default plan, no tuning
    tune_seconds: float
    strategy: str
    seed: int
    time_limit: float
    compile: bool
    compile_mode: str
    graphs: bool  # forward cases also time each contender replayed from CUDA graphs
    n_inputs: int
    timing: TimingConfig
    out: str | None
    json: str | None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["timing"] = self.timing.to_dict()
        return d


_csv = timing.csv


def parse_args(argv: list[str] | None = None) -> Config:
    p = argparse.ArgumentParser(prog="python -m benchmarks.blocks", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--suites",
        help=f"comma list of {', '.join([*SUITES, *MODULE_SUITES, *GRAPH_SUITES])} (default: all; "
        "cuda_graphs with CUDA only)",
    )
    p.add_argument("--passes", help="comma list of fwd,fwd+bwd (default: both)")
    p.add_argument("--dtypes", help="comma list of bf16,fp16,fp32 (default: bf16 on GPU, fp32 small)")
    p.add_argument("--blocks-per-suite", type=int, default=1, help="entries per suite, heaviest traffic first")
    p.add_argument("--batch", type=int, default=32, help="batch size of the suites' blocks (GPU mode)")
    p.add_argument("--tune-budget", type=int, default=0, help="tune_block trials per block (0: the default plan)")
    p.add_argument("--tune-seconds", type=float, default=30.0, help="tune_block seconds per block")
    p.add_argument("--strategy", default="model", help="schedules.strategies name for tune_block")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--time-limit", type=float, help="seconds; no case starts that would cross it (default 400)")
    timing.add_args(p)
    p.add_argument(
        "--graphs",
        choices=("auto", "on", "off"),
        default="auto",
        help="fwd: also time each contender replayed from CUDA graphs, device time without host overhead "
        "(auto: with CUDA)",
    )
    p.add_argument("--small", action="store_true", help="tiny interpreter-sized blocks (the default without CUDA)")
    p.add_argument("--full", action="store_true", help="the GPU-sized blocks even without CUDA (hours)")
    p.add_argument("--out", help="output directory (default: benchmarks/results/<date>-<device>-blocks/, temp small)")
    p.add_argument("--json", help="write only this JSON file, no report.md (the GPU check's flat output)")
    a = p.parse_args(argv)

    cuda = torch.cuda.is_available() and not runtime.interpreting()
    small = a.small or (not cuda and not a.full)
    names = _csv(a.suites) or [*SUITES, *MODULE_SUITES, *(GRAPH_SUITES if cuda and not small else ())]
    if bad := [n for n in names if n not in SUITES and n not in MODULE_SUITES and n not in GRAPH_SUITES]:
        p.error(f"unknown suites {bad}; choose from {[*SUITES, *MODULE_SUITES, *GRAPH_SUITES]}")
    passes = _csv(a.passes) or list(PASSES)
    if bad := [x for x in passes if x not in PASSES]:
        p.error(f"passes must be among {list(PASSES)}, got {bad}")
    dtypes = _csv(a.dtypes) or (["fp32"] if small else ["bf16"])
    if bad := [d for d in dtypes if d not in DTYPES]:
        p.error(f"dtypes must be among {list(DTYPES)}, got {bad}")
    if a.strategy not in STRATEGIES:
        p.error(f"unknown strategy {a.strategy!r}; choose one of {sorted(STRATEGIES)}")
    if a.blocks_per_suite < 1 or a.batch < 1 or a.tune_budget < 0:
        p.error("--blocks-per-suite and --batch must be >= 1, --tune-budget >= 0")
    warm, reps, rounds = (0, 1, 1) if small else (3, 10, 5)
    return Config(
        small=small,
        device="cuda" if cuda else "cpu",
        suites=names,
        passes=passes,
        dtypes=[DTYPES[d] for d in dtypes],
        blocks_per_suite=1 if small else a.blocks_per_suite,
        batch=a.batch,
        tune_budget=a.tune_budget,
        tune_seconds=a.tune_seconds,
        strategy=a.strategy,
        seed=a.seed,
        time_limit=a.time_limit or (120.0 if small else 400.0),
        compile=a.compile == "on" or (a.compile == "auto" and cuda),
        compile_mode=a.compile_mode,
        graphs=a.graphs == "on" or (a.graphs == "auto" and cuda),
        n_inputs=a.inputs or (1 if small else 3),
        timing=timing.config_from_args(a, cuda, warm, reps, rounds),
        out=a.out,
        json=a.json,
    )


# ---- cases ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    suite: str
    entry: str
    count: int  # how many blocks of the network have this shape
    block: Block | None  # a block-graph case, or
    op: str  # "fwd" or "fwd+bwd"
    rank: tuple[int, ...]  # run order under a time limit: first dtype, then forward of every suite, ...
    module: ModuleEntry | None = None  # a module case

    @property
    def dtype(self) -> str:
        return self.block.dtype if self.block is not None else self.module.dtype  # type: ignore[union-attr]

    @property
    def label(self) -> str:
        return f"{self.suite}/{self.entry} {self.op} {self.dtype}"

    def describe(self) -> str:
        return self.block.describe() if self.block is not None else self.module.describe()  # type: ignore[union-attr]


def plan_cases(cfg: Config) -> list[Case]:
    """Every case, most important first: the first dtype before the others; within a dtype every suite's first
    block forward, then its fwd+bwd, then further blocks; suites round-robin within each tier."""
    cases = []
    for si, name in enumerate(cfg.suites):
        for di, dtype in enumerate(cfg.dtypes):
            if name in GRAPH_SUITES:  # inference only: the forward pass
                for j, m in enumerate(GRAPH_SUITES[name](dtype)):
                    if "fwd" in cfg.passes:
                        cases.append(Case(name, m.name, m.count, None, "fwd", (di, j, 0, si), module=m))
                continue
            if name in MODULE_SUITES:
                mods = (
                    [SMALL_MODULES[name](dtype)]
                    if cfg.small
                    else representative_modules(MODULE_SUITES[name](cfg.batch, dtype), cfg.blocks_per_suite)
                )
                for j, m in enumerate(mods):
                    for pi, op in enumerate(cfg.passes):
                        cases.append(Case(name, m.name, m.count, None, op, (di, j, pi, si), module=m))
                continue
            if cfg.small:
                entries = [block_suites.Entry("small", SMALL[name](dtype), 1)]
            else:
                entries = representative(SUITES[name](cfg.batch, dtype), cfg.blocks_per_suite)
            for j, e in enumerate(entries):
                for pi, op in enumerate(cfg.passes):
                    cases.append(Case(name, e.name, e.count, e.block, op, (di, j, pi, si)))
    return sorted(cases, key=lambda c: c.rank)


# ---- inputs -------------------------------------------------------------------------------------------------
@dataclass
class InputSet:
    x: torch.Tensor  # channels-last, in the block dtype
    params: Params  # every parameter in the block dtype (as a model's parameters would be)
    dy: torch.Tensor | None  # the upstream gradient (fwd+bwd)


def make_sets(blk: Block, n: int, device: torch.device, seed: int, backward: bool) -> list[InputSet]:
    """n input sets: fresh random x, parameters (fused.random_params) and dy, seeded per block."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed * 1_000_003 + zlib.crc32(blk.key.encode()))
    dt, cl = SPEC_DTYPES[blk.dtype], torch.channels_last
    out = []
    for _ in range(n):  # conv weights channels_last too, as in a channels_last model (cuDNN copies others per call)
        params = {
            k: v.to(dt).contiguous(memory_format=cl) if v.dim() == 4 else v.to(dt)
            for k, v in fused.random_params(blk, device, gen).items()
        }
        x = torch.randn((blk.n, blk.c, *blk.in_size), generator=gen, device=device).to(dt)
        shape = (blk.n, blk.output.c, *blk.output.size)
        dy = torch.randn(shape, generator=gen, device=device).to(dt) if backward else None
        out.append(
            InputSet(x.contiguous(memory_format=cl), params, None if dy is None else dy.contiguous(memory_format=cl))
        )
    return out


def oracle(blk: Block, s: InputSet) -> Outputs:
    """float64 output (and with dy, the gradients of x and of every parameter) of the block on s."""
    x = s.x.detach().double().requires_grad_(s.dy is not None)
    params = {k: v.detach().double().requires_grad_(s.dy is not None) for k, v in s.params.items()}
    with torch.set_grad_enabled(s.dy is not None):
        y = block_reference.block(blk, params, x)
        if s.dy is None:
            return (y.detach(),)
        grads = torch.autograd.grad(y, [x, *params.values()], s.dy.double())
    return (y.detach(), *grads)


# ---- contenders ---------------------------------------------------------------------------------------------
def _node_params(blk: Block, params: Params) -> dict[str, Params]:
    """node name -> its own parameters (apply_node filters by the node's prefix)."""
    out: dict[str, Params] = {nd.name: {} for nd in blk.nodes}
    for k, v in params.items():
        out[k.split(".", 1)[0]][k] = v
    return out


def eager_forward(blk: Block) -> Callable[[torch.Tensor, Params], torch.Tensor]:
    """The block as separate torch ops: F.conv2d (bias included), eval-mode F.batch_norm for the folded BN
    (mean 0, var 1 - eps: one normalisation kernel, as an eval model runs it), idiomatic activations, and the
    other nodes as kernels.block_reference.apply_node defines them, all in the input's dtype."""
    convs = {nd.name: blk.conv_spec(nd) for nd in blk.nodes if nd.op == "conv"}
    for name, spec in convs.items():
        if any(lo != hi for lo, hi in spec.padding):
            raise ValueError(f"node {name!r}: asymmetric padding {spec.padding} has no F.conv2d equivalent")
    eps = 1e-5

    def run_node(nd: Node, ins: list[torch.Tensor], p: Params) -> torch.Tensor:
        x = ins[0]
        if nd.op == "conv":
            spec = convs[nd.name]
            pad = tuple(lo for lo, _ in spec.padding)
            return F.conv2d(
                x, p[f"{nd.name}.weight"], p.get(f"{nd.name}.bias"), spec.stride, pad, spec.dilation, spec.groups
            )
        if nd.op == "bn":
            scale = p[f"{nd.name}.scale"]
            mean = torch.zeros_like(scale)
            var = torch.full_like(scale, 1.0 - eps)
            return F.batch_norm(x, mean, var, scale, p[f"{nd.name}.shift"], False, 0.0, eps)
        if nd.op == "act" and nd["fn"] in _ACT:
            return _ACT[nd["fn"]](x)
        return block_reference.apply_node(nd, ins, p)

    def forward(x: torch.Tensor, params: Params) -> torch.Tensor:
        per_node = _node_params(blk, params)
        vals = {B.INPUT: x}
        for nd in blk.nodes:
            vals[nd.name] = run_node(nd, [vals[i] for i in nd.inputs], per_node[nd.name])
        return vals[blk.nodes[-1].name]

    return forward


def _runner(fn: Callable[[torch.Tensor, Params], torch.Tensor], sets: list[InputSet]) -> Run:
    """fn on input set i: forward only, or (with dy) forward then the gradients of x and every parameter."""
    if sets[0].dy is None:
        return lambda i: (fn(sets[i].x, sets[i].params),)
    leaves = [[s.x.detach().requires_grad_(), *(v.detach().requires_grad_() for v in s.params.values())] for s in sets]
    keys = list(sets[0].params)

    def run(i: int) -> Outputs:
        x, *ps = leaves[i]
        y = fn(x, dict(zip(keys, ps)))
        return (y.detach(), *torch.autograd.grad(y, leaves[i], sets[i].dy))

    return run


def tunerd_runs(blk: Block, plan: Plan, schedules: dict[int, Schedule] | None, sets: list[InputSet]) -> tuple[Run, Run]:
    """(checked, timed): the block under plan, the checked run with every kernel output NaN-poisoned first."""

    def fn(poison: bool) -> Callable[[torch.Tensor, Params], torch.Tensor]:
        if sets[0].dy is None:
            return lambda x, p: fused.run_plan(blk, p, x, plan, schedules, poison=poison)
        return lambda x, p: block_autograd.block(blk, p, x, plan, schedules, poison=poison)

    return _runner(fn(True), sets), _runner(fn(False), sets)


def compiled_run(blk: Block, sets: list[InputSet], mode: str) -> Run:
    """torch.compile of the eager function (one compiled block at a time: no cache-size fallbacks to eager)."""
    torch._dynamo.reset()
    return _runner(torch.compile(eager_forward(blk), mode=mode, dynamic=False), sets)


def graphed(run: Run, n_inputs: int, device: torch.device) -> Run:
    """run captured in one CUDA graph per input set on its first call (after a warm-up of every set on a side
    stream, as torch.cuda.graph wants); each call replays set i's graph and returns what its capture wrote.
    The replay is the contender's device time alone: no Python, no launch overhead."""
    graphs: list[torch.cuda.CUDAGraph] = []
    outs: list[Outputs] = []

    def replay(i: int) -> Outputs:
        if not graphs:
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                for j in range(n_inputs):
                    run(j)
            torch.cuda.current_stream(device).wait_stream(side)
            for j in range(n_inputs):
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g):
                    outs.append(run(j))
                graphs.append(g)
        graphs[i].replay()
        return outs[i]

    return replay


# ---- checking and timing ------------------------------------------------------------------------------------
def grad_bound(tol: float, errs: list[float]) -> float:
    """The error a gradient may have: the dtype's tolerance, or GRAD_FACTOR x the yardstick's error on it
    (16-bit gradients of long, cancelling sums lose digits in every implementation; errs: eager torch's, the
    yardstick, or without it every contender's, the best counting), never GRAD_CEILING or more."""
    best = min((e for e in errs if math.isfinite(e)), default=0.0)
    return min(GRAD_CEILING, max(tol, GRAD_FACTOR * best))


def errors(got: Outputs, want: Outputs) -> list[float]:
    """rel_error of the output and of each gradient against float64 (inf for a missing or misshapen one)."""
    if len(got) != len(want):
        return [math.inf] * len(want)
    return [reference.rel_error(g, w) if g.shape == w.shape else math.inf for g, w in zip(got, want)]


def measure(
    checked: dict[str, tuple[Run, Run] | Skip | Failure],
    ref: Outputs,
    names: list[str],
    tol: float,
    n_inputs: int,
    device: torch.device,
    tcfg: TimingConfig,
) -> dict[str, dict[str, Any]]:
    """Each contender's first (checked) call, timed as first_call_s, against ref: the output within tol, each
    gradient within grad_bound(); the correct ones timed side by side."""
    results: dict[str, dict[str, Any]] = {}
    errs: dict[str, list[float]] = {}
    timed: dict[str, Run] = {}
    for name, c in checked.items():
        if isinstance(c, Skip):
            results[name] = {"status": "skipped", "reason": c.reason}
            continue
        if isinstance(c, Failure):
            results[name] = c.to_dict()
            continue
        t0 = time.perf_counter()
        try:
            got = c[0](0)
            synchronize(device)
        except Exception as e:  # compile errors, unsupported shapes, OOM: recorded per contender
            results[name] = {"status": "error", "stage": "first call", "error": describe_error(e)}
            continue
        errs[name], timed[name] = errors(got, ref), c[1]
        results[name] = {"first_call_s": time.perf_counter() - t0, "rel_error": errs[name][0]}
        if len(ref) > 1:
            results[name]["grad_rel_error"] = dict(zip(names, errs[name][1:]))
            results[name]["grad_rel_error_max"] = max(errs[name][1:])
    yardstick = [errs["eager"]] if "eager" in errs else list(errs.values())
    bounds = [tol] + [grad_bound(tol, [e[i] for e in yardstick]) for i in range(1, len(ref))]
    live: dict[str, Run] = {}
    for name, errs_of in errs.items():
        bad = {n: [v, b] for n, v, b in zip(["output", *names], errs_of, bounds) if not v < b}
        if bad:
            results[name].update(status="wrong-result", tolerance=tol, wrong=list(bad), wrong_error_bound=bad)
        else:
            live[name] = timed[name]
    for name, t in compare(live, n_inputs, device, tcfg).items():
        results[name] = (
            {"status": "ok", **t.to_dict(), **results[name]}
            if isinstance(t, Timing)
            else {**t.to_dict(), **results[name]}
        )
    return {name: results[name] for name in checked}


def _ms(doc: dict[str, Any], name: str) -> float | None:
    r = doc["contenders"].get(name, {})
    return r.get("median_ms") if r.get("status") == "ok" else None


def speedups(doc: dict[str, Any]) -> dict[str, float | None]:
    """contender time / tunerd time (> 1: tunerd faster), each METRICS pair the case has."""
    out: dict[str, float | None] = {}
    for metric, (other, ours) in METRICS.items():
        if ours not in doc["contenders"]:
            continue
        o, t = _ms(doc, other), _ms(doc, ours)
        out[metric] = o / t if o is not None and t else None
    return out


# ---- one case -----------------------------------------------------------------------------------------------
def _plan_doc(pc: PlanCost) -> dict[str, Any]:
    return {"plan": pc.plan.describe(), "launches": pc.launches, "bytes": pc.bytes}


def choose_plan(
    blk: Block, cfg: Config, harness: BlockHarness | None
) -> tuple[Plan, dict[int, Schedule] | None, dict[str, Any]]:
    """The plan the tunerd contender runs: tune_block's winner when tuning was asked and found one, else the
    planner's default plan on default schedules; with what was done."""
    default = rank(blk)[0].plan
    if not cfg.tune_budget or harness is None:
        return default, None, {"source": "default", "why": "the planner's rank()[0] on default schedules"}
    t0 = time.perf_counter()
    try:
        r = tune_block(
            blk,
            strategy=cfg.strategy,
            budget_trials=cfg.tune_budget,
            budget_seconds=cfg.tune_seconds,
            seed=cfg.seed,
            harness=harness,
        )
    except Exception as e:
        return default, None, {"source": "default", "why": f"tuning failed: {describe_error(e)}"}
    info = {
        "strategy": cfg.strategy,
        "budget_trials": cfg.tune_budget,
        "budget_seconds": cfg.tune_seconds,
        "seconds": time.perf_counter() - t0,
        "trials": len(r.trials),
        "statuses": r.statuses,
        "speedup_vs_unfused": r.speedup_vs_unfused,
    }
    if r.best is None:
        return default, None, {"source": "default", "why": "no tuned trial passed the gate", "tune": info}
    info["best_median_ms"] = r.best.trial.median_ms
    return r.best.plan, dict(r.best.schedules), {"source": "tuned", "tune": info}


Chosen = tuple[Plan, "dict[int, Schedule] | None", dict[str, Any]]


def run_case(
    case: Case, cfg: Config, device: torch.device, chosen: dict[str, Chosen], harness: BlockHarness | None = None
) -> dict[str, Any]:
    """Check and time the contenders of one case; chosen: block key -> (plan, schedules, how), shared by the
    fwd and fwd+bwd cases of a block (tuned once, with harness)."""
    if case.suite in GRAPH_SUITES and case.module is not None:
        return run_cuda_graph_case(case, case.module, cfg, device)
    if case.module is not None:
        return run_module_case(case, case.module, cfg, device)
    blk = case.block
    assert blk is not None
    doc: dict[str, Any] = {
        "suite": case.suite,
        "entry": case.entry,
        "count": case.count,
        "name": blk.describe(),
        "pass": case.op,
        "dtype": blk.dtype,
        "block": blk.to_dict(),
    }
    t0 = time.perf_counter()
    backward = case.op == "fwd+bwd"
    try:  # a block the planner or the oracle cannot take is this case's error, not the run's
        if blk.key not in chosen:
            chosen[blk.key] = choose_plan(blk, cfg, harness)
        plan, schedules, how = chosen[blk.key]
        fused_cost, eager_cost = cost(blk, plan), cost(blk, unfused(blk))
        doc["plan"] = {
            **how,
            **_plan_doc(fused_cost),
            "steps": plan.to_dict()["steps"],
            "schedules": {str(i): s.to_dict() for i, s in (schedules or {}).items()},
        }
        doc["eager_plan"] = _plan_doc(eager_cost)
        doc["bytes_ratio"] = fused_cost.bytes / eager_cost.bytes
        sets = make_sets(blk, cfg.n_inputs, device, cfg.seed, backward)
        ref = oracle(blk, sets[0])
    except Exception as e:
        doc.update(error=describe_error(e), contenders={}, speedups={}, seconds=time.perf_counter() - t0)
        return doc
    checked: dict[str, tuple[Run, Run] | Skip | Failure] = {}
    try:
        checked["tunerd"] = tunerd_runs(blk, plan, schedules, sets)
    except Exception as e:
        checked["tunerd"] = Failure("setup", describe_error(e))
    try:
        eager = _runner(eager_forward(blk), sets)
        checked["eager"] = (eager, eager)
    except Exception as e:
        checked["eager"] = Failure("setup", describe_error(e))
    if not cfg.compile:
        checked["torch_compile"] = Skip(
            COMPILE_CPU_SKIP if cfg.device == "cpu" else "torch.compile off (--compile off)"
        )
    else:
        try:
            comp = compiled_run(blk, sets, cfg.compile_mode)
            checked["torch_compile"] = (comp, comp)
        except Exception as e:
            checked["torch_compile"] = Failure("setup", describe_error(e))
    if cfg.graphs and not backward:
        for name, gname in GRAPHED.items():
            c = checked[name]
            g = c if isinstance(c, (Skip, Failure)) else graphed(c[1], cfg.n_inputs, device)
            checked[gname] = g if isinstance(g, (Skip, Failure)) else (g, g)
    grads = ["x", *sets[0].params] if backward else []
    tol = reference.tolerance(blk.dtype)
    doc["contenders"] = measure(checked, ref, grads, tol, cfg.n_inputs, device, cfg.timing)
    doc["speedups"] = speedups(doc)
    if not backward:  # the modelled forward traffic at the measured time
        for name, nbytes in (("tunerd", fused_cost.bytes), ("eager", eager_cost.bytes)):
            for n in (name, GRAPHED[name]):
                ms = _ms(doc, n)
                if n in doc["contenders"]:
                    doc["contenders"][n]["modelled_gbps"] = nbytes / (ms * 1e-3) / 1e9 if ms else None
    doc["seconds"] = time.perf_counter() - t0
    return doc


# ---- module cases -------------------------------------------------------------------------------------------
def _module_sets(entry: ModuleEntry, n: int, device: torch.device, seed: int, backward: bool) -> list[InputSet]:
    gen = torch.Generator(device=device)
    gen.manual_seed(seed * 1_000_003 + zlib.crc32(entry.key.encode()))
    dt, cl = SPEC_DTYPES[entry.dtype], torch.channels_last
    out = []
    for _ in range(n):
        x = torch.randn(entry.x_shape, generator=gen, device=device).to(dt).contiguous(memory_format=cl)
        dy = None
        if backward:
            y_shape = _out_shape(entry)
            dy = torch.randn(y_shape, generator=gen, device=device).to(dt).contiguous(memory_format=cl)
        out.append(InputSet(x, {}, dy))
    return out


def _out_shape(entry: ModuleEntry) -> tuple[int, ...]:
    with torch.device("meta"):
        return tuple(entry.make()(torch.empty(entry.x_shape)).shape)


def _module(entry: ModuleEntry, device: torch.device, seed: int) -> torch.nn.Module:
    """The case's module (fp32, training mode), its BatchNorm affines away from their init so every branch's
    scale and shift matter, seeded per entry."""
    torch.manual_seed(seed * 1_000_003 + zlib.crc32(entry.key.encode()))
    m = entry.make().train()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.weight.copy_(torch.rand(mod.weight.shape, generator=gen) + 0.5)
                mod.bias.copy_(torch.randn(mod.bias.shape, generator=gen) * 0.2)
    return m.to(device)


def _module_runner(m: torch.nn.Module, sets: list[InputSet]) -> Run:
    """m on input set i: forward without gradients, or (with dy) forward then the gradients of x and every
    parameter (m.parameters() order)."""
    params = list(m.parameters())
    if sets[0].dy is None:

        def fwd(i: int) -> Outputs:
            with torch.no_grad():
                return (m(sets[i].x),)

        return fwd
    xs = [s.x.detach().requires_grad_() for s in sets]

    def run(i: int) -> Outputs:
        y = m(xs[i])
        return (y.detach(), *torch.autograd.grad(y, [xs[i], *params], sets[i].dy))

    return run


def _form_doc(costs: dict[str, Any], form: str) -> dict[str, Any]:
    c = costs[form]
    return {"plan": f"rep_block {form}", "launches": c.launches, "bytes": c.bytes}


def run_module_case(case: Case, entry: ModuleEntry, cfg: Config, device: torch.device) -> dict[str, Any]:
    """A module case: the timm block in training mode (BatchNorm on batch statistics) under rep_block's auto form,
    each forced form, its own forward (eager) and torch.compile of it; each checked against the float64 module
    first (output and, fwd+bwd, the gradients of x and every parameter), then timed side by side. The bytes are
    reparam.train_costs' forward for the auto form's pick vs the block's own forward. Module forms allocate their
    outputs themselves: no NaN poisoning here, the float64 check is the gate."""
    from tunerd.blocks import last_form, rep_block, rep_costs

    doc = _module_doc(case, entry)
    t0 = time.perf_counter()
    backward = case.op == "fwd+bwd"
    dt = SPEC_DTYPES[entry.dtype]
    try:
        base = _module(entry, device, cfg.seed)
        sets = _module_sets(entry, cfg.n_inputs, device, cfg.seed, backward)
        m64 = copy.deepcopy(base).double()
        ref_sets = [InputSet(s.x.double(), {}, None if s.dy is None else s.dy.double()) for s in sets[:1]]
        ref = _module_runner(m64, ref_sets)(0)
        costs, pass_costs = rep_costs(base, sets[0].x, False), rep_costs(base, sets[0].x, backward)
    except Exception as e:
        doc.update(error=describe_error(e), contenders={}, speedups={}, seconds=time.perf_counter() - t0)
        return doc
    checked: dict[str, tuple[Run, Run] | Skip | Failure] = {}
    mods: dict[str, torch.nn.Module] = {}
    for name, form in (("tunerd", None), *((f"tunerd_{f}", f) for f in ("combine", "merged"))):
        try:
            mods[name] = copy.deepcopy(base).to(dt).to(memory_format=torch.channels_last)
            rep_block(mods[name], form)
            r = _module_runner(mods[name], sets)
            checked[name] = (r, r)
        except Exception as e:
            checked[name] = Failure("setup", describe_error(e))
    eager_m = copy.deepcopy(base).to(dt).to(memory_format=torch.channels_last)
    eager = _module_runner(eager_m, sets)
    checked["eager"] = (eager, eager)
    if not cfg.compile:
        checked["torch_compile"] = Skip(
            COMPILE_CPU_SKIP if cfg.device == "cpu" else "torch.compile off (--compile off)"
        )
    else:
        try:
            torch._dynamo.reset()
            comp_m = copy.deepcopy(base).to(dt).to(memory_format=torch.channels_last)
            comp = _module_runner(torch.compile(comp_m, mode=cfg.compile_mode, dynamic=False), sets)  # type: ignore[arg-type]
            checked["torch_compile"] = (comp, comp)
        except Exception as e:
            checked["torch_compile"] = Failure("setup", describe_error(e))
    grads = ["x", *(n for n, _ in base.named_parameters())] if backward else []
    doc["contenders"] = measure(checked, ref, grads, reference.tolerance(entry.dtype), cfg.n_inputs, device, cfg.timing)
    doc["speedups"] = speedups(doc)
    form = last_form(mods["tunerd"]) if "tunerd" in mods else None
    doc["plan"] = {"source": "auto form", "form": form, **_form_doc(costs, form if form in costs else "eager")}
    doc["plan"]["costs"] = {  # this pass's modelled cost per form (the bytes columns are the forward's)
        f: {"bytes": c.bytes, "launches": c.launches, "seconds": c.seconds} for f, c in pass_costs.items()
    }
    doc["eager_plan"] = _form_doc(costs, "eager")
    doc["bytes_ratio"] = doc["plan"]["bytes"] / doc["eager_plan"]["bytes"]
    doc["seconds"] = time.perf_counter() - t0
    return doc


def _module_doc(case: Case, entry: ModuleEntry) -> dict[str, Any]:
    """The result document's header of a module case."""
    return {
        "suite": case.suite,
        "entry": case.entry,
        "count": case.count,
        "name": entry.describe(),
        "pass": case.op,
        "dtype": entry.dtype,
        "module": {"x_shape": list(entry.x_shape)},
    }


def run_cuda_graph_case(case: Case, entry: ModuleEntry, cfg: Config, device: torch.device) -> dict[str, Any]:
    """A CUDA-graph case: the timm module in eval without gradients, patched (kernels launched call by call) and
    patched with cuda_graphs=True (graph replays), its own forward and torch.compile of it; each checked against
    the float64 module, then timed side by side. GPU only: on another device the case records why it did not run."""
    from tunerd import graphs
    from tunerd.patching import patch

    doc = _module_doc(case, entry)
    t0 = time.perf_counter()
    if device.type != "cuda":
        doc.update(error="CUDA graphs need a CUDA device: GPU only", contenders={}, speedups={}, seconds=0.0)
        return doc
    dt, cl = SPEC_DTYPES[entry.dtype], torch.channels_last
    try:
        base = _module(entry, device, cfg.seed).eval()
        sets = _module_sets(entry, cfg.n_inputs, device, cfg.seed, False)
        ref = _module_runner(copy.deepcopy(base).double(), [InputSet(sets[0].x.double(), {}, None)])(0)
    except Exception as e:
        doc.update(error=describe_error(e), contenders={}, speedups={}, seconds=time.perf_counter() - t0)
        return doc
    checked: dict[str, tuple[Run, Run] | Skip | Failure] = {}
    mods: dict[str, torch.nn.Module] = {}
    for name, cuda_graphs in (("tunerd", False), ("tunerd_cuda_graphs", True)):
        try:
            mods[name] = copy.deepcopy(base).to(dt).to(memory_format=cl)
            patch(mods[name], cuda_graphs=cuda_graphs)
            r = _module_runner(mods[name], sets)
            checked[name] = (r, r)
        except Exception as e:
            checked[name] = Failure("setup", describe_error(e))
    eager = _module_runner(copy.deepcopy(base).to(dt).to(memory_format=cl), sets)
    checked["eager"] = (eager, eager)
    if not cfg.compile:
        checked["torch_compile"] = Skip("torch.compile off (--compile off)")
    else:
        try:
            torch._dynamo.reset()
            comp_m = copy.deepcopy(base).to(dt).to(memory_format=cl)
            comp = _module_runner(torch.compile(comp_m, mode=cfg.compile_mode, dynamic=False), sets)  # type: ignore[arg-type]
            checked["torch_compile"] = (comp, comp)
        except Exception as e:
            checked["torch_compile"] = Failure("setup", describe_error(e))
    doc["contenders"] = measure(checked, ref, [], reference.tolerance(entry.dtype), cfg.n_inputs, device, cfg.timing)
    doc["speedups"] = speedups(doc)
    stats = graphs.stats(mods["tunerd_cuda_graphs"]) if "tunerd_cuda_graphs" in mods else {}
    doc["cuda_graphs"] = {
        "modules": len(stats),
        "captures": sum(s["captures"] for s in stats.values()),
        "replays": sum(s["replays"] for s in stats.values()),
        "ordinary": {n: s["last_ordinary"] for n, s in stats.items() if s["last_ordinary"]},
        "failed": {n: s["failed"] for n, s in stats.items() if s["failed"]},
    }
    doc["plan"] = {"source": "tunerd.patch", "plan": "patched module, eval, no grad"}
    doc["eager_plan"] = {"plan": "the timm module's forward"}
    doc["seconds"] = time.perf_counter() - t0
    return doc


# ---- summary and report -------------------------------------------------------------------------------------
def summarize(cases: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per suite (and 'all'), per pass: geometric means and counts of the speedups; the fused/eager bytes ratio
    (geometric mean over the suite's blocks)."""
    out: dict[str, dict[str, Any]] = {}
    for suite, cs in report.by_suite(cases).items():
        row: dict[str, Any] = {"cases": len(cs)}
        for op in PASSES:
            sel = [c for c in cs if c["pass"] == op and not c.get("error")]
            row[op] = {
                m: {"geomean": report.geomean(v), "n": len(v)}
                for m in METRICS
                for v in [[c["speedups"][m] for c in sel if c["speedups"].get(m)]]
            }
        ratios = {(c["entry"], c["dtype"]): c.get("bytes_ratio") for c in cs}  # one per block, not per pass
        row["bytes_ratio"] = report.geomean(ratios.values())
        out[suite] = row
    return out


def _cell(r: dict[str, Any] | None) -> str:
    if r is None:
        return ""
    return f"{r['median_ms']:.4g}" if r.get("status") == "ok" else str(r.get("status", "?"))


def _cell_text(text: str) -> str:
    """text inside a markdown table cell (a plan's ' | ' between steps escaped)."""
    return text.replace("|", "\\|")


def markdown(doc: dict[str, Any]) -> str:
    dev, cfg = doc["device"], doc["config"]
    lines = [f"# tunerd block benchmark: {dev['name']}", ""]
    if dev["interpreter"]:
        lines += [
            "**Triton interpreter results on CPU (tiny blocks): the times show the benchmark works and say nothing "
            "about GPU speed; the modelled bytes and launches are the planner's and hold on any device.**",
            "",
        ]
    lines += [
        f"- created {doc['created']}, {doc['elapsed_s']:.0f} s; torch {dev['torch']}, triton {dev['triton']}, "
        f"CUDA {dev.get('cuda')}, cuDNN {dev.get('cudnn')}",
        f"- `eager` = {doc['labels']['eager']}; `compile` = torch.compile(mode={cfg['compile_mode']!r}) of it",
        f"- tunerd plan: {'tune_block, ' + str(cfg['tune_budget']) + ' trials' if cfg['tune_budget'] else 'default'}"
        f"; timing: {cfg['timing']}, {cfg['n_inputs']} rotated input sets",
        "- bytes: modelled HBM traffic of the forward (kernels.plan.cost), fused plan vs unfused (eager) plan",
    ]
    if doc.get("stopped"):
        lines.append(
            f"- **stopped early**: {doc['stopped']['reason']} ({doc['stopped']['cases_not_run']} cases not run)"
        )
    # the metrics and contenders this run has (graph ones only with --graphs)
    cols = [(op, m) for op in PASSES for m in METRICS if doc["summary"].get("all", {}).get(op, {}).get(m, {}).get("n")]
    cols = cols or [(op, m) for op in PASSES for m in ("vs_eager", "vs_compile")]
    every = [*CONTENDERS, *FORM_CONTENDERS, *GRAPH_CONTENDERS, *GRAPHED.values()]
    names = [n for n in every if any(n in c.get("contenders", {}) for c in doc["cases"])]
    metrics = [m for m in METRICS if any(m in c.get("speedups", {}) for c in doc["cases"])]
    lines += [
        "",
        "## Geometric-mean speedups (contender time / tunerd time; > 1: tunerd faster)",
        "",
        *(
            ["`graph_*`: each contender replayed from CUDA graphs: device time without host overhead.", ""]
            if cfg.get("graphs")
            else []
        ),
        "| suite | cases | " + " | ".join(f"{op} {m.replace('_', ' ')}" for op, m in cols) + " | bytes fused/eager |",
        "|---|---|" + "---|" * (len(cols) + 1),
    ]

    def gm(r: dict[str, Any]) -> str:
        return "—" if r["geomean"] is None else f"{r['geomean']:.2f}x (n={r['n']})"

    def x(v: float | None) -> str:
        return "—" if v is None else f"{v:.2f}x"

    for suite, row in doc["summary"].items():
        ratio = "—" if row["bytes_ratio"] is None else f"{row['bytes_ratio']:.2f}"
        lines.append(f"| {suite} | {row['cases']} | " + " | ".join(gm(row[op][m]) for op, m in cols) + f" | {ratio} |")
    head = "| suite | block | x | pass | dtype | plan (source) | launches fused/eager | MB fused | MB eager | "
    lines += [
        "",
        "## Per block (median ms)",
        "",
        head + " | ".join(names + [m.replace("_", " ") for m in metrics]) + " |",
        "|---|---|---|---|---|---|---|---|---|" + "---|" * (len(names) + len(metrics)),
    ]
    for c in doc["cases"]:
        where = f"| {c['suite']} | {c['entry']}: {c['name']} | {c['count']} | {c['pass']} | {c['dtype']} | "
        if "plan" not in c:
            lines.append(where + "error (below) |" + " |" * (3 + len(names) + len(metrics)))
            continue
        p, e, s, r = c["plan"], c["eager_plan"], c["speedups"], c["contenders"]
        modelled = "launches" in p and "launches" in e  # CUDA-graph cases model no bytes
        lines.append(
            where
            + f"{_cell_text(p['plan'])} ({p['source']}) | "
            + (
                f"{p['launches']}/{e['launches']} | {p['bytes'] / 1e6:.3g} | {e['bytes'] / 1e6:.3g} | "
                if modelled
                else "— | — | — | "
            )
            + " | ".join([_cell(r.get(n)) for n in names] + [x(s.get(m)) for m in metrics])
            + " |"
        )
    lines += report.problem_lines(doc, lambda c: f"{c['suite']}/{c['entry']} {c['pass']} {c['dtype']}")
    if doc.get("modelled"):
        m = doc["modelled"]
        lines += [
            "",
            f"## Modelled forward traffic of the GPU-size blocks (batch {m['batch']}, {m['dtype']}; no kernel ran)",
            "",
            "| suite | block | x | plan | launches fused/eager | MB fused | MB eager | fused/eager |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in m["rows"]:
            p, e = r["plan"], r["eager_plan"]
            lines.append(
                f"| {r['suite']} | {r['entry']}: {r['name']} | {r['count']} | {_cell_text(p['plan'])} | "
                f"{p['launches']}/{e['launches']} | {p['bytes'] / 1e6:.1f} | {e['bytes'] / 1e6:.1f} | "
                f"{r['bytes_ratio']:.2f} |"
            )
    return "\n".join(lines) + "\n"


def write(doc: dict[str, Any], cfg: Config, out_dir: Path | None) -> list[str]:
    """results.json and report.md under out_dir, or only cfg.json; atomic."""
    if cfg.json:
        return [report.write_json(doc, Path(cfg.json))]
    assert out_dir is not None
    return report.write_files(doc, markdown(doc), out_dir)


def modelled_rows(suites: list[str], batch: int, dtype: str = "bfloat16") -> list[dict[str, Any]]:
    """The GPU-size cases' modelled forward bytes and launches, planner's plan vs unfused (no kernel runs): what
    the small mode's tiny blocks stand for."""
    rows = []
    for name in suites:
        if name in GRAPH_SUITES:  # nothing modelled: launch overhead is what they time
            continue
        if name in MODULE_SUITES:
            rows += _modelled_module_rows(name, batch, dtype)
            continue
        for e in representative(SUITES[name](batch, dtype), 1):
            best, base = rank(e.block)[0], cost(e.block, unfused(e.block))
            rows.append(
                {
                    "suite": name,
                    "entry": e.name,
                    "count": e.count,
                    "name": e.block.describe(),
                    "plan": _plan_doc(best),
                    "eager_plan": _plan_doc(base),
                    "bytes_ratio": best.bytes / base.bytes,
                }
            )
    return rows


def _modelled_module_rows(name: str, batch: int, dtype: str) -> list[dict[str, Any]]:
    """A module suite's representative block: the modelled cheapest training form's forward bytes vs the block's own
    forward (reparam.train_costs on a meta-device module)."""
    from tunerd.blocks import rep_costs

    rows = []
    for e in representative_modules(MODULE_SUITES[name](batch, dtype), 1):
        try:
            with torch.device("meta"):
                m = e.make()
        except ImportError:  # no timm here: the module cases themselves record the error
            continue
        costs = rep_costs(m, torch.empty(e.x_shape, dtype=SPEC_DTYPES[dtype], device="meta"), False)
        form = min(costs, key=lambda f: (costs[f].seconds, costs[f].bytes))
        plan, base = _form_doc(costs, form), _form_doc(costs, "eager")
        rows.append(
            {
                "suite": name,
                "entry": e.name,
                "count": e.count,
                "name": e.describe(),
                "plan": plan,
                "eager_plan": base,
                "bytes_ratio": plan["bytes"] / base["bytes"],
            }
        )
    return rows


# ---- the run ------------------------------------------------------------------------------------------------
def output_dir(cfg: Config, dev: dict[str, Any]) -> Path | None:
    if cfg.json:
        return None
    if cfg.out:
        return Path(cfg.out)
    if cfg.small:
        return Path(tempfile.mkdtemp(prefix="tunerd-bench-blocks-"))
    slug = re.sub(r"[^a-z0-9]+", "-", dev["name"].lower()).strip("-")
    base = Path(__file__).resolve().parent / "results" / f"{_dt.date.today():%Y-%m-%d}-{slug}-blocks"
    path, i = base, 1
    while path.exists():
        i += 1
        path = base.with_name(f"{base.name}-{i}")
    return path


def _line(doc: dict[str, Any]) -> str:
    if doc.get("error"):
        return f"error: {doc['error']}"
    cells = [f"{n} {_cell(r)}{'ms' if r.get('status') == 'ok' else ''}" for n, r in doc["contenders"].items()]
    s = doc["speedups"]
    extra = [f"{k} {v:.2f}x" for k, v in s.items() if v]
    p = doc["plan"]
    if "launches" not in p:  # a CUDA-graph case
        return ", ".join(cells) + (" | " + ", ".join(extra) if extra else "") + f" | {doc.get('cuda_graphs')}"
    return (
        ", ".join(cells)
        + (" | " + ", ".join(extra) if extra else "")
        + f" | {p['source']} plan, {p['launches']} vs {doc['eager_plan']['launches']} launches, "
        + f"bytes x{doc['bytes_ratio']:.2f}"
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    cfg = parse_args(argv)
    t0 = time.perf_counter()
    device = torch.device(cfg.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cudnn.allow_tf32 = False  # fp32 compares as tunerd's 'ieee' precision, as benchmarks.run
        torch.backends.cuda.matmul.allow_tf32 = False
    dev = fingerprint(device)
    out_dir = output_dir(cfg, dev)
    interp = dev["interpreter"]
    doc: dict[str, Any] = {
        "schema": "tunerd-block-benchmark/1",
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": dev,
        "labels": {"eager": "torch ops on CPU (ATen)" if interp else "cuDNN convs + separate torch ops, channels_last"},
        "note": (
            "Triton interpreter results on CPU, tiny blocks: they prove the benchmark runs; the times are not GPU "
            "numbers, the modelled bytes and launches are the planner's."
            if interp
            else "GPU results"
        ),
        "config": cfg.to_dict(),
        "cases": [],
        "summary": {},
        "stopped": None,
        "elapsed_s": 0.0,
    }
    if cfg.small:  # the tiny blocks' bytes are the planner's on tiny shapes; these are the GPU cases'
        doc["modelled"] = {"batch": cfg.batch, "dtype": "bfloat16", "rows": modelled_rows(cfg.suites, cfg.batch)}
    _log(t0, f"tunerd block benchmark on {dev['name']} -> {cfg.json or out_dir}")
    cases = plan_cases(cfg)
    chosen: dict[str, Chosen] = {}
    harness = BlockHarness(device=cfg.device, seed=cfg.seed) if cfg.tune_budget else None
    spent: dict[str, list[float]] = {}
    try:
        for i, case in enumerate(cases):
            past = spent.get(case.op, [])
            if time.perf_counter() - t0 + (sum(past) / len(past) if past else 0.0) > cfg.time_limit:
                doc["stopped"] = {
                    "reason": f"time limit ({cfg.time_limit:.0f}s)",
                    "cases_not_run": len(cases) - i,
                    "not_run": [c.label for c in cases[i:]],
                }
                _log(t0, f"time limit reached: {len(cases) - i} cases not run")
                break
            _log(t0, f"[{i + 1}/{len(cases)}] {case.label}: {case.describe()}")
            cdoc = run_case(case, cfg, device, chosen, harness)
            spent.setdefault(case.op, []).append(cdoc["seconds"])
            doc["cases"].append(cdoc)
            _log(t0, "    " + _line(cdoc))
            doc["summary"] = summarize(doc["cases"])
            doc["elapsed_s"] = time.perf_counter() - t0
            write(doc, cfg, out_dir)
            torch._dynamo.reset()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    finally:
        if harness is not None:
            harness.close()
    doc["summary"] = summarize(doc["cases"])
    doc["elapsed_s"] = time.perf_counter() - t0
    _log(t0, "wrote " + ", ".join(write(doc, cfg, out_dir)))
    for suite, row in doc["summary"].items():
        cells = [
            f"{op} {m} {row[op][m]['geomean']:.2f}x"
            for op in PASSES
            for m in METRICS
            if row[op][m]["geomean"] is not None
        ]
        ratio = f"bytes x{row['bytes_ratio']:.2f}" if row["bytes_ratio"] is not None else ""
        print(f"  {suite}: " + ", ".join([*cells, ratio]), flush=True)
    return doc


if __name__ == "__main__":
    main()
