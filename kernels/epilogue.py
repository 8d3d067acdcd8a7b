"""The fused epilogue chain: Triton expressions for the generator and the torch oracle for tests."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .spec import Epilogue

LEAKY_SLOPE = 0.01  # leaky_relu's negative slope: torch's default (timm's 'leaky_relu', CSPNet, DarkNet)

# Triton expression of each activation on an fp32 tile `v`; starrelu reads starrelu_scale, starrelu_bias
# (loaded from starrelu_ptr).
# tanh is written through sigmoid: tl.math has no tanh on every Triton version we support.
_TANH = "(2.0 * tl.sigmoid(2.0 * ({x})) - 1.0)"
ACT_TRITON: dict[str, str] = {
    "relu": "tl.maximum({v}, 0.0)",
    "relu6": "tl.minimum(tl.maximum({v}, 0.0), 6.0)",
    "silu": "{v} * tl.sigmoid({v})",
    "gelu": "0.5 * {v} * (1.0 + tl.erf({v} * 0.7071067811865476))",
    "gelu_tanh": "0.5 * {v} * (1.0 + "
    + _TANH.format(x="0.7978845608028654 * ({v} + 0.044715 * {v} * {v} * {v})")
    + ")",
    "hardswish": "{v} * tl.minimum(tl.maximum({v} + 3.0, 0.0), 6.0) * 0.16666666666666666",
    "sigmoid": "tl.sigmoid({v})",
    "leaky_relu": f"tl.where({{v}} > 0.0, {{v}}, {{v}} * {LEAKY_SLOPE!r})",
    "starrelu": "starrelu_scale * tl.maximum({v}, 0.0) * tl.maximum({v}, 0.0) + starrelu_bias",
}


# d act / d v, as torch's own backward formulas define it (relu'(0) = 0, hardswish at +-3, ...).
_TANH_INNER = _TANH.format(x="0.7978845608028654 * ({v} + 0.044715 * {v} * {v} * {v})")
ACT_GRAD_TRITON: dict[str, str] = {
    "relu": "tl.where({v} > 0.0, 1.0, 0.0)",
    "relu6": "tl.where(({v} > 0.0) & ({v} < 6.0), 1.0, 0.0)",
    "silu": "tl.sigmoid({v}) * (1.0 + {v} * (1.0 - tl.sigmoid({v})))",
    "gelu": "0.5 * (1.0 + tl.erf({v} * 0.7071067811865476)) + {v} * 0.3989422804014327 * tl.exp(-0.5 * {v} * {v})",
    "gelu_tanh": (
        "0.5 * (1.0 + "
        + _TANH_INNER
        + ") + 0.5 * {v} * (1.0 - "
        + _TANH_INNER
        + " * "
        + _TANH_INNER
        + ") * 0.7978845608028654 * (1.0 + 0.134145 * {v} * {v})"
    ),
    "hardswish": "tl.where({v} < -3.0, 0.0, tl.where({v} <= 3.0, {v} * 0.3333333333333333 + 0.5, 1.0))",
    "sigmoid": "tl.sigmoid({v}) * (1.0 - tl.sigmoid({v}))",
    "leaky_relu": f"tl.where({{v}} > 0.0, 1.0, {LEAKY_SLOPE!r})",
    "starrelu": "2.0 * starrelu_scale * tl.maximum({v}, 0.0)",
}


def activation_expr(name: str, var: str) -> str:
    return ACT_TRITON[name].format(v=var)


def activation_grad_expr(name: str, var: str) -> str:
    return ACT_GRAD_TRITON[name].format(v=var)


def activation_torch(
    name: str | None, v: torch.Tensor, starrelu_scale: float = 1.0, starrelu_bias: float = 0.0
) -> torch.Tensor:
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
        return 0.5 * v * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (v + 0.044715 * v**3)))
    if name == "hardswish":
        return v * (v + 3.0).clamp(0.0, 6.0) / 6.0
    if name == "sigmoid":
        return torch.sigmoid(v)
    if name == "leaky_relu":
        return torch.nn.functional.leaky_relu(v, LEAKY_SLOPE)
    if name == "starrelu":
        return starrelu_scale * torch.relu(v) ** 2 + starrelu_bias
    raise ValueError(f"unknown activation {name!r}")


def apply_torch(
    ep: Epilogue,
    y: torch.Tensor,
    *,
    bias=None,
    scale=None,
    shift=None,
    residual=None,
    layer_scale=None,
    starrelu_scale: float = 1.0,
    starrelu_bias: float = 0.0,
) -> torch.Tensor:
    """Apply the chain to a channels-first conv output y [N, K, *spatial] (reference semantics).

    The spec's `affine` flag is the pair scale, shift (folded BatchNorm: y * scale + shift)."""

    def per_channel(t: torch.Tensor) -> torch.Tensor:
        return t.to(y.dtype).reshape((1, -1) + (1,) * (y.dim() - 2))

    if ep.bias:
        y = y + per_channel(bias)
    if ep.affine:
        y = y * per_channel(scale) + per_channel(shift)
    if ep.residual == "pre":
        y = y + residual.to(y.dtype)
    y = activation_torch(ep.activation, y, starrelu_scale, starrelu_bias)
    if ep.layer_scale:
        y = y * per_channel(layer_scale)
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
        names.append("layer_scale_ptr")
    if ep.activation == "starrelu":
        names.append("starrelu_ptr")  # [2] fp32: (scale, bias), a pointer so learnable scalars need no host sync
    return names


