"""Block-level transforms of torch models: fused blocks for training and inference, and re-parameterization.

Fused blocks. from_graph() turns the torch.fx graph of a block module into a kernels.block description: every
graph node must map to a block node (conv, Linear between channels-last permutes as a pointwise conv,
LayerNorm over channels, activation, eval BatchNorm as an affine, layer-scale multiply, residual add, channel
split / concat, average pool (nn.AvgPool2d, F.avg_pool2d: ResNet-D's and ConvNeXt's downsample shortcuts, timm's
create_aa); identities, inactive dropout and drop path vanish; a channel gate, x times a gate of x's
spatial mean, becomes an se node (fc -> act -> fc -> sigmoid: timm SqueezeExcite, torchvision
SqueezeExcitation) or an eca node (conv1d over channels -> sigmoid: timm EcaModule); a product of two block
tensors is a mul node and of a constant a scalar node (HorNet's gnConv); channel means through 1x1 convs, BN
and activations, interpolated to the input's size, are gap -> ... -> broadcast (torchvision's ASPP pooling)), so
the description is proven to compute what the module computes; anything else is refused with the reason.
canonical() gives a graph the node names of the seed block it equals (kernels.block: convnext, inception_dw,
separable, mbconv, gnconv, aspp, bottleneck). Candidates are FUSED_BLOCKS' classes, GATED_BLOCKS' with a channel
gate (ECA-ResNet) and, by their submodules, gnConvs. A
module patched with fuse_block() runs its block under the planner's plan (kernels.block_autograd: fused
forward, recomputing backward) in each training mode whose graph converted, and its own forward (per-conv
kernels) otherwise.

reparameterize(module): structural re-parameterization for inference. timm's training-form blocks
with parallel branches (each conv + BatchNorm) become one tunerd conv with merged weights and bias
(kernels.reparam), followed by the block's attention and activation:
  RepVggBlock (timm.models.byobnet)       k x k + 1 x 1 + identity BN
  MobileOneBlock (byobnet and fastvit)    n x (k x k) + 1 x 1 scale + identity BN
  ReparamLargeKernelConv (fastvit)        RepLKNet's large + small kernel
The merge uses BatchNorm's running statistics: the result computes what the block computes in eval mode.

rep_block(module): the same blocks for training, in place (class swap: parameters, buffers, state_dict keys and
optimizer identity stay). Each forward is kernels.reparam.train_forward: with batch statistics one stats conv
over all conv branches, then an elementwise combine or a conv of the statistics-merged weight (by modelled cost,
or as asked), BatchNorm buffers updated as torch does; with running statistics (eval) one merged conv.
"""

from __future__ import annotations

import copy
import math
import operator
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from tunerd.kernels import block as B
from tunerd.kernels import block_autograd, reparam
from tunerd.kernels.block import INPUT, Block, Node, node
from tunerd.kernels.conv import TORCH_DTYPES
from tunerd.kernels.plan import Plan, rank
from tunerd.kernels.prologue import bn_scale_shift
from tunerd.kernels.schedule import Schedule
from tunerd.kernels.spec import SpecError
from tunerd.kernels.trust import TrustedPlan

from . import graphs
from .nn import Conv2d, activation_name

REPARAM_BLOCKS = ("RepVggBlock", "MobileOneBlock", "ReparamLargeKernelConv")


class RepConv2d(nn.Module):
    """A re-parameterized block: one tunerd conv (merged weight and bias), then the block's attention and
    activation; the activation runs in the conv's epilogue when no attention sits between them."""

    def __init__(self, conv: Conv2d, attn: nn.Module | None = None, act: nn.Module | None = None) -> None:
        super().__init__()
        attn = attn if attn is not None else nn.Identity()
        act = act if act is not None else nn.Identity()
        name = activation_name(act)
        if type(attn) is nn.Identity and name is not None:
            conv.activation, act = name, nn.Identity()
        self.conv, self.attn, self.act = conv, attn, act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.attn(self.conv(x)))


def is_rep_block(m: nn.Module) -> bool:
    """Whether m is one of timm's re-parameterizable blocks (REPARAM_BLOCKS)."""
    return type(m).__module__.startswith("timm.") and type(m).__name__ in REPARAM_BLOCKS


_is_timm = is_rep_block


def _plain(m: nn.Module | None) -> bool:
    return m is None or type(m) is nn.Identity


def _linear_branch(branch: nn.Module, where: str) -> tuple[nn.Conv2d, nn.BatchNorm2d]:
    """timm ConvNormAct (conv -> BN, no act, drop or anti-aliasing): its conv and BN; SpecError otherwise."""
    conv, bn = getattr(branch, "conv", None), getattr(branch, "bn", None)
    if type(conv) is not nn.Conv2d or not isinstance(bn, nn.BatchNorm2d):
        raise SpecError(f"{where}: expected conv -> BatchNorm2d, got {type(conv).__name__} -> {type(bn).__name__}")
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        raise SpecError(f"{where}: only explicit zero padding merges, got {conv.padding!r} ({conv.padding_mode})")
    if not all(_plain(getattr(bn, a, None)) for a in ("act", "drop")) or not _plain(getattr(branch, "aa", None)):
        raise SpecError(f"{where}: the branch applies an activation, dropout or anti-aliasing: not linear")
    return conv, bn


def _conv_bn_branch(branch: nn.Module, where: str) -> reparam.Branch:
    """timm ConvNormAct as a Branch with its eval BN folded in."""
    conv, bn = _linear_branch(branch, where)
    return reparam.bn_branch(conv.weight, conv.bias, bn, conv.dilation, conv.padding)


def _check_identity(bn: nn.Module, where: str) -> None:
    if not isinstance(bn, nn.BatchNorm2d) or not all(_plain(getattr(bn, a, None)) for a in ("act", "drop")):
        raise SpecError(f"{where}: the identity branch must be a plain BatchNorm2d, got {type(bn).__name__}")


def _identity_branch(bn: nn.Module, like: nn.Conv2d, where: str) -> reparam.Branch:
    _check_identity(bn, where)
    assert isinstance(bn, nn.BatchNorm2d)
    w = reparam.identity_weight(like.out_channels, like.groups, like.weight)
    return reparam.bn_branch(w, None, bn)


def merge_block(block: nn.Module) -> RepConv2d:
    """One timm training-form block (REPARAM_BLOCKS) as its inference RepConv2d on a tunerd conv."""
    name = type(block).__name__
    if not _is_timm(block):
        raise SpecError(f"{name} is not a re-parameterizable timm block ({', '.join(REPARAM_BLOCKS)})")
    if getattr(block, "reparam_conv", None) is not None:
        conv, branches = block.reparam_conv, None
        if type(conv) is not nn.Conv2d:
            raise SpecError(f"{name}: reparam_conv is a {type(conv).__name__}, not nn.Conv2d")
    elif name == "ReparamLargeKernelConv":
        mains = [block.large_conv] + ([block.small_conv] if getattr(block, "small_conv", None) is not None else [])
        branches = [_conv_bn_branch(b, f"{name}.{i}") for i, b in enumerate(mains)]
        conv = block.large_conv.conv
    else:  # RepVggBlock / MobileOneBlock
        kxk = block.conv_kxk if isinstance(block.conv_kxk, nn.ModuleList) else [block.conv_kxk]
        small = getattr(block, "conv_1x1", None) if name == "RepVggBlock" else getattr(block, "conv_scale", None)
        branches = [_conv_bn_branch(b, f"{name}.conv_kxk") for b in kxk]
        if small is not None:
            branches.append(_conv_bn_branch(small, f"{name}.1x1"))
        conv = kxk[0].conv
        if block.identity is not None:
            branches.append(_identity_branch(block.identity, conv, f"{name}.identity"))
    attn = getattr(block, "attn", None) if hasattr(block, "attn") else getattr(block, "se", None)
    if branches is None:
        weight, bias, padding = conv.weight.detach(), conv.bias, conv.padding
        dilation = conv.dilation
    else:
        weight, bias, padding = reparam.merge(branches)
        dilation = (1, 1)
    if branches is not None and len({tuple(m.conv.stride) for m in _branch_convs(block)}) > 1:
        raise SpecError(f"{name}: branches differ in stride")
    out = Conv2d(
        conv.in_channels,
        conv.out_channels,
        tuple(weight.shape[2:]),
        stride=conv.stride,
        padding=padding,
        dilation=dilation,
        groups=conv.groups,
        bias=True,
        device=weight.device,
        dtype=weight.dtype,
    )
    with torch.no_grad():
        out.weight.copy_(weight)
        out.bias.copy_(bias if bias is not None else torch.zeros_like(out.bias))
    return RepConv2d(out, attn, getattr(block, "act", None))


