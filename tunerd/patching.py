"""tunerd.patch(model): swap a model's torch convolutions and whole conv blocks for tunerd ones, in place.

Modules change class in place (parameters, buffers, hooks and state_dict keys stay), so an optimizer built
before patching keeps working and unpatch() restores plain torch modules. Where a torch.fx trace proves that a
conv feeds only a BatchNorm (and that BN only an activation module), the three are fused into one kernel call.
Block modules (tunerd.blocks.FUSED_BLOCKS: ConvNeXt, InceptionNeXt's token mixer, depthwise-separable, MBConv
/ inverted residual with SE or ECA) are traced in training and in eval mode; in each mode whose graph is
proven to be a block description the whole block runs its fused plan, otherwise (drop path active, BatchNorm
with batch statistics, an unsupported option) its per-conv kernels, and the report names the reason.
timm's re-parameterizable blocks (RepVGG, MobileOne, RepLKNet's large + small kernel) run their training form as
a stats conv and a combine or merged conv, and one merged conv in eval (tunerd.blocks.rep_block); blocks whose
branches are not linear, or with drop path active, keep their own forward and are named. With example_input
the report also says, per conv and block, whether its kernels are tuned winners (the installed lookup answered:
tunerd.kernels.conv's for convs, tunerd.blocks' block lookup for whole blocks) or default schedules, and each
block's plan (a re-parameterized block's form).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from tunerd.kernels.conv import TORCH_DTYPES, schedule_lookup, set_schedule_lookup
from tunerd.kernels.plan import FUSED
from tunerd.kernels.spec import SpecError

from .blocks import (
    BlockGraph,
    BlockTracer,
    NotABlock,
    RepParts,
    from_graph,
    fuse_block,
    is_fusable_block,
    is_rep_block,
    last_form,
    last_plan,
    last_tuned,
    rep_block,
    rep_parts,
)
from .graphs import check_max_graphs, ordinary
from .nn import BN_MODES, activation_name, fuse_conv_bn, is_norm_act, twin_class, use_cuda_graphs

_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)  # and their subclasses: timm's BatchNormAct2d (is_norm_act)
_MODE = {True: "train", False: "eval"}


@dataclass
class PatchReport:
    swapped: list[tuple[str, str]] = field(default_factory=list)  # (module name, what it became)
    fused: list[tuple[str, str]] = field(default_factory=list)  # (conv name, "bn[+act]" names)
    left: list[tuple[str, str]] = field(default_factory=list)  # (module name, why it was left)
    blocks: list[tuple[str, str]] = field(default_factory=list)  # (block module name, modes it runs fused in)
    kernels: list[tuple[str, str]] = field(default_factory=list)  # (conv or block name, tuned or default; plan)
    graphs: list[str] = field(default_factory=list)  # modules whose eval no-grad CUDA calls replay CUDA graphs

    def __str__(self) -> str:
        lines = [
            f"tunerd.patch: {len(self.swapped)} convolutions swapped, {len(self.fused)} fused with BN, "
            f"{len(self.blocks)} blocks fused, {len(self.left)} left"
        ]
        lines += [f"  swapped {n}: {w}" for n, w in self.swapped]
        lines += [f"  fused   {n} <- {w}" for n, w in self.fused]
        lines += [f"  block   {n}: {w}" for n, w in self.blocks]
        lines += [f"  left    {n}: {w}" for n, w in self.left]
        if self.graphs:
            lines.append(
                f"  graphs: {len(self.graphs)} modules replay CUDA graphs in eval no-grad CUDA calls "
                "(tunerd.graphs.stats(model): captures, replays, and why a call or capture ran the ordinary path)"
            )
        if self.kernels:
            lines += [f"  kernel  {n}: {w}" for n, w in self.kernels]
        elif self.swapped:
            lines.append(
                "  kernels: default schedules (no tuned-kernel lookup installed)"
                if schedule_lookup() is None
                else "  kernels: tuned winners where the installed lookup has one for the shapes seen, else default "
                "schedules (patch with example_input to see which)"
            )
        return "\n".join(lines)


def _why_not(m: nn.Module) -> str | None:
    if twin_class(type(m)) is None:
        return f"{type(m).__name__} is a subclass of a torch conv with its own behaviour"
    if m.weight.dtype not in TORCH_DTYPES:
        return f"weight dtype {m.weight.dtype} is not supported (float32, float16, bfloat16)"
    return None


@contextlib.contextmanager
def _meta_state(model: nn.Module) -> Iterator[None]:
    """Every parameter and buffer swapped for a meta-device twin (shared tensors stay shared) and the RNG
    states forked: the Python that tracing runs (e.g. a BatchNorm counting num_batches_tracked) touches
    no real tensor and draws no random number."""
    swapped: list[tuple[dict, str, torch.Tensor]] = []
    twins: dict[int, torch.Tensor] = {}
    for m in model.modules():
        for store in (m._parameters, m._buffers):
            for name, t in store.items():
                if t is None:
                    continue
                if id(t) not in twins:
                    meta = torch.empty_like(t, device="meta")
                    twins[id(t)] = nn.Parameter(meta, t.requires_grad) if isinstance(t, nn.Parameter) else meta
                swapped.append((store, name, t))
                store[name] = twins[id(t)]
    cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    try:
        with torch.random.fork_rng(devices=cuda):
            yield
    finally:
        for store, name, t in swapped:
            store[name] = t


def _fusible_chains(model: nn.Module) -> tuple[dict[str, tuple[str, str | None]], str | None]:
    """conv name -> (bn name, act name or None) where an fx graph shows an exclusive chain, and a note naming the
    submodules torch.fx could not trace. A module that does not trace (data-dependent control flow, shape
    arithmetic in its forward) is replaced by its children, each traced on its own: a chain inside a child holds
    as long as the child's submodules are called only through its forward, as PyTorch modules are written."""
    chains: dict[str, tuple[str, str | None]] = {}
    untraced: list[str] = []
    _collect_chains(model, "", chains, untraced)
    if not untraced:
        return chains, None
    where = ", ".join(untraced[:3]) + (f" and {len(untraced) - 3} more" if len(untraced) > 3 else "")
    return chains, f"torch.fx could not trace {where}; BatchNorm after their own convs left unfused"


