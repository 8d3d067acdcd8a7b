"""Weight prologue: transforms applied once per step to the weights, not per pixel.

Differentiable torch ops on small tensors, so gradients flow through them in training
(BatchNorm 'Tune mode') and the conv kernel itself stays the plain one.
"""

from __future__ import annotations

import torch


def bn_scale_shift(
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval BatchNorm as a per-channel affine y*scale + shift (the epilogue's 'affine'), in fp32 (float64 for
    float64 statistics: exact re-parameterization checks)."""
    dt = torch.promote_types(torch.float32, running_var.dtype)
    inv = torch.rsqrt(running_var.to(dt) + eps)
    g = weight.to(dt) if weight is not None else torch.ones_like(inv)
    b = bias.to(dt) if bias is not None else torch.zeros_like(inv)
    scale = g * inv
    return scale, b - running_mean.to(dt) * scale


def fold_bn(
    conv_weight: torch.Tensor,
    conv_bias: torch.Tensor | None,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    bn_weight: torch.Tensor | None,
    bn_bias: torch.Tensor | None,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """W' = W * gamma / sqrt(var + eps), b' = beta + (b - mean) * gamma / sqrt(var + eps)."""
    scale, shift = bn_scale_shift(running_mean, running_var, bn_weight, bn_bias, eps)
    shape = (-1,) + (1,) * (conv_weight.dim() - 1)
    w = (conv_weight.to(scale.dtype) * scale.reshape(shape)).to(conv_weight.dtype)
    b = shift if conv_bias is None else shift + conv_bias.to(scale.dtype) * scale
    return w, b.to(conv_weight.dtype)


def density(alpha: torch.Tensor, ndim: int) -> torch.Tensor:
    """The separable density Phi = alpha (x) alpha (x) ... of weighted convolution, one factor per dim."""
    phi = alpha
    for _ in range(ndim - 1):
        phi = phi.unsqueeze(-1) * alpha
    return phi


def apply_density(weight: torch.Tensor, phi: torch.Tensor) -> torch.Tensor:
    """Weighted convolution W (.) Phi: Phi has the kernel's spatial shape and broadcasts over [K, C/g]."""
    if tuple(phi.shape) != tuple(weight.shape[2:]):
        raise ValueError(f"density shape {tuple(phi.shape)} must equal the kernel shape {tuple(weight.shape[2:])}")
    return weight * phi.to(weight.dtype)
