"""Torch oracles: what every generated kernel must compute, evaluated in float64."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import epilogue as _ep
from .spec import BlockSpec

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def pad_input(spec: BlockSpec, x: torch.Tensor) -> torch.Tensor:
    """Explicit (low, high) padding, last spatial dim first as F.pad wants."""
    pads: list[int] = []
    for lo, hi in reversed(spec.padding):
        pads += [lo, hi]
    return F.pad(x, pads)


def conv(
    spec: BlockSpec,
    x: torch.Tensor,
    weight: torch.Tensor,
    *,
    bias=None,
    scale=None,
    shift=None,
    residual=None,
    layer_scale=None,
    starrelu_scale: float = 1.0,
    starrelu_bias: float = 0.0,
) -> torch.Tensor:
    """float64 forward of spec (conv + its epilogue) on channels-first tensors."""
    d = torch.float64
    y = _CONV[spec.ndim](pad_input(spec, x.to(d)), weight.to(d), None, spec.stride, 0, spec.dilation, spec.groups)
    return _ep.apply_torch(
        spec.epilogue,
        y,
        bias=None if bias is None else bias.to(d),
        scale=None if scale is None else scale.to(d),
        shift=None if shift is None else shift.to(d),
        residual=None if residual is None else residual.to(d),
        layer_scale=None if layer_scale is None else layer_scale.to(d),
        starrelu_scale=starrelu_scale,
        starrelu_bias=starrelu_bias,
    )


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64 (inf if out holds a NaN/inf)."""
    o = out.detach().to(torch.float64).cpu()
    r = ref.detach().to(torch.float64).cpu()
    if not torch.isfinite(o).all():
        return float("inf")
    denom = r.norm().item()
    return (o - r).norm().item() / (denom if denom > 0 else 1.0)


def tolerance(dtype: str) -> float:
    """Relative-error bound for an fp32-accumulated kernel with inputs of this dtype."""
    return {"float32": 1e-5, "float16": 2e-3, "bfloat16": 1.6e-2}[dtype]
