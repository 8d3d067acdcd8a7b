"""Real model definitions from timm and torchvision, built narrow and shallow with random weights.

Each entry is the library's own model class (its blocks, norms, activations and forward code) with a
small configuration, so a train step through Triton's interpreter stays cheap. Nothing is downloaded.

torchvision's compiled ops do not load over a CPU build of torch that it was not built against; at
import it only registers fake kernels for `torchvision::nms` and `torchvision::qnms`, so those two
schemas are declared here when its library did not (none of the models use them).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from torch import nn

import tunerd  # noqa: F401  (before timm and torchvision, which import triton: it picks the interpreter on CPU)


def _declare_torchvision_ops() -> torch.library.Library | None:
    try:
        torch.ops.torchvision.nms.default  # noqa: B018  (loaded from torchvision's own library)
        return None
    except (AttributeError, RuntimeError):
        pass
    lib = torch.library.Library("torchvision", "DEF")
    for name in ("nms", "qnms"):
        lib.define(f"{name}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    return lib


_TORCHVISION_OPS = _declare_torchvision_ops()

import timm.models.byobnet as byob  # noqa: E402  (torchvision, which timm imports, needs the ops above)
import timm.models.cspnet as csp  # noqa: E402
import torchvision.models as tvm  # noqa: E402
from timm.models._efficientnet_builder import decode_arch_def  # noqa: E402
from timm.models.efficientnet import EfficientNet  # noqa: E402
from timm.models.fastvit import FastVit  # noqa: E402
from timm.models.ghostnet import GhostNet  # noqa: E402
from timm.models.inception_next import MetaNeXt  # noqa: E402
from timm.models.res2net import Bottle2neck  # noqa: E402
from timm.models.resnet import BasicBlock, Bottleneck, ResNet  # noqa: E402
from timm.models.starnet import StarNet  # noqa: E402
from torchvision.models.convnext import CNBlockConfig  # noqa: E402
from torchvision.models.efficientnet import MBConvConfig  # noqa: E402
from torchvision.models.mobilenetv3 import InvertedResidualConfig  # noqa: E402
from torchvision.models.regnet import BlockParams  # noqa: E402

CLASSES = 10


def _byob(blocks: tuple, stem_type: str, stem_chs: int) -> nn.Module:
    return byob.ByobNet(byob.ByoModelCfg(blocks=blocks, stem_type=stem_type, stem_chs=stem_chs), num_classes=CLASSES)


def _timm_cspnet() -> nn.Module:
    """CSPResNet-style stages: ConvNormAct (BatchNormAct2d with LeakyReLU) everywhere, each stage's blocks
    working on a channel slice of the expanded input (x.split) and its output concatenated back."""
    cfg = csp.CspModelCfg(
        stem=csp.CspStemCfg(out_chs=16, stride=4, kernel_size=3, pool="max"),
        stages=csp.CspStagesCfg(
            depth=(1, 1), out_chs=(32, 64), stride=(1, 2), expand_ratio=2.0, bottle_ratio=0.5, cross_linear=True
        ),
    )
    return csp.CspNet(cfg, num_classes=CLASSES)


def _tv_mobilenet_v3() -> nn.Module:
    cfg = partial(InvertedResidualConfig, width_mult=1.0)
    setting = [cfg(8, 3, 8, 8, True, "RE", 2, 1), cfg(8, 3, 24, 16, False, "HS", 2, 1)]
    return tvm.MobileNetV3(setting, last_channel=32, num_classes=CLASSES)


# name -> (builder, input height/width): every one trains from random init, no weights are fetched
MODELS: dict[str, tuple[Callable[[], nn.Module], int]] = {
    "timm_resnet": (
        lambda: ResNet(
            block=[BasicBlock, BasicBlock, Bottleneck, BasicBlock],
            layers=(1, 1, 1, 1),
            channels=(8, 8, 8, 16),
            stem_width=8,
            output_stride=16,
            num_classes=CLASSES,
        ),
        32,
    ),
    "timm_repvgg": (
        lambda: _byob(
            (
                byob.ByoBlockCfg(type="rep", d=1, c=8, s=2, gs=0, br=1.0),
                byob.ByoBlockCfg(type="rep", d=1, c=16, s=2, gs=0, br=1.0),
            ),
            "rep",
            8,
        ),
        16,
    ),
    "timm_mobileone": (
        lambda: _byob(
            (
                byob.ByoBlockCfg(type="one", d=1, c=8, s=2, gs=1, br=1.0),
                byob.ByoBlockCfg(type="one", d=1, c=16, s=2, gs=1, br=1.0),
            ),
            "one",
            8,
        ),
        16,
    ),
    "timm_efficientnet": (
        lambda: EfficientNet(
            decode_arch_def([["ds_r1_k3_s1_e1_c8"], ["ir_r1_k3_s2_e4_c16_se0.25"], ["ir_r1_k5_s2_e4_c24_se0.25"]]),
            stem_size=8,
            num_features=32,
            num_classes=CLASSES,
        ),
        16,
    ),
    "timm_ghostnet": (
        lambda: GhostNet([[[3, 8, 8, 0, 1]], [[3, 24, 16, 0.25, 2]]], drop_rate=0.0, num_classes=CLASSES),
        16,
    ),
    "timm_fastvit": (
        lambda: FastVit(
            layers=(1, 1),
            embed_dims=(8, 16),
            mlp_ratios=(2, 2),
            downsamples=(False, True),
            token_mixers=("repmixer", "repmixer"),
            pos_embs=(None, None),
            num_classes=CLASSES,
        ),
        16,
    ),
    "timm_inceptionnext": (lambda: MetaNeXt(depths=(1, 1), dims=(16, 16), num_classes=CLASSES), 16),
    "timm_cspnet": (_timm_cspnet, 32),
    # Res2Net: each 3x3 conv of a block reads one channel slice of the 1x1's output (torch.split), then concat
    "timm_res2net": (
        lambda: ResNet(
            block=Bottle2neck,
            layers=(1, 1, 1, 1),
            channels=(8, 8, 8, 8),
            base_width=26,  # Res2Net-50's: 3 channels per slice at this width
            block_args=dict(scale=4),
            stem_width=8,
            output_stride=16,
            num_classes=CLASSES,
        ),
        32,
    ),
    "timm_starnet": (lambda: StarNet(base_dim=8, depths=[1, 1], num_classes=CLASSES), 16),
    "tv_mobilenet_v2": (
        lambda: tvm.MobileNetV2(
            num_classes=CLASSES,
            inverted_residual_setting=[[1, 8, 1, 1], [4, 16, 1, 2]],
            width_mult=1.0,
            round_nearest=8,
        ),
        16,
    ),
    "tv_mobilenet_v3": (_tv_mobilenet_v3, 16),
    "tv_regnet": (
        lambda: tvm.RegNet(
            BlockParams(
                depths=[1, 1],
                widths=[8, 16],
                group_widths=[8, 8],
                bottleneck_multipliers=[1.0, 1.0],
                strides=[2, 2],
                se_ratio=0.25,
            ),
            stem_width=8,
            num_classes=CLASSES,
        ),
        16,
    ),
    "tv_efficientnet": (
        lambda: tvm.EfficientNet(
            [MBConvConfig(1, 3, 1, 8, 8, 1, 1.0, 1.0), MBConvConfig(4, 3, 2, 8, 16, 1, 1.0, 1.0)],
            dropout=0.0,
            last_channel=32,
            num_classes=CLASSES,
        ),
        16,
    ),
    "tv_densenet": (  # pre-activation BN -> ReLU -> conv on concatenated features
        lambda: tvm.DenseNet(growth_rate=8, block_config=(2, 2), num_init_features=16, bn_size=2, num_classes=CLASSES),
        16,
    ),
    "tv_convnext": (
        lambda: tvm.ConvNeXt([CNBlockConfig(8, 16, 1), CNBlockConfig(16, None, 1)], num_classes=CLASSES),
        16,
    ),
}


def build(name: str) -> nn.Module:
    """A fresh model (call under a fixed seed for the same weights), every dropout and drop path off."""
    make, _ = MODELS[name]
    model = make()
    for m in model.modules():
        if isinstance(m, nn.Dropout) or type(m).__name__ in ("DropPath", "StochasticDepth"):
            for attr in ("p", "drop_prob"):
                if hasattr(m, attr):
                    setattr(m, attr, 0.0)
    return model