# ---- backward of the chain --------------------------------------------------------------------
@dataclass(frozen=True)
class GradPlan:
    """What one dgrad/wgrad kernel reads to turn dy into dz, and what wgrad reduces per channel.

    dgrad and wgrad apply the chain's gradient to dy as they load it (never materialising dz):
      da = dy * layer_scale;  du = da * act'(u);  dz = du * scale (+ d0 + d1 * (z - d2) with stats)
    with u = (z + bias) * scale + shift (+ residual 'pre') rebuilt from the saved z.
    wgrad programs that own a channel's first column tile also sum, per channel:
      dshift = sum du (dbias = scale * dshift), dscale = sum du * (z + bias),
      dlayer_scale = sum dy * act(u), and dstarrelu_scale = sum da relu(u)^2, dstarrelu_bias = sum da.
    """

    epilogue: Epilogue
    load_z: bool  # the kernel reads the saved pre-epilogue conv output z
    need_u: bool  # ... and rebuilds the pre-activation u from it
    params: tuple[str, ...]  # kernel arguments it reads, in signature order
    reductions: tuple[str, ...]  # per-channel sums (wgrad)

    @property
    def plain(self) -> bool:
        """dz is dy itself."""
        e = self.epilogue
        return not (e.affine or e.activation or e.layer_scale or e.stats)


def grad_epilogue(ep: Epilogue, op: str) -> Epilogue:
    """The part of a forward chain that matters to the op's backward kernel (its spec's epilogue).

    Dropping what a kernel does not read keeps one kernel (and one tuned schedule) per real variant:
    residual 'post' never matters (its gradient is dy); for dgrad, bias / residual 'pre' only
    shape u, which only an activation reads.
    """
    if op == "fwd":
        return ep
    pre = ep.residual == "pre"
    if op == "dgrad":
        act = ep.activation is not None
        return Epilogue(
            bias=ep.bias and act,
            affine=ep.affine,
            activation=ep.activation,
            residual="pre" if pre and act else None,
            layer_scale=ep.layer_scale,
            stats=ep.stats,
        )
    return Epilogue(
        bias=ep.bias,
        affine=ep.affine,
        activation=ep.activation,
        residual="pre" if pre else None,
        layer_scale=ep.layer_scale,
        stats=ep.stats,
    )


def grad_plan(ep: Epilogue, op: str) -> GradPlan:
    """Plan of the op's kernel for a spec epilogue already reduced by grad_epilogue."""
    if op == "dgrad":
        need_u = ep.activation is not None
        load_z = need_u or ep.stats
        reductions: tuple[str, ...] = ()
    else:
        need_u = ep.activation is not None or ep.layer_scale
        load_z = need_u or ep.affine or ep.stats
        red = []
        if ep.bias or ep.affine:
            red.append("dshift")
        if ep.affine:
            red.append("dscale")
        if ep.layer_scale:
            red.append("dlayer_scale")
        if ep.activation == "starrelu":
            red += ["dstarrelu_scale", "dstarrelu_bias"]
        reductions = tuple(red)
    params = []
    if ep.bias and load_z:
        params.append("bias_ptr")
    if ep.affine:
        params += ["scale_ptr", "shift_ptr"] if need_u else ["scale_ptr"]
    if ep.residual == "pre" and need_u:
        params.append("res_ptr")
    if ep.layer_scale:
        params.append("layer_scale_ptr")
    if ep.activation == "starrelu":
        params.append("starrelu_ptr")
    if ep.stats:
        params.append("dstats_ptr")  # [3, K] fp32 (d0, d1, d2): the stats outputs' gradient dz += d0 + d1 (z - d2)
    return GradPlan(epilogue=ep, load_z=load_z, need_u=need_u, params=tuple(params), reductions=reductions)


def saves_z(ep: Epilogue) -> bool:
    """Does training with this forward chain need z kept for backward? (wgrad reads the most)."""
    return grad_plan(grad_epilogue(ep, "wgrad"), "wgrad").load_z