def _branch_convs(block: nn.Module) -> list[nn.Module]:
    names = ("large_conv", "small_conv", "conv_1x1", "conv_scale")
    mods = [getattr(block, n) for n in names if getattr(block, n, None) is not None]
    kxk = getattr(block, "conv_kxk", None)
    if kxk is not None:
        mods += list(kxk) if isinstance(kxk, nn.ModuleList) else [kxk]
    return mods


def reparameterize(module: nn.Module, *, inplace: bool = False) -> nn.Module:
    """The inference form of module: every re-parameterizable timm block (REPARAM_BLOCKS, module itself
    included) replaced by a RepConv2d on one tunerd conv. A copy unless inplace; SpecError names a block
    whose branches cannot merge (an activation inside a branch, mismatched centres or strides)."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"reparameterize takes an nn.Module, got {type(module).__name__}")
    root = module if inplace else copy.deepcopy(module)
    if _is_timm(root):
        return merge_block(root)
    for parent in list(root.modules()):
        for name, child in list(parent.named_children()):
            if _is_timm(child):
                setattr(parent, name, merge_block(child))
    return root


# ---- the training form, in place -------------------------------------------------------------------
@dataclass(frozen=True)
class RepParts:
    """A timm re-parameterizable block's training form: its conv branches (ConvNormAct submodule names), its
    identity BatchNorm's name and the attention module between the branch sum and the activation."""

    convs: tuple[str, ...]
    identity: str | None = None
    attn: str | None = None


def rep_parts(block: nn.Module) -> RepParts:
    """Where block's (REPARAM_BLOCKS) branches are; SpecError naming why its training form cannot run fused."""
    name = type(block).__name__
    if not _is_timm(block):
        raise SpecError(f"{name} is not a re-parameterizable timm block ({', '.join(REPARAM_BLOCKS)})")
    if getattr(block, "reparam_conv", None) is not None:
        raise SpecError(f"{name} is already re-parameterized (reparam_conv): its conv is swapped on its own")
    identity = None
    if name == "ReparamLargeKernelConv":
        convs = ["large_conv"] + (["small_conv"] if getattr(block, "small_conv", None) is not None else [])
    else:
        kxk = getattr(block, "conv_kxk", None)
        convs = [f"conv_kxk.{i}" for i in range(len(kxk))] if isinstance(kxk, nn.ModuleList) else ["conv_kxk"]
        convs = convs if kxk is not None else []
        small = "conv_1x1" if name == "RepVggBlock" else "conv_scale"
        convs += [small] if getattr(block, small, None) is not None else []
        if getattr(block, "identity", None) is not None:
            identity = "identity"
            _check_identity(block.identity, f"{name}.identity")
    if not convs:
        raise SpecError(f"{name} has no conv branch")
    pairs = [_linear_branch(block.get_submodule(c), f"{name}.{c}") for c in convs]
    if len({(tuple(c.stride), c.groups, c.in_channels, c.out_channels) for c, _ in pairs}) > 1:
        raise SpecError(f"{name}: branches differ in stride, groups or channels")
    reparam.merge([reparam.Branch(c.weight.detach(), None, c.dilation, c.padding) for c, _ in pairs])  # centres
    drop = getattr(block, "drop_path", None)
    if not _plain(drop) and float(getattr(drop, "drop_prob", 1.0)) > 0:
        raise SpecError(f"{name}: drop path is active in training, the branch sum is not linear")
    attn = next((a for a in ("attn", "se") if hasattr(block, a)), None)
    return RepParts(tuple(convs), identity, attn if attn is not None and not _plain(getattr(block, attn)) else None)


class _RepBlock:
    """A re-parameterizable block whose forward is kernels.reparam.train_forward: in training mode the stats
    conv of all branches then a combine or a merged conv (form), in eval one conv of the merged weight."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if getattr(self, "reparam_conv", None) is not None or not isinstance(x, torch.Tensor):
            return super().forward(x)  # type: ignore[misc]
        if x.dim() != 4 or x.dtype not in TORCH_DTYPES:
            return super().forward(x)  # type: ignore[misc]
        return _rep_forward(self, self.__dict__["_tunerd_rep"], x)  # type: ignore[arg-type]


def _norm(bn: nn.BatchNorm2d) -> reparam.Norm:
    """bn as train_forward's Norm: running statistics unless it normalises with the batch's (torch's rule)."""
    batch = bn.training or bn.running_mean is None or bn.running_var is None
    running = None if batch else (bn.running_mean, bn.running_var)
    return reparam.Norm(bn.weight, bn.bias, bn.eps, running)  # type: ignore[arg-type]


def _track(bn: nn.BatchNorm2d, mean: torch.Tensor, var: torch.Tensor, count: int) -> None:
    """torch's BatchNorm buffer update from batch (mean, biased var) over count values per channel."""
    factor: float | torch.Tensor = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)  # the cumulative factor below stays on the device (no host read)
        factor = bn.num_batches_tracked.double().reciprocal() if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.running_mean is not None and bn.running_var is not None:
        with torch.no_grad():  # in float64, as torch's CPU kernel
            bn.running_mean.copy_(factor * mean.double() + (1.0 - factor) * bn.running_mean.double())
            unbiased = var.double() * (count / (count - 1))
            bn.running_var.copy_(factor * unbiased + (1.0 - factor) * bn.running_var.double())


@lru_cache(maxsize=512)
def _auto_form(
    n: int, c: int, k: int, hw: tuple[int, int], out: tuple[int, int], taps: tuple[int, ...], window: int,
    groups: int, identity: bool, itemsize: int, backward: bool,
) -> str:  # fmt: skip
    """The training form with the least modelled time, or 'eager' (the block's own per-branch forward) when that
    models faster than both: padding a 1 x 1 branch into the k x k stack costs GEMM FLOPs that wide layers feel."""
    costs = reparam.train_costs(n, c, k, hw, out, taps, window, groups, identity, itemsize, backward)
    form = reparam.choose_form(costs)
    return "eager" if costs["eager"].seconds < costs[form].seconds else form


def _form_args(block: nn.Module, parts: RepParts, x: torch.Tensor) -> tuple[Any, ...]:
    """reparam.train_costs' shape arguments for x: n, c, k, in size, out size, taps per branch, the widest
    window's taps, groups, identity."""
    convs = [block.get_submodule(n).conv for n in parts.convs]
    c0 = convs[0]
    out = tuple(
        (x.shape[2 + d] + 2 * c0.padding[d] - c0.dilation[d] * (c0.kernel_size[d] - 1) - 1) // c0.stride[d] + 1
        for d in range(2)
    )
    windows = [tuple(c.dilation[d] * (c.kernel_size[d] - 1) + 1 for d in range(2)) for c in convs]
    return (
        x.shape[0], x.shape[1], c0.out_channels, tuple(x.shape[2:]), out,
        tuple(int(c.kernel_size[0] * c.kernel_size[1]) for c in convs),
        max(w[0] for w in windows) * max(w[1] for w in windows),
        c0.groups, parts.identity is not None,
    )  # fmt: skip


def rep_costs(module: nn.Module, x: torch.Tensor, backward: bool) -> dict[str, reparam.FormCost]:
    """The modelled cost of each training form of a re-parameterizable block (rep_parts) on input x, forward or
    forward + backward: 'combine', 'merged' and 'eager' (its own per-branch forward), as the auto form weighs them."""
    parts = module.__dict__.get("_tunerd_rep") or rep_parts(module)
    return reparam.train_costs(*_form_args(module, parts, x), x.element_size(), backward)


