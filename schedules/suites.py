"""Shape suites: the unique conv layers of the architectures in SEEDS.md, as forward BlockSpecs.

Each architecture is a small generator that walks the network stage by stage (the way its
reference implementation builds it) and emits every conv layer; `suite()` keeps the unique
specs in first-seen order. Layers carry their natural fused epilogue (folded BatchNorm as
`affine`, the activation, the residual add, layer scale); with `fused=False` (the default)
every epilogue is plain, so the suite holds the unique conv geometries.

`model_specs(model, example_input)` does the same for any torch model by tracing its
Conv1d/2d/3d layers with forward hooks (works on the meta device: no compute).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from tunerd.kernels.conv import TORCH_DTYPES
from tunerd.kernels.convargs import is_tf_same_conv, tf_same_padding
from tunerd.kernels.spec import BlockSpec, Epilogue, SpecError, conv_spec

BN_RELU = Epilogue(affine=True, activation="relu")
BN_RELU6 = Epilogue(affine=True, activation="relu6")
BN = Epilogue(affine=True)
BN_ADD_RELU = Epilogue(affine=True, residual="pre", activation="relu")  # relu(bn(conv) + identity)
BN_ADD = Epilogue(affine=True, residual="post")  # identity + bn(conv)
BIAS = Epilogue(bias=True)
BIAS_GELU = Epilogue(bias=True, activation="gelu")
BIAS_GELU_BN = Epilogue(affine=True, activation="gelu")
LAYER_SCALE_ADD = Epilogue(bias=True, layer_scale=True, residual="post")  # identity + gamma * (conv + b)


@dataclass
class Net:
    """Collects the conv layers of one network: conv() returns the output spatial size."""

    batch: int
    dtype: str
    specs: list[BlockSpec] = field(default_factory=list)

    def conv(
        self,
        c: int,
        k: int,
        size: tuple[int, ...],
        kernel: Any,
        stride: Any = 1,
        padding: Any = 0,
        groups: int = 1,
        dilation: Any = 1,
        epilogue: Epilogue = Epilogue(),  # noqa: B008  (frozen, hashable)
    ) -> tuple[int, ...]:
        spec = conv_spec(
            n=self.batch,
            c=c,
            k=k,
            in_size=tuple(size),
            kernel=kernel,
            stride=stride,
            padding=padding,
            dilation=dilation,
            groups=groups,
            dtype=self.dtype,
            epilogue=epilogue,
        )
        self.specs.append(spec)
        return spec.out_size


# ---- ResNet family ----------------------------------------------------------------------
def _bottleneck_resnet(net: Net, width_of: Callable[[int], int], groups: int) -> None:
    """torchvision-style bottleneck ResNet-50 (v1.5: stride on the 3x3) at 224x224."""
    size = net.conv(3, 64, (224, 224), 7, stride=2, padding=3, epilogue=BN_RELU)
    size = tuple((s + 2 - 3) // 2 + 1 for s in size)  # 3x3 s2 max-pool
    c = 64
    for planes, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
        width, out = width_of(planes), planes * 4
        for i in range(blocks):
            s = stride if i == 0 else 1
            net.conv(c, width, size, 1, epilogue=BN_RELU)
            mid = net.conv(width, width, size, 3, stride=s, padding=1, groups=groups, epilogue=BN_RELU)
            net.conv(width, out, mid, 1, epilogue=BN_ADD_RELU)
            if i == 0:  # projection shortcut
                net.conv(c, out, size, 1, stride=s, epilogue=BN)
            c, size = out, mid


def resnet50(net: Net) -> None:
    _bottleneck_resnet(net, lambda planes: planes, groups=1)


def resnext50_32x4d(net: Net) -> None:
    _bottleneck_resnet(net, lambda planes: planes * 4 // 64 * 32, groups=32)


# ---- MobileNetV2 ------------------------------------------------------------------------
MOBILENETV2 = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)  # (expansion t, channels c, repeats n, first stride s)


def mobilenetv2(net: Net) -> None:
    size = net.conv(3, 32, (224, 224), 3, stride=2, padding=1, epilogue=BN_RELU6)
    c = 32
    for t, out, n, stride in MOBILENETV2:
        for i in range(n):
            s = stride if i == 0 else 1
            hidden = c * t
            if t != 1:
                net.conv(c, hidden, size, 1, epilogue=BN_RELU6)
            mid = net.conv(hidden, hidden, size, 3, stride=s, padding=1, groups=hidden, epilogue=BN_RELU6)
            net.conv(hidden, out, mid, 1, epilogue=BN_ADD if s == 1 and c == out else BN)
            c, size = out, mid
    net.conv(c, 1280, size, 1, epilogue=BN_RELU6)


# ---- ConvNeXt / InceptionNeXt (MetaNeXt) -------------------------------------------------
def convnext_t(net: Net) -> None:
    """ConvNeXt-T: 4x4 s4 stem, blocks dw7x7 -> LN -> 1x1 (C->4C) GELU -> 1x1 (4C->C), LN + 2x2 s2 downsamples."""
    dims, depths = (96, 192, 384, 768), (3, 3, 9, 3)
    size = net.conv(3, dims[0], (224, 224), 4, stride=4, epilogue=BIAS)
    for i, (d, depth) in enumerate(zip(dims, depths)):
        if i:
            size = net.conv(dims[i - 1], d, size, 2, stride=2, epilogue=BIAS)
        for _ in range(depth):
            net.conv(d, d, size, 7, padding=3, groups=d, epilogue=BIAS)
            net.conv(d, 4 * d, size, 1, epilogue=BIAS_GELU)  # the pointwise Linear layers as 1x1 convs
            net.conv(4 * d, d, size, 1, epilogue=LAYER_SCALE_ADD)


def inceptionnext_t(net: Net) -> None:
    """InceptionNeXt-T: ConvNeXt layout, token mixer = identity + dw3x3 + dw1x11 + dw11x1 on C/8 slices,
    BN, ConvMlp 1x1 convs with MLP ratios (4, 4, 4, 3)."""
    dims, depths, ratios = (96, 192, 384, 768), (3, 3, 9, 3), (4, 4, 4, 3)
    size = net.conv(3, dims[0], (224, 224), 4, stride=4, epilogue=BIAS)
    for i, (d, depth, r) in enumerate(zip(dims, depths, ratios)):
        if i:
            size = net.conv(dims[i - 1], d, size, 2, stride=2, epilogue=BIAS)
        gc = int(d * 0.125)
        for _ in range(depth):
            net.conv(gc, gc, size, 3, padding=1, groups=gc, epilogue=BIAS)
            net.conv(gc, gc, size, (1, 11), padding=(0, 5), groups=gc, epilogue=BIAS)
            net.conv(gc, gc, size, (11, 1), padding=(5, 0), groups=gc, epilogue=BIAS)
            net.conv(d, r * d, size, 1, epilogue=BIAS_GELU)
            net.conv(r * d, d, size, 1, epilogue=LAYER_SCALE_ADD)


# ---- RepLKNet-31B -----------------------------------------------------------------------
def replknet31b(net: Net) -> None:
    """RepLKNet-31B in deploy form (the 5x5 branch merged into the large kernel)."""
    channels, kernels_, depths = (128, 256, 512, 1024), (31, 29, 27, 13), (2, 2, 18, 2)
    c = channels[0]
    size = net.conv(3, c, (224, 224), 3, stride=2, padding=1, epilogue=BN_RELU)
    size = net.conv(c, c, size, 3, padding=1, groups=c, epilogue=BN_RELU)
    size = net.conv(c, c, size, 1, epilogue=BN_RELU)
    size = net.conv(c, c, size, 3, stride=2, padding=1, groups=c, epilogue=BN_RELU)
    for i, (c, lk, depth) in enumerate(zip(channels, kernels_, depths)):
        for _ in range(depth):
            net.conv(c, c, size, 1, epilogue=BN_RELU)  # RepLK block: pw1
            net.conv(c, c, size, lk, padding=lk // 2, groups=c, epilogue=BN_RELU)
            net.conv(c, c, size, 1, epilogue=BN_ADD)  # pw2 + shortcut
            net.conv(c, 4 * c, size, 1, epilogue=BIAS_GELU_BN)  # ConvFFN
            net.conv(4 * c, c, size, 1, epilogue=BN_ADD)
        if i + 1 < len(channels):  # transition
            nxt = channels[i + 1]
            net.conv(c, nxt, size, 1, epilogue=BN_RELU)
            size = net.conv(nxt, nxt, size, 3, stride=2, padding=1, groups=nxt, epilogue=BN_RELU)


# ---- sequence and video ----------------------------------------------------------------
MAMBA_D_INNER = (1536, 2048, 3072, 4096, 5120)  # 2 x d_model of Mamba 130M .. 2.8B
MAMBA_LENGTHS = (2048, 4096, 8192, 16384)


def repvgg_a0(net: Net) -> None:
    """RepVGG-A0 (timm repvgg_a0) in its training form: every block runs a 3x3 and a 1x1 conv over the same
    input, each with BatchNorm (plus an identity BatchNorm where the shapes allow); its inference form is the
    3x3 alone, the branches merged into its weights (tunerd.blocks.reparameterize)."""
    size: tuple[int, ...] = (224, 224)
    cin = 3
    for width, depth in ((48, 1), (48, 2), (96, 4), (192, 14), (1280, 1)):  # the stem, then stages 1-4
        for i in range(depth):
            stride = 2 if i == 0 else 1
            net.conv(cin, width, size, 1, stride=stride, epilogue=BN)
            size = net.conv(cin, width, size, 3, stride=stride, padding=1, epilogue=BN)
            cin = width


def mamba_short_conv(net: Net) -> None:
    """Mamba's causal depthwise conv1d (k=4, left padding 3) followed by SiLU, over d_inner x length."""
    for d in MAMBA_D_INNER:
        for length in MAMBA_LENGTHS:
            net.conv(d, d, (length,), 4, padding=((3, 0),), groups=d, epilogue=Epilogue(bias=True, activation="silu"))


