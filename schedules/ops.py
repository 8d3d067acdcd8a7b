"""Op bindings: how the harness feeds, runs and checks each pass (fwd, dgrad, wgrad).

An OpBinding maps a variant to fresh random inputs, a NaN-poisoned output buffer, the kernel's
arguments, the kernel's result in the reference's layout, and the float64 torch reference.
Backward passes (kernels.backward's dgrad/wgrad templates) are bound for specs whose gradient
chain is plain (no epilogue parameters for the kernel to read): their kernels then take only
dy, the weight or input, and the gradient buffer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from tunerd.kernels import backward as _bwd
from tunerd.kernels import conv as _conv
from tunerd.kernels import reference
from tunerd.kernels.generator import Variant
from tunerd.kernels.spec import BlockSpec, Epilogue, SpecError

Inputs = dict[str, Any]


@dataclass(frozen=True)
class OpBinding:
    make_inputs: Callable[[BlockSpec, torch.device, torch.Generator], Inputs]
    output: Callable[[Variant, Inputs], torch.Tensor]  # NaN-poisoned buffer the kernel writes
    kernel_args: Callable[[Variant, Inputs, torch.Tensor], dict[str, Any]]
    result: Callable[[Variant, Inputs, torch.Tensor], torch.Tensor]  # buffer -> reference layout
    reference: Callable[[BlockSpec, Inputs], torch.Tensor]  # float64
    validate: Callable[[BlockSpec], None] = lambda spec: None  # SpecError if the binding cannot feed spec


OPS: dict[str, OpBinding] = {}


def register(op: str, binding: OpBinding) -> None:
    OPS[op] = binding


def binding(op: str) -> OpBinding:
    b = OPS.get(op)
    if b is None:
        raise SpecError(f"the harness cannot measure op {op!r}: bound ops are {sorted(OPS)}")
    return b


def check(spec: BlockSpec) -> None:
    """SpecError unless the harness can feed and gate spec's op."""
    binding(spec.op).validate(spec)


def torch_dtype(spec: BlockSpec) -> torch.dtype:
    return _conv.SPEC_DTYPES[spec.dtype]


