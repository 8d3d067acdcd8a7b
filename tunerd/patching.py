"""tunerd.patch(model): swap a model's torch convolutions for tunerd ones, in place.

Modules change class in place (parameters, buffers, hooks and state_dict keys stay), so an
optimizer built before patching keeps working and unpatch() restores plain torch modules.
Where a torch.fx trace proves that a conv feeds only a BatchNorm (and that BN only an
activation module), the three are fused into one kernel call.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from tunerd.kernels.conv import TORCH_DTYPES

from .nn import BN_MODES, TUNERD_CONV, activation_name, fuse_conv_bn

_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@dataclass
class PatchReport:
    swapped: list[tuple[str, str]] = field(default_factory=list)  # (module name, what it became)
    fused: list[tuple[str, str]] = field(default_factory=list)  # (conv name, "bn[+act]" names)
    left: list[tuple[str, str]] = field(default_factory=list)  # (module name, why it was left)

    def __str__(self) -> str:
        lines = [
            f"tunerd.patch: {len(self.swapped)} convolutions swapped, {len(self.fused)} fused with BN, "
            f"{len(self.left)} left"
        ]
        lines += [f"  swapped {n}: {w}" for n, w in self.swapped]
        lines += [f"  fused   {n} <- {w}" for n, w in self.fused]
        lines += [f"  left    {n}: {w}" for n, w in self.left]
        return "\n".join(lines)


def _why_not(m: nn.Module) -> str | None:
    if type(m) not in TUNERD_CONV:
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
    """conv name -> (bn name, act name or None) where the fx graph shows an exclusive chain."""
    try:
        with _meta_state(model):
            gm = torch.fx.symbolic_trace(model)
    except Exception as e:  # untraceable control flow: swap convs only
        return {}, f"torch.fx could not trace the model ({type(e).__name__}); BatchNorm left unfused"
    modules = dict(model.named_modules())
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1

    def only_user(node: torch.fx.Node, kinds: tuple[type, ...]) -> torch.fx.Node | None:
        users = list(node.users)
        if len(users) != 1 or users[0].op != "call_module" or calls.get(users[0].target) != 1:
            return None
        return users[0] if isinstance(modules.get(users[0].target), kinds) else None

    chains: dict[str, tuple[str, str | None]] = {}
    for node in gm.graph.nodes:
        if node.op != "call_module" or calls[node.target] != 1 or type(modules[node.target]) not in TUNERD_CONV:
            continue
        bn_node = only_user(node, _BN)
        if bn_node is None or not bn_node.args or bn_node.args[0] is not node:
            continue
        act_node = only_user(bn_node, (nn.Module,))
        act = act_node.target if act_node is not None and activation_name(modules[act_node.target]) else None
        chains[node.target] = (bn_node.target, act)
    return chains, None


def patch(model: nn.Module, *, fuse_bn: bool = True, bn_mode: str = "train") -> PatchReport:
    """Swap every plain torch Conv1d/2d/3d in model for its tunerd twin, in place; return what was done.

    bn_mode ('train' exact torch semantics, 'tune' BN folded into the weights each step,
    'eval' running statistics) applies while the model is in training mode; eval() always uses
    the running statistics fused into the conv's epilogue.
    """
    if bn_mode not in BN_MODES:
        raise ValueError(f"bn_mode must be one of {BN_MODES}, got {bn_mode!r}")
    report = PatchReport()
    chains, trace_note = _fusible_chains(model) if fuse_bn else ({}, None)
    modules = dict(model.named_modules())
    for name, m in modules.items():
        if isinstance(m, nn.modules.conv._ConvTransposeNd):
            report.left.append((name, f"{type(m).__name__}: tunerd has no transposed-convolution kernel"))
            continue
        if not isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
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
        m.__class__ = TUNERD_CONV[type(m)]
        m.activation = None
        report.swapped.append((name, type(m).__name__))
    if trace_note:
        report.left.append(("<model>", trace_note))
    return report


def unpatch(model: nn.Module) -> int:
    """Restore every module patch() changed to its torch class (same parameters); returns the count."""
    n = 0
    for m in model.modules():
        orig = m.__dict__.pop("_tunerd_orig_class", None)
        if orig is None:
            continue
        m.__class__ = orig
        for attr in ("_tunerd_bn", "bn_mode", "activation"):
            m.__dict__.pop(attr, None)
        n += 1
    return n