def _collect_chains(
    module: nn.Module, prefix: str, chains: dict[str, tuple[str, str | None]], untraced: list[str]
) -> None:
    try:
        with _meta_state(module):
            graph = _ChainTracer().trace(module)
    except Exception as e:  # untraceable control flow: its children one by one, else swap convs only
        children = list(module.named_children())
        if any(isinstance(m, nn.modules.conv._ConvNd) for _, m in children):  # their BNs stay unfused
            untraced.append(f"{prefix.rstrip('.') or 'the model'} ({type(e).__name__})")
        for name, child in children:
            _collect_chains(child, f"{prefix}{name}.", chains, untraced)
        return
    for conv, (bn, act) in _graph_chains(module, graph).items():
        chains[prefix + conv] = (prefix + bn, None if act is None else prefix + act)


def _graph_chains(model: nn.Module, graph: torch.fx.Graph) -> dict[str, tuple[str, str | None]]:
    """The conv -> bn (-> act) chains of one traced graph (names relative to model)."""
    modules = dict(model.named_modules())
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1

    def only_user(node: torch.fx.Node, kinds: tuple[type, ...]) -> torch.fx.Node | None:
        users = list(node.users)
        if len(users) != 1 or users[0].op != "call_module" or calls.get(users[0].target) != 1:
            return None
        return users[0] if isinstance(modules.get(users[0].target), kinds) else None

    chains: dict[str, tuple[str, str | None]] = {}
    for node in graph.nodes:
        if node.op != "call_module" or calls[node.target] != 1 or twin_class(type(modules[node.target])) is None:
            continue
        bn_node = only_user(node, _BN)
        if bn_node is None or not bn_node.args or bn_node.args[0] is not node:
            continue
        bn = modules[bn_node.target]
        if is_norm_act(bn) and not (type(bn.drop) is nn.Identity and type(bn.act) is nn.Identity):
            # timm's BatchNorm + drop + act: the conv absorbs the act only right after the normalisation
            absorbed = type(bn.drop) is nn.Identity and activation_name(bn.act)
            chains[node.target] = (bn_node.target, f"{bn_node.target}.act" if absorbed else None)
            continue
        act_node = only_user(bn_node, (nn.Module,))
        act = act_node.target if act_node is not None and activation_name(modules[act_node.target]) else None
        chains[node.target] = (bn_node.target, act)
    return chains


