"""BlockSpec: what one kernel computes. Frozen, hashable, canonical JSON is the lookup key."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from functools import lru_cache
from typing import Any

ACTIVATIONS = ("relu", "relu6", "silu", "gelu", "gelu_tanh", "hardswish", "sigmoid", "leaky_relu", "starrelu")
DTYPES = ("float32", "float16", "bfloat16")
KINDS = ("conv", "depthwise")  # implicit GEMM | direct per-channel kernel
OPS = ("fwd", "dgrad", "wgrad")
RESIDUAL = (None, "pre", "post")  # residual added before or after the activation
PRECISIONS = ("ieee", "tf32")  # fp32 tl.dot math; ignored for fp16/bf16


def canonical_json(value: Any) -> str:
    """Canonical JSON: sorted keys, no spaces. Equal values give equal strings (what the store keys by)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


class Canonical:
    """to_json / key / digest for a frozen description that defines to_dict(). The JSON is computed once per
    instance (the hot path keys caches and stores by it): a subclass must not change after __post_init__."""

    to_dict: Callable[[], dict[str, Any]]

    def to_json(self) -> str:
        memo = self.__dict__
        text = memo.get("_canonical_json")
        if text is None:
            text = memo["_canonical_json"] = canonical_json(self.to_dict())  # frozen: write the dict itself
        return text

    @property
    def key(self) -> str:
        return self.to_json()

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:16]


class SpecError(ValueError):
    """A malformed or unsupported block description."""


@dataclass(frozen=True)
class Epilogue:
    """Fused output chain, applied in this order to the fp32 accumulator:

    acc (+ bias) (* scale + shift) (+ residual if 'pre') -> activation (* gamma) (+ residual if 'post')

    ResNet's relu(bn(conv(x)) + identity) is affine + residual='pre' + relu;
    ConvNeXt's identity + gamma * conv(x) is layer_scale + residual='post'.

    Two training options (forward specs) change what else a kernel writes, not y:
    save_z stores the pre-epilogue conv output z for the backward kernels; stats emits per-tile,
    per-channel mean and M2 of z (BatchNorm batch statistics, merged on the host); stats_only (with stats,
    an identity chain) writes those statistics and nothing else. On dgrad/wgrad specs the chain
    names the forward epilogue whose gradient the kernel applies to dy as it loads it, and stats
    adds the gradients of those statistics.
    """

    bias: bool = False
    affine: bool = False  # per-channel scale/shift: a folded eval BatchNorm
    activation: str | None = None
    residual: str | None = None
    layer_scale: bool = False  # per-channel gamma
    stats: bool = False  # per-channel mean and M2 (sum of squared deviations) of z, per tile
    save_z: bool = False  # also store z (forward of a training step)
    stats_only: bool = False  # with stats: only the statistics, no output y (the kernel takes no out_ptr)

    def __post_init__(self) -> None:
        if self.activation is not None and self.activation not in ACTIVATIONS:
            raise SpecError(f"unknown activation {self.activation!r}; expected one of {ACTIVATIONS}")
        if self.residual not in RESIDUAL:
            raise SpecError(f"residual must be None, 'pre' or 'post', got {self.residual!r}")
        for name in ("bias", "affine", "layer_scale", "stats", "save_z", "stats_only"):
            if not isinstance(getattr(self, name), bool):
                raise SpecError(f"epilogue.{name} must be a bool")
        if self.stats_only and not (self.stats and self.is_identity and not self.save_z):
            raise SpecError("epilogue.stats_only needs stats, no save_z and an identity chain (nothing else is stored)")

    @property
    def is_identity(self) -> bool:
        """y == z: nothing applied to the conv output (stats may still be gathered)."""
        return not (self.bias or self.affine or self.activation or self.residual or self.layer_scale)

    def to_dict(self) -> dict[str, Any]:
        """Field dict; the training flags appear only when set, so inference keys never change."""
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        for name in _OPTIONAL_FLAGS:
            if not d[name]:
                del d[name]
        return d