def randn(gen: torch.Generator, shape: tuple[int, ...], device: torch.device, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(shape, generator=gen, device=device) * scale


def poisoned(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An output buffer full of NaN: any element the kernel fails to write fails the gate."""
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def epilogue_inputs(spec: BlockSpec, device: torch.device, gen: torch.Generator) -> Inputs:
    """Random tensors for every epilogue feature of spec (channels-first residual)."""
    e = spec.epilogue
    dt = torch_dtype(spec)
    out: Inputs = {}
    if e.bias:
        out["bias"] = randn(gen, (spec.k,), device).to(dt)
    if e.affine:
        out["scale"] = torch.rand((spec.k,), generator=gen, device=device) + 0.5
        out["shift"] = randn(gen, (spec.k,), device)
    if e.residual:
        out["residual"] = randn(gen, (spec.n, spec.k, *spec.out_size), device).to(dt)
    if e.layer_scale:
        out["layer_scale"] = randn(gen, (spec.k,), device)
    if e.activation == "starrelu":
        out["starrelu_scale"], out["starrelu_bias"] = 0.8944, -0.4472
    return out


def epilogue_args(spec: BlockSpec, inp: Inputs) -> _conv.EpilogueArgs:
    return _conv.EpilogueArgs(
        bias=inp.get("bias"),
        scale=inp.get("scale"),
        shift=inp.get("shift"),
        residual=inp.get("residual"),
        layer_scale=inp.get("layer_scale"),
        activation=spec.epilogue.activation,
        residual_mode=spec.epilogue.residual or "post",
        starrelu_scale=inp.get("starrelu_scale", 1.0),
        starrelu_bias=inp.get("starrelu_bias", 0.0),
    )


def reference_epilogue(inp: Inputs) -> dict[str, Any]:
    keys = ("bias", "scale", "shift", "residual", "layer_scale", "starrelu_scale", "starrelu_bias")
    return {k: inp[k] for k in keys if k in inp}


# ---- forward --------------------------------------------------------------------------
def _fwd_inputs(spec: BlockSpec, device: torch.device, gen: torch.Generator) -> Inputs:
    """x (and the residual) as channel slices of wider buffers where the spec has their pixel strides."""
    dt = torch_dtype(spec)
    x = _conv.in_wider_buffer(randn(gen, (spec.n, spec.c, *spec.in_size), device).to(dt), spec.x_pixel_stride)
    w = randn(gen, (spec.k, spec.cg, *spec.kernel), device, scale=(spec.cg * spec.taps) ** -0.5).to(dt)
    inp = {"x": x, "w": w, **epilogue_inputs(spec, device, gen)}
    if "residual" in inp:
        inp["residual"] = _conv.in_wider_buffer(inp["residual"], spec.res_pixel_stride)
    return inp


def _fwd_output(v: Variant, inp: Inputs) -> torch.Tensor:
    spec = v.spec
    return poisoned((spec.n, *spec.out_size, spec.out_pix), torch_dtype(spec), inp["x"].device)[..., : spec.k]


def _fwd_args(v: Variant, inp: Inputs, out: torch.Tensor) -> dict[str, Any]:
    return _conv.forward_args(v.spec, inp["x"], inp["w"], epilogue_args(v.spec, inp), out, schedule=v.schedule)


def _fwd_result(v: Variant, inp: Inputs, out: torch.Tensor) -> torch.Tensor:
    return _conv.from_channels_last(out, inp["x"])


def _fwd_reference(spec: BlockSpec, inp: Inputs) -> torch.Tensor:
    return reference.conv(spec, inp["x"], inp["w"], **reference_epilogue(inp))


register("fwd", OpBinding(_fwd_inputs, _fwd_output, _fwd_args, _fwd_result, _fwd_reference))


# ---- backward (plain gradient chain) ----------------------------------------------------
def _plain_chain(spec: BlockSpec) -> None:
    if spec.epilogue != Epilogue():
        raise SpecError(
            f"the harness gates {spec.op} variants whose gradient chain is plain; this spec's epilogue "
            f"{spec.epilogue} gives the kernel chain arguments it does not bind"
        )


def _forward_of(spec: BlockSpec) -> BlockSpec:
    return spec.with_(op="fwd", dy_pixel_stride=None)


def _bwd_inputs(spec: BlockSpec, device: torch.device, gen: torch.Generator) -> Inputs:
    """The forward's inputs and dy (a channel slice of a wider gradient where the spec has its pixel stride)."""
    inp = _fwd_inputs(_forward_of(spec), device, gen)
    dy = randn(gen, (spec.n, spec.k, *spec.out_size), device).to(torch_dtype(spec))
    inp["dy"] = _conv.in_wider_buffer(dy, spec.dy_pixel_stride)
    return inp


def _bwd_reference(spec: BlockSpec, inp: Inputs) -> torch.Tensor:
    """d(sum(conv(x, w) * dy)) / dx or / dw in float64."""
    x = inp["x"].to(torch.float64).requires_grad_(spec.op == "dgrad")
    w = inp["w"].to(torch.float64).requires_grad_(spec.op == "wgrad")
    with torch.enable_grad():
        y = reference.conv(_forward_of(spec), x, w)
        (grad,) = torch.autograd.grad(y, [x if spec.op == "dgrad" else w], inp["dy"].to(torch.float64))
    return grad


def _dy_arg(spec: BlockSpec, inp: Inputs) -> torch.Tensor:
    return _conv.channels_last_arg(inp["dy"], spec.dy_pixel_stride, "dy")


def _dgrad_output(v: Variant, inp: Inputs) -> torch.Tensor:
    spec = v.spec
    return poisoned((spec.n, *spec.in_size, spec.c), torch_dtype(spec), inp["x"].device)


def _dgrad_args(v: Variant, inp: Inputs, out: torch.Tensor) -> dict[str, Any]:
    return _bwd.dgrad_args(v.spec, _dy_arg(v.spec, inp), inp["w"], out)


def _wgrad_output(v: Variant, inp: Inputs) -> torch.Tensor:
    return poisoned(_bwd.wgrad_partials_shape(v.spec, v.schedule.split_k), torch.float32, inp["x"].device)


def _wgrad_args(v: Variant, inp: Inputs, out: torch.Tensor) -> dict[str, Any]:
    cnt = _bwd.wgrad_counters(v, out.device) if v.spec.kind == "conv" else None
    return _bwd.wgrad_args(v.spec, _dy_arg(v.spec, inp), inp["x"], out, counters=cnt)


def _wgrad_result(v: Variant, inp: Inputs, out: torch.Tensor) -> torch.Tensor:
    """The partials' sum, unpacked to torch's [K, C/g, *kernel]."""
    return _bwd.unpack_weight_grad(v.spec, _bwd.wgrad_sums(v.spec, out))


register("dgrad", OpBinding(_bwd_inputs, _dgrad_output, _dgrad_args, _fwd_result, _bwd_reference, _plain_chain))
register("wgrad", OpBinding(_bwd_inputs, _wgrad_output, _wgrad_args, _wgrad_result, _bwd_reference, _plain_chain))
