"""Forward convolution entry: validate torch arguments, build the spec, pack, launch.

Public API of the generator for any convolution (1d/2d/3d, dense, grouped, depthwise) with
its fused epilogue. kernels.autograd wraps it (and kernels.backward) for training.

BatchNorm train mode: `conv_forward(..., stats=True)` also returns the per-channel mean and biased
variance (fp32, [K]) of the pre-epilogue conv output z, gathered by the same kernel from its fp32
accumulator, so batch statistics need no second read: each output tile writes its per-channel mean
and M2 (sum of squared deviations), which combine_moments merges in fixed order (deterministic).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Collection
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Any

import torch
from torch.utils.weak import WeakIdKeyDictionary

from . import convargs, generator, runtime, space_to_depth
from .schedule import Schedule
from .spec import BlockSpec, Epilogue, SpecError, conv_spec

TORCH_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
SPEC_DTYPES = {v: k for k, v in TORCH_DTYPES.items()}

# Tuned-kernel lookup installed by the product layer (tunerd); kernels never import it. It
# answers a Schedule (rendered here), a Variant (rendered by this process: a source from a store or
# server is only ever a claim checked by kernels.trust), or None.
ScheduleLookup = Callable[[BlockSpec, torch.device], "Schedule | generator.Variant | None"]
_lookup: ScheduleLookup | None = None


def set_schedule_lookup(fn: ScheduleLookup | None) -> None:
    """Install the function that returns a tuned schedule or variant for (spec, device), or None."""
    global _lookup
    _lookup = fn


def schedule_lookup() -> ScheduleLookup | None:
    """The installed lookup (None: every conv runs its default schedule)."""
    return _lookup


# Per layer (spec without its batch size, device): the largest batch seen and the schedule it ran. A smaller
# batch of the same layer (a ragged last batch) with no answer of its own reuses that schedule, so it runs
# the same source and compiled kernel (the batch size is a launch argument) instead of its own default.
_LAYERS_KEPT = 4096
_layers: OrderedDict[tuple[str, str], tuple[int, Schedule]] = OrderedDict()
_layers_lock = threading.Lock()


def choose_variant(spec: BlockSpec, device: torch.device, schedule: Schedule | dict | None) -> generator.Variant:
    """The variant to launch: an explicit schedule, else the lookup's answer, else the schedule a larger batch
    of this layer ran, else the default heuristic."""
    if schedule is not None:  # explicit: not remembered for the layer's other batches
        return generator.render(spec, schedule)
    if _lookup is not None:
        answer = _lookup(spec, device)
        if answer is None and spec.is_view:  # a channel-slice view runs its dense layer's tuned schedule
            dense = _lookup(spec.dense(), device)
            answer = dense.schedule if isinstance(dense, generator.Variant) else dense
        if isinstance(answer, generator.Variant):
            if answer.spec != spec:
                raise SpecError(
                    f"schedule lookup answered a kernel for {answer.spec.describe()}, not {spec.describe()}"
                )
            _remember(spec, device, answer.schedule)
            return answer
        schedule = answer
    if schedule is None:
        with _layers_lock:
            seen = _layers.get(_layer_key(spec, device))
        if seen is not None and seen[0] > spec.n:
            v = generator.render(spec, seen[1])
            if v.batch is not None and spec.n in v.batch:
                return v
    v = generator.render(spec, schedule)
    _remember(spec, device, v.schedule)
    return v


def _layer_key(spec: BlockSpec, device: torch.device) -> tuple[str, str]:
    return generator.batch_free(spec).key, str(device)


def _remember(spec: BlockSpec, device: torch.device, s: Schedule) -> None:
    key = _layer_key(spec, device)
    with _layers_lock:
        seen = _layers.get(key)
        if seen is None or seen[0] < spec.n:
            _layers[key] = (spec.n, s)
        _layers.move_to_end(key)
        while len(_layers) > _LAYERS_KEPT:
            _layers.popitem(last=False)


def forget_layer_schedules() -> None:
    """Drop the per-layer schedule memory (tests; a process that re-tunes its layers)."""
    with _layers_lock:
        _layers.clear()


@dataclass
class EpilogueArgs:
    """Runtime tensors of the epilogue chain (None where a feature is off)."""

    bias: torch.Tensor | None = None
    scale: torch.Tensor | None = None
    shift: torch.Tensor | None = None
    residual: torch.Tensor | None = None
    layer_scale: torch.Tensor | None = None
    activation: str | None = None
    residual_mode: str = "post"
    starrelu_scale: float | torch.Tensor = 1.0  # StarReLU s and b: floats or 0-dim tensors (learnable)
    starrelu_bias: float | torch.Tensor = 0.0

    def need(self, name: str) -> torch.Tensor:
        """The chain tensor `name` (bias, scale, shift, residual, layer_scale), which the epilogue uses: SpecError
        when it was not given."""
        t: torch.Tensor | None = getattr(self, name)
        if t is None:
            raise SpecError(f"the epilogue uses {name}, which was not given")
        return t

    def spec(self, stats: bool = False, save_z: bool = False) -> Epilogue:
        if (self.scale is None) != (self.shift is None):
            raise SpecError("scale and shift (folded BatchNorm) must be given together")
        if self.residual_mode not in ("pre", "post"):
            raise SpecError(f"residual_mode must be 'pre' or 'post', got {self.residual_mode!r}")
        return Epilogue(
            bias=self.bias is not None,
            affine=self.scale is not None,
            activation=self.activation,
            residual=self.residual_mode if self.residual is not None else None,
            layer_scale=self.layer_scale is not None,
            stats=stats,
            save_z=save_z,
        )

    def starrelu_tensor(self, device: torch.device) -> torch.Tensor:
        """(s, b) as the [2] fp32 tensor the kernels read through starrelu_ptr (starrelu_pair, detached)."""
        s, b = (v.detach() if isinstance(v, torch.Tensor) else v for v in (self.starrelu_scale, self.starrelu_bias))
        return starrelu_pair(s, b, device)


def starrelu_pair(scale: float | torch.Tensor, bias: float | torch.Tensor, device: torch.device) -> torch.Tensor:
    """StarReLU's (s, b) as the [2] fp32 tensor the kernels read through starrelu_ptr, made on device with no
    host round trip (no H2D copy, no read-back: a CUDA graph can capture it); differentiable in tensor values."""
    return torch.stack(
        [
            v.to(device=device, dtype=torch.float32).reshape(())
            if isinstance(v, torch.Tensor)
            else torch.full((), float(v), dtype=torch.float32, device=device)
            for v in (scale, bias)
        ]
    )


def _check_tensor(name: str, t: Any) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def _meta(t: Any) -> tuple[Any, ...] | None:
    """What make_spec's checks read of an argument: a tensor's type, shape, dtype and device; a plain value's
    type and repr (True and 1 differ)."""
    if t is None:
        return None
    if isinstance(t, torch.Tensor):
        return (type(t), tuple(t.shape), t.dtype, t.device, t.is_floating_point())
    return (type(t), repr(t))


_SPECS: dict[tuple[Any, ...], BlockSpec] = {}  # make_spec's checked calls by what the checks read
_SPECS_KEPT = 4096


def make_spec(
    x: torch.Tensor,
    weight: torch.Tensor,
    ndim: int,
    stride: Any,
    padding: Any,
    dilation: Any,
    groups: int,
    ep: EpilogueArgs,
    precision: str = "ieee",
    op: str = "fwd",
    stats: bool = False,
    save_z: bool = False,
) -> BlockSpec:
    """Validate the torch-style call and describe it as a BlockSpec (stats / save_z: forward options). The
    checks read only metadata (types, shapes, dtypes, devices, argument values), so a call whose metadata was
    checked before takes its spec from memory: a conv layer pays for them once, not every step."""
    try:
        key: tuple[Any, ...] | None = (
            ndim,
            precision,
            op,
            stats,
            save_z,
            ep.activation,
            ep.residual_mode,
            *map(_meta, (x, weight, stride, padding, dilation, groups, ep.bias, ep.scale, ep.shift, ep.residual)),
            *map(_meta, (ep.layer_scale, ep.starrelu_scale, ep.starrelu_bias)),
        )
        spec = _SPECS.get(key)  # type: ignore[arg-type]
    except TypeError:  # symbolic shapes (torch.compile): not hashable, checked every time
        key, spec = None, None
    if spec is not None:
        return spec
    spec = _checked_spec(x, weight, ndim, stride, padding, dilation, groups, ep, precision, op, stats, save_z)
    if key is not None:
        if len(_SPECS) >= _SPECS_KEPT:
            _SPECS.clear()
        _SPECS[key] = spec
    return spec


def _checked_spec(
    x: torch.Tensor,
    weight: torch.Tensor,
    ndim: int,
    stride: Any,
    padding: Any,
    dilation: Any,
    groups: int,
    ep: EpilogueArgs,
    precision: str,
    op: str,
    stats: bool,
    save_z: bool,
) -> BlockSpec:
    # torch's own checks, order, wording and exception types (x must be batched here)
    args = convargs.normalize(ndim, x, weight, ep.bias, stride, padding, dilation, groups, unbatched=False)
    stride, padding, dilation, groups = args.stride, args.padding, args.dilation, args.groups
    n, c, k = x.shape[0], x.shape[1], weight.shape[0]
    for name in ("bias", "scale", "shift", "layer_scale"):
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
    if ep.activation == "starrelu":
        for name in ("starrelu_scale", "starrelu_bias"):
            v = getattr(ep, name)
            if isinstance(v, torch.Tensor):
                if v.numel() != 1 or not v.is_floating_point():
                    raise SpecError(
                        f"{name} must be a float or a one-element float tensor, got shape {tuple(v.shape)} {v.dtype}"
                    )
                if v.device != x.device:
                    raise SpecError(f"{name} is on {v.device} but input is on {x.device}")
            elif not isinstance(v, (int, float)) or isinstance(v, bool):
                raise SpecError(f"{name} must be a float or a tensor, got {type(v).__name__}")
    spec = conv_spec(
        n=n,
        c=c,
        k=k,
        in_size=tuple(x.shape[2:]),
        kernel=tuple(weight.shape[2:]),
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
        dtype=TORCH_DTYPES[x.dtype],
        epilogue=ep.spec(stats=stats, save_z=save_z),
        op=op,
        precision=precision,
    )
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


# ---- channel-slice views: tensors the kernels address in place with a pixel stride ----------------------
VIEW_ALIGN = 16  # bytes: a view's base and pixel stride keep 16-byte vector loads, cp.async and TMA legal


def pixel_stride(t: torch.Tensor) -> int | None:
    """Elements between adjacent pixels of t [N, C, *S] when its channels-last form [N, *S, C] is a packed pixel
    grid with unit channel stride (C for a dense channels-last tensor; the wider buffer's channels for a channel
    slice of one), else None. Size-1 dims' strides do not matter."""
    if t.dim() < 3 or (t.shape[1] > 1 and t.stride(1) != 1):
        return None
    p, inner = None, 1
    for d in (*range(t.dim() - 1, 1, -1), 0):  # innermost spatial dim outwards, then the batch
        if t.shape[d] > 1:
            if p is None:
                if t.stride(d) % inner:
                    return None
                p = t.stride(d) // inner
            elif t.stride(d) != p * inner:
                return None
        inner *= t.shape[d]
    p = t.shape[1] if p is None else p
    return p if p >= t.shape[1] else None


