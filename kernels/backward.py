"""Backward convolution: dgrad (grad wrt input) and wgrad (grad wrt weight) launches, plus the
gradients of the fused epilogue chain.

Scheme (kernels.epilogue.GradPlan has the formulas):
- The forward of a training step stores z, the pre-epilogue conv output, when the chain's gradient
  needs it (activation, affine, layer scale, stats; kernels.epilogue.saves_z). No dz tensor is ever
  materialised: dgrad and wgrad load dy (and z, and the residual for 'pre') and apply the chain's
  gradient on the fly, rebuilding u = (z + bias) * scale + shift (+ residual) per element.
- wgrad is a split-K GEMM over N*P*Q writing fp32 partials [split, ...] that are summed in fixed
  order (deterministic): conv in the kernel (the last split of a tile to arrive at its counter sums them
  into partial 0), depthwise on the host. Its programs that own a channel's first column tile also sum
  the per-channel parameter gradients (dbias, dscale, dshift, dlayer_scale, StarReLU's ds, db) into
  [split, n, K] partials and write d residual for 'pre': no separate elementwise pass.
- dgrad decomposes strided convs by stride phase (one launch, a grid axis over phases), so no
  multiply touches an inserted zero; dilation and asymmetric padding are part of the phase tables.
- Only with a frozen weight (no wgrad launch) but trainable chain parameters do the chain's
  gradients come from torch autograd over kernels.epilogue.apply_torch on the saved z.
- dy that is a channel slice of a wider channels-last gradient (torch.cat's backward hands each branch one) is
  read in place by dgrad and wgrad (spec dy_pixel_stride, conv.view_stride's alignment rule; other layouts are
  copied), as wgrad reads a channel-slice x. dx is always a dense buffer of its own: no caller hands dgrad a
  slice to write into (autograd, block recomputation and a split's backward all take a fresh dx).
Residual 'post' has gradient dy itself; the caller passes dy through.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from . import epilogue as _ep
from . import runtime
from .conv import (
    SPEC_DTYPES,
    EpilogueArgs,
    channels_last_arg,
    choose_variant,
    epilogue_kernel_args,
    from_channels_last,
    in_format_of,
    new_buffer,
    new_channels_last,
    pack_weight,
    to_channels_last,
    upcast,
    view_stride,
)
from .generator import Variant
from .schedule import Schedule
from .spec import BlockSpec


@dataclass(frozen=True)
class Needs:
    """Which gradients to compute (autograd's needs_input_grad)."""

    input: bool = True
    weight: bool = True
    bias: bool = False
    scale: bool = False
    shift: bool = False
    residual: bool = False
    layer_scale: bool = False
    starrelu: bool = False

    @property
    def chain(self) -> bool:
        return self.bias or self.scale or self.shift or self.layer_scale or self.starrelu


@dataclass
class Grads:
    """Gradients of one conv call; None where not needed. starrelu is [2] fp32: (d s, d b) of StarReLU."""

    input: torch.Tensor | None = None
    weight: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    scale: torch.Tensor | None = None
    shift: torch.Tensor | None = None
    residual: torch.Tensor | None = None
    layer_scale: torch.Tensor | None = None
    starrelu: torch.Tensor | None = None


def grad_spec(spec: BlockSpec, op: str, dy_stride: int | None = None) -> BlockSpec:
    """The dgrad/wgrad spec of a forward spec: same geometry on dense buffers but dy's pixel stride (a wgrad of a
    channel-slice input also gets x's at launch), the chain reduced to what the op reads."""
    return spec.dense().with_(op=op, epilogue=_ep.grad_epilogue(spec.epilogue, op), dy_pixel_stride=dy_stride)


def _dy_arg(gspec: BlockSpec, dy: torch.Tensor) -> torch.Tensor:
    """dy, the channels-last [N, *out, K] gradient, checked to have the pixel stride a view spec addresses it with."""
    if gspec.dy_pixel_stride is not None:
        channels_last_arg(dy.permute(0, dy.dim() - 1, *range(1, dy.dim() - 1)), gspec.dy_pixel_stride, "dy")
    return dy


def _chain_args(
    gspec: BlockSpec, ep: EpilogueArgs, z: torch.Tensor | None, dstats: torch.Tensor | None, device: torch.device
) -> dict[str, Any]:
    """The chain arguments a backward variant reads (its plan), bound from the forward's tensors."""
    plan = _ep.grad_plan(gspec.epilogue, gspec.op)
    args = epilogue_kernel_args(gspec, ep, device, only=plan.params)
    if "dstats_ptr" in plan.params:
        args["dstats_ptr"] = dstats
    if plan.load_z:
        args["z_ptr"] = z
    return args


def dgrad_args(
    gspec: BlockSpec,
    dy: torch.Tensor,
    weight: torch.Tensor,
    dx: torch.Tensor,
    ep: EpilogueArgs | None = None,
    z: torch.Tensor | None = None,
    dstats: torch.Tensor | None = None,
) -> dict[str, Any]:
    """Kernel arguments of a dgrad variant.

    dy: channels-last [N, *out, K] (a view spec's: a slice with its dy_pixel_stride); dx: the dense channels-last
    [N, *in, C] buffer it writes; ep / z /
    dstats: the forward chain's tensors, saved z and the [3, K] stats gradient (stats_grad), where the plan
    reads them.
    """
    args = {"dy_ptr": _dy_arg(gspec, dy), "w_ptr": pack_weight(gspec, weight), "dx_ptr": dx, "UPCAST": upcast(dy)}
    args.update(_chain_args(gspec, ep or EpilogueArgs(), z, dstats, dy.device))
    return args


def wgrad_partials_shape(gspec: BlockSpec, split_k: int) -> tuple[int, ...]:
    """Shape of the fp32 partials a wgrad variant writes: [split, taps, K] (depthwise), [split, K, taps * C/g]."""
    return (split_k, gspec.taps, gspec.k) if gspec.kind == "depthwise" else (split_k, gspec.k, gspec.taps * gspec.cg)


def wgrad_partials(gspec: BlockSpec, split_k: int, device: torch.device) -> torch.Tensor:
    """The fp32 partial buffer a wgrad variant writes (see wgrad_partials_shape)."""
    return new_buffer(wgrad_partials_shape(gspec, split_k), torch.float32, device)


def wgrad_counters(variant: Variant, device: torch.device) -> torch.Tensor:
    """The zeroed int32 arrival counters of a conv wgrad variant's in-kernel split-K sum, one per output tile: the
    kernel leaves them zeroed, so they come from runtime's per-stream cache (runtime.arrival_counters)."""
    return runtime.arrival_counters(device, variant.grid[0] * variant.grid[1])


def wgrad_sums(gspec: BlockSpec, partials: torch.Tensor) -> torch.Tensor:
    """The fixed-order sum of a wgrad variant's [split, ...] partials: conv kernels leave it in partial 0,
    depthwise partials are summed here."""
    return partials[0] if gspec.kind == "conv" else partials.sum(dim=0)


def wgrad_args(
    gspec: BlockSpec,
    dy: torch.Tensor,
    x: torch.Tensor,
    dw: torch.Tensor,
    ep: EpilogueArgs | None = None,
    z: torch.Tensor | None = None,
    dstats: torch.Tensor | None = None,
    red: torch.Tensor | None = None,
    dres: torch.Tensor | None = None,
    counters: torch.Tensor | None = None,
) -> dict[str, Any]:
    """Kernel arguments of a wgrad variant.

    dw: wgrad_partials(); red: [split, len(plan.reductions), K] fp32 when the plan reduces; dres:
    the channels-last buffer for d residual ('pre'), or None to skip writing it; counters: wgrad_counters()
    (conv only, required there).
    """
    x_cl = channels_last_arg(x.detach(), gspec.x_pixel_stride, "x")  # a view spec reads x in place
    args: dict[str, Any] = {"dy_ptr": _dy_arg(gspec, dy), "x_ptr": x_cl, "dw_ptr": dw, "UPCAST": upcast(dy)}
    if gspec.kind == "conv":
        if counters is None:
            raise ValueError("a conv wgrad variant needs its split-K arrival counters (wgrad_counters)")
        args["cnt_ptr"] = counters
    args.update(_chain_args(gspec, ep or EpilogueArgs(), z, dstats, dy.device))
    if _ep.grad_plan(gspec.epilogue, "wgrad").reductions:
        args["red_ptr"] = red
    if gspec.epilogue.residual:
        args["dres_ptr"] = dres if dres is not None else dy  # never written when STORE_DRES is off
        args["STORE_DRES"] = dres is not None
    return args


def unpack_weight_grad(spec: BlockSpec, dw: torch.Tensor) -> torch.Tensor:
    """Packed weight gradient (conv [K, taps, C/g]; depthwise [taps, K]) -> torch's [K, C/g, *kernel] (a view)."""
    nd = spec.ndim
    if spec.kind == "depthwise":
        return dw.t().reshape(spec.k, 1, *spec.kernel)
    return dw.reshape(spec.k, *spec.kernel, spec.cg).permute(0, nd + 1, *range(1, nd + 1))


def _launch_dgrad(
    spec: BlockSpec,
    dy: torch.Tensor,
    weight: torch.Tensor,
    ep: EpilogueArgs,
    z: torch.Tensor | None,
    dstats: torch.Tensor | None,
    like: torch.Tensor,
    schedule: Schedule | dict | None,
    dy_stride: int | None = None,
) -> torch.Tensor:
    gspec = grad_spec(spec, "dgrad", dy_stride)
    variant = choose_variant(gspec, dy.device, schedule)
    dx = new_channels_last((spec.n, spec.c, *spec.in_size), dy.dtype, dy.device)
    runtime.launch(variant, dgrad_args(gspec, dy, weight, to_channels_last(dx), ep, z, dstats), dy.device)
    return in_format_of(dx, like)


def _launch_wgrad(
    spec: BlockSpec,
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    ep: EpilogueArgs,
    z: torch.Tensor | None,
    dstats: torch.Tensor | None,
    want_dres: bool,
    schedule: Schedule | dict | None,
    dy_stride: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor | None]:
    """(weight gradient, per-channel chain sums by name, d residual for 'pre' or None)."""
    gspec = grad_spec(spec, "wgrad", dy_stride)
    stride = view_stride(x)  # a channel slice of a wider channels-last buffer: addressed in place, not copied
    if stride is not None:
        gspec = gspec.with_(x_pixel_stride=stride)
    plan = _ep.grad_plan(gspec.epilogue, "wgrad")
    variant = choose_variant(gspec, dy.device, schedule)
    split = variant.schedule.split_k
    dw = wgrad_partials(gspec, split, dy.device)
    red = new_buffer((split, len(plan.reductions), spec.k), torch.float32, dy.device) if plan.reductions else None
    dres = new_channels_last((spec.n, spec.k, *spec.out_size), dy.dtype, dy.device) if want_dres else None
    dres_cl = to_channels_last(dres) if dres is not None else None
    cnt = wgrad_counters(variant, dy.device) if gspec.kind == "conv" else None
    runtime.launch(variant, wgrad_args(gspec, dy, x, dw, ep, z, dstats, red, dres_cl, cnt), dy.device)
    # fixed-order sums of the split partials: bitwise reproducible
    grad = unpack_weight_grad(spec, wgrad_sums(gspec, dw)).to(weight.dtype).contiguous()
    sums = dict(zip(plan.reductions, wgrad_sums(gspec, red).unbind(0))) if red is not None else {}
    return grad, sums, (in_format_of(dres, ep.need("residual")) if dres is not None else None)


def _chain_grads_torch(
    spec: BlockSpec, dy: torch.Tensor, ep: EpilogueArgs, z: torch.Tensor | None, needs: Needs
) -> Grads:
    """Chain gradients when no wgrad runs (frozen weight): torch autograd over the reference chain, fp32.

    Without a saved z the chain's parameter gradients do not depend on z (no activation, affine or
    layer scale), so zeros stand in for it.
    """
    shape = (spec.n, spec.k, *spec.out_size)
    if z is None:
        zc = torch.zeros((), dtype=torch.float32, device=dy.device).expand(shape)
    else:
        zc = from_channels_last(z, dy).float()

    def leaf(t: Any, need: bool) -> Any:
        if not isinstance(t, torch.Tensor):
            return t
        return t.detach().float().requires_grad_(need)

    starrelu = ep.starrelu_tensor(dy.device) if spec.epilogue.activation == "starrelu" else None
    inp = dict(
        bias=leaf(ep.bias, needs.bias),
        scale=leaf(ep.scale, needs.scale),
        shift=leaf(ep.shift, needs.shift),
        residual=leaf(ep.residual, needs.residual),
        layer_scale=leaf(ep.layer_scale, needs.layer_scale),
        starrelu=leaf(starrelu, needs.starrelu),
    )
    with torch.enable_grad():
        st = inp["starrelu"]
        y = _ep.apply_torch(
            spec.epilogue,
            zc,
            bias=inp["bias"],
            scale=inp["scale"],
            shift=inp["shift"],
            residual=inp["residual"],
            layer_scale=inp["layer_scale"],
            starrelu_scale=st[0] if st is not None else 1.0,
            starrelu_bias=st[1] if st is not None else 0.0,
        )
        names = [
            n
            for n in ("bias", "scale", "shift", "residual", "layer_scale", "starrelu")
            if getattr(needs, n) and isinstance(inp[n], torch.Tensor)
        ]
        got = torch.autograd.grad(y, [inp[n] for n in names], dy.float(), allow_unused=True)
    out = Grads()
    for n, g in zip(names, got):
        setattr(out, n, g)
    return out


def stats_grad(
    spec: BlockSpec,
    dmean: torch.Tensor | None,
    dvar: torch.Tensor | None,
    mean: torch.Tensor | None,
    device: torch.device,
) -> torch.Tensor:
    """The [3, K] fp32 (d0, d1, d2) with which kernels add the stats' gradient: dz += d0 + d1 * (z - d2).

    mean = sum z / n and var = sum (z - mean)^2 / n give d0 = dmean / n, d1 = 2 dvar / n, d2 = mean:
    z - mean is formed per element, as torch's BatchNorm backward does, so large means never cancel.
    """
    n, k = spec.out_pixels, spec.k

    def vec(t: torch.Tensor | None) -> torch.Tensor:
        if t is None:
            return torch.zeros(k, dtype=torch.float32, device=device)
        return t.detach().to(torch.float32).reshape(k)

    if dvar is not None and mean is None:
        raise ValueError("the variance's gradient needs the forward's batch mean")
    return torch.stack([vec(dmean) / n, vec(dvar) * (2.0 / n), vec(mean if dvar is not None else None)]).contiguous()


def conv_backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    spec: BlockSpec,
    ep: EpilogueArgs,
    z: torch.Tensor | None = None,
    needs: Needs = Needs(),
    dmean: torch.Tensor | None = None,
    dvar: torch.Tensor | None = None,
    mean: torch.Tensor | None = None,
    schedules: dict[str, Schedule | dict] | None = None,
) -> Grads:
    """All requested gradients of y = epilogue(conv(x, weight)) (and of the stats' mean / var).

    spec: the forward spec (make_spec); z: the channels-last pre-epilogue output the forward saved
    (required when kernels.epilogue.saves_z(spec.epilogue)); dmean / dvar: [K] gradients of the
    stats outputs (None = 0), mean: the forward's batch mean of z (required with dvar). schedules:
    optional {"dgrad": ..., "wgrad": ...} overrides of the tuned / default schedules. Gradients come back
    in their tensor's dtype and memory format.
    """
    e = spec.epilogue
    if z is None and _ep.saves_z(e) and (needs.input or needs.weight or needs.chain or e.residual == "pre"):
        raise ValueError("this epilogue's backward needs z, the pre-epilogue output saved by the forward")
    schedules = schedules or {}
    dy_stride = view_stride(dy)  # an aligned channel slice (a concat's gradient): read in place, not copied
    dy_cl = channels_last_arg(dy, dy_stride, "dy")
    dstats = stats_grad(spec, dmean, dvar, mean, dy.device) if e.stats else None
    out = Grads()
    if needs.input:
        out.input = _launch_dgrad(spec, dy_cl, weight, ep, z, dstats, x, schedules.get("dgrad"), dy_stride)
    res_pre = needs.residual and e.residual == "pre"
    if needs.weight:
        out.weight, sums, dres = _launch_wgrad(
            spec, dy_cl, x, weight, ep, z, dstats, res_pre, schedules.get("wgrad"), dy_stride
        )
        if res_pre:
            out.residual = dres
        if "dshift" in sums:
            out.shift = sums["dshift"]
            out.bias = sums["dshift"] * ep.need("scale").float() if e.affine else sums["dshift"]
        out.scale = sums.get("dscale")
        out.layer_scale = sums.get("dlayer_scale")
        if "dstarrelu_scale" in sums:
            out.starrelu = torch.stack([sums["dstarrelu_scale"].sum(), sums["dstarrelu_bias"].sum()])
    elif needs.chain or res_pre:
        chain = _chain_grads_torch(
            spec,
            dy,
            ep,
            z,
            Needs(
                input=False,
                weight=False,
                bias=needs.bias,
                scale=needs.scale,
                shift=needs.shift,
                residual=res_pre,
                layer_scale=needs.layer_scale,
                starrelu=needs.starrelu,
            ),
        )
        for f in ("bias", "scale", "shift", "residual", "layer_scale", "starrelu"):
            setattr(out, f, getattr(chain, f))
    if needs.residual and e.residual == "post":
        out.residual = dy
    # only what was asked for, in the dtype of the tensor it belongs to
    for f in ("bias", "scale", "shift", "layer_scale"):
        g = getattr(out, f)
        setattr(out, f, g.to(ep.need(f).dtype) if getattr(needs, f) and g is not None else None)
    if out.residual is not None and out.residual is not dy:
        out.residual = out.residual.to(ep.need("residual").dtype)
    if not needs.starrelu:
        out.starrelu = None
    return out