def video_2plus1d(net: Net) -> None:
    """R(2+1)D-18 (torchvision's layout) on 16x112x112 clips: every 3x3x3 conv factored into 1x3x3
    spatial (C -> M) then 3x1x1 temporal (M -> K); M = 27CK / (9C + 3K) from the block's input
    and output widths, so the parameter count matches the 3D conv."""
    size = net.conv(3, 45, (16, 112, 112), (1, 7, 7), stride=(1, 2, 2), padding=(0, 3, 3), epilogue=BN_RELU)
    size = net.conv(45, 64, size, (3, 1, 1), padding=(1, 0, 0), epilogue=BN_RELU)
    c = 64
    for planes, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        for i in range(2):  # BasicBlocks
            s = stride if i == 0 else 1
            block_in, block_size = c, size
            mid = c * planes * 27 // (c * 9 + 3 * planes)
            for j, (cin, out) in enumerate(((c, planes), (planes, planes))):
                st = s if j == 0 else 1
                size = net.conv(cin, mid, size, (1, 3, 3), stride=(1, st, st), padding=(0, 1, 1), epilogue=BN_RELU)
                size = net.conv(
                    mid,
                    out,
                    size,
                    (3, 1, 1),
                    stride=(st, 1, 1),
                    padding=(1, 0, 0),
                    epilogue=BN_RELU if j == 0 else BN_ADD_RELU,
                )
            if s != 1 or block_in != planes:
                net.conv(block_in, planes, block_size, 1, stride=s, epilogue=BN)
            c = planes


