"""torch.nn.functional.convNd's calling convention: argument normalisation and torch's own checks.

`normalize` accepts what torch accepts (unbatched inputs, one-element tuples, numpy and 0-dim
tensor integers, 'same' / 'valid') and refuses what torch refuses, in torch's order, with torch's
wording and exception types: a caller catching RuntimeError or TypeError around F.conv2d keeps
working. Every error is also a SpecError (a ValueError). tunerd's own extension, padding given as
(low, high) pairs per dim, passes through. What torch accepts but the kernels do not compute
(float64, integer or complex dtypes, an empty batch or channel dim) comes last, as NotSupported
(a NotImplementedError, so also a RuntimeError).

float64 is refused on purpose: every template accumulates in fp32 and reads the epilogue's
per-channel vectors as fp32, so a float64 call would return fp32-accurate numbers under a float64
dtype. Callers that need float64 (gradcheck, numerics references) use torch.nn.functional.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .spec import SpecError, normalize_padding

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def tf_same_padding(
    size: Sequence[int], kernel: Sequence[int], stride: Sequence[int], dilation: Sequence[int]
) -> tuple[tuple[int, int], ...]:
    """TensorFlow's 'SAME' padding of inputs this size, (low, high) per dim, the extra one at the end (timm's
    Conv2dSame and pad_same): outputs ceil(size / stride)."""
    pads = (max((-(-i // s) - 1) * s + (k - 1) * d + 1 - i, 0) for i, k, s, d in zip(size, kernel, stride, dilation))
    return tuple((p // 2, p - p // 2) for p in pads)


def is_timm_class(cls: type, module: str, name: str) -> bool:
    """Whether cls is timm's module.name (or a subclass keeping its forward), told without importing timm."""
    forward = getattr(cls, "forward", None)
    return (getattr(forward, "__module__", ""), getattr(forward, "__qualname__", "")) == (module, f"{name}.forward")


def is_tf_same_conv(cls: type) -> bool:
    """Whether conv modules of class cls pad TensorFlow-'SAME' from each input's size (tf_same_padding; their
    padding attribute says 0): timm's Conv2dSame, or tunerd's twin of it (class attribute _tf_same)."""
    return bool(getattr(cls, "_tf_same", False)) or is_timm_class(cls, "timm.layers.conv2d_same", "Conv2dSame")


class ConvArgumentError(SpecError, RuntimeError):
    """An argument torch's convolution refuses with RuntimeError (same wording)."""


class ConvTypeError(SpecError, TypeError):
    """An argument of a type torch's convolution refuses with TypeError."""


class NotSupported(SpecError, NotImplementedError):
    """A call torch computes but tunerd's kernels do not (see the module docstring)."""


@dataclass(frozen=True)
class ConvArgs:
    """A normalised call: input always batched, per-dim int tuples, padding as (low, high) pairs."""

    input: torch.Tensor
    batched: bool
    stride: tuple[int, ...]
    padding: tuple[tuple[int, int], ...]
    dilation: tuple[int, ...]
    groups: int


def _index(fn: str, name: str, v: Any, what: str = "an int") -> int:
    """An int from anything torch's argument parser takes as one (int, numpy integer, 0-dim int tensor)."""
    if isinstance(v, bool) or (isinstance(v, torch.Tensor) and (v.dim() or v.is_floating_point())):
        raise ConvTypeError(f"{fn}(): argument '{name}' must be {what}, got {v!r}")
    try:
        return operator.index(v)
    except TypeError:
        raise ConvTypeError(f"{fn}(): argument '{name}' must be {what}, got {type(v).__name__} {v!r}") from None


def _int_list(fn: str, name: str, v: Any) -> list[int]:
    what = "an int or a tuple of ints"
    if isinstance(v, (tuple, list)):
        return [_index(fn, name, e, what) for e in v]
    return [_index(fn, name, v, what)]


def _expand(name: str, values: list[int], dim: int) -> tuple[int, ...]:
    """torch's expand_param_if_needed: one value broadcasts; otherwise exactly one per spatial dim."""
    if len(values) == 1:
        return (values[0],) * dim
    if len(values) != dim:
        raise ConvArgumentError(
            f"expected {name} to be a single integer value or a list of {dim} values to match "
            f"the convolution dimensions, but got {name}={values}"
        )
    return tuple(values)


def _sizes(t: torch.Tensor) -> list[int]:
    return list(t.shape)


def _tensor(fn: str, name: str, t: Any, optional: bool = False) -> None:
    if not isinstance(t, torch.Tensor) and not (optional and t is None):
        raise ConvTypeError(f"{fn}(): argument '{name}' must be a torch.Tensor, got {type(t).__name__}")


