"""Shared forward-correctness machinery: random inputs, poisoned outputs, float64 oracle."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from hypothesis import strategies as st

from tunerd.kernels import reference
from tunerd.kernels.conv import EpilogueArgs, conv_forward
from tunerd.kernels.spec import BlockSpec, Epilogue, conv_spec

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class Case:
    ndim: int
    c: int
    k: int
    size: tuple
    kernel: Any
    stride: Any = 1
    padding: Any = 0
    dilation: Any = 1
    groups: int = 1
    n: int = 2
    epilogue: dict = field(default_factory=dict)

    def __str__(self) -> str:  # readable test ids
        ep = ",".join(f"{k}={v}" for k, v in self.epilogue.items())
        return (
            f"{self.ndim}d-c{self.c}k{self.k}-{'x'.join(map(str, self.size))}-k{self.kernel}-s{self.stride}"
            f"-p{self.padding}-d{self.dilation}-g{self.groups}" + (f"-[{ep}]" if ep else "")
        )


def make_inputs(spec: BlockSpec, dtype: torch.dtype, device: str) -> dict[str, Any]:
    e = spec.epilogue
    x = torch.randn(spec.n, spec.c, *spec.in_size, device=device).to(dtype)
    w = (torch.randn(spec.k, spec.cg, *spec.kernel, device=device) / (spec.cg * spec.taps) ** 0.5).to(dtype)
    out_shape = (spec.n, spec.k, *spec.out_size)
    inp: dict[str, Any] = {"x": x, "w": w}
    if e.bias:
        inp["bias"] = torch.randn(spec.k, device=device).to(dtype)
    if e.affine:
        inp["scale"] = torch.rand(spec.k, device=device) + 0.5
        inp["shift"] = torch.randn(spec.k, device=device)
    if e.residual:
        inp["residual"] = torch.randn(out_shape, device=device).to(dtype)
    if e.layer_scale:
        inp["layer_scale"] = torch.randn(spec.k, device=device)
    if e.activation == "starrelu":
        inp["starrelu_scale"], inp["starrelu_bias"] = 0.8944, -0.4472
    return inp


def spec_of(case: Case, dtype: str) -> BlockSpec:
    ep = Epilogue(**case.epilogue)
    return conv_spec(
        n=case.n,
        c=case.c,
        k=case.k,
        in_size=case.size,
        kernel=case.kernel,
        stride=case.stride,
        padding=case.padding,
        dilation=case.dilation,
        groups=case.groups,
        dtype=dtype,
        epilogue=ep,
    )


def run_case(case: Case, dtype: str, device: str = "cpu", schedule=None, channels_last_input: bool = False) -> float:
    """Run the generated kernel into a NaN-poisoned buffer; return its relative error vs float64 torch."""
    spec = spec_of(case, dtype)
    inp = make_inputs(spec, DTYPES[dtype], device)
    x = inp["x"]
    if channels_last_input and case.ndim in (2, 3):
        x = x.to(memory_format=torch.channels_last if case.ndim == 2 else torch.channels_last_3d)
    ep = EpilogueArgs(
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
    buf = torch.full((spec.n, *spec.out_size, spec.k), float("nan"), dtype=DTYPES[dtype], device=device)
    y = conv_forward(
        x, inp["w"], case.ndim, case.stride, case.padding, case.dilation, case.groups, ep, schedule=schedule, out=buf
    )
    ref = reference.conv(
        spec,
        inp["x"],
        inp["w"],
        bias=inp.get("bias"),
        scale=inp.get("scale"),
        shift=inp.get("shift"),
        residual=inp.get("residual"),
        layer_scale=inp.get("layer_scale"),
        starrelu_scale=inp.get("starrelu_scale", 1.0),
        starrelu_bias=inp.get("starrelu_bias", 0.0),
    )
    assert y.shape == ref.shape
    return reference.rel_error(y, ref)


@st.composite
def random_case(
    draw, *, groups=(1, 2, 4), cg=(1, 3, 8, 16, 20), max_kernel=(5, 5, 3), max_size=(9, 9, 5), epilogues=({},)
) -> Case:
    """A hypothesis-drawn conv of any family: ndim 1-3, dense/grouped/depthwise (with channel multiplier),
    any stride, dilation and asymmetric padding, sizes kept legal (the window fits the padded input)."""
    ndim = draw(st.integers(1, 3))
    depthwise = draw(st.booleans())
    g = draw(st.sampled_from(groups))
    c = draw(st.sampled_from(cg)) * g
    if depthwise:
        g, k = c, c * draw(st.sampled_from([1, 2]))
    else:
        k = g * draw(st.sampled_from([4, 16, 24]))
    kernel = tuple(draw(st.integers(1, max_kernel[ndim - 1])) for _ in range(ndim))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(ndim))
    stride = tuple(draw(st.integers(1, 3)) for _ in range(ndim))
    padding = tuple((draw(st.integers(0, 2)), draw(st.integers(0, 2))) for _ in range(ndim))
    size = tuple(
        max(draw(st.integers(1, max_size[ndim - 1])), (kernel[i] - 1) * dilation[i] + 1 - sum(padding[i]))
        for i in range(ndim)
    )
    ep = draw(st.sampled_from(list(epilogues)))
    return Case(ndim, c, k, size, kernel, stride, padding, dilation, g, n=draw(st.integers(1, 2)), epilogue=ep)