class _ChainTracer(torch.fx.Tracer):
    """torch.fx's tracer, with timm's BatchNorm + activation modules and Conv2dSame kept whole (leaves, like
    torch's own)."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return is_norm_act(m) or twin_class(type(m)) is not None or super().is_leaf_module(m, module_qualified_name)


def _block_graph(module: nn.Module, training: bool) -> BlockGraph | str:
    """module's block description in that training mode (traced on meta tensors), or why there is none."""
    flags = [(m, m.training) for m in module.modules()]
    try:
        module.train(training)
        with _meta_state(module):
            graph = BlockTracer().trace(module)
        return from_graph(module, graph, training)
    except NotABlock as e:
        return str(e)
    except Exception as e:  # untraceable control flow
        return f"torch.fx could not trace it ({type(e).__name__}: {str(e)[:200]})"
    finally:
        for m, flag in flags:
            m.training = flag


def _fusable_blocks(model: nn.Module) -> dict[str, dict[bool, BlockGraph | str]]:
    """Block module name -> {training mode: its BlockGraph or the reason it has none}; outermost blocks only."""
    out: dict[str, dict[bool, BlockGraph | str]] = {}
    for name, m in model.named_modules():
        if (
            is_fusable_block(m)
            and not any(name.startswith(b + ".") for b in out)
            and "_tunerd_orig_class" not in vars(m)
        ):
            out[name] = {mode: _block_graph(m, mode) for mode in (True, False)}
    return out


def _rep_blocks(model: nn.Module) -> dict[str, RepParts | str]:
    """Re-parameterizable block name -> its branches when its training form runs fused (tunerd.blocks.rep_parts),
    else why not; blocks already patched are skipped."""
    out: dict[str, RepParts | str] = {}
    for name, m in model.named_modules():
        if is_rep_block(m) and "_tunerd_orig_class" not in vars(m):
            try:
                out[name] = rep_parts(m)
            except SpecError as e:
                out[name] = str(e)
    return out


