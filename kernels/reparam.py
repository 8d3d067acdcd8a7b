"""Structural re-parameterization: parallel conv branches (each with eval BatchNorm) merged into one conv.

RepVGG / MobileOne (k x k + 1 x 1 + identity), RepLKNet (large + small kernel) and UniRepLKNet
(dilated small kernels beside a large one): every branch is a conv over the same input with the same
stride, groups and window centre, so their sum is one conv whose weight is the sum of the branch
kernels, each dilated and zero-padded to the largest window, and whose bias is the sum of the biases.
A weight prologue: torch ops on the weights only (differentiable), the conv kernel stays the plain one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .prologue import fold_bn
from .spec import SpecError


@dataclass(frozen=True)
class Branch:
    """One linear branch: conv weight [K, C/g, kh, kw] (bias [K] or None), its dilation and padding."""

    weight: torch.Tensor
    bias: torch.Tensor | None = None
    dilation: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)

    @property
    def window(self) -> tuple[int, int]:
        """The dilated kernel's extent."""
        (dh, dw), (kh, kw) = self.dilation, self.weight.shape[2:4]
        return dh * (kh - 1) + 1, dw * (kw - 1) + 1

    @property
    def offset(self) -> tuple[int, int]:
        """Where the window starts relative to the output pixel (minus the padding); equal for mergeable branches."""
        (ph, pw), (wh, ww) = self.padding, self.window
        return ph - (wh - 1) // 2, pw - (ww - 1) // 2


def bn_branch(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    bn: torch.nn.modules.batchnorm._BatchNorm,
    dilation: tuple[int, int] = (1, 1),
    padding: tuple[int, int] = (0, 0),
) -> Branch:
    """conv -> eval BatchNorm as one Branch (BN folded into the weight, running statistics)."""
    if bn.running_mean is None or bn.running_var is None:
        raise SpecError("BatchNorm without running statistics cannot be folded")
    w, b = fold_bn(weight, bias, bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps)
    return Branch(w, b, (dilation[0], dilation[1]), (padding[0], padding[1]))


def identity_weight(channels: int, groups: int, like: torch.Tensor) -> torch.Tensor:
    """The 1 x 1 grouped conv weight [C, C/g, 1, 1] that copies its input (dtype and device of like)."""
    if channels % groups:
        raise SpecError(f"channels {channels} must be divisible by groups {groups}")
    cg = channels // groups
    w = torch.zeros((channels, cg, 1, 1), dtype=like.dtype, device=like.device)
    idx = torch.arange(channels, device=like.device)
    w[idx, idx % cg, 0, 0] = 1
    return w


def dilate(weight: torch.Tensor, dilation: Sequence[int]) -> torch.Tensor:
    """A dilated kernel as the equivalent undilated one (zeros between taps)."""
    dh, dw = dilation
    if (dh, dw) == (1, 1):
        return weight
    kh, kw = weight.shape[2:]
    out = weight.new_zeros((*weight.shape[:2], dh * (kh - 1) + 1, dw * (kw - 1) + 1))
    out[:, :, ::dh, ::dw] = weight
    return out


def pad_to(weight: torch.Tensor, window: Sequence[int]) -> torch.Tensor:
    """Zero-pad a kernel symmetrically to window (each extent's difference must be even: same centre)."""
    dh, dw = (t - k for t, k in zip(window, weight.shape[2:]))
    if dh < 0 or dw < 0 or dh % 2 or dw % 2:
        raise SpecError(f"a {tuple(weight.shape[2:])} kernel cannot be centred in a {tuple(window)} window")
    return torch.nn.functional.pad(weight, (dw // 2, dw // 2, dh // 2, dh // 2))


def merge(branches: Sequence[Branch]) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
    """Sum of branches as one conv: (weight, bias, padding) at the largest window, dilation 1. SpecError unless
    the branches share channels and window centre (padding - half window equal across branches)."""
    if not branches:
        raise SpecError("nothing to merge: no branches")
    shapes = {tuple(b.weight.shape[:2]) for b in branches}
    if len(shapes) != 1:
        raise SpecError(f"branches disagree on [out, in/groups] channels: {sorted(shapes)}")
    offsets = {b.offset for b in branches}
    if len(offsets) != 1:
        raise SpecError(f"branches are not centred alike (padding - half window differs: {sorted(offsets)})")
    window = tuple(max(b.window[d] for b in branches) for d in range(2))
    padded = [pad_to(dilate(b.weight, b.dilation), window) for b in branches]
    weight = sum(padded[1:], padded[0])
    k = branches[0].weight.shape[0]
    bias = sum((b.bias for b in branches if b.bias is not None), branches[0].weight.new_zeros(k))
    ((oh, ow),) = offsets
    return weight, bias, (oh + (window[0] - 1) // 2, ow + (window[1] - 1) // 2)
