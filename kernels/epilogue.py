"""The fused epilogue chain: Triton expressions for the generator and the torch oracle for tests."""
from __future__ import annotations

import math

import torch

from .spec import Epilogue

# Triton expression of each activation on an fp32 tile `v`; starrelu reads runtime scalars star_s, star_b.
# tanh is written through sigmoid: tl.math has no tanh on every Triton version we support.
_TANH = "(2.0 * tl.sigmoid(2.0 * ({x})) - 1.0)"
ACT_TRITON: dict[str, str] = {
    "relu": "tl.maximum({v}, 0.0)",
    "relu6": "tl.minimum(tl.maximum({v}, 0.0), 6.0)",
    "silu": "{v} * tl.sigmoid({v})",
    "gelu": "0.5 * {v} * (1.0 + tl.erf({v} * 0.7071067811865476))",
    "gelu_tanh": "0.5 * {v} * (1.0 + " + _TANH.format(x="0.7978845608028654 * ({v} + 0.044715 * {v} * {v} * {v})") + ")",
    "hardswish": "{v} * tl.minimum(tl.maximum({v} + 3.0, 0.0), 6.0) * 0.16666666666666666",
    "sigmoid": "tl.sigmoid({v})",
    "starrelu": "star_s * tl.maximum({v}, 0.0) * tl.maximum({v}, 0.0) + star_b",
}


def activation_expr(name: str, var: str) -> str:
    return ACT_TRITON[name].format(v=var)


def activation_torch(name: str | None, v: torch.Tensor, star_s: float = 1.0, star_b: float = 0.0) -> torch.Tensor:
    """torch reference of one activation (any dtype; tests call it in float64)."""
    if name is None:
        return v
    if name == "relu":
        return torch.relu(v)
    if name == "relu6":
        return v.clamp(0.0, 6.0)
    if name == "silu":
        return v * torch.sigmoid(v)
    if name == "gelu":
        return 0.5 * v * (1.0 + torch.erf(v / math.sqrt(2.0)))
    if name == "gelu_tanh":
        return 0.5 * v * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (v + 0.044715 * v ** 3)))
    if name == "hardswish":
        return v * (v + 3.0).clamp(0.0, 6.0) / 6.0
    if name == "sigmoid":
        return torch.sigmoid(v)
    if name == "starrelu":
        return star_s * torch.relu(v) ** 2 + star_b
    raise ValueError(f"unknown activation {name!r}")


def apply_torch(ep: Epilogue, y: torch.Tensor, *, bias=None, scale=None, shift=None, residual=None, gamma=None,
                star_s: float = 1.0, star_b: float = 0.0) -> torch.Tensor:
    """Apply the chain to a channels-first conv output y [N, K, *spatial] (reference semantics)."""
    def per_channel(t: torch.Tensor) -> torch.Tensor:
        return t.to(y.dtype).reshape((1, -1) + (1,) * (y.dim() - 2))

    if ep.bias:
        y = y + per_channel(bias)
    if ep.affine:
        y = y * per_channel(scale) + per_channel(shift)
    if ep.residual == "pre":
        y = y + residual.to(y.dtype)
    y = activation_torch(ep.activation, y, star_s, star_b)
    if ep.layer_scale:
        y = y * per_channel(gamma)
    if ep.residual == "post":
        y = y + residual.to(y.dtype)
    return y


# Names of the runtime arguments each epilogue feature adds to a kernel signature, in order.
def arg_names(ep: Epilogue) -> list[str]:
    names = []
    if ep.bias:
        names.append("bias_ptr")
    if ep.affine:
        names += ["scale_ptr", "shift_ptr"]
    if ep.residual:
        names.append("res_ptr")
    if ep.layer_scale:
        names.append("gamma_ptr")
    if ep.activation == "starrelu":
        names += ["star_s", "star_b"]
    return names
