"""Autograd for the generated convolutions, as torch custom ops.

`tunerd::conv` runs the forward kernel (optionally saving z for backward and gathering BatchNorm
batch statistics: the mean and biased variance of z); `tunerd::conv_backward` runs dgrad / wgrad
(kernels.backward) for exactly the inputs autograd asks for. Both are opaque custom ops with fake
(meta) implementations and the backward is registered with torch.library.register_autograd, so
models using them train eagerly and under torch.compile. `conv` is the Python entry
(tunerd.functional.conv1d/2d/3d call it).
"""

import json
from typing import Any

import torch

from . import capture, convargs
from . import epilogue as _ep
from .backward import Needs, conv_backward
from .conv import EpilogueArgs, from_channels_last, make_spec, run_forward, starrelu_pair, to_channels_last
from .schedule import Schedule
from .spec import BlockSpec

Tensor = torch.Tensor
_F32 = torch.float32


def _epilogue_args(
    bias: Tensor | None,
    scale: Tensor | None,
    shift: Tensor | None,
    residual: Tensor | None,
    layer_scale: Tensor | None,
    starrelu: Tensor | None,
    activation: str | None,
    residual_mode: str,
) -> EpilogueArgs:
    ep = EpilogueArgs(
        bias=bias,
        scale=scale,
        shift=shift,
        residual=residual,
        layer_scale=layer_scale,
        activation=activation,
        residual_mode=residual_mode,
    )
    if starrelu is not None:
        ep.starrelu_scale, ep.starrelu_bias = starrelu[0], starrelu[1]
    return ep


def _spec(
    x: Tensor,
    weight: Tensor,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    ep: EpilogueArgs,
    precision: str,
    stats: bool,
    save_z: bool,
) -> BlockSpec:
    pairs = tuple((padding[2 * i], padding[2 * i + 1]) for i in range(len(stride)))
    return make_spec(
        x, weight, len(stride), tuple(stride), pairs, tuple(dilation), groups, ep, precision, stats=stats, save_z=save_z
    )