def view_stride(t: torch.Tensor) -> int | None:
    """The pixel stride a kernel addresses t [N, C, *S] with in place: a channel slice's (pixel_stride > C) when
    its base and pixel stride are VIEW_ALIGN-byte aligned. None: dense, or a tensor the caller copies (any other
    layout, or a misaligned slice: a copy keeps the 16-byte vector loads and shares the dense kernel)."""
    p = pixel_stride(t)
    if p is None or p == t.shape[1] or (p * t.element_size()) % VIEW_ALIGN or t.data_ptr() % VIEW_ALIGN:
        return None
    return p


def channels_last_arg(t: torch.Tensor, stride: int | None, name: str) -> torch.Tensor:
    """t [N, C, *S] as the [N, *S, C] tensor a kernel addresses: to_channels_last (dense) when stride is None,
    else t itself, checked to have exactly that pixel stride (the kernel's addressing is compiled in)."""
    if stride is None:
        return to_channels_last(t)
    if pixel_stride(t) != stride:
        raise SpecError(f"{name} is not a channels-last view with pixel stride {stride}, as its spec addresses it")
    return t.permute(0, *range(2, t.dim()), 1)


def in_wider_buffer(t: torch.Tensor, stride: int | None) -> torch.Tensor:
    """t [N, C, *S] copied into the first C channels of a NaN-filled channels-last buffer of `stride` channels:
    the channel-slice view a spec with that pixel stride reads (t itself when stride is None)."""
    if stride is None:
        return t
    n, c, *size = t.shape
    buf = torch.full((n, *size, stride), float("nan"), dtype=t.dtype, device=t.device)
    view = buf[..., :c].permute(0, t.dim() - 1, *range(1, t.dim() - 1))
    return view.copy_(t)