# ---- compile-validity examples (kernels.validate) ------------------------------------------------
def example_args(spec: BlockSpec, fwd: dict[str, Any]) -> dict[str, Any]:
    """Kernel arguments of a dgrad/wgrad variant on the meta device (the real builders, no memory)."""
    dt = SPEC_DTYPES[spec.dtype]
    f32 = torch.float32

    def meta(*shape: int, dtype: torch.dtype = dt) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, device="meta")

    e, n, k, out = spec.epilogue, spec.n, spec.k, spec.out_size
    ep = EpilogueArgs(
        bias=meta(k) if e.bias else None,
        scale=meta(k, dtype=f32) if e.affine else None,
        shift=meta(k, dtype=f32) if e.affine else None,
        residual=meta(n, k, *out) if e.residual else None,
        layer_scale=meta(k, dtype=f32) if e.layer_scale else None,
        activation=e.activation,
        residual_mode=e.residual or "post",
    )
    dy, dstats = meta(n, *out, spec.dy_pix)[..., :k], meta(3, k, dtype=f32)  # a view spec's dy: a slice
    if spec.op == "dgrad":
        return dgrad_args(spec, dy, meta(k, spec.cg, *spec.kernel), meta(n, *spec.in_size, spec.c), ep, dy, dstats)
    return wgrad_args(
        spec,
        dy,
        meta(n, spec.c, *spec.in_size),
        meta(1, dtype=f32),
        ep,
        dy,
        dstats,
        red=meta(1, dtype=f32),
        dres=dy if e.residual else None,
        counters=meta(1, dtype=torch.int32),
    )


__all__ = [
    "Grads",
    "Needs",
    "conv_backward",
    "dgrad_args",
    "grad_spec",
    "stats_grad",
    "unpack_weight_grad",
    "wgrad_args",
    "wgrad_counters",
    "wgrad_partials",
    "wgrad_sums",
]