def patch(
    model: nn.Module,
    *,
    fuse_bn: bool = True,
    bn_mode: str = "train",
    fuse_blocks: bool = True,
    example_input: Any = None,
    rep_form: str | None = None,
    cuda_graphs: bool | int = False,
) -> PatchReport:
    """Swap every plain torch Conv1d/2d/3d in model for its tunerd twin, in place; return what was done.

    bn_mode ('train' exact torch semantics, 'tune' BN folded into the weights each step,
    'eval' running statistics) applies while the model is in training mode; eval() always uses
    the running statistics fused into the conv's epilogue. fuse_blocks: run whole blocks
    (tunerd.blocks.FUSED_BLOCKS) as fused plans where their traced graph proves it exact. example_input (a
    tensor or a tuple of forward arguments) runs one forward (no grad, state restored) so the report says
    per conv and block which kernels are tuned winners and which plan each block runs. rep_form: the training
    form of re-parameterizable blocks (tunerd.blocks.REP_FORMS: 'combine', 'merged' or 'eager', the block's own
    per-branch forward); None picks per input shape by modelled cost. cuda_graphs: True (or how many input
    signatures to keep per module) makes every patched conv and fused block replay a captured CUDA graph in eval,
    no-grad calls on CUDA inputs (tunerd.graphs), for launch-bound small layers.
    """
    if bn_mode not in BN_MODES:
        raise ValueError(f"bn_mode must be one of {BN_MODES}, got {bn_mode!r}")
    if not isinstance(cuda_graphs, bool):
        check_max_graphs(cuda_graphs)  # before anything changes
    report = PatchReport()
    blocks = _fusable_blocks(model) if fuse_blocks else {}
    reps = _rep_blocks(model) if fuse_blocks else {}
    # the branch convs of rep blocks: they run in their block's launches
    inside = {f"{b}.{c}.conv": b for b, parts in reps.items() if isinstance(parts, RepParts) for c in parts.convs}
    chains, trace_note = _fusible_chains(model) if fuse_bn else ({}, None)
    modules = dict(model.named_modules())
    for name, m in modules.items():
        if isinstance(m, nn.modules.conv._ConvTransposeNd):
            report.left.append((name, f"{type(m).__name__}: tunerd has no transposed-convolution kernel"))
            continue
        if not isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            continue
        if name in inside:
            report.swapped.append((name, f"computed in the re-parameterized block {inside[name]}'s launches"))
            continue
        if hasattr(m, "_tunerd_orig_class"):
            report.left.append((name, "already patched"))
            continue
        why = _why_not(m)
        if why:
            report.left.append((name, why))
            continue
        if name in chains:
            bn_name, act_name = chains[name]
            bn = modules[bn_name]
            if bn.weight is not None and bn.weight.dtype != m.weight.dtype:
                report.left.append((bn_name, "BatchNorm dtype differs from the conv's; left unfused"))
            else:
                fuse_conv_bn(m, bn, modules[act_name] if act_name else None, bn_mode)
                report.fused.append((name, bn_name + (f" + {act_name}" if act_name else "")))
                report.swapped.append((name, type(m).__name__))
                continue
        m._tunerd_orig_class = type(m)
        m.__class__ = twin_class(type(m))
        m.activation = None
        report.swapped.append((name, type(m).__name__))
    for name, graphs in blocks.items():
        proven = {mode: g for mode, g in graphs.items() if isinstance(g, BlockGraph)}
        kind = type(modules[name]).__name__
        for mode, why in graphs.items():
            if isinstance(why, str):
                report.left.append((name, f"{kind} in {_MODE[mode]} mode runs per-conv kernels: {why}"))
        if proven:
            fuse_block(modules[name], proven)
            report.blocks.append(
                (name, f"{kind} as a fused block plan in {' and '.join(_MODE[m] for m in proven)} mode")
            )
    for name, parts in reps.items():
        kind = type(modules[name]).__name__
        if isinstance(parts, str):
            report.left.append((name, f"{kind} runs its own forward (per-conv kernels): {parts}"))
            continue
        rep_block(modules[name], rep_form)
        branches = f"{len(parts.convs)} conv branch(es)" + (" + identity" if parts.identity else "")
        report.blocks.append(
            (
                name,
                f"{kind} re-parameterized: train mode one stats conv over {branches} then a combine or a merged "
                "conv, or its own per-branch forward (whichever models fastest), eval mode one merged conv",
            )
        )
    if trace_note:
        report.left.append(("<model>", trace_note))
    if cuda_graphs is not False:
        for name, m in model.named_modules():
            patched = "_tunerd_orig_class" in vars(m)
            if patched and (isinstance(m, nn.modules.conv._ConvNd) or "_tunerd_graphs" in vars(m)):
                use_cuda_graphs(m, cuda_graphs)
                report.graphs.append(name)
    if example_input is not None:
        report.kernels = kernel_sources(model, example_input)
    return report


