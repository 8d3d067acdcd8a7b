"""Forward convolution entry: validate torch arguments, build the spec, pack, launch.

Public API of the generator for any convolution (1d/2d/3d, dense, grouped, depthwise) with
its fused epilogue. tunerd.functional wraps this with autograd.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from . import generator, runtime
from .schedule import Schedule
from .spec import BlockSpec, Epilogue, SpecError, conv_spec

TORCH_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
SPEC_DTYPES = {v: k for k, v in TORCH_DTYPES.items()}

# Tuned-schedule lookup installed by the product layer (tunerd); kernels never import it.
ScheduleLookup = Callable[[BlockSpec, torch.device], "Schedule | None"]
_lookup: ScheduleLookup | None = None


def set_schedule_lookup(fn: ScheduleLookup | None) -> None:
    """Install the function that returns a tuned schedule for (spec, device), or None."""
    global _lookup
    _lookup = fn


def choose_schedule(spec: BlockSpec, device: torch.device, schedule: Schedule | dict | None) -> Schedule | dict | None:
    if schedule is not None or _lookup is None:
        return schedule
    return _lookup(spec, device)


@dataclass
class EpilogueArgs:
    """Runtime tensors of the epilogue chain (None where a feature is off)."""

    bias: torch.Tensor | None = None
    scale: torch.Tensor | None = None
    shift: torch.Tensor | None = None
    residual: torch.Tensor | None = None
    gamma: torch.Tensor | None = None
    activation: str | None = None
    residual_mode: str = "post"
    star_s: float = 1.0
    star_b: float = 0.0

    def spec(self) -> Epilogue:
        if (self.scale is None) != (self.shift is None):
            raise SpecError("scale and shift (folded BatchNorm) must be given together")
        if self.residual_mode not in ("pre", "post"):
            raise SpecError(f"residual_mode must be 'pre' or 'post', got {self.residual_mode!r}")
        return Epilogue(bias=self.bias is not None, affine=self.scale is not None, activation=self.activation,
                        residual=self.residual_mode if self.residual is not None else None,
                        layer_scale=self.gamma is not None)


def _check_tensor(name: str, t: Any) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def make_spec(x: torch.Tensor, weight: torch.Tensor, ndim: int, stride: Any, padding: Any, dilation: Any,
              groups: int, ep: EpilogueArgs, precision: str = "ieee", op: str = "fwd") -> BlockSpec:
    """Validate the torch-style call and describe it as a BlockSpec."""
    _check_tensor("input", x)
    _check_tensor("weight", weight)
    fn = f"conv{ndim}d"
    layout = "N, C, " + ", ".join(("D", "H", "W")[3 - ndim:])
    if x.dim() != ndim + 2:
        raise SpecError(f"{fn} expects a {ndim + 2}-D input [{layout}], got {x.dim()}-D shape {tuple(x.shape)}")
    if weight.dim() != ndim + 2:
        raise SpecError(f"{fn} expects a {ndim + 2}-D weight [K, C/groups, kernel...]; got shape {tuple(weight.shape)}")
    if x.dtype not in TORCH_DTYPES:
        raise SpecError(f"input dtype {x.dtype} is not supported; use float32, float16 or bfloat16")
    if weight.dtype != x.dtype:
        raise SpecError(f"weight dtype {weight.dtype} does not match input dtype {x.dtype}")
    if weight.device != x.device:
        raise SpecError(f"weight is on {weight.device} but input is on {x.device}")
    if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1:
        raise SpecError(f"groups must be a positive int, got {groups!r}")
    n, c = x.shape[0], x.shape[1]
    k = weight.shape[0]
    if c % groups:
        raise SpecError(f"input channels ({c}) must be divisible by groups ({groups})")
    if k % groups:
        raise SpecError(f"output channels ({k}) must be divisible by groups ({groups})")
    if weight.shape[1] * groups != c:
        raise SpecError(f"weight has {weight.shape[1]} input channels per group, but input has {c} channels "
                        f"and groups={groups} (expected {c // groups})")
    if min(x.shape) == 0:
        raise SpecError(f"input has an empty dimension: {tuple(x.shape)}")
    for name in ("bias", "scale", "shift", "gamma"):
        t = getattr(ep, name)
        if t is None:
            continue
        _check_tensor(name, t)
        if t.device != x.device:
            raise SpecError(f"{name} is on {t.device} but input is on {x.device}")
        if t.dim() != 1 or t.shape[0] != k:
            raise SpecError(f"{name} must have shape [{k}] (one value per output channel), got {tuple(t.shape)}")
        if name == "bias" and t.dtype != x.dtype:
            raise SpecError(f"bias dtype {t.dtype} does not match input dtype {x.dtype}")
        if t.dtype not in TORCH_DTYPES:
            raise SpecError(f"{name} dtype {t.dtype} is not a supported float type")
    spec = conv_spec(n=n, c=c, k=k, in_size=tuple(x.shape[2:]), kernel=tuple(weight.shape[2:]), stride=stride,
                     padding=padding, dilation=dilation, groups=groups, dtype=TORCH_DTYPES[x.dtype],
                     epilogue=ep.spec(), op=op, precision=precision)
    if ep.residual is not None:
        r = _check_tensor("residual", ep.residual)
        expected = (n, k, *spec.out_size)
        if tuple(r.shape) != expected:
            raise SpecError(f"residual must have the output's shape {expected}, got {tuple(r.shape)}")
        if r.dtype != x.dtype:
            raise SpecError(f"residual dtype {r.dtype} does not match input dtype {x.dtype}")
        if r.device != x.device:
            raise SpecError(f"residual is on {r.device} but input is on {x.device}")
    return spec


def to_channels_last(t: torch.Tensor) -> torch.Tensor:
    """[N, C, *S] -> contiguous [N, *S, C] (a no-op view for channels_last tensors)."""
    return t.permute(0, *range(2, t.dim()), 1).contiguous()


def from_channels_last(buf: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[N, *S, K] buffer -> [N, K, *S] in the memory format of `like`."""
    out = buf.permute(0, buf.dim() - 1, *range(1, buf.dim() - 1))
    return out.contiguous() if like.is_contiguous() else out


