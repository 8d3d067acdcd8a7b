"""Compact builders of the three end-to-end nets (no torchvision): ResNet-50, MobileNetV2, ConvNeXt-T.

Layer structure and parameter counts follow the reference models (torchvision / the ConvNeXt paper):
ResNet-50 v1.5 (stride on the 3x3), 25,557,032 parameters; MobileNetV2 1.0, 3,504,872;
ConvNeXt-T, 28,589,128. `width` scales every channel count for tiny CPU runs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

# MobileNetV2 inverted-residual settings: expansion t, channels c, repeats n, first stride s.
MOBILENETV2_SETTINGS = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


def _scaled(c: int, width: float, divisor: int = 8) -> int:
    """c * width rounded to a multiple of divisor (never below divisor, never 10% under c * width)."""
    v = c * width
    out = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return out + divisor if out < 0.9 * v else out


# ---- ResNet-50 -------------------------------------------------------------------------------
class Bottleneck(nn.Module):
    """1x1 -> 3x3 (stride here, v1.5) -> 1x1 (x4), each with BN; ReLU after the residual add."""

    expansion = 4

    def __init__(self, c_in: int, width: int, stride: int = 1) -> None:
        super().__init__()
        c_out = width * self.expansion
        self.conv1 = nn.Conv2d(c_in, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv2d(width, c_out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c_out)
        self.relu3 = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        y = self.relu1(self.bn1(self.conv1(x)))
        y = self.relu2(self.bn2(self.conv2(y)))
        return self.relu3(self.bn3(self.conv3(y)) + identity)


class ResNet50(nn.Module):
    def __init__(self, num_classes: int = 1000, width: float = 1.0, depths: tuple[int, ...] = (3, 4, 6, 3)) -> None:
        super().__init__()
        stem = _scaled(64, width)
        self.stem = nn.Sequential(
            nn.Conv2d(3, stem, 7, 2, 3, bias=False), nn.BatchNorm2d(stem), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1)
        )
        layers: list[nn.Module] = []
        c_in = stem
        for i, depth in enumerate(depths):
            w = _scaled(64 * 2**i, width)
            for j in range(depth):
                layers.append(Bottleneck(c_in, w, 2 if (j == 0 and i > 0) else 1))
                c_in = w * Bottleneck.expansion
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.stem(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


# ---- MobileNetV2 -------------------------------------------------------------------------------
def _conv_bn_act(
    c_in: int, c_out: int, kernel: int, stride: int = 1, groups: int = 1, act: bool = True
) -> list[nn.Module]:
    mods: list[nn.Module] = [
        nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(c_out),
    ]
    return mods + [nn.ReLU6(inplace=True)] if act else mods


class InvertedResidual(nn.Module):
    """[1x1 expand] -> 3x3 depthwise -> 1x1 linear projection; identity skip when shapes allow."""

    def __init__(self, c_in: int, c_out: int, stride: int, t: int) -> None:
        super().__init__()
        hidden = c_in * t
        mods: list[nn.Module] = _conv_bn_act(c_in, hidden, 1) if t != 1 else []
        mods += _conv_bn_act(hidden, hidden, 3, stride, groups=hidden)
        mods += _conv_bn_act(hidden, c_out, 1, act=False)
        self.conv = nn.Sequential(*mods)
        self.use_res = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res else self.conv(x)


class MobileNetV2(nn.Module):
    def __init__(
        self,
        num_classes: int = 1000,
        width: float = 1.0,
        settings: tuple[tuple[int, int, int, int], ...] = MOBILENETV2_SETTINGS,
    ) -> None:
        super().__init__()
        c_in = _scaled(32, width)
        last = _scaled(1280, max(1.0, width))
        mods: list[nn.Module] = _conv_bn_act(3, c_in, 3, 2)
        for t, c, n, s in settings:
            c_out = _scaled(c, width)
            for i in range(n):
                mods.append(InvertedResidual(c_in, c_out, s if i == 0 else 1, t))
                c_in = c_out
        mods += _conv_bn_act(c_in, last, 1)
        self.features = nn.Sequential(*mods)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(last, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.adaptive_avg_pool2d(self.features(x), 1)
        return self.classifier(torch.flatten(x, 1))


# ---- ConvNeXt-T ------------------------------------------------------------------------------
class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW tensor."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ConvNeXtBlock(nn.Module):
    """x + gamma * PW2(GELU(PW1(LN(DW7x7(x))))), PW1: C -> 4C, gamma the layer scale."""

    def __init__(self, dim: int, layer_scale: float = 1e-6) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), layer_scale))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(self.dwconv(x).permute(0, 2, 3, 1))
        y = self.gamma * self.pwconv2(self.act(self.pwconv1(y)))
        return x + y.permute(0, 3, 1, 2)


class ConvNeXt(nn.Module):
    def __init__(
        self,
        num_classes: int = 1000,
        width: float = 1.0,
        depths: tuple[int, ...] = (3, 3, 9, 3),
        dims: tuple[int, ...] = (96, 192, 384, 768),
    ) -> None:
        super().__init__()
        dims = tuple(_scaled(d, width) for d in dims)
        self.downsample = nn.ModuleList([nn.Sequential(nn.Conv2d(3, dims[0], 4, 4), LayerNorm2d(dims[0], eps=1e-6))])
        for i in range(1, len(dims)):
            self.downsample.append(
                nn.Sequential(LayerNorm2d(dims[i - 1], eps=1e-6), nn.Conv2d(dims[i - 1], dims[i], 2, 2))
            )
        self.stages = nn.ModuleList(
            [nn.Sequential(*(ConvNeXtBlock(d) for _ in range(n))) for d, n in zip(dims, depths)]
        )
        self.norm = nn.LayerNorm(dims[-1], eps=1e-6)
        self.head = nn.Linear(dims[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for down, stage in zip(self.downsample, self.stages):
            x = stage(down(x))
        return self.head(self.norm(x.mean((2, 3))))


MODELS: dict[str, Callable[..., nn.Module]] = {"resnet50": ResNet50, "mobilenetv2": MobileNetV2, "convnext_t": ConvNeXt}


def build(
    name: str,
    *,
    width: float = 1.0,
    num_classes: int = 1000,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    blocks_per_stage: int | None = None,
) -> nn.Module:
    """One of MODELS, built directly on `device` ("meta" builds without allocating).

    blocks_per_stage caps every stage's depth (tiny CI models); None keeps the real depths.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; expected one of {sorted(MODELS)}")
    kw: dict[str, object] = {}
    if blocks_per_stage is not None:
        if name == "mobilenetv2":
            kw["settings"] = tuple((t, c, min(n, blocks_per_stage), s) for t, c, n, s in MOBILENETV2_SETTINGS)
        else:
            kw["depths"] = (blocks_per_stage,) * 4
    with torch.device(device):
        model = MODELS[name](num_classes=num_classes, width=width, **kw)
    return model.to(dtype) if dtype is not None else model


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def conv_count(model: nn.Module) -> int:
    return sum(isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) for m in model.modules())