def normalize(
    ndim: int,
    input: Any,
    weight: Any,
    bias: Any,
    stride: Any,
    padding: Any,
    dilation: Any,
    groups: Any,
    unbatched: bool = True,
) -> ConvArgs:
    """Check a conv{ndim}d call as torch does and return it normalised (unbatched: allow an (ndim+1)-D input)."""
    fn = f"conv{ndim}d"
    _tensor(fn, "input", input)
    _tensor(fn, "weight", weight)
    _tensor(fn, "bias", bias, optional=True)
    stride_l, dilation_l = _int_list(fn, "stride", stride), _int_list(fn, "dilation", dilation)
    groups_i = _index(fn, "groups", groups)
    pairs = None
    if isinstance(padding, str):
        padding_l: list[int] = []
    elif isinstance(padding, (tuple, list)) and padding and all(isinstance(p, (tuple, list)) for p in padding):
        pairs = [tuple(_int_list(fn, "padding", p)) for p in padding]  # tunerd's (low, high) per dim
        if any(len(p) != 2 for p in pairs) or len(pairs) != ndim:
            raise ConvTypeError(f"{fn}(): padding as pairs needs {ndim} (low, high) pairs, got {padding!r}")
        padding_l = [v for p in pairs for v in p]
    else:
        padding_l = _int_list(fn, "padding", padding)

    # batchify (torch.nn.functional.convNd)
    if input.dim() not in (ndim + 1, ndim + 2) or (input.dim() == ndim + 1 and not unbatched):
        want = f"{ndim + 1}D (unbatched) or {ndim + 2}D (batched)" if unbatched else f"{ndim + 2}D (batched)"
        raise ConvArgumentError(f"Expected {want} input to {fn}, but got input of size: {_sizes(input)}")
    batched = input.dim() == ndim + 2
    x = input if batched else input.unsqueeze(0)

    wdim = weight.dim()
    dim = wdim - 2
    if isinstance(padding, str):
        if padding not in ("same", "valid"):
            raise ConvArgumentError(f"Invalid padding string: '{padding}'")
        if padding == "same":  # torch's _convolution_mode checks these first
            if wdim <= 2:
                raise ConvArgumentError("weight should have at least three dimensions")
            if groups_i <= 0:
                raise ConvArgumentError("non-positive groups is not supported")
            if wdim != x.dim():
                raise ConvArgumentError(
                    f"Expected {wdim}-dimensional input for {wdim}-dimensional weight"
                    f"{_sizes(weight)}, but got {x.dim()}-dimensional input of size "
                    f"{_sizes(x)} instead"
                )
            for name, vals in (("stride", stride_l), ("dilation", dilation_l)):
                if len(vals) not in (1, dim):
                    raise ConvArgumentError(f"{name} cannot broadcast to {dim} dimensions")
            if any(s != 1 for s in stride_l):
                raise ConvArgumentError("padding='same' is not supported for strided convolutions")
        padding_l = [0]
    # at::_convolution
    if wdim <= 2:
        raise ConvArgumentError("weight should have at least three dimensions")
    if groups_i <= 0:
        raise ConvArgumentError("non-positive groups is not supported")
    stride_t = _expand("stride", stride_l, dim)
    dilation_t = _expand("dilation", dilation_l, dim)
    if pairs is None:
        pads = _expand("padding", padding_l, dim)
        pad_pairs = tuple((p, p) for p in pads)
    else:
        pad_pairs = tuple((lo, hi) for lo, hi in pairs)
    # check_shape_forward
    if any(v < 0 for p in pad_pairs for v in p):
        raise ConvArgumentError("negative padding is not supported")
    if any(s <= 0 for s in stride_t):
        raise ConvArgumentError("non-positive stride is not supported")
    if any(d <= 0 for d in dilation_t):
        raise ConvArgumentError("dilation should be greater than zero")
    ws = _sizes(weight)
    if wdim != x.dim():
        raise ConvArgumentError(
            f"Expected {wdim}-dimensional input for {wdim}-dimensional weight {ws}, but got "
            f"{x.dim()}-dimensional input of size {_sizes(x)} instead"
        )
    if ws[0] < groups_i:
        raise ConvArgumentError(
            f"Given groups={groups_i}, expected weight to be at least {groups_i} at dimension 0, "
            f"but got weight of size {ws} instead"
        )
    if ws[0] % groups_i:
        raise ConvArgumentError(
            f"Given groups={groups_i}, expected weight to be divisible by {groups_i} at "
            f"dimension 0, but got weight of size {ws} instead"
        )
    if x.shape[1] != ws[1] * groups_i:
        raise ConvArgumentError(
            f"Given groups={groups_i}, weight of size {ws}, expected input{_sizes(x)} to have "
            f"{ws[1] * groups_i} channels, but got {x.shape[1]} channels instead"
        )
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != ws[0]):
        raise ConvArgumentError(
            f"Given weight of size {ws}, expected bias to be 1-dimensional with {ws[0]} "
            f"elements, but got bias of size {_sizes(bias)} instead"
        )
    if padding == "same":
        pad_pairs = normalize_padding("same", tuple(ws[2:]), dilation_t, stride_t)
    padded = [x.shape[2 + i] + sum(pad_pairs[i]) for i in range(dim)]
    spans = [dilation_t[i] * (ws[2 + i] - 1) + 1 for i in range(dim)]
    if any(p < s for p, s in zip(padded, spans)):
        raise ConvArgumentError(
            f"Calculated padded input size per channel: ({' x '.join(map(str, padded))}). "
            f"Kernel size: ({' x '.join(map(str, spans))}). Kernel size can't be greater than "
            f"actual input size"
        )
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and (t.dtype != x.dtype or t.device != x.device):
            raise ConvArgumentError(
                f"Input type ({x.dtype}, {x.device}) and {name} type ({t.dtype}, {t.device}) should be the same"
            )
    # what torch computes but the generated kernels do not
    if x.dtype not in SUPPORTED_DTYPES:
        why = (
            " (the kernels accumulate in fp32; use torch.nn.functional for float64)" if x.dtype == torch.float64 else ""
        )
        raise NotSupported(f"{fn}: input dtype {x.dtype} is not supported; use float32, float16 or bfloat16{why}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise NotSupported(f"{fn}: an empty batch or channel dimension is not supported, got input of size {_sizes(x)}")
    return ConvArgs(input=x, batched=batched, stride=stride_t, padding=pad_pairs, dilation=dilation_t, groups=groups_i)