def _span(t: torch.Tensor) -> tuple[int, int]:
    """[first, last] byte address t's elements touch."""
    last = sum((size - 1) * st for size, st in zip(t.shape, t.stride()))
    return t.data_ptr(), t.data_ptr() + (last + 1) * t.element_size() - 1


def _overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two [N, C, *S] tensors may share an element. Channel slices of one pixel grid (one pixel stride)
    whose channel ranges are disjoint do not (a conv writing one branch of a concat it reads another of)."""
    if a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return False
    (a0, a1), (b0, b1) = _span(a), _span(b)
    if a1 < b0 or b1 < a0:
        return False
    pa, pb = pixel_stride(a), pixel_stride(b)
    if pa is None or pa != pb or a.element_size() != b.element_size():
        return True
    size, width = a.element_size(), pa * a.element_size()
    if (a0 - b0) % size:
        return True
    ra, rb = (a0 % width) // size, (b0 % width) // size  # each one's first channel within a pixel, mod P
    return any((r - ra) % pa < a.shape[1] for r in range(rb, rb + b.shape[1]))


def from_channels_last(buf: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[N, *S, K] buffer -> [N, K, *S] in the memory format of `like`."""
    out = buf.permute(0, buf.dim() - 1, *range(1, buf.dim() - 1))
    return out.contiguous() if like.is_contiguous() else out


