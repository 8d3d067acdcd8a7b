"""torch.nn.functional-style convolutions with a fused epilogue, run by generated Triton kernels.

Differentiable (generated dgrad / wgrad kernels behind torch custom ops, see kernels.autograd), so
they train eagerly and under torch.compile. starrelu_scale / starrelu_bias may be 0-dim tensors
(learnable StarReLU scalars).

Arguments follow torch exactly (kernels.convargs): unbatched inputs, one-element tuples, numpy
integers, 'same' / 'valid'; bad calls raise torch's exception type with torch's message (each also a
SpecError). float32, float16 and bfloat16 only: float64 raises NotImplementedError, because the
kernels accumulate in fp32 (use torch.nn.functional where float64 is needed, e.g. gradcheck).
"""

from __future__ import annotations

from typing import Any, cast

import torch

from tunerd.kernels.autograd import conv as _autograd_conv
from tunerd.kernels.schedule import Schedule

Scalar = float | torch.Tensor


def _conv(
    ndim: int,
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: Any,
    padding: Any,
    dilation: Any,
    groups: int,
    activation: str | None,
    scale: torch.Tensor | None,
    shift: torch.Tensor | None,
    residual: torch.Tensor | None,
    residual_mode: str,
    layer_scale: torch.Tensor | None,
    starrelu_scale: Scalar,
    starrelu_bias: Scalar,
    schedule: Schedule | dict | None,
    precision: str,
) -> torch.Tensor:
    y = _autograd_conv(
        input,
        weight,
        bias,
        stride,
        padding,
        dilation,
        groups,
        ndim=ndim,
        activation=activation,
        scale=scale,
        shift=shift,
        residual=residual,
        residual_mode=residual_mode,
        layer_scale=layer_scale,
        starrelu_scale=starrelu_scale,
        starrelu_bias=starrelu_bias,
        schedule=schedule,
        precision=precision,
    )
    return cast(torch.Tensor, y)  # stats=False: the output alone


def conv1d(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: Any = 1,
    padding: Any = 0,
    dilation: Any = 1,
    groups: int = 1,
    *,
    activation: str | None = None,
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    residual_mode: str = "post",
    layer_scale: torch.Tensor | None = None,
    starrelu_scale: Scalar = 1.0,
    starrelu_bias: Scalar = 0.0,
    schedule: Schedule | dict | None = None,
    precision: str = "ieee",
) -> torch.Tensor:
    """F.conv1d semantics plus the fused epilogue; padding may also be a ((low, high),) pair (causal: ((k-1, 0),))."""
    return _conv(
        1,
        input,
        weight,
        bias,
        stride,
        padding,
        dilation,
        groups,
        activation,
        scale,
        shift,
        residual,
        residual_mode,
        layer_scale,
        starrelu_scale,
        starrelu_bias,
        schedule,
        precision,
    )


def conv2d(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: Any = 1,
    padding: Any = 0,
    dilation: Any = 1,
    groups: int = 1,
    *,
    activation: str | None = None,
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    residual_mode: str = "post",
    layer_scale: torch.Tensor | None = None,
    starrelu_scale: Scalar = 1.0,
    starrelu_bias: Scalar = 0.0,
    schedule: Schedule | dict | None = None,
    precision: str = "ieee",
) -> torch.Tensor:
    """F.conv2d semantics plus the fused epilogue:

    y = conv (+ bias) (* scale + shift) (+ residual if residual_mode='pre') -> activation
        (* layer_scale) (+ residual if residual_mode='post')
    """
    return _conv(
        2,
        input,
        weight,
        bias,
        stride,
        padding,
        dilation,
        groups,
        activation,
        scale,
        shift,
        residual,
        residual_mode,
        layer_scale,
        starrelu_scale,
        starrelu_bias,
        schedule,
        precision,
    )


def conv3d(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: Any = 1,
    padding: Any = 0,
    dilation: Any = 1,
    groups: int = 1,
    *,
    activation: str | None = None,
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    residual_mode: str = "post",
    layer_scale: torch.Tensor | None = None,
    starrelu_scale: Scalar = 1.0,
    starrelu_bias: Scalar = 0.0,
    schedule: Schedule | dict | None = None,
    precision: str = "ieee",
) -> torch.Tensor:
    """F.conv3d semantics plus the fused epilogue (see conv2d)."""
    return _conv(
        3,
        input,
        weight,
        bias,
        stride,
        padding,
        dilation,
        groups,
        activation,
        scale,
        shift,
        residual,
        residual_mode,
        layer_scale,
        starrelu_scale,
        starrelu_bias,
        schedule,
        precision,
    )