def _rep_forward(block: nn.Module, parts: RepParts, x: torch.Tensor) -> torch.Tensor:
    mods = [block.get_submodule(n) for n in parts.convs]
    convs, bns = [m.conv for m in mods], [m.bn for m in mods]
    if parts.identity is not None:
        bns.append(block.get_submodule(parts.identity))
    branches = [reparam.Branch(c.weight, c.bias, tuple(c.dilation), tuple(c.padding)) for c in convs]
    norms = [_norm(bn) for bn in bns]
    attn = block.get_submodule(parts.attn) if parts.attn is not None else None
    act = getattr(block, "act", None) or nn.Identity()
    name = activation_name(act) if attn is None else None
    form = block.__dict__.get("_tunerd_rep_form")
    c0 = convs[0]
    if form is None:
        params = [t for b in branches for t in (b.weight, b.bias)] + [t for bn in bns for t in (bn.weight, bn.bias)]
        grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in [x, *params])
        form = _auto_form(*_form_args(block, parts, x), x.element_size(), grad)
    if form == "eager":
        if any(nm.running is None for nm in norms):  # batch statistics: the block's own forward
            block.__dict__["_tunerd_rep_last"] = "eager"
            return block._tunerd_orig_class.forward(block, x)  # type: ignore[operator]
        form = "merged"  # running statistics only: one merged conv whatever the training form
    res = reparam.train_forward(
        x, branches, norms[: len(convs)], norms[len(convs)] if parts.identity else None,
        tuple(c0.stride), c0.groups, name, form,
    )  # fmt: skip
    if res.count == 1 and any(st is not None for st in res.stats):
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {x.size()}")
    for bn, st in zip(bns, res.stats):
        if st is not None:
            _track(bn, st[0], st[1], res.count)
    block.__dict__["_tunerd_rep_last"] = res.form
    y = attn(res.y) if attn is not None else res.y
    return act(y) if name is None else y


_REP_CLASSES: dict[type, type] = {}


REP_FORMS = (*reparam.FORMS, "eager")  # the training forms a rep_block may run ('eager': its own forward)


def rep_block(module: nn.Module, form: str | None = None) -> RepParts:
    """Make a timm re-parameterizable block run kernels.reparam.train_forward, in place (its class becomes a
    subclass of its own: parameters, buffers, state_dict keys and optimizer identity stay). form: the training
    form (REP_FORMS), None to choose per input shape by modelled cost. SpecError (nothing changed) when
    the block's training form is not a sum of linear branches (rep_parts)."""
    if form is not None and form not in REP_FORMS:
        raise SpecError(f"form must be one of {REP_FORMS} or None, got {form!r}")
    parts = rep_parts(module)
    base = type(module)
    cls = _REP_CLASSES.setdefault(base, type(f"RepTrain{base.__name__}", (_RepBlock, base), {"__module__": __name__}))
    module._tunerd_orig_class = base
    module.__class__ = cls
    module.__dict__["_tunerd_rep"] = parts
    module.__dict__["_tunerd_rep_form"] = form
    return parts


def last_form(module: nn.Module) -> str | None:
    """The form a rep_block's last forward ran ('combine', 'merged', 'eval': one merged conv, or 'eager': its own
    per-branch forward, modelled faster for its shape), else None."""
    return module.__dict__.get("_tunerd_rep_last")


# ---- fused blocks ---------------------------------------------------------------------------------
# (library, class name) of the block modules patch() tries to swap whole
FUSED_BLOCKS = (
    ("timm", "ConvNeXtBlock"),
    ("torchvision", "CNBlock"),
    ("timm", "InceptionDWConv2d"),
    ("timm", "DepthwiseSeparableConv"),
    ("timm", "InvertedResidual"),
    ("torchvision", "InvertedResidual"),
    ("torchvision", "MBConv"),
    ("torchvision", "ASPP"),
)
# (library, class name) of blocks patch() tries only when they have a channel gate (their `se`: timm's ECA-ResNet and
# SE-ResNet): the gate's pool and scale fuse into the conv3 and residual steps (pw_pool, gate_ep); a block without
# one keeps its per-conv kernels, which already take each conv's BN and activation
GATED_BLOCKS = (("timm", "Bottleneck"),)
# submodules by which a module of any class is tried as HorNet's gnConv (the official code's names): the traced
# graph must then prove it (kernels.block.gnconv)
GNCONV_PARTS = {"proj_in": nn.Conv2d, "dwconv": nn.Conv2d, "proj_out": nn.Conv2d, "pws": nn.ModuleList}
# block classes whose graphs key as B.mbconv blocks first (an expansion-1 block is also a separable one)
_FAMILY = {"InvertedResidual": "mbconv", "MBConv": "mbconv"}
_DROP_PATH = ("DropPath", "StochasticDepth")
_ACT_FNS = {
    F.relu: "relu",
    torch.relu: "relu",
    F.relu6: "relu6",
    F.silu: "silu",
    F.hardswish: "hardswish",
    torch.sigmoid: "sigmoid",
    F.sigmoid: "sigmoid",
}
_ADD = (operator.add, operator.iadd, torch.add)
_MUL = (operator.mul, operator.imul, torch.mul)


def is_fusable_block(m: nn.Module) -> bool:
    """Whether m's class is one of FUSED_BLOCKS, one of GATED_BLOCKS with a gate, or m has gnConv's submodules
    (GNCONV_PARTS); from_graph proves the structure."""
    lib = type(m).__module__.split(".")[0]
    if (lib, type(m).__name__) in FUSED_BLOCKS:
        return True
    if (lib, type(m).__name__) in GATED_BLOCKS:
        return getattr(m, "se", None) is not None
    return all(type(getattr(m, k, None)) is t for k, t in GNCONV_PARTS.items())


