"""Block-level transforms of torch models.

reparameterize(module): structural re-parameterization for inference. timm's training-form blocks
with parallel branches (each conv + BatchNorm) become one tunerd conv with merged weights and bias
(kernels.reparam), followed by the block's attention and activation:
  RepVggBlock (timm.models.byobnet)       k x k + 1 x 1 + identity BN
  MobileOneBlock (byobnet and fastvit)    n x (k x k) + 1 x 1 scale + identity BN
  ReparamLargeKernelConv (fastvit)        RepLKNet's large + small kernel
The merge uses BatchNorm's running statistics: the result computes what the block computes in eval mode.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from tunerd.kernels import reparam
from tunerd.kernels.spec import SpecError

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


def _is_timm(m: nn.Module) -> bool:
    return type(m).__module__.startswith("timm.") and type(m).__name__ in REPARAM_BLOCKS


def _plain(m: nn.Module | None) -> bool:
    return m is None or type(m) is nn.Identity


def _conv_bn_branch(branch: nn.Module, where: str) -> reparam.Branch:
    """timm ConvNormAct (conv -> BN, no act, drop or anti-aliasing) as a Branch."""
    conv, bn = getattr(branch, "conv", None), getattr(branch, "bn", None)
    if type(conv) is not nn.Conv2d or not isinstance(bn, nn.BatchNorm2d):
        raise SpecError(f"{where}: expected conv -> BatchNorm2d, got {type(conv).__name__} -> {type(bn).__name__}")
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        raise SpecError(f"{where}: only explicit zero padding merges, got {conv.padding!r} ({conv.padding_mode})")
    if not all(_plain(getattr(bn, a, None)) for a in ("act", "drop")) or not _plain(getattr(branch, "aa", None)):
        raise SpecError(f"{where}: the branch applies an activation, dropout or anti-aliasing: not linear")
    return reparam.bn_branch(conv.weight, conv.bias, bn, conv.dilation, conv.padding)


def _identity_branch(bn: nn.Module, like: nn.Conv2d, where: str) -> reparam.Branch:
    if not isinstance(bn, nn.BatchNorm2d) or not all(_plain(getattr(bn, a, None)) for a in ("act", "drop")):
        raise SpecError(f"{where}: the identity branch must be a plain BatchNorm2d, got {type(bn).__name__}")
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
