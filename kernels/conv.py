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
        """(s, b) as the [2] fp32 tensor the kernels read through starrelu_ptr (no host sync for tensors)."""
        if isinstance(self.starrelu_scale, torch.Tensor) or isinstance(self.starrelu_bias, torch.Tensor):
            return torch.stack(
                [
                    torch.as_tensor(v, device=device).detach().to(torch.float32).reshape(())
                    for v in (self.starrelu_scale, self.starrelu_bias)
                ]
            )
        return torch.tensor([float(self.starrelu_scale), float(self.starrelu_bias)], dtype=torch.float32, device=device)


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
    weight itself, not a fresh .detach(), for the cache to hit). In-place updates and `param.data = ...` repack."""
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
        args["res_ptr"] = to_channels_last(ep.need("residual").detach())
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
    out_buf: torch.Tensor,
    z_buf: torch.Tensor | None = None,
    stats_buf: torch.Tensor | None = None,
    schedule: Schedule | None = None,
) -> dict[str, Any]:
    """Kernel arguments of a forward variant; z_buf / stats_buf when its epilogue has save_z / stats.
    A space_to_depth schedule's kernel reads the folded input and weight (kernels.space_to_depth)."""
    if schedule is not None and schedule.space_to_depth:
        x, weight = space_to_depth.fold_input(x.detach(), spec), space_to_depth.fold_weight(weight.detach(), spec)
        spec = space_to_depth.rewrite(spec)
    args = {
        "x_ptr": to_channels_last(x.detach()),
        "w_ptr": pack_weight(spec, weight),
        "out_ptr": out_buf,
        "UPCAST": upcast(x),
    }
    if spec.epilogue.save_z:
        args["z_ptr"] = z_buf
    if spec.epilogue.stats:
        args["stats_ptr"] = stats_buf
    args.update(epilogue_kernel_args(spec, ep, x.device))
    return args


@dataclass
class ForwardResult:
    """What one forward launch produced.

    y: the output in x's memory format. z: the channels-last [N, *out, K] pre-epilogue conv output
    (only with epilogue.save_z). mean / var: per-channel fp32 [K] mean and biased variance of z over
    batch and output positions (only with epilogue.stats).
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
    """Launch the forward variant of an already validated spec (see make_spec)."""
    variant = choose_variant(spec, x.device, schedule)
    shape = (spec.n, *spec.out_size, spec.k)
    full = None
    if out is None:
        full = new_channels_last((spec.n, spec.k, *spec.out_size), x.dtype, x.device)
        out = to_channels_last(full)
    elif tuple(out.shape) != shape or not out.is_contiguous() or out.dtype != x.dtype or out.device != x.device:
        raise SpecError(f"out must be a contiguous {x.dtype} tensor of shape {shape} on {x.device}")
    z = new_buffer(shape, x.dtype, x.device) if spec.epilogue.save_z else None
    partial = None
    if spec.epilogue.stats:  # per tile of block_m output pixels, per channel: mean (m0 + c) and M2
        rows = -(-spec.out_pixels // variant.schedule.block_m)
        partial = new_buffer((rows, 3, spec.k), torch.float32, x.device)
    args = forward_args(spec, x, weight, ep, out, z, partial, variant.schedule)
    if variant.schedule.tma and any(isinstance(t, torch.Tensor) and t.data_ptr() % 16 for t in args.values()):
        # TMA descriptors need 16-byte aligned bases: a view at an odd storage offset takes the pointer path
        variant = generator.render(spec, replace(variant.schedule, tma=False))
        args = forward_args(spec, x, weight, ep, out, z, partial, variant.schedule)
    runtime.launch(variant, args, x.device)
    res = ForwardResult(y=from_channels_last(out, x) if full is None else in_format_of(full, x), z=z)
    if partial is not None:
        res.mean, m2 = combine_moments(partial, spec.out_pixels, variant.schedule.block_m)
        res.var = m2 / spec.out_pixels
    return res


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

    `out`, if given, is the [N, *out_spatial, K] channels-last buffer to write (tests poison it).
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