# ---- quick --------------------------------------------------------------------------------
def quick(net: Net) -> None:
    """Tiny specs of each family, small enough to tune on the CPU interpreter in seconds each."""
    net.conv(16, 16, (8, 8), 3, padding=1, epilogue=BN_ADD_RELU)  # ResNet 3x3 block
    net.conv(32, 16, (6, 6), 1, epilogue=BIAS)  # pointwise
    net.conv(3, 16, (16, 16), 4, stride=4, epilogue=BIAS)  # patch-embedding stem
    net.conv(16, 16, (8, 8), 3, padding=1, groups=16, epilogue=BN_RELU6)  # MobileNet depthwise
    net.conv(32, 32, (16,), 4, padding=((3, 0),), groups=32, epilogue=Epilogue(bias=True, activation="silu"))
    net.conv(8, 8, (3, 4, 4), (3, 1, 1), padding=(1, 0, 0), epilogue=BN_RELU)  # (2+1)D temporal


@dataclass(frozen=True)
class Suite:
    build: Callable[[Net], None]
    batch: int  # default batch size
    dtype: str = "bfloat16"


SUITES: dict[str, Suite] = {
    "resnet50": Suite(resnet50, 32),
    "mobilenetv2": Suite(mobilenetv2, 32),
    "convnext_t": Suite(convnext_t, 32),
    "replknet31b": Suite(replknet31b, 32),
    "resnext50_32x4d": Suite(resnext50_32x4d, 32),
    "inceptionnext_t": Suite(inceptionnext_t, 32),
    "repvgg_a0": Suite(repvgg_a0, 32),
    "mamba_short_conv": Suite(mamba_short_conv, 8),
    "video_2plus1d": Suite(video_2plus1d, 8),
    "quick": Suite(quick, 1, "float32"),
}


