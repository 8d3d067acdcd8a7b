"""Space-to-depth rewrite of strided small-channel convs (stems): 7x7 s2 C=3 -> 4x4 s1 C=12 (padded to 16).

A stem's input rows are C=3 values (6 bytes in bf16), so the implicit GEMM gathers them with scalar
loads, and each of its 49 taps pads a 3-channel slice to a 16-wide reduction step (19% useful).
Folding every s x s pixel block into channels,

    x'[n, (a, b, c), i, j] = xpad[n, c, s*i + a, s*j + b]
    w'[k, (a, b, c), u, v] = w[k, c, s*u + a, s*v + b]     (zero where s*u + a >= kh)

turns conv(x, w, stride s) into conv(x', w', stride 1, no padding) with ceil(kh/s) x ceil(kw/s) taps over
s*s*C channels, padded with zero channels to a multiple of 16: 16-channel (32-byte) rows, and 57% of the
reduction useful for the ResNet stem. Both rewrites are torch ops (differentiable), so training flows
through the plain conv's dgrad/wgrad kernels and autograd maps the gradients back.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F

from .spec import BlockSpec

MAX_CHANNELS = 8  # stems with at most this many input channels are rewritten
CHANNEL_MULTIPLE = 16  # folded channels are zero-padded to a multiple of this (one tl.dot reduction step)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def applies(spec: BlockSpec) -> bool:
    """Whether spec is a 2-d dense strided small-channel forward conv that the rewrite turns into a leaner GEMM."""
    return (
        spec.ndim == 2
        and spec.kind == "conv"
        and spec.op == "fwd"
        and spec.groups == 1
        and spec.c <= MAX_CHANNELS
        and all(d == 1 for d in spec.dilation)
        and all(s >= 2 for s in spec.stride)
        and all(k >= s for k, s in zip(spec.kernel, spec.stride))
    )


def folded_channels(c: int, stride: tuple[int, ...]) -> int:
    """Channels of the folded input: c * prod(stride), rounded up to CHANNEL_MULTIPLE."""
    return _cdiv(c * stride[0] * stride[1], CHANNEL_MULTIPLE) * CHANNEL_MULTIPLE


def rewrite(spec: BlockSpec) -> BlockSpec:
    """The stride-1 spec that computes spec's output from the folded input (see module doc)."""
    if not applies(spec):
        raise ValueError(f"space-to-depth does not apply to {spec.describe()}")
    kernel = tuple(_cdiv(k, s) for k, s in zip(spec.kernel, spec.stride))
    in_size = tuple(p + k - 1 for p, k in zip(spec.out_size, kernel))
    return replace(
        spec,
        c=folded_channels(spec.c, spec.stride),
        in_size=in_size,
        kernel=kernel,
        stride=(1, 1),
        padding=((0, 0), (0, 0)),
        x_pixel_stride=None,  # the folded input is a fresh dense buffer
    )


def fold_input(x: torch.Tensor, spec: BlockSpec) -> torch.Tensor:
    """x [N, C, H, W] (any memory format) -> the rewritten spec's input, channels-last [N, C', H', W']."""
    (sh, sw), new = spec.stride, rewrite(spec)
    (ph, _), (pw, _) = spec.padding
    hp, wp = sh * new.in_size[0], sw * new.in_size[1]
    h, w = spec.in_size
    xp = F.pad(x, (pw, wp - w - pw, ph, hp - h - ph))  # negative right/bottom pads crop rows never read
    n, c = x.shape[:2]
    t = xp.reshape(n, c, new.in_size[0], sh, new.in_size[1], sw).permute(0, 2, 4, 3, 5, 1)  # [N, H', W', a, b, C]
    t = t.reshape(n, new.in_size[0], new.in_size[1], sh * sw * c)
    t = F.pad(t, (0, new.c - sh * sw * c))
    return t.permute(0, 3, 1, 2)


def fold_weight(weight: torch.Tensor, spec: BlockSpec) -> torch.Tensor:
    """weight [K, C, kh, kw] -> the rewritten spec's weight [K, C', ceil(kh/s), ceil(kw/s)]."""
    (sh, sw), new = spec.stride, rewrite(spec)
    (kh, kw), (uh, uw) = spec.kernel, new.kernel
    k, c = weight.shape[:2]
    wp = F.pad(weight, (0, sw * uw - kw, 0, sh * uh - kh))
    t = wp.reshape(k, c, uh, sh, uw, sw).permute(0, 3, 5, 1, 2, 4)  # [K, a, b, C, u, v]
    t = t.reshape(k, sh * sw * c, uh, uw)
    return F.pad(t, (0, 0, 0, 0, 0, new.c - sh * sw * c))