class BlockTracer(fx.Tracer):
    """torch.fx tracing with drop-path modules kept as leaves, so their probability is read, not traced."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return type(m).__name__ in _DROP_PATH or super().is_leaf_module(m, qualname)


@dataclass(frozen=True)
class Source:
    """Where one block parameter comes from at run time: tensors of the module by qualified name.
    kind 'tensor' (targets[0] reshaped to shape), 'bn_scale' / 'bn_shift' (eval BatchNorm as an affine of
    running mean, running var, weight, bias: '' when absent, eps), 'ones' / 'zeros' (shape)."""

    kind: str
    targets: tuple[str, ...] = ()
    shape: tuple[int, ...] = ()
    eps: float = 0.0

    def get(self, module: nn.Module, like: torch.Tensor) -> torch.Tensor:
        if self.kind == "tensor":
            return _tensor(module, self.targets[0]).reshape(self.shape)
        if self.kind in ("ones", "zeros"):
            return (torch.ones if self.kind == "ones" else torch.zeros)(self.shape, device=like.device)
        mean, var, w, b = (_tensor(module, t) if t else None for t in self.targets)
        scale, shift = bn_scale_shift(mean, var, w, b, self.eps)
        return scale if self.kind == "bn_scale" else shift


def _tensor(module: nn.Module, target: str) -> torch.Tensor:
    prefix, _, leaf = target.rpartition(".")
    t = getattr(module.get_submodule(prefix), leaf)
    if not isinstance(t, torch.Tensor):
        raise SpecError(f"{target} is not a tensor")
    return t


@dataclass(frozen=True)
class BlockGraph:
    """A block module's computation as block nodes (input channels c) and the source of each parameter."""

    c: int
    nodes: tuple[Node, ...]
    sources: tuple[tuple[str, Source], ...]
    sized: tuple[str, ...] = ()  # broadcast nodes to the input's spatial size (traced at TRACE_SIZE)

    def block(self, x: torch.Tensor) -> Block:
        """The Block for input x ([N, c, H, W] of a supported dtype); SpecError otherwise."""
        if x.dim() != 4 or x.shape[1] != self.c or x.dtype not in TORCH_DTYPES:
            raise SpecError(f"input {tuple(x.shape)} {x.dtype} is not a [N, {self.c}, H, W] float tensor")
        n, _, h, w = x.shape
        nodes = tuple(
            node(nd.name, nd.op, nd.inputs, size=(h, w)) if nd.name in self.sized else nd for nd in self.nodes
        )
        return Block(n=n, c=self.c, in_size=(h, w), nodes=nodes, dtype=TORCH_DTYPES[x.dtype])

    def params(self, module: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {k: src.get(module, x) for k, src in self.sources}


class NotABlock(Exception):
    """A traced graph that no block description computes (the message says which node and why)."""


@dataclass(frozen=True)
class _Val:
    """A block tensor: its node name, channels and whether it is permuted to [N, H, W, C]."""

    name: str
    c: int
    nhwc: bool = False


@dataclass(frozen=True)
class _Param:
    """A tensor of the module (get_attr), possibly reshaped."""

    target: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class _Slice:
    """A channel slice of a block tensor, emitted as a split node when first read."""

    src: _Val
    start: int
    size: int
    name: str


@dataclass(frozen=True)
class _Chunks:
    src: _Val
    parts: tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class _Pooled:
    """The channel means of a block tensor and the ops applied to them since: a channel gate (squeeze-excite,
    ECA) under way, which becomes one se / eca node when it multiplies the tensor it pooled. view: the means
    [N, C] shaped as 'nc11' ([N, C, 1, 1]), 'n1c' ([N, 1, C], for a conv1d over channels) or 'nc'."""

    src: _Val
    view: str
    ops: tuple[tuple[Any, ...], ...] = ()
    at: str = "pool"  # the fx node that pooled (names the gap node when the means become a block tensor)

    def then(self, *op: Any) -> _Pooled:
        return _Pooled(self.src, self.view, (*self.ops, op), self.at)


_SHAPE_ONLY = object()  # x.ndim and comparisons of it: shape checks the block input satisfies
_SHAPE, _BATCH = object(), object()  # x.shape of a block tensor, and its x.shape[0] / x.size(0)
_IN_SHAPE, _IN_SIZE = object(), object()  # the block input's x.shape and its x.shape[-2:] (an interpolation size)
TRACE_SIZE = (8, 8)  # the spatial size graphs are checked and keyed at (BlockGraph.block substitutes the input's)
_HW = ((2, 3), (3, 2), (-2, -1), (-1, -2))  # the spatial dims of [N, C, H, W]
_SE_ACTS = ("relu", "silu", "gelu", "hardswish")  # the se node's hidden activations
_AVG_DEFAULTS = (None, None, 0, False, True, None)  # F.avg_pool2d's arguments after the input


def _arg(n: fx.Node, i: int, name: str, default: Any = None) -> Any:
    if len(n.args) > i:
        return n.args[i]
    return n.kwargs.get(name, default)


@dataclass
class _Converter:
    root: nn.Module
    training: bool
    nodes: list[Node] = field(default_factory=list)
    sources: dict[str, Source] = field(default_factory=dict)
    c_in: int | None = None
    emitted: set[str] = field(default_factory=set)
    names: dict[str, str] = field(default_factory=dict)
    sized: list[str] = field(default_factory=list)

    def name(self, n: fx.Node | str) -> str:
        raw = n if isinstance(n, str) else n.name
        if raw not in self.names:
            clean = re.sub(r"[^a-z0-9_]", "_", raw.lower()) or "n"
            while clean == INPUT or clean in self.names.values():
                clean += "_"
            self.names[raw] = clean
        return self.names[raw]

    def channels(self, v: _Val, want: int, what: str) -> None:
        if v.name == INPUT and self.c_in is None:
            self.c_in = want
        c = self.c_in if v.name == INPUT else v.c
        if c != want:
            raise NotABlock(f"{what} expects {want} channels, its input has {c}")

    def val(self, a: Any, what: str) -> _Val:
        if isinstance(a, _Slice):
            if a.name not in self.emitted:
                self.emitted.add(a.name)
                self.nodes.append(node(a.name, "split", [a.src.name], start=a.start, size=a.size))
            return _Val(a.name, a.size)
        if not isinstance(a, _Val):
            raise NotABlock(f"{what} reads {type(a).__name__.strip('_').lower()} {a!r}, not a block tensor")
        return a

    def emit(self, n: fx.Node | str, op: str, ins: list[_Val], c: int, nhwc: bool = False, **attrs: Any) -> _Val:
        name = self.name(n)
        self.nodes.append(node(name, op, [v.name for v in ins], **attrs))
        return _Val(name, c, nhwc)

    def tensor(self, key: str, target: str, shape: tuple[int, ...]) -> None:
        self.sources[key] = Source("tensor", (target,), shape)

    # ---- one fx node ------------------------------------------------------------------------
    def module(self, n: fx.Node, ins: list[Any]) -> Any:
        m = self.root.get_submodule(n.target)
        kind = type(m).__name__
        if type(m) is nn.Identity or (isinstance(m, nn.Dropout) and (m.p == 0 or not self.training)):
            return ins[0]
        if kind in _DROP_PATH:
            p = getattr(m, "drop_prob", getattr(m, "p", 0.0))
            if p and self.training:
                raise NotABlock(f"{kind} {n.target} (p={p}) is active in training mode: random per sample")
            return ins[0]
        if isinstance(ins[0], _Pooled) and type(m) is nn.BatchNorm2d:  # image pooling (ASPP), not a gate
            ins[0] = self.materialize(n, ins[0])
        if isinstance(ins[0], _Pooled):
            return self.gate_module(n, m, ins[0])
        x = self.val(ins[0], n.target)
        if type(m) is nn.AdaptiveAvgPool2d and m.output_size in (1, (1, 1)) and not x.nhwc:
            return _Pooled(x, "nc11", at=n.name)
        if type(m) is nn.AvgPool2d:
            stride = m.stride if m.stride is not None else m.kernel_size
            return self.avg_pool(
                n, x, m.kernel_size, stride, m.padding, m.ceil_mode, m.count_include_pad, m.divisor_override
            )
        if type(m) is nn.Conv2d:
            if x.nhwc or m.padding_mode != "zeros" or isinstance(m.padding, str):
                raise NotABlock(f"Conv2d {n.target}: only zero padding given as sizes, on an [N, C, H, W] tensor")
            self.channels(x, m.in_channels, n.target)
            v = self.emit(
                n,
                "conv",
                [x],
                m.out_channels,
                out=m.out_channels,
                kernel=_pair(m.kernel_size),
                stride=_pair(m.stride),
                padding=_pair(m.padding),
                dilation=_pair(m.dilation),
                groups=m.groups,
                bias=m.bias is not None,
            )
            self.tensor(f"{v.name}.weight", f"{n.target}.weight", tuple(m.weight.shape))
            if m.bias is not None:
                self.tensor(f"{v.name}.bias", f"{n.target}.bias", (m.out_channels,))
            return v
        if type(m) is nn.Linear:
            if not x.nhwc:
                raise NotABlock(f"Linear {n.target} acts on the last dimension of a tensor that is not channels-last")
            self.channels(x, m.in_features, n.target)
            k = m.out_features
            v = self.emit(n, "conv", [x], k, True, out=k, kernel=1, bias=m.bias is not None)
            self.tensor(f"{v.name}.weight", f"{n.target}.weight", (k, m.in_features, 1, 1))
            if m.bias is not None:
                self.tensor(f"{v.name}.bias", f"{n.target}.bias", (k,))
            return v
        if type(m) is nn.LayerNorm:
            w = _Param(f"{n.target}.weight", ()) if m.weight is not None else None
            b = _Param(f"{n.target}.bias", ()) if m.bias is not None else None
            return self.layer_norm(n, x, tuple(m.normalized_shape), w, b, m.eps)
        if type(m) is nn.BatchNorm2d:
            if m.training or not m.track_running_stats:
                raise NotABlock(f"BatchNorm2d {n.target} normalises with batch statistics in training mode")
            t = n.target
            return self.batch_norm(n, x, (f"{t}.running_mean", f"{t}.running_var"), m.weight, m.bias, t, m.eps)
        act = activation_name(m)
        if act is not None:
            return self.emit(n, "act", [x], x.c, x.nhwc, fn=act)
        raise NotABlock(f"{kind} {n.target} has no block node")

    def avg_pool(
        self, n: fx.Node, x: _Val, kernel: Any, stride: Any, padding: Any, ceil: bool, count_pad: bool, divisor: Any
    ) -> _Val:
        """nn.AvgPool2d / F.avg_pool2d of an [N, C, H, W] tensor: an avgpool node (square windows, no divisor
        override)."""
        ks, ss, ps = (_pair(v if isinstance(v, (tuple, list)) else (v, v)) for v in (kernel, stride or kernel, padding))
        if x.nhwc or divisor is not None or not all(isinstance(v, int) for v in (ks, ss, ps)):
            raise NotABlock(
                f"{n.name}: average pool other than a square one without a divisor override on [N, C, H, W]"
            )
        c = self.c_in if x.name == INPUT else x.c
        if c is None:
            raise NotABlock(f"{n.name}: an average pool of the block input before any conv says its channels")
        try:
            return self.emit(
                n,
                "avgpool",
                [x],
                c,
                kernel=ks,
                stride=ss,
                padding=ps,
                ceil_mode=bool(ceil),
                count_include_pad=bool(count_pad),
            )
        except SpecError as e:
            raise NotABlock(str(e)) from None

    def gate_module(self, n: fx.Node, m: nn.Module, p: _Pooled) -> _Pooled:
        """A module applied to pooled channel means: a gate's 1 x 1 conv (fc), conv1d over channels, activation."""
        if type(m) is nn.Conv2d and p.view == "nc11":
            if (m.kernel_size, m.stride, m.padding, m.groups) == ((1, 1), (1, 1), (0, 0), 1):
                return p.then("fc", n.target, m.in_channels, m.out_channels, m.bias is not None)
        elif type(m) is nn.Conv1d and p.view == "n1c":
            k = m.kernel_size[0]
            if (m.in_channels, m.out_channels, m.stride, m.dilation, m.groups) == (1, 1, (1,), (1,), 1) and (
                m.padding == ((k - 1) // 2,) and m.padding_mode == "zeros" and m.bias is None and k % 2
            ):
                return p.then("conv1d", n.target, k)
        elif activation_name(m) is not None:
            return p.then("act", activation_name(m))
        raise NotABlock(f"{type(m).__name__} {n.target} on pooled channel means is not part of an SE or ECA gate")

    def materialize(self, n: fx.Node, p: _Pooled) -> _Val:
        """Pooled means and the 1 x 1 convs and activations applied to them as block nodes (gap, conv, act): a
        [N, C, 1, 1] block tensor (DeepLab's image pooling), when what follows is no channel gate."""
        if p.view != "nc11":
            raise NotABlock(f"{n.name}: pooled channel means viewed as {p.view} feed {n.target}")
        c = self.c_in if p.src.name == INPUT else p.src.c
        v = self.emit(p.at, "gap", [p.src], c)
        for i, op in enumerate(p.ops):
            if op[0] == "fc":
                _, target, cin, cout, bias = op
                v = self.emit(target, "conv", [v], cout, out=cout, kernel=1, bias=bias)
                self.tensor(f"{v.name}.weight", f"{target}.weight", (cout, cin, 1, 1))
                if bias:
                    self.tensor(f"{v.name}.bias", f"{target}.bias", (cout,))
            elif op[0] == "act":
                v = self.emit(f"{p.at}_act{i}", "act", [v], v.c, fn=op[1])
            else:
                raise NotABlock(f"{n.name}: {op[0]} of pooled channel means has no block node")
        return v

    def pooled_view(self, n: fx.Node, p: _Pooled, shape: tuple) -> _Pooled:
        """p reshaped: [N, C] means as [N, C, 1, 1], [N, 1, C] or [N, C] (N from the block input's shape)."""
        c = self.c_in if p.src.name == INPUT else p.src.c
        rest = tuple(-1 if d == c else d for d in shape[1:])
        views = {(-1, 1, 1): "nc11", (1, -1): "n1c", (-1,): "nc"}
        if not shape or shape[0] is not _BATCH or rest not in views:
            raise NotABlock(f"{n.name}: pooled channel means viewed as {list(shape)}")
        return _Pooled(p.src, views[rest], p.ops)

    def gated(self, n: fx.Node, ins: list[Any]) -> _Val:
        """x * gate(mean_hw(x)): an se node (fc -> act -> fc -> sigmoid) or an eca node (conv1d -> sigmoid)."""
        p = next(v for v in ins if isinstance(v, _Pooled))
        other = next((v for v in ins if v is not p), None)
        x = self.val(other, n.name)
        if x.name != p.src.name or x.nhwc or p.view != "nc11":
            raise NotABlock(f"{n.name}: a channel gate scales a tensor other than the one it pooled")
        c = self.c_in if x.name == INPUT else x.c
        kinds = tuple(op[0] for op in p.ops)
        if kinds == ("fc", "act", "fc", "act") and p.ops[3][1] == "sigmoid":
            (_, t1, c1, h, b1), (_, act), (_, t2, h2, c2, b2) = p.ops[:3]
            if (c1, h2, c2) != (c, h, c):
                raise NotABlock(f"{n.name}: squeeze-excite fcs {c1}->{h} and {h2}->{c2} over {c} channels")
            if act not in _SE_ACTS:
                raise NotABlock(f"{n.name}: squeeze-excite with a {act} hidden activation (se takes {_SE_ACTS})")
            v = self.emit(n, "se", [x], x.c, hidden=h, act=act)
            for key, t, shape, bias in (("1", t1, (h, c), b1), ("2", t2, (c, h), b2)):
                self.tensor(f"{v.name}.w{key}", f"{t}.weight", shape)
                b = Source("tensor", (f"{t}.bias",), shape[:1]) if bias else Source("zeros", (), shape[:1])
                self.sources[f"{v.name}.b{key}"] = b
            return v
        if kinds == ("conv1d", "act") and p.ops[1][1] == "sigmoid":
            _, t, k = p.ops[0]
            v = self.emit(n, "eca", [x], x.c, kernel=k)
            self.tensor(f"{v.name}.weight", f"{t}.weight", (k,))
            return v
        ops = " -> ".join(f"{op[0]}({op[-1]})" if op[0] == "act" else op[0] for op in p.ops)
        raise NotABlock(f"{n.name}: the channel gate mean -> {ops} is neither SE (fc-act-fc-sigmoid) nor ECA")

    def layer_norm(self, n: fx.Node, x: _Val, shape: tuple, w: _Param | None, b: _Param | None, eps: float) -> _Val:
        if not x.nhwc or len(shape) != 1:
            raise NotABlock(f"{n.name}: LayerNorm over {list(shape)} of a tensor that is not channels-last")
        self.channels(x, int(shape[0]), n.name)
        v = self.emit(n, "ln", [x], x.c, True, eps=float(eps))
        for key, p, kind in (("weight", w, "ones"), ("bias", b, "zeros")):
            self.sources[f"{v.name}.{key}"] = Source("tensor", (p.target,), (x.c,)) if p else Source(kind, (), (x.c,))
        return v

    def batch_norm(self, n: fx.Node, x: _Val, stats: tuple[str, str], w: Any, b: Any, where: str, eps: float) -> _Val:
        if x.nhwc:
            raise NotABlock(f"BatchNorm {where} on a channels-last permuted tensor")
        v = self.emit(n, "bn", [x], x.c)
        wt = f"{where}.weight" if isinstance(w, torch.Tensor) else w.target if isinstance(w, _Param) else ""
        bt = f"{where}.bias" if isinstance(b, torch.Tensor) else b.target if isinstance(b, _Param) else ""
        for key in ("scale", "shift"):
            self.sources[f"{v.name}.{key}"] = Source(f"bn_{key}", (*stats, wt, bt), eps=float(eps))
        return v

    def function(self, n: fx.Node, ins: list[Any], kw: dict[str, Any]) -> Any:
        f = n.target
        if f is getattr and ins[1] == "ndim":
            return _SHAPE_ONLY
        if f is operator.eq and ins[0] is _SHAPE_ONLY and ins[1] == 4:
            return _SHAPE_ONLY
        if f is torch._assert and ins[0] is _SHAPE_ONLY:
            return None
        if f is getattr and ins[1] == "shape" and isinstance(ins[0], _Val):
            return _IN_SHAPE if ins[0].name == INPUT else _SHAPE
        if f is operator.getitem and (ins[0] is _SHAPE or ins[0] is _IN_SHAPE):
            if ins[1] == 0:
                return _BATCH
            if ins[0] is _IN_SHAPE and ins[1] == slice(-2, None):
                return _IN_SIZE
            if isinstance(ins[1], int):
                return _SHAPE_ONLY  # C, H or W (B, C, H, W = x.shape): read, never computed with
        if f is F.interpolate:
            return self.interpolate(n, ins, kw)
        if f is F.adaptive_avg_pool2d and _at(ins, 1) in (1, (1, 1)):
            return self.pooled(n, ins[0], (2, 3), True)
        if f is torch.mean and len(ins) >= 2:
            return self.pooled(n, ins[0], ins[1], kw.get("keepdim", bool(_at(ins, 2))))
        if f is F.avg_pool2d:
            names = ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override")
            got = [
                kw.get(k, ins[i + 1] if len(ins) > i + 1 else d) for i, (k, d) in enumerate(zip(names, _AVG_DEFAULTS))
            ]
            return self.avg_pool(n, self.val(ins[0], n.name), *got)
        if isinstance(_at(ins, 0), _Pooled) and (f in _ACT_FNS or f is torch.sigmoid) and len(ins) == 1:
            return ins[0].then("act", _ACT_FNS.get(f, "sigmoid"))
        if f is operator.getitem and isinstance(ins[0], _Chunks):
            start, size = ins[0].parts[ins[1]]
            return _Slice(ins[0].src, start, size, self.name(n))
        if f is F.layer_norm:
            x = self.val(ins[0], n.name)
            eps = _arg(n, 4, "eps", 1e-5)
            return self.layer_norm(n, x, tuple(ins[1]), kw.get("weight", _at(ins, 2)), kw.get("bias", _at(ins, 3)), eps)
        if f is F.batch_norm:
            x = self.val(ins[0], n.name)
            if _arg(n, 5, "training", False):
                where, kind = next(reversed(n.meta.get("nn_module_stack", {}).values()), (n.name, None))
                what = f"{getattr(kind, '__name__', kind)} {where}" if kind is not None else where
                raise NotABlock(f"{what}: BatchNorm normalises with batch statistics in training mode")
            stats = (ins[1], ins[2])
            if not all(isinstance(t, _Param) for t in stats):
                raise NotABlock(f"{n.name}: BatchNorm without running statistics")
            w, b = kw.get("weight", _at(ins, 3)), kw.get("bias", _at(ins, 4))
            return self.batch_norm(n, x, (stats[0].target, stats[1].target), w, b, n.name, _arg(n, 7, "eps", 1e-5))
        if f is F.gelu:
            x = self.val(ins[0], n.name)
            approx = kw.get("approximate", _at(ins, 1) or "none")
            return self.emit(n, "act", [x], x.c, x.nhwc, fn="gelu_tanh" if approx == "tanh" else "gelu")
        if f in _ACT_FNS and len(ins) == 1:
            x = self.val(ins[0], n.name)
            return self.emit(n, "act", [x], x.c, x.nhwc, fn=_ACT_FNS[f])
        if f is torch.permute:
            return self.permute(n, ins[0], tuple(ins[1] if len(ins) == 2 else kw["dims"]))
        if f is torch.split:
            return self.split(n, ins[0], ins[1] if len(ins) > 1 else kw["split_size_or_sections"], kw)
        if f is torch.cat:
            parts = [self.val(a, n.name) for a in (ins[0] if ins else kw["tensors"])]
            if kw.get("dim", _at(ins, 1)) != 1 or any(p.nhwc for p in parts):
                raise NotABlock(f"{n.name}: concatenation other than over the channels of [N, C, H, W] tensors")
            return self.emit(n, "concat", parts, sum(p.c for p in parts))
        if f in _ADD and len(ins) == 2 and "alpha" not in kw:
            return self.add(n, ins)
        if f in _MUL and len(ins) == 2 and not kw:
            return self.gated(n, ins) if any(isinstance(v, _Pooled) for v in ins) else self.mul(n, ins)
        raise NotABlock(f"{n.name}: {getattr(f, '__name__', f)} has no block node")

    def method(self, n: fx.Node, ins: list[Any], kw: dict[str, Any]) -> Any:
        name = n.target
        if isinstance(ins[0], _Param) and name in ("reshape", "view"):
            shape = ins[1] if len(ins) == 2 and isinstance(ins[1], (tuple, list)) else ins[1:]
            return _Param(ins[0].target, tuple(torch.empty(ins[0].shape, device="meta").reshape(shape).shape))
        if isinstance(ins[0], _Pooled):
            return self.pooled_method(n, ins[0], ins[1:], kw)
        if name == "mean" and len(ins) >= 2:
            return self.pooled(n, ins[0], ins[1], kw.get("keepdim", bool(_at(ins, 2))))
        if name == "size" and ins[1:] == [0] and isinstance(ins[0], _Val):
            return _BATCH
        if name == "permute":
            return self.permute(n, ins[0], tuple(ins[1] if len(ins) == 2 else ins[1:]))
        if name == "contiguous":
            return ins[0]
        if name == "split":
            return self.split(n, ins[0], ins[1], kw)
        if name in ("add", "mul") and len(ins) == 2 and not kw:
            if name == "mul" and isinstance(ins[1], _Pooled):
                return self.gated(n, ins)
            return self.add(n, ins) if name == "add" else self.mul(n, ins)
        if name == "add_" and isinstance(ins[0], _Param) and ins[0].target.endswith("num_batches_tracked"):
            raise NotABlock(f"{ins[0].target.rsplit('.', 1)[0]}: BatchNorm in training mode (batch statistics)")
        raise NotABlock(f"{n.name}: Tensor.{name} has no block node")

    def pooled(self, n: fx.Node, a: Any, dims: Any, keepdim: bool) -> _Pooled:
        x = self.val(a, n.name)
        if x.nhwc or tuple(dims) not in _HW:
            raise NotABlock(f"{n.name}: a mean over dims {dims} that is not the spatial mean of [N, C, H, W]")
        return _Pooled(x, "nc11" if keepdim else "nc", at=n.name)

    def pooled_method(self, n: fx.Node, p: _Pooled, args: list[Any], kw: dict[str, Any]) -> Any:
        name = n.target
        if name in ("view", "reshape"):
            return self.pooled_view(n, p, tuple(args[0] if len(args) == 1 and isinstance(args[0], tuple) else args))
        if name in ("sigmoid", "sigmoid_", "relu", "relu_") and not args and not kw:
            return p.then("act", name.rstrip("_"))
        if name == "expand_as" and isinstance(args[0], _Val) and args[0].name == p.src.name:
            return p  # broadcasting does the same in the multiply
        if name == "mul" and len(args) == 1 and not kw:
            return self.gated(n, [p, *args])
        raise NotABlock(f"{n.name}: Tensor.{name} of pooled channel means is not part of an SE or ECA gate")

    def permute(self, n: fx.Node, a: Any, dims: tuple) -> _Val:
        x = self.val(a, n.name)
        if dims == (0, 2, 3, 1) and not x.nhwc:
            return _Val(x.name, x.c, True)
        if dims == (0, 3, 1, 2) and x.nhwc:
            return _Val(x.name, x.c, False)
        raise NotABlock(f"{n.name}: permute{dims} is not a channels-last round trip")

    def split(self, n: fx.Node, a: Any, sizes: Any, kw: dict[str, Any]) -> _Chunks:
        x = self.val(a, n.name)
        if x.nhwc or kw.get("dim", _at(n.args, 2)) != 1 or not isinstance(sizes, (tuple, list)):
            raise NotABlock(f"{n.name}: only channel splits of [N, C, H, W] tensors into given sizes")
        if min(sizes) < 1:
            raise NotABlock(f"{n.name}: an empty channel split {list(sizes)}")
        self.channels(x, sum(sizes), n.name)
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        return _Chunks(x, tuple(zip(starts, sizes)))

    def add(self, n: fx.Node, ins: list[Any]) -> _Val:
        a, b = (self.val(v, n.name) for v in ins)
        if a.nhwc != b.nhwc:
            raise NotABlock(f"{n.name}: add of tensors in different layouts")
        if a.name == INPUT:  # x + f(x) as the seed blocks write it, f(x) + x (float addition commutes exactly)
            a, b = b, a
        c = a.c if a.name != INPUT else b.c
        self.channels(a, c, n.name)
        self.channels(b, c, n.name)
        return self.emit(n, "add", [a, b], c, a.nhwc)

    def mul(self, n: fx.Node, ins: list[Any]) -> _Val:
        if all(isinstance(v, (_Val, _Slice)) for v in ins):  # an elementwise gate (gnConv)
            a, b = (self.val(v, n.name) for v in ins)
            if a.nhwc != b.nhwc:
                raise NotABlock(f"{n.name}: product of tensors in different layouts")
            c = a.c if a.name != INPUT else b.c
            self.channels(a, c, n.name)
            self.channels(b, c, n.name)
            return self.emit(n, "mul", [a, b], c, a.nhwc)
        k = next((v for v in ins if type(v) in (int, float)), None)
        if k is not None and math.isfinite(k):  # a constant scale (gnConv's s)
            x = self.val(next(v for v in ins if v is not k), n.name)
            return self.emit(n, "scalar", [x], x.c, x.nhwc, value=float(k))
        t = next((v for v in ins if isinstance(v, _Param)), None)
        other = next((v for v in ins if v is not t), None)
        if t is None or other is None:
            raise NotABlock(f"{n.name}: only a per-channel parameter times a block tensor (layer scale)")
        x = self.val(other, n.name)
        c = x.c if x.name != INPUT else self.c_in
        ok = ((c,), (1, 1, 1, c)) if x.nhwc else ((c, 1, 1), (1, c, 1, 1))
        if t.shape not in ok:
            raise NotABlock(f"{n.name}: {t.target} of shape {list(t.shape)} is not a per-channel scale")
        v = self.emit(n, "scale", [x], x.c, x.nhwc)
        self.tensor(f"{v.name}.gamma", t.target, (x.c,))
        return v

    def interpolate(self, n: fx.Node, ins: list[Any], kw: dict[str, Any]) -> _Val:
        """A 1 x 1 map resized to the block input's size (F.interpolate, as ASPP's pooling branch): a broadcast."""
        x = self.val(ins[0], n.name)
        size = kw.get("size", _at(ins, 1))
        mode = kw.get("mode", _at(ins, 3) or "nearest")
        if size is not _IN_SIZE or kw.get("scale_factor", _at(ins, 2)) is not None or x.nhwc:
            raise NotABlock(f"{n.name}: interpolation other than of a 1 x 1 map to the block input's size")
        if mode not in ("nearest", "bilinear", "bicubic") or kw.get("antialias", False):
            raise NotABlock(f"{n.name}: {mode} interpolation of a 1 x 1 map is not a broadcast")
        v = self.emit(n, "broadcast", [x], x.c, size=TRACE_SIZE)
        self.sized.append(v.name)
        return v

    def run(self, graph: fx.Graph) -> BlockGraph:
        env: dict[fx.Node, Any] = {}
        out: Any = None
        placeholders = [n for n in graph.nodes if n.op == "placeholder"]
        # arguments after the first that keep their defaults and are never read (gnConv's mask=None, dummy=False)
        unused = [n for n in placeholders[1:] if not n.users and n.args]
        if len(placeholders) - len(unused) != 1:
            raise NotABlock(f"forward takes {len(placeholders)} inputs; a block takes one")
        for n in graph.nodes:
            ins = list(fx.node.map_arg(n.args, lambda a: env[a]))
            kw = dict(fx.node.map_arg(n.kwargs, lambda a: env[a]))
            if n in unused:
                continue
            if n.op == "placeholder":
                self.names[n.name] = INPUT
                env[n] = _Val(INPUT, -1)
            elif n.op == "get_attr":
                env[n] = _Param(n.target, tuple(_tensor(self.root, n.target).shape))
            elif n.op == "call_module":
                env[n] = self.module(n, ins)
            elif n.op == "call_function":
                env[n] = self.function(n, ins, kw)
            elif n.op == "call_method":
                env[n] = self.method(n, ins, kw)
            elif n.op == "output":
                out = self.val(ins[0], "the output")
        if out is None or out.nhwc or out.name == INPUT or self.c_in is None:
            raise NotABlock("the output is not a computed [N, C, H, W] tensor")
        if not self.nodes or self.nodes[-1].name != out.name:
            raise NotABlock("the output is not the last computed tensor")
        try:
            Block(n=1, c=self.c_in, in_size=TRACE_SIZE, nodes=tuple(self.nodes))  # the graph's own checks
        except SpecError as e:
            raise NotABlock(str(e)) from None
        family = _FAMILY.get(type(self.root).__name__)
        g = BlockGraph(self.c_in, tuple(self.nodes), tuple(self.sources.items()), tuple(self.sized))
        return canonical(g, family)


def _seeds(g: BlockGraph, family: str | None = None) -> list[Block]:
    """The seed blocks (kernels.block's builders) g may be, with the settings read off its nodes; those of
    family (a builder's name) first."""
    convs = [nd for nd in g.nodes if nd.op == "conv"]
    acts = [nd["fn"] for nd in g.nodes if nd.op == "act"]
    has = {nd.op for nd in g.nodes}
    out: list[Any] = []
    first: list[Any] = []
    kw = {"n": 1, "c": g.c, "in_size": TRACE_SIZE}
    muls = [nd for nd in g.nodes if nd.op == "mul"]
    if muls and len(convs) == len(muls) + 2 and isinstance(convs[1]["kernel"], int):  # gnConv
        scalar = next((nd for nd in g.nodes if nd.op == "scalar"), None)
        out.append(
            lambda: B.gnconv(
                **kw, order=len(muls), kernel=convs[1]["kernel"], scale=scalar["value"] if scalar is not None else None
            )
        )
    direct = [nd for nd in convs if nd.inputs[0] == INPUT]
    if "concat" in has and acts and direct and all(nd["groups"] == 1 for nd in convs):  # DeepLabV3 ASPP
        cat = next(nd for nd in g.nodes if nd.op == "concat")
        out.append(
            lambda: B.aspp(
                **kw,
                k=direct[0]["out"],
                rates=tuple(nd["dilation"] for nd in direct if nd["kernel"] != 1),
                pooling="gap" in has,
                project=any(nd.inputs[0] == cat.name for nd in convs),
                act=acts[0],
            )
        )
    if len(convs) == 3 and "ln" in has and isinstance(convs[0]["kernel"], int):
        ln = next(nd for nd in g.nodes if nd.op == "ln")
        out.append(
            lambda: B.convnext(
                **kw,
                kernel=convs[0]["kernel"],
                expansion=convs[1]["out"] // g.c,
                eps=ln["eps"],
                layer_scale="scale" in has,
            )
        )
    if len(convs) == 3 and "concat" in has:
        out.append(
            lambda: B.inception_dw(
                **kw,
                square_kernel=convs[0]["kernel"],
                band_kernel=max(convs[1]["kernel"]),
                branch_ratio=convs[0]["out"] / g.c,
            )
        )
    if len(convs) == 2 and "bn" in has and isinstance(convs[0]["kernel"], int):
        dw_act = acts[0] if acts and g.nodes[2].op == "act" else None
        pw_act = g.nodes[-2]["fn"] if g.nodes[-1].op == "add" and g.nodes[-2].op == "act" else None
        pw_act = g.nodes[-1]["fn"] if g.nodes[-1].op == "act" else pw_act
        out.append(
            lambda: B.separable(
                **kw,
                k=convs[1]["out"],
                kernel=convs[0]["kernel"],
                stride=convs[0]["stride"],
                act=dw_act,
                pw_act=pw_act,
                residual=g.nodes[-1].op == "add",
            )
        )
    gates = [nd for nd in g.nodes if nd.op in B.GATES]
    if len(convs) in (3, 4) and len(gates) == 1 and g.nodes[-1].op == "act" and "add" in has:  # gated bottleneck
        gate = gates[0]
        out.append(
            lambda: B.bottleneck(
                **kw,
                k=convs[2]["out"],
                width=convs[0]["out"],
                stride=convs[1]["stride"],
                groups=convs[1]["groups"],
                act=acts[0],
                attention=gate.op,
                eca_kernel=gate["kernel"] if gate.op == "eca" else None,
                se_hidden=gate["hidden"] if gate.op == "se" else None,
                downsample=len(convs) == 4,
                avg_down="avgpool" in has,
            )
        )
    if len(convs) in (2, 3) and acts and "bn" in has and len(gates) <= 1 and isinstance(convs[-2]["kernel"], int):
        dw, gate = convs[-2], (gates[0] if gates else None)
        (first if family == "mbconv" else out).append(
            lambda: B.mbconv(
                **kw,
                k=convs[-1]["out"],
                expansion=dw["out"] // g.c,
                kernel=dw["kernel"],
                stride=dw["stride"],
                act=acts[0],
                se_ratio=(gate["hidden"] + 0.5) / g.c if gate is not None and gate.op == "se" else None,
                attention=gate.op if gate is not None else None,
                eca_kernel=gate["kernel"] if gate is not None and gate.op == "eca" else None,
            )
        )
    seeds = []
    for make in first + out:
        try:
            seeds.append(make())
        except (SpecError, TypeError, ValueError):
            continue
    return seeds


def _same(a: tuple[Node, ...], b: tuple[Node, ...]) -> dict[str, str] | None:
    """The renaming that makes node list a compute what b computes (same ops, attributes and wiring), or None."""
    ga, gb = {nd.name: nd for nd in a}, {nd.name: nd for nd in b}
    names = {INPUT: INPUT}

    def same(x: str, y: str) -> bool:
        if x in names:
            return names[x] == y
        if INPUT in (x, y) or y in names.values():
            return False
        nx, ny = ga[x], gb[y]
        if nx.op != ny.op or nx.attrs != ny.attrs or len(nx.inputs) != len(ny.inputs):
            return False
        names[x] = y
        return all(same(i, j) for i, j in zip(nx.inputs, ny.inputs))

    ok = len(a) == len(b) and same(a[-1].name, b[-1].name) and len(names) == len(a) + 1
    return names if ok else None


def canonical(g: BlockGraph, family: str | None = None) -> BlockGraph:
    """g with the node names and order of the seed block it equals (the store's key for that block family's
    winners, e.g. the convnext_t suite's), else g unchanged. family: the builder tried first where seeds of
    two families compute the same graph (an expansion-1 MBConv without a gate is a separable block)."""
    for seed in _seeds(g, family):
        names = _same(g.nodes, seed.nodes)
        if names is not None:
            sources = tuple((f"{names[k.split('.')[0]]}.{k.split('.', 1)[1]}", src) for k, src in g.sources)
            return BlockGraph(g.c, seed.nodes, sources, tuple(names[s] for s in g.sized))
    return g


def _pair(v: Any) -> int | tuple[int, int]:
    """A conv's (h, w) setting as the seed blocks write it: one int when both are equal (canonical keys)."""
    h, w = v
    return int(h) if h == w else (int(h), int(w))


def _at(seq: Any, i: int) -> Any:
    return seq[i] if len(seq) > i else None


def from_graph(module: nn.Module, graph: fx.Graph, training: bool) -> BlockGraph:
    """The block description module's traced graph computes (traced in that training mode); NotABlock
    naming the first node without a block equivalent otherwise."""
    return _Converter(module, training).run(graph)


# ---- the fused module --------------------------------------------------------------------------------
class _FusedBlock:
    """A block module whose forward runs its block description under the installed block lookup's tuned plan
    and schedules, else the planner's plan on default schedules, in each training mode whose graph converted
    (its own forward otherwise, and for inputs the description does not cover)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return graphs.run(self, x, self._fused_forward)  # type: ignore[arg-type]  (CUDA graphs when enabled)

    def _fused_forward(self, x: torch.Tensor) -> torch.Tensor:
        graph = self.__dict__["_tunerd_graphs"].get(self.training)  # type: ignore[attr-defined]
        mixed = any(m.training != self.training for m in self.modules())  # type: ignore[attr-defined]
        if graph is None or mixed or not isinstance(x, torch.Tensor):
            return super().forward(x)  # type: ignore[misc]
        try:
            blk, plan, schedules = _planned(graph, x)
        except SpecError:
            return super().forward(x)  # type: ignore[misc]
        self.__dict__["_tunerd_last"] = (blk, plan)
        self.__dict__["_tunerd_last_tuned"] = schedules is not None
        return block_autograd.block(blk, graph.params(self, x), x, plan, schedules)  # type: ignore[arg-type]


# Tuned block winners, installed by the product layer (the local store, a server, a bundle): (block, device) ->
# a plan and schedules this process checked and rendered (kernels.trust.verify_plan), or None (the planner's
# plan on default schedules). A lookup that fails must answer None, never raise.
BlockLookup = Callable[[Block, torch.device], "TrustedPlan | None"]
_block_lookup: BlockLookup | None = None


def set_block_lookup(fn: BlockLookup | None) -> None:
    """Install the function that answers a tuned plan for (block, device), or None."""
    global _block_lookup
    _block_lookup = fn


def block_lookup() -> BlockLookup | None:
    return _block_lookup


@lru_cache(maxsize=256)
def default_plan(blk: Block) -> Plan:
    """The planner's best plan of blk (what a block without a tuned winner runs)."""
    return rank(blk)[0].plan


def _planned(graph: BlockGraph, x: torch.Tensor) -> tuple[Block, Plan, dict[int, Schedule] | None]:
    """The block x makes of graph, its plan and its fused steps' schedules (None: the defaults)."""
    blk = graph.block(x)
    lookup = _block_lookup
    tuned = lookup(blk, x.device) if lookup is not None else None
    if tuned is not None and tuned.block == blk:
        return blk, tuned.plan, tuned.schedules
    return blk, default_plan(blk), None


_FUSED_CLASSES: dict[type, type] = {}


def fuse_block(module: nn.Module, graphs: dict[bool, BlockGraph]) -> None:
    """Make module run its block description in the training modes of graphs ({training: BlockGraph}), in
    place: its class becomes a subclass of its own (same parameters, buffers, state_dict keys and hooks; hooks
    on its submodules fire only when it runs its own forward)."""
    base = type(module)
    cls = _FUSED_CLASSES.setdefault(base, type(f"Fused{base.__name__}", (_FusedBlock, base), {"__module__": __name__}))
    module._tunerd_orig_class = base
    module.__class__ = cls
    module.__dict__["_tunerd_graphs"] = dict(graphs)


def last_plan(module: nn.Module) -> tuple[Block, Plan] | None:
    """The block and plan module's last fused forward ran (None before one ran, or when not fused)."""
    return module.__dict__.get("_tunerd_last")


def last_tuned(module: nn.Module) -> bool:
    """Whether module's last fused forward ran a tuned block winner (the block lookup answered)."""
    return bool(module.__dict__.get("_tunerd_last_tuned"))