def kernel_sources(model: nn.Module, example_input: Any) -> list[tuple[str, str]]:
    """Per patched conv and fused block that one forward of model(example_input) runs: whether its kernels are
    tuned winners (the installed schedule lookup answered) or default schedules, and a block's plan.

    The forward runs in the model's mode without gradients; buffers and the RNG state are restored."""
    lookup = schedule_lookup()
    current: list[str | None] = [None]
    seen: dict[str, list[bool]] = {}

    def record(spec: Any, device: torch.device) -> Any:
        answer = lookup(spec, device) if lookup is not None else None
        if current[0] is not None:
            seen.setdefault(current[0], []).append(answer is not None)
        return answer

    def enter(name: str) -> Any:
        return lambda m, args: current.__setitem__(0, name)

    def leave(m: nn.Module, args: Any, out: Any) -> None:
        current[0] = None

    names = {name: m for name, m in model.named_modules() if "_tunerd_orig_class" in vars(m)}
    names = {
        n: m
        for n, m in names.items()
        if isinstance(m, nn.modules.conv._ConvNd) or "_tunerd_graphs" in vars(m) or "_tunerd_rep" in vars(m)
    }
    handles = [
        h for n, m in names.items() for h in (m.register_forward_pre_hook(enter(n)), m.register_forward_hook(leave))
    ]
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    cuda = sorted({t.device.index or 0 for t in [*model.parameters(), *model.buffers()] if t.device.type == "cuda"})
    for m in names.values():
        m.__dict__.pop("_tunerd_last", None)
        m.__dict__.pop("_tunerd_last_tuned", None)
        m.__dict__.pop("_tunerd_rep_last", None)
    set_schedule_lookup(record)
    try:
        with torch.random.fork_rng(devices=cuda), torch.no_grad(), ordinary():
            model(*(example_input if isinstance(example_input, tuple) else (example_input,)))
    finally:
        set_schedule_lookup(lookup)
        for h in handles:
            h.remove()
        with torch.no_grad():
            for name, b in model.named_buffers():
                if name in buffers:
                    b.copy_(buffers[name])
    out = []
    ran_fused = [n for n, m in names.items() if last_plan(m) is not None]
    for name, m in names.items():
        convs = _tuned(seen.get(name, []))
        inside = next((b for b in ran_fused if name.startswith(b + ".")), None)
        if inside is not None and name not in seen:
            out.append((name, f"computed inside the fused block {inside}"))
            continue
        if "_tunerd_rep" in vars(m):
            form = last_form(m)
            ran = {
                "eval": "one merged conv",
                "combine": "stats conv + combine",
                "merged": "stats conv + merged conv",
                "eager": "its own per-branch forward (modelled faster than the fused forms)",
            }
            out.append((name, f"{ran.get(form or '', 'its own forward')}: {convs}"))
            continue
        if "_tunerd_graphs" not in vars(m):
            out.append((name, convs))
            continue
        ran = last_plan(m)
        if ran is None:
            out.append((name, "ran its own forward (see its convs)"))
            continue
        plan = ran[1]
        n_fused = sum(s.kind in FUSED for s in plan.steps)
        if last_tuned(m):
            parts = [f"plan {plan.describe()} (tuned winner: the installed block lookup's plan)"]
            if n_fused:
                parts.append(f"{n_fused} fused kernel(s) on tuned tile schedules")
        else:
            parts = [f"plan {plan.describe()} (the planner's default: no tuned block winner for this shape)"]
            if n_fused:
                parts.append(f"{n_fused} fused kernel(s) on default tile schedules")
        if name in seen:
            parts.append(f"conv steps: {convs}")
        out.append((name, "; ".join(parts)))
    return out


def _tuned(hits: list[bool]) -> str:
    """What the schedule lookup answered for one module's kernel launches."""
    if not hits:
        return "not run by the example input"
    if all(hits):
        return "tuned winner"
    if not any(hits):
        return "default schedule"
    return f"{sum(hits)} of {len(hits)} kernels tuned winners, the rest default schedules"


def unpatch(model: nn.Module) -> int:
    """Restore every module patch() changed to its torch class (same parameters); returns the count."""
    n = 0
    for m in model.modules():
        orig = m.__dict__.pop("_tunerd_orig_class", None)
        if orig is None:
            continue
        m.__class__ = orig
        for attr in (
            "_tunerd_bn",
            "bn_mode",
            "activation",
            "_tunerd_graphs",
            "_tunerd_last",
            "_tunerd_last_tuned",
            "_tunerd_rep",
            "_tunerd_rep_form",
            "_tunerd_rep_last",
            "_tunerd_cuda_graphs",
        ):
            m.__dict__.pop(attr, None)
        n += 1
    return n