def pack_weight(spec: BlockSpec, weight: torch.Tensor) -> torch.Tensor:
    """conv: [K, C/g, *ks] -> [K, taps, C/g]; depthwise: [K, 1, *ks] -> [taps, K]."""
    if spec.kind == "depthwise":
        return weight.reshape(spec.k, spec.taps).t().contiguous()
    return weight.permute(0, *range(2, weight.dim()), 1).contiguous()


def epilogue_kernel_args(spec: BlockSpec, ep: EpilogueArgs) -> dict[str, Any]:
    """Epilogue arguments as the generated kernels name them (per-channel vectors in fp32)."""
    e = spec.epilogue
    args: dict[str, Any] = {}

    def vec(t: torch.Tensor) -> torch.Tensor:
        return t.detach().to(torch.float32).contiguous()

    if e.bias:
        args["bias_ptr"] = vec(ep.bias)
    if e.affine:
        args["scale_ptr"], args["shift_ptr"] = vec(ep.scale), vec(ep.shift)
    if e.residual:
        args["res_ptr"] = to_channels_last(ep.residual.detach())
    if e.layer_scale:
        args["gamma_ptr"] = vec(ep.gamma)
    if e.activation == "starrelu":
        args["star_s"], args["star_b"] = float(ep.star_s), float(ep.star_b)
    return args


def forward_args(spec: BlockSpec, x: torch.Tensor, weight: torch.Tensor, ep: EpilogueArgs,
                 out_buf: torch.Tensor) -> dict[str, Any]:
    args = {"x_ptr": to_channels_last(x.detach()), "w_ptr": pack_weight(spec, weight.detach()), "out_ptr": out_buf,
            "UPCAST": runtime.is_interpreted(x.device) and x.dtype == torch.bfloat16}
    args.update(epilogue_kernel_args(spec, ep))
    return args


def conv_forward(x: torch.Tensor, weight: torch.Tensor, ndim: int, stride: Any = 1, padding: Any = 0,
                 dilation: Any = 1, groups: int = 1, ep: EpilogueArgs | None = None,
                 schedule: Schedule | dict | None = None, precision: str = "ieee",
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """y = epilogue(conv(x, weight)) with torch.nn.functional semantics; returns y in x's memory format.

    `out`, if given, is the [N, *out_spatial, K] channels-last buffer to write (tests poison it).
    """
    ep = ep or EpilogueArgs()
    spec = make_spec(x, weight, ndim, stride, padding, dilation, groups, ep, precision)
    variant = generator.render(spec, choose_schedule(spec, x.device, schedule))
    shape = (spec.n, *spec.out_size, spec.k)
    if out is None:
        out = torch.empty(shape, dtype=x.dtype, device=x.device)
    elif tuple(out.shape) != shape or not out.is_contiguous() or out.dtype != x.dtype or out.device != x.device:
        raise SpecError(f"out must be a contiguous {x.dtype} tensor of shape {shape} on {x.device}")
    runtime.launch(variant, forward_args(spec, x, weight, ep, out), x.device)
    return from_channels_last(out, x)