def _build(name: str, batch: int | None, dtype: str | None) -> Net:
    entry = SUITES.get(name)
    if entry is None:
        raise SpecError(f"unknown suite {name!r}; available: {', '.join(sorted(SUITES))}")
    batch = entry.batch if batch is None else batch
    if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
        raise SpecError(f"batch must be a positive int, got {batch!r}")
    net = Net(batch=batch, dtype=dtype or entry.dtype)
    entry.build(net)
    return net


def suite(name: str, batch: int | None = None, dtype: str | None = None, fused: bool = False) -> list[BlockSpec]:
    """The unique forward conv specs of a named suite (first-seen order); batch/dtype default per suite."""
    specs = _build(name, batch, dtype).specs
    if not fused:
        specs = [s.with_(epilogue=Epilogue()) for s in specs]
    return list(dict.fromkeys(specs))


def layers(name: str, batch: int | None = None, dtype: str | None = None) -> list[BlockSpec]:
    """Every conv layer of the suite in network order, repeats included, with fused epilogues."""
    return _build(name, batch, dtype).specs


def model_specs(model: nn.Module, example_input: Any, strict: bool = True) -> list[BlockSpec]:
    """Unique forward specs of the Conv1d/2d/3d layers a model runs on example_input.

    Traced with forward hooks under no_grad (meta-device models and inputs work). Plain
    epilogues; the dtype is the layer input's. strict=False skips layers tunerd cannot run
    (non-zero padding modes, unsupported dtypes) instead of raising SpecError.
    """
    found: list[BlockSpec] = []
    errors: list[str] = []

    def hook(mod: Any, args: tuple, _out: Any) -> None:  # mod: a Conv1d/2d/3d
        x = args[0]
        name = names.get(mod, type(mod).__name__)
        try:
            if mod.padding_mode != "zeros":
                raise SpecError(f"padding_mode={mod.padding_mode!r} is not supported (zeros only)")
            if x.dtype not in TORCH_DTYPES:
                raise SpecError(f"input dtype {x.dtype} is not supported; use float32, float16 or bfloat16")
            found.append(
                conv_spec(
                    n=x.shape[0],
                    c=x.shape[1],
                    k=mod.out_channels,
                    in_size=tuple(x.shape[2:]),
                    kernel=mod.kernel_size,
                    stride=mod.stride,
                    padding=tf_same_padding(x.shape[2:], mod.kernel_size, mod.stride, mod.dilation)
                    if is_tf_same_conv(type(mod))
                    else mod.padding,
                    dilation=mod.dilation,
                    groups=mod.groups,
                    dtype=TORCH_DTYPES[x.dtype],
                )
            )
        except SpecError as e:
            errors.append(f"layer {name}: {e}")

    convs = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
    names = {m: n for n, m in model.named_modules()}
    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, convs)]
    try:
        with torch.no_grad():
            model(example_input)
    finally:
        for h in handles:
            h.remove()
    if errors and strict:
        raise SpecError("; ".join(errors))
    return list(dict.fromkeys(found))