_OPTIONAL_FLAGS = ("stats", "save_z", "stats_only")


def _ints(name: str, value: Any, ndim: int) -> tuple[int, ...]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value,) * ndim
    if not isinstance(value, (tuple, list)) or len(value) != ndim:
        raise SpecError(f"{name} must be an int or a sequence of {ndim} ints, got {value!r}")
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise SpecError(f"{name} must hold ints, got {value!r}")
    return tuple(int(v) for v in value)


@dataclass(frozen=True)
class BlockSpec(Canonical):
    """One convolution instance (any of conv1d/2d/3d), its pass and its fused epilogue.

    Shapes follow torch: input [n, c, *in_size], weight [k, c // groups, *kernel].
    padding holds (low, high) per spatial dim, so 'same' with even kernels and causal
    padding are exact. Kernels read and write channels-last tensors (layout).

    Pixel strides: elements between adjacent pixels of x, the output and the residual (forward; wgrad: x) and of
    dy (dgrad, wgrad) when they are channel slices of wider channels-last buffers (a split's chunk, one branch of
    a concat, its gradient). None is the dense stride (c for x, k for the others); a dense value is stored as
    None, so dense specs keep their canonical JSON.
    """

    kind: str
    n: int
    c: int
    k: int
    in_size: tuple[int, ...]
    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[tuple[int, int], ...]
    dilation: tuple[int, ...]
    groups: int = 1
    dtype: str = "float32"
    epilogue: Epilogue = field(default_factory=Epilogue)
    op: str = "fwd"
    layout: str = "channels_last"
    precision: str = "ieee"
    x_pixel_stride: int | None = None
    out_pixel_stride: int | None = None
    res_pixel_stride: int | None = None
    dy_pixel_stride: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise SpecError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if self.op not in OPS:
            raise SpecError(f"op must be one of {OPS}, got {self.op!r}")
        if self.dtype not in DTYPES:
            raise SpecError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.layout != "channels_last":
            raise SpecError(f"only the channels_last layout is generated, got {self.layout!r}")
        if self.precision not in PRECISIONS:
            raise SpecError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if not isinstance(self.epilogue, Epilogue):
            raise SpecError("epilogue must be an Epilogue")
        if self.epilogue.save_z and self.op != "fwd":
            raise SpecError("epilogue.save_z is a forward option; backward specs must not set it")
        nd = len(self.in_size) if isinstance(self.in_size, (tuple, list)) else -1
        if nd not in (1, 2, 3):
            raise SpecError(f"in_size must have 1, 2 or 3 spatial dims, got {self.in_size!r}")
        for name in ("in_size", "kernel", "stride", "dilation"):
            object.__setattr__(self, name, _ints(name, getattr(self, name), nd))
        pad = self.padding
        if not isinstance(pad, (tuple, list)) or len(pad) != nd:
            raise SpecError(f"padding must hold {nd} (low, high) pairs, got {pad!r}")
        object.__setattr__(self, "padding", tuple(_ints("padding pair", p, 2) for p in pad))
        for name in ("n", "c", "k", "groups"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise SpecError(f"{name} must be a positive int, got {v!r}")
        if any(v < 1 for v in self.in_size + self.kernel + self.stride + self.dilation):
            raise SpecError("sizes, kernel, stride and dilation must be >= 1")
        if any(v < 0 for p in self.padding for v in p):
            raise SpecError(f"padding must be >= 0, got {self.padding}")
        if self.c % self.groups or self.k % self.groups:
            raise SpecError(
                f"in_channels ({self.c}) and out_channels ({self.k}) must both be divisible by groups ({self.groups})"
            )
        if self.kind == "depthwise" and self.groups != self.c:
            raise SpecError("a depthwise spec needs groups == in_channels")
        self._check_pixel_strides()
        for i in range(nd):
            span = self.dilation[i] * (self.kernel[i] - 1) + 1
            padded = self.in_size[i] + sum(self.padding[i])
            if span > padded:
                raise SpecError(
                    f"kernel extent {span} (kernel {self.kernel[i]}, dilation {self.dilation[i]}) is larger than "
                    f"the padded input {padded} along spatial dim {i}"
                )

    def _check_pixel_strides(self) -> None:
        if self.epilogue.stats_only and self.op != "fwd":
            raise SpecError("epilogue.stats_only is a forward option; backward specs must not set it")
        for name, dense in (
            ("x_pixel_stride", self.c),
            ("out_pixel_stride", self.k),
            ("res_pixel_stride", self.k),
            ("dy_pixel_stride", self.k),
        ):
            v = getattr(self, name)
            if v is None:
                continue
            if not isinstance(v, int) or isinstance(v, bool):
                raise SpecError(f"{name} must be an int or None, got {v!r}")
            if v < dense:
                raise SpecError(f"{name} {v} is smaller than the {dense} channels it holds (pixels would overlap)")
            if name == "dy_pixel_stride" and self.op == "fwd":
                raise SpecError("dy_pixel_stride is a backward option (dgrad and wgrad read dy)")
            read = ("dy_pixel_stride", "x_pixel_stride") if self.op == "wgrad" else ("dy_pixel_stride",)
            if self.op != "fwd" and name not in read:
                raise SpecError(f"{name} is a forward option (backward kernels read dy's; wgrad reads x's)")
            if name == "res_pixel_stride" and not self.epilogue.residual:
                raise SpecError("res_pixel_stride needs an epilogue with a residual")
            if name == "out_pixel_stride" and self.epilogue.stats_only:
                raise SpecError("out_pixel_stride with epilogue.stats_only: there is no output")
            if v == dense:
                object.__setattr__(self, name, None)  # the dense stride: one spec, one key

    # ---- derived shapes -------------------------------------------------------------
    @property
    def x_pix(self) -> int:
        """Elements between adjacent input pixels (c unless x is a channel slice)."""
        return self.x_pixel_stride or self.c

    @property
    def out_pix(self) -> int:
        """Elements between adjacent output pixels (k unless the output is a channel slice)."""
        return self.out_pixel_stride or self.k

    @property
    def res_pix(self) -> int:
        """Elements between adjacent residual pixels (k unless the residual is a channel slice)."""
        return self.res_pixel_stride or self.k

    @property
    def dy_pix(self) -> int:
        """Elements between adjacent pixels of dy (k unless dy is a channel slice of a wider gradient)."""
        return self.dy_pixel_stride or self.k

    @property
    def pixel_strides(self) -> dict[str, int | None]:
        """The pixel stride of each tensor that may be a channel slice (x, out, res, dy); None where dense."""
        return {name.removesuffix("_pixel_stride"): getattr(self, name) for name in _OPTIONAL_FIELDS}

    @property
    def is_view(self) -> bool:
        """Whether any tensor is addressed with a non-dense pixel stride."""
        return any(getattr(self, name) for name in _OPTIONAL_FIELDS)

    def dense(self) -> BlockSpec:
        """The same conv on dense buffers (what a view's schedule is tuned for)."""
        dense: dict[str, Any] = dict.fromkeys(_OPTIONAL_FIELDS)
        return replace(self, **dense) if self.is_view else self

    @property
    def spanned_per_image(self) -> int:
        """The largest element span one image of any tensor covers (a view's spans its wider buffer's pixels)."""
        out = _prod(self.out_size) * max(self.out_pix, self.res_pix if self.epilogue.residual else 0, self.dy_pix)
        return max(_prod(self.in_size) * self.x_pix, out)

    @property
    def spanned_elements(self) -> int:
        """The largest element span any tensor's addressing covers: n * spanned_per_image."""
        return self.n * self.spanned_per_image

    @property
    def ndim(self) -> int:
        return len(self.in_size)

    @property
    def out_size(self) -> tuple[int, ...]:
        return tuple(
            (self.in_size[i] + sum(self.padding[i]) - self.dilation[i] * (self.kernel[i] - 1) - 1) // self.stride[i] + 1
            for i in range(self.ndim)
        )

    @property
    def cg(self) -> int:
        return self.c // self.groups

    @property
    def kg(self) -> int:
        return self.k // self.groups

    @property
    def taps(self) -> int:
        return _prod(self.kernel)

    @property
    def out_pixels(self) -> int:
        return self.n * _prod(self.out_size)

    @property
    def phases(self) -> int:
        """Stride phases of dgrad: input pixels split by residue per stride."""
        return _prod(self.stride)

    @property
    def phase_pixels(self) -> int:
        """Input pixels of dgrad's largest stride phase: n * prod(ceil(in / stride))."""
        return self.n * _prod(tuple(-(-i // s) for i, s in zip(self.in_size, self.stride)))

    @property
    def has_padding(self) -> bool:
        return any(v for p in self.padding for v in p)

    def gemm_shape(self) -> tuple[int, int, int]:
        """(M, N, K) of the per-group GEMM view of the forward pass."""
        return self.out_pixels, self.kg, self.cg * self.taps

    @property
    def flops(self) -> int:
        return 2 * self.out_pixels * self.k * self.cg * self.taps

    @property
    def itemsize(self) -> int:
        return 4 if self.dtype == "float32" else 2

    @property
    def min_bytes(self) -> int:
        """Compulsory traffic: read input and weight once, write output (and read residual) once."""
        x = self.n * self.c * _prod(self.in_size)
        w = self.k * self.cg * self.taps
        y = self.out_pixels * self.k
        extra = y if self.epilogue.residual else 0
        return (x + w + y + extra) * self.itemsize

    # ---- identity ---------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, Epilogue):
                v = v.to_dict()
            elif isinstance(v, tuple):
                v = [list(p) if isinstance(p, tuple) else p for p in v]
            d[f.name] = v
        for name in _OPTIONAL_FIELDS:
            if d[name] is None:
                del d[name]
        return d

    @classmethod
    def from_dict(cls, d: Any) -> BlockSpec:
        if not isinstance(d, dict):
            raise SpecError(f"a spec must be a JSON object, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise SpecError(f"unknown spec fields: {sorted(unknown)}")
        missing = {"kind", "n", "c", "k", "in_size", "kernel", "stride", "padding", "dilation"} - set(d)
        if missing:
            raise SpecError(f"missing spec fields: {sorted(missing)}")
        d = dict(d)
        ep = d.get("epilogue", {})
        if not isinstance(ep, dict):
            raise SpecError("epilogue must be a JSON object")
        ep_known = {f.name for f in fields(Epilogue)}
        if set(ep) - ep_known:
            raise SpecError(f"unknown epilogue fields: {sorted(set(ep) - ep_known)}")
        d["epilogue"] = Epilogue(**ep)
        for name in ("in_size", "kernel", "stride", "dilation"):
            if isinstance(d[name], list):
                d[name] = tuple(d[name])
        if isinstance(d["padding"], list):
            d["padding"] = tuple(tuple(p) if isinstance(p, list) else p for p in d["padding"])
        try:
            return cls(**d)
        except TypeError as e:  # wrong value types that dataclass init itself rejects
            raise SpecError(str(e)) from None

    @classmethod
    def from_json(cls, text: str) -> BlockSpec:
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise SpecError(f"spec is not valid JSON: {e}") from None
        return cls.from_dict(d)

    def with_(self, **changes: Any) -> BlockSpec:
        return replace(self, **changes)

    def describe(self) -> str:
        dims = "x".join(map(str, self.kernel))
        size = "x".join(map(str, self.in_size))
        s = f"{self.kind}{self.ndim}d {self.op} n{self.n} c{self.c}->k{self.k} @{size} k{dims}"
        if any(v != 1 for v in self.stride):
            s += " s" + "x".join(map(str, self.stride))
        if any(v != 1 for v in self.dilation):
            s += " d" + "x".join(map(str, self.dilation))
        if self.groups != 1:
            s += f" g{self.groups}"
        views = [f"{t}/{p}" for t, p in self.pixel_strides.items() if p]
        if views:
            s += " pixel-strides " + ",".join(views)
        return s + f" {self.dtype}"


_OPTIONAL_FIELDS = ("x_pixel_stride", "out_pixel_stride", "res_pixel_stride", "dy_pixel_stride")  # in JSON when set


def _prod(xs: tuple[int, ...]) -> int:
    out = 1
    for v in xs:
        out *= v
    return out


def normalize_padding(
    padding: Any, kernel: tuple[int, ...], dilation: tuple[int, ...], stride: tuple[int, ...]
) -> tuple[tuple[int, int], ...]:
    """torch padding (int, tuple, 'same', 'valid') -> (low, high) per dim.

    'same' pads total d*(k-1) with the extra element on the high side, as torch does.
    """
    nd = len(kernel)
    if isinstance(padding, str):
        if padding == "valid":
            return ((0, 0),) * nd
        if padding == "same":
            if any(s != 1 for s in stride):
                raise SpecError("padding='same' is not supported for strided convolutions (as in torch)")
            out = []
            for k, d in zip(kernel, dilation):
                total = d * (k - 1)
                out.append((total // 2, total - total // 2))
            return tuple(out)
        raise SpecError(f"padding string must be 'same' or 'valid', got {padding!r}")
    if isinstance(padding, (tuple, list)) and len(padding) == nd and all(isinstance(p, (tuple, list)) for p in padding):
        pairs = [_ints("padding pair", p, 2) for p in padding]
        return tuple((lo, hi) for lo, hi in pairs)
    return tuple((p, p) for p in _ints("padding", padding, nd))


def conv_spec(
    *,
    n: int,
    c: int,
    k: int,
    in_size: tuple[int, ...],
    kernel: Any,
    stride: Any = 1,
    padding: Any = 0,
    dilation: Any = 1,
    groups: int = 1,
    dtype: str = "float32",
    epilogue: Epilogue | None = None,
    op: str = "fwd",
    precision: str = "ieee",
) -> BlockSpec:
    """Build a spec from torch-style arguments; picks the depthwise kind when groups == c. Cached when every
    argument is exact (ints, not bools; tuples, not lists): conv calls on the hot path build the same few specs."""
    args = (n, c, k, in_size, kernel, stride, padding, dilation, groups, dtype, epilogue or Epilogue(), op, precision)
    return _cached_spec(*args) if _exact(args) else _build_spec(*args)


def _exact(value: Any) -> bool:
    """Whether value is made of exact ints, strings, Epilogues and tuples only: equal only to itself as a cache
    key (True == 1 and [1] is unhashable; a bool or a list must reach the checks)."""
    t = type(value)
    if t is tuple:
        return all(_exact(v) for v in value)
    return t is int or t is str or t is Epilogue


def _build_spec(
    n: int,
    c: int,
    k: int,
    in_size: Any,
    kernel: Any,
    stride: Any,
    padding: Any,
    dilation: Any,
    groups: int,
    dtype: str,
    epilogue: Epilogue,
    op: str,
    precision: str,
) -> BlockSpec:
    nd = len(in_size)
    kernel_t = _ints("kernel_size", kernel, nd)
    stride_t = _ints("stride", stride, nd)
    dilation_t = _ints("dilation", dilation, nd)
    pad = normalize_padding(padding, kernel_t, dilation_t, stride_t)
    kind = "depthwise" if groups == c and groups > 1 else "conv"
    return BlockSpec(
        kind=kind,
        n=n,
        c=c,
        k=k,
        in_size=tuple(in_size),
        kernel=kernel_t,
        stride=stride_t,
        padding=pad,
        dilation=dilation_t,
        groups=groups,
        dtype=dtype,
        epilogue=epilogue,
        op=op,
        precision=precision,
    )


_cached_spec = lru_cache(maxsize=8192)(_build_spec)