def _empty(like: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    return like.new_empty((0,), dtype=dtype or like.dtype)


# ---- forward op ------------------------------------------------------------------------------------
def _conv_impl(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    scale: Tensor | None,
    shift: Tensor | None,
    residual: Tensor | None,
    layer_scale: Tensor | None,
    starrelu: Tensor | None,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    activation: str | None,
    residual_mode: str,
    schedule: str | None,
    precision: str,
    save_z: bool,
    stats: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(y, z or empty, mean or empty, var or empty); padding is flattened (low, high) pairs."""
    ep = _epilogue_args(bias, scale, shift, residual, layer_scale, starrelu, activation, residual_mode)
    spec = _spec(x, weight, stride, padding, dilation, groups, ep, precision, stats, save_z)
    res = run_forward(spec, x, weight, ep, json.loads(schedule) if schedule else None)
    y = res.y
    z = res.z if res.z is not None else _empty(x)
    if not stats:
        return y, z, _empty(x, _F32), _empty(x, _F32)
    if res.mean is None or res.var is None:  # a stats spec always gathers them
        raise RuntimeError(f"the forward of {spec.describe()} returned no batch statistics")
    return y, z, res.mean, res.var


conv_op = torch.library.custom_op("tunerd::conv", mutates_args=())(_conv_impl)


@conv_op.register_fake
def _conv_fake(
    x,
    weight,
    bias,
    scale,
    shift,
    residual,
    layer_scale,
    starrelu,
    stride,
    padding,
    dilation,
    groups,
    activation,
    residual_mode,
    schedule,
    precision,
    save_z,
    stats,
):
    # shapes only (symbolic sizes allowed); the real implementation validates and specialises
    k = weight.shape[0]
    out = [
        (x.shape[2 + i] + padding[2 * i] + padding[2 * i + 1] - dilation[i] * (weight.shape[2 + i] - 1) - 1)
        // stride[i]
        + 1
        for i in range(len(stride))
    ]
    shape = (x.shape[0], *out, k)
    y = from_channels_last(x.new_empty(shape), x)
    z = x.new_empty(shape) if save_z else _empty(x)
    if not stats:
        return y, z, _empty(x, _F32), _empty(x, _F32)
    return y, z, x.new_empty((k,), dtype=_F32), x.new_empty((k,), dtype=_F32)


# ---- backward op -----------------------------------------------------------------------------------
_NEEDS = ("input", "weight", "bias", "scale", "shift", "residual", "layer_scale", "starrelu")


@torch.library.custom_op("tunerd::conv_backward", mutates_args=())
def conv_backward_op(
    dy: Tensor,
    x: Tensor,
    weight: Tensor,
    z: Tensor | None,
    bias: Tensor | None,
    scale: Tensor | None,
    shift: Tensor | None,
    residual: Tensor | None,
    layer_scale: Tensor | None,
    starrelu: Tensor | None,
    dmean: Tensor | None,
    dvar: Tensor | None,
    mean: Tensor | None,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    activation: str | None,
    residual_mode: str,
    precision: str,
    stats: bool,
    needs: list[bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients (input, weight, bias, scale, shift, residual 'pre', layer_scale, starrelu); empty where not needed."""
    ep = _epilogue_args(bias, scale, shift, residual, layer_scale, starrelu, activation, residual_mode)
    spec = _spec(x, weight, stride, padding, dilation, groups, ep, precision, stats, False)
    g = conv_backward(dy, x, weight, spec, ep, z, Needs(*needs), dmean, dvar, mean)
    fakes = _backward_fake(
        dy,
        x,
        weight,
        z,
        bias,
        scale,
        shift,
        residual,
        layer_scale,
        starrelu,
        dmean,
        dvar,
        mean,
        stride,
        padding,
        dilation,
        groups,
        activation,
        residual_mode,
        precision,
        stats,
        needs,
    )
    out = []
    # storages already held by an input or an output: a view of one must be copied (a custom op's outputs alias
    # nothing; under a Python dispatch mode views lose their _base, so storages are compared)
    taken = {t.untyped_storage().data_ptr() for t in (dy, x, weight, z, bias, scale, shift, residual) if t is not None}
    for name, fake in zip(_NEEDS, fakes):
        t = getattr(g, name)
        if t is None:
            out.append(fake)
            continue
        held = t.numel() > 0 and t.untyped_storage().data_ptr() in taken
        if t.stride() != fake.stride() or t._base is not None or held:  # the layout the fake promises
            out.append(fake.copy_(t))
        else:
            out.append(t)
            taken.add(t.untyped_storage().data_ptr())
    return tuple(out)


@conv_backward_op.register_fake
def _backward_fake(
    dy,
    x,
    weight,
    z,
    bias,
    scale,
    shift,
    residual,
    layer_scale,
    starrelu,
    dmean,
    dvar,
    mean,
    stride,
    padding,
    dilation,
    groups,
    activation,
    residual_mode,
    precision,
    stats,
    needs,
):
    def cl_like(t: Tensor) -> Tensor:  # channels-last buffer seen in t's memory format (as the kernels return)
        return from_channels_last(t.new_empty((t.shape[0], *t.shape[2:], t.shape[1])), t)

    shapes = (
        cl_like(x) if needs[0] else None,
        torch.empty_like(weight, memory_format=torch.contiguous_format),
        bias,
        scale,
        shift,
        cl_like(residual) if residual is not None and needs[5] else None,
        layer_scale,
        starrelu,
    )
    out = []
    for need, t, ref in zip(needs, shapes, (x, weight, bias, scale, shift, residual, layer_scale, starrelu)):
        if not need or ref is None:
            out.append(_empty(x))
        elif t is ref:
            out.append(ref.new_empty(ref.shape, dtype=_F32 if ref is starrelu else ref.dtype))
        else:
            out.append(t)
    return tuple(out)


def _setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
    (
        x,
        weight,
        bias,
        scale,
        shift,
        residual,
        layer_scale,
        starrelu,
        stride,
        padding,
        dilation,
        groups,
        activation,
        residual_mode,
        schedule,
        precision,
        save_z,
        stats,
    ) = inputs
    y, z, mean, var = output
    ctx.mark_non_differentiable(z)
    if not stats:
        ctx.mark_non_differentiable(mean, var)
    ep = _ep.Epilogue(
        bias=bias is not None,
        affine=scale is not None,
        activation=activation,
        residual=residual_mode if residual is not None else None,
        layer_scale=layer_scale is not None,
        stats=stats,
    )
    # z is y itself when nothing follows the conv (BatchNorm-train convs): keep y instead of a copy
    saved_z = y if (not save_z and ep.is_identity and stats) else (z if save_z else None)
    ctx.z_is_y = saved_z is y
    ctx.save_for_backward(
        x, weight, bias, scale, shift, residual, layer_scale, starrelu, saved_z, mean if stats else None
    )
    ctx.cfg = (stride, padding, dilation, groups, activation, residual_mode, precision, stats)


def _backward(ctx: Any, dy: Tensor, dz: Tensor, dmean: Tensor | None, dvar: Tensor | None) -> tuple:
    x, weight, bias, scale, shift, residual, layer_scale, starrelu, z, mean = ctx.saved_tensors
    stride, padding, dilation, groups, activation, residual_mode, precision, stats = ctx.cfg
    ng = ctx.needs_input_grad
    needs = [bool(ng[i]) for i in range(8)]
    post = residual is not None and residual_mode == "post"
    if post:
        needs[5] = False  # d residual is dy itself
    if ctx.z_is_y:
        z = to_channels_last(z)
    if not stats or (dmean is not None and dmean.numel() == 0):
        dmean = dvar = mean = None
    grads: list[Tensor | None] = [None] * 8
    if any(needs):
        got = torch.ops.tunerd.conv_backward(
            dy,
            x,
            weight,
            z,
            bias,
            scale,
            shift,
            residual,
            layer_scale,
            starrelu,
            dmean,
            dvar,
            mean,
            stride,
            padding,
            dilation,
            groups,
            activation,
            residual_mode,
            precision,
            stats,
            needs,
        )
        grads = [t if need else None for t, need in zip(got, needs)]
    if post and ng[5]:
        grads[5] = dy
    return tuple(grads) + (None,) * 10


conv_op.register_autograd(_backward, setup_context=_setup_context)


class _EagerConv(torch.autograd.Function):
    """tunerd::conv's autograd for plain eager calls (outside torch.compile and dispatch modes): the op's own
    forward, setup_context and backward, without torch.library's per-call argument handling (about 0.3 ms of
    Python per conv on the CPU that launches the GPU's work)."""

    @staticmethod
    def forward(ctx: Any, *inputs: Any) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        out = _conv_impl(*inputs)
        _setup_context(ctx, inputs, out)
        return out

    @staticmethod
    def backward(ctx: Any, *grads: Tensor) -> tuple:
        return _backward(ctx, *grads)


# ---- Python entry ----------------------------------------------------------------------------------
def _eager(tensors: tuple[Tensor | None, ...]) -> bool:
    """Whether a call may skip the custom op: plain tensors, no torch.compile tracing, no Python dispatch or
    torch-function mode (fake, functional or meta tracing need the op and its fake implementation)."""
    if torch.compiler.is_compiling():
        return False
    if (torch._C._len_torch_dispatch_stack() or torch._C._is_torch_function_mode_enabled()) and not (
        capture.only_guards_active()  # capture.no_host_sync() observes the path that runs without it
    ):
        return False
    return all(t is None or type(t) in _PLAIN for t in tensors)


_PLAIN = (Tensor, torch.nn.Parameter)  # no __torch_function__ of their own (a Parameter's is disabled)


def conv(
    input: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride: Any = 1,
    padding: Any = 0,
    dilation: Any = 1,
    groups: int = 1,
    *,
    ndim: int,
    activation: str | None = None,
    scale: Tensor | None = None,
    shift: Tensor | None = None,
    residual: Tensor | None = None,
    residual_mode: str = "post",
    layer_scale: Tensor | None = None,
    starrelu_scale: float | Tensor = 1.0,
    starrelu_bias: float | Tensor = 0.0,
    schedule: Schedule | dict | None = None,
    precision: str = "ieee",
    stats: bool = False,
) -> Tensor | tuple[Tensor, Tensor, Tensor]:
    """Differentiable y = epilogue(conv(input, weight)) (tunerd.functional semantics).

    Gradients flow to input, weight, bias, scale, shift, residual, layer_scale and (tensor)
    starrelu_scale / starrelu_bias. stats=True returns (y, mean, var): per-channel fp32 mean and
    biased variance of the pre-epilogue conv output z over batch and positions (BatchNorm's batch
    statistics), differentiable too.
    `schedule` picks the forward variant; backward variants come from the tuned lookup or defaults.
    """
    ep = EpilogueArgs(
        bias=bias,
        scale=scale,
        shift=shift,
        residual=residual,
        layer_scale=layer_scale,
        activation=activation,
        residual_mode=residual_mode,
        starrelu_scale=starrelu_scale,
        starrelu_bias=starrelu_bias,
    )
    args = convargs.normalize(ndim, input, weight, bias, stride, padding, dilation, groups)  # torch's rules
    input, groups, stride_t, dilation_t = args.input, args.groups, args.stride, args.dilation
    if residual is not None and not args.batched:
        residual = ep.residual = residual.unsqueeze(0)
    spec = None  # clear errors before the dispatcher (the fake implementation checks under compile)
    if not torch.compiler.is_compiling():
        spec = make_spec(input, weight, ndim, stride_t, args.padding, dilation_t, groups, ep, precision, stats=stats)
    pads = [v for pair in args.padding for v in pair]
    starrelu = None
    if activation == "starrelu":
        starrelu = starrelu_pair(starrelu_scale, starrelu_bias, input.device)
    if isinstance(schedule, Schedule):
        schedule = schedule.to_dict()
    sched = json.dumps(schedule, sort_keys=True) if schedule is not None else None
    tensors = (input, weight, bias, scale, shift, residual, layer_scale, starrelu)
    training = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    if spec is not None and not training and _eager(tensors):  # nothing to differentiate: skip the dispatcher
        res = run_forward(spec, input, weight, ep, schedule)
        y = res.y if args.batched else res.y.squeeze(0)
        return (y, res.mean, res.var) if stats else y  # type: ignore[return-value]
    e = ep.spec(stats=stats)
    save_z = training and _ep.saves_z(e) and not (e.is_identity and stats)
    op = _EagerConv.apply if _eager(tensors) else torch.ops.tunerd.conv
    y, _, mean, var = op(
        input,
        weight,
        bias,
        scale,
        shift,
        residual,
        layer_scale,
        starrelu,
        list(stride_t),
        pads,
        list(dilation_t),
        groups,
        activation,
        residual_mode,
        sched,
        precision,
        save_z,
        stats,
    )
    if not args.batched:
        y = y.squeeze(0)
    return (y, mean, var) if stats else y