# Tests set this to fill every buffer a kernel writes with NaN first, so elements a kernel misses show up.
POISON_OUTPUTS = False


def new_buffer(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised kernel output (NaN-filled under POISON_OUTPUTS)."""
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def new_channels_last(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised [N, C, *S] tensor whose memory is channels-last [N, *S, C].

    to_channels_last() of it is a free view (the buffer a kernel writes); the tensor itself is
    what from_channels_last returns for a non-contiguous `like`, but owns its storage (not a view).
    """
    n, c, *sp = shape
    strides = [1] * len(shape)
    step = c
    for i in range(len(shape) - 1, 1, -1):
        strides[i] = step
        step *= shape[i]
    strides[0] = step
    out = torch.empty_strided(shape, strides, dtype=dtype, device=device)
    return out.fill_(float("nan")) if POISON_OUTPUTS else out


def in_format_of(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A new_channels_last tensor in like's memory format (same rule as from_channels_last)."""
    return full.contiguous() if like.is_contiguous() else full


# Packed weights per weight tensor object (weakly held: a freed weight drops its entries) and layout, valid
# while the tensor still points at the same memory (`param.data = ...` moves it; the entry keeps the source
# storage alive, so no other tensor can reuse that address) with an unchanged version counter (in-place
# updates such as an optimizer step bump it). Eval and inference pack each weight once instead of
# launching a permute copy before every conv.
_packed: WeakIdKeyDictionary = WeakIdKeyDictionary()


def cached_pack(weight: torch.Tensor, form: str, pack: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """pack(weight.detach()), cached per weight tensor, its version, storage and the packed form's name (pass the
    weight itself, not a fresh .detach(), for the cache to hit). In-place updates and `param.data = ...` repack.
    Under CUDA graph capture the pack is captured with the graph (no cache either way): a replay packs the weight
    as it is then, so a captured training step sees its optimizer's in-place updates."""
    if weight.is_cuda and torch.cuda.is_current_stream_capturing():
        return pack(weight.detach())
    layout = (form, tuple(weight.shape), weight.stride(), weight.dtype, weight.device)
    by_layout = _packed.get(weight)
    hit = by_layout.get(layout) if by_layout is not None else None
    if hit is not None and hit[0] == weight._version and hit[1].data_ptr() == weight.data_ptr():
        return hit[2]
    w = weight.detach()
    packed = pack(w)
    if not torch.compiler.is_compiling():
        _packed.setdefault(weight, {})[layout] = (weight._version, w, packed)
    return packed


def pack_weight(spec: BlockSpec, weight: torch.Tensor) -> torch.Tensor:
    """conv: [K, C/g, *ks] -> [K, taps, C/g]; depthwise: [K, 1, *ks] -> [taps, K]. Cached (cached_pack)."""
    if spec.kind == "depthwise":
        return cached_pack(weight, "depthwise", lambda w: w.reshape(spec.k, spec.taps).t().contiguous())
    return cached_pack(weight, "conv", lambda w: w.permute(0, *range(2, w.dim()), 1).contiguous())


def clear_packed_weights() -> None:
    """Drop every cached packed weight (they are also dropped with their weights)."""
    _packed.clear()


def epilogue_kernel_args(
    spec: BlockSpec, ep: EpilogueArgs, device: torch.device | None = None, only: Collection[str] | None = None
) -> dict[str, Any]:
    """Epilogue arguments as the generated kernels name them (per-channel vectors in fp32).

    Every chain argument the spec's epilogue uses, or just the names in `only` (a backward
    kernel's plan reads a subset).
    """
    e = spec.epilogue
    args: dict[str, Any] = {}

    def vec(name: str) -> torch.Tensor:
        return ep.need(name).detach().to(torch.float32).contiguous()

    def want(name: str) -> bool:
        return only is None or name in only

    if e.bias and want("bias_ptr"):
        args["bias_ptr"] = vec("bias")
    if e.affine and want("scale_ptr"):
        args["scale_ptr"] = vec("scale")
    if e.affine and want("shift_ptr"):
        args["shift_ptr"] = vec("shift")
    if e.residual and want("res_ptr"):
        args["res_ptr"] = channels_last_arg(ep.need("residual").detach(), spec.res_pixel_stride, "residual")
    if e.layer_scale and want("layer_scale_ptr"):
        args["layer_scale_ptr"] = vec("layer_scale")
    if e.activation == "starrelu" and want("starrelu_ptr"):
        if device is None:
            device = next(
                (t.device for t in (ep.bias, ep.scale, ep.residual, ep.layer_scale) if t is not None),
                torch.device("cpu"),
            )
        args["starrelu_ptr"] = ep.starrelu_tensor(device)
    return args


def upcast(x: torch.Tensor) -> bool:
    """The UPCAST constexpr: bf16 tl.dot operands go through fp32 on the interpreter only."""
    return runtime.is_interpreted(x.device) and x.dtype == torch.bfloat16


def forward_args(
    spec: BlockSpec,
    x: torch.Tensor,
    weight: torch.Tensor,
    ep: EpilogueArgs,
    out_buf: torch.Tensor | None,
    z_buf: torch.Tensor | None = None,
    stats_buf: torch.Tensor | None = None,
    schedule: Schedule | None = None,
) -> dict[str, Any]:
    """Kernel arguments of a forward variant; z_buf / stats_buf when its epilogue has save_z / stats; out_buf
    [N, *out, K] (None under stats_only). A view spec's x, residual and out_buf must have its pixel strides.
    A space_to_depth schedule's kernel reads the folded input and weight (kernels.space_to_depth)."""
    if schedule is not None and schedule.space_to_depth:
        x, weight = space_to_depth.fold_input(x.detach(), spec), space_to_depth.fold_weight(weight.detach(), spec)
        spec = space_to_depth.rewrite(spec)
    args: dict[str, Any] = {"x_ptr": channels_last_arg(x.detach(), spec.x_pixel_stride, "x")}
    args["w_ptr"] = pack_weight(spec, weight)
    if not spec.epilogue.stats_only:
        if out_buf is None:
            raise SpecError("the forward kernel needs an output buffer")
        if spec.out_pixel_stride is not None:  # its [N, K, *out] form must have the spec's pixel stride
            channels_last_arg(out_buf.permute(0, -1, *range(1, out_buf.dim() - 1)), spec.out_pixel_stride, "out")
        args["out_ptr"] = out_buf
    args["UPCAST"] = upcast(x)
    if spec.epilogue.save_z:
        args["z_ptr"] = z_buf
    if spec.epilogue.stats:
        args["stats_ptr"] = stats_buf
    args.update(epilogue_kernel_args(spec, ep, x.device))
    return args


@dataclass
class ForwardResult:
    """What one forward launch produced.

    y: the output in x's memory format (empty under epilogue.stats_only). z: the channels-last [N, *out, K]
    pre-epilogue conv output (only with epilogue.save_z). mean / var: per-channel fp32 [K] mean and biased
    variance of z over batch and output positions (only with epilogue.stats).
    """

    y: torch.Tensor
    z: torch.Tensor | None = None
    mean: torch.Tensor | None = None
    var: torch.Tensor | None = None


def combine_moments(partial: torch.Tensor, count: int, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (mean, M2) of `count` rows from per-tile moments.

    partial [tiles, 3, K]: each tile's mean as the pair m0 + c and its M2 over `block` rows (the last
    tile has the rest). Chan et al.'s parallel formula over all tiles at once,
    M2 = sum M2_t + sum n_t (mean_t - mean)^2, with every deviation taken from the first tile's pair
    (m0_t - m0_0 is exact where the means are close) so large means neither cancel nor lose the tiles'
    low bits. Fixed-shape
    reductions only: bitwise reproducible.
    """
    tiles = partial.shape[0]
    n_t = torch.full((tiles, 1), float(block), dtype=torch.float32, device=partial.device)
    n_t[-1] = float(count - (tiles - 1) * block)
    m0, c, m2s = partial.unbind(1)
    dev = (m0 - m0[0]) + (c - c[0])  # tile mean - first tile's mean
    shift = (n_t * dev).sum(dim=0) / count  # overall mean - first tile's mean
    mean = m0[0] + (c[0] + shift)
    m2 = m2s.sum(dim=0) + (n_t * (dev - shift).square()).sum(dim=0)
    return mean, m2


def run_forward(
    spec: BlockSpec,
    x: torch.Tensor,
    weight: torch.Tensor,
    ep: EpilogueArgs,
    schedule: Schedule | dict | None = None,
    out: torch.Tensor | None = None,
) -> ForwardResult:
    """Launch the forward variant of an already validated spec (see make_spec).

    x and the residual may be channel slices of wider channels-last buffers, and out (the [N, *out, K] buffer
    to write) one of a wider [N, *out, K_total] buffer (writing one branch of a concat in place): aligned
    slices are addressed in place (the spec gets their pixel strides: view_stride), other layouts are copied."""
    e = spec.epilogue
    shape = (spec.n, *spec.out_size, spec.k)
    full = target = None
    if e.stats_only:
        if out is not None:
            raise SpecError("a stats_only conv writes no output: out must be None")
    elif out is None:
        full = new_channels_last((spec.n, spec.k, *spec.out_size), x.dtype, x.device)
        out = to_channels_last(full)
    else:
        _check_out(out, shape, x, ep.residual)
        dense = out.is_contiguous() or pixel_stride(_nchw(out)) == spec.k
        if not dense and view_stride(_nchw(out)) is None:  # computed densely, then copied in
            target, out = out, new_buffer(shape, x.dtype, x.device)
    views = (
        view_stride(x),
        view_stride(_nchw(out)) if out is not None and target is None else None,
        view_stride(ep.residual) if e.residual and ep.residual is not None else None,
    )
    if views != (None, None, None):
        spec = _with_views(spec, *views)
    variant = choose_variant(spec, x.device, schedule)
    z = new_buffer(shape, x.dtype, x.device) if e.save_z else None
    partial = None
    if e.stats:  # per tile of block_m output pixels, per channel: mean (m0 + c) and M2
        rows = -(-spec.out_pixels // variant.schedule.block_m)
        partial = new_buffer((rows, 3, spec.k), torch.float32, x.device)
    args = forward_args(spec, x, weight, ep, out, z, partial, variant.schedule)
    if variant.schedule.tma and any(isinstance(t, torch.Tensor) and t.data_ptr() % 16 for t in args.values()):
        # TMA descriptors need 16-byte aligned bases: a view at an odd storage offset takes the pointer path
        variant = generator.render(spec, replace(variant.schedule, tma=False))
        args = forward_args(spec, x, weight, ep, out, z, partial, variant.schedule)
    runtime.launch(variant, args, x.device)
    if out is None:
        y = x.new_empty((0,))
    elif target is not None:
        y = from_channels_last(target.copy_(out), x)
    else:
        y = from_channels_last(out, x) if full is None else in_format_of(full, x)
    res = ForwardResult(y=y, z=z)
    if partial is not None:
        res.mean, m2 = combine_moments(partial, spec.out_pixels, variant.schedule.block_m)
        res.var = m2 / spec.out_pixels
    return res


def _nchw(t: torch.Tensor) -> torch.Tensor:
    """A [N, *S, K] buffer seen as [N, K, *S] (a view)."""
    return t.permute(0, t.dim() - 1, *range(1, t.dim() - 1))


@lru_cache(maxsize=4096)
def _with_views(spec: BlockSpec, x: int | None, out: int | None, res: int | None) -> BlockSpec:
    """spec with the pixel strides of the channel-slice views it runs on (None: dense)."""
    return spec.with_(x_pixel_stride=x, out_pixel_stride=out, res_pixel_stride=res)


def _check_out(out: torch.Tensor, shape: tuple[int, ...], x: torch.Tensor, residual: torch.Tensor | None) -> None:
    """SpecError unless out can take the forward's result: the [N, *out, K] shape, x's dtype and device, no element
    written twice, none that x (or, unless it is out itself, the residual) holds."""
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"out must be a torch.Tensor, got {type(out).__name__}")
    if tuple(out.shape) != shape or out.dtype != x.dtype or out.device != x.device:
        raise SpecError(
            f"out must be a {x.dtype} tensor of shape {shape} (channels-last [N, *out, K]) on {x.device}, "
            f"got {out.dtype} {tuple(out.shape)} on {out.device}"
        )
    if torch._debug_has_internal_overlap(out) == 1:
        raise SpecError(f"out has overlapping elements (strides {out.stride()}): it cannot be written in place")
    if _overlap(_nchw(out), x):
        raise SpecError("out overlaps the input x: write to a buffer the conv does not read")
    if residual is not None and _overlap(_nchw(out), residual):
        same = residual.data_ptr() == out.data_ptr() and residual.stride() == _nchw(out).stride()
        if not same:  # the residual read and overwritten element by element is fine; a shifted one is not
            raise SpecError("out overlaps the residual at other positions: write to a separate buffer")


def conv_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    ndim: int,
    stride: Any = 1,
    padding: Any = 0,
    dilation: Any = 1,
    groups: int = 1,
    ep: EpilogueArgs | None = None,
    schedule: Schedule | dict | None = None,
    precision: str = "ieee",
    out: torch.Tensor | None = None,
    stats: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """y = epilogue(conv(x, weight)) with torch.nn.functional semantics; returns y in x's memory format.

    `out`, if given, is the [N, *out_spatial, K] channels-last buffer to write (tests poison it), or a channel
    slice of a wider one (one branch of a concat, written in place; see run_forward). x and the residual may be
    channel slices of channels-last tensors too (read in place, no copy).
    stats=True returns (y, mean, var): per-channel fp32 [K] mean and biased variance over N and the
    output positions of the pre-epilogue conv output z (no bias), as BatchNorm's batch statistics.
    No autograd here: kernels.autograd.conv differentiates through y, mean and var.
    """
    ep = ep or EpilogueArgs()
    spec = make_spec(x, weight, ndim, stride, padding, dilation, groups, ep, precision, stats=stats)
    res = run_forward(spec, x, weight, ep, schedule, out)
    if not stats:
        return res.y
    if res.mean is None or res.var is None:  # a stats spec always gathers them
        raise RuntimeError(f"the forward of {spec.describe()} returned no batch statistics")
    return res.y, res.mean, res.var


def conv_stats(
    x: torch.Tensor,
    weight: torch.Tensor,
    ndim: int,
    stride: Any = 1,
    padding: Any = 0,
    dilation: Any = 1,
    groups: int = 1,
    schedule: Schedule | dict | None = None,
    precision: str = "ieee",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel fp32 [K] (mean, biased var) of conv(x, weight) over N and the output positions, the conv's
    output itself never written (epilogue.stats_only: no output buffer). No autograd: the gradient of these
    statistics needs the conv output, which kernels.autograd.conv(..., stats=True) keeps."""
    ep = EpilogueArgs()
    spec = _stats_only(make_spec(x, weight, ndim, stride, padding, dilation, groups, ep, precision, stats=True))
    res = run_forward(spec, x, weight, ep, schedule)
    if res.mean is None or res.var is None:  # a stats spec always gathers them
        raise RuntimeError(f"the forward of {spec.describe()} returned no batch statistics")
    return res.mean, res.var


@lru_cache(maxsize=1024)
def _stats_only(spec: BlockSpec) -> BlockSpec:
    return spec.with_(epilogue=replace(spec.epilogue, stats_only=True))
