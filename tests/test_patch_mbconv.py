"""MBConv / inverted-residual blocks with squeeze-excite and ECA, proven from traced graphs and fused.

timm InvertedResidual (SqueezeExcite or EcaModule) and DepthwiseSeparableConv + SE, torchvision
InvertedResidual (MobileNetV2) and MBConv (EfficientNet) trace to kernels.block.mbconv blocks with the seed's
node names (the block suites' store keys); train-mode BatchNorm and gates the se / eca nodes do not compute
are refused with the reason. The description run as a fused plan (NaN-poisoned outputs) equals the module in
float64; block_autograd's gradients through se / eca nodes match float64. The three-SGD-step training match of
an EfficientNet stage is tests/test_patch_blocks.py's (MODELS["timm_efficientnet_stage"]).
"""

from __future__ import annotations

import copy
import re
from functools import partial

import models_zoo  # noqa: F401  (timm and torchvision after tunerd, with torchvision's ops declared)
import pytest
import torch
from blockcheck import check_gradients
from timm.layers import EcaModule
from timm.models._efficientnet_blocks import DepthwiseSeparableConv, InvertedResidual, SqueezeExcite
from torch import nn
from torchvision.models.efficientnet import MBConv, MBConvConfig
from torchvision.models.mobilenetv2 import InvertedResidual as TvInvertedResidual
from torchvision.ops.misc import SqueezeExcitation

from tunerd.blocks import BlockTracer, NotABlock, from_graph, last_plan
from tunerd.kernels import block as B
from tunerd.kernels import block_autograd
from tunerd.kernels.plan import FUSED, rank
from tunerd.kernels.reference import rel_error
from tunerd.patching import patch, unpatch

pytestmark = pytest.mark.usefixtures("one_thread")


def _graph(m: nn.Module, training: bool):
    m.train(training)
    return from_graph(m, BlockTracer().trace(m), training)


def _se(ratio: float):  # timm's EfficientNet sizes SE from the block input: ratio over the expansion
    return partial(SqueezeExcite, rd_ratio=ratio)


# name -> (module, its seed block's keyword arguments (n=1, 8x8), input channels)
MODULES = {
    "timm_ir_se_res": (
        lambda: InvertedResidual(8, 8, 3, exp_ratio=4, act_layer=nn.SiLU, se_layer=_se(0.25 / 4)),
        dict(c=8, k=8, expansion=4),
    ),
    "timm_ir_se_s2": (
        lambda: InvertedResidual(8, 16, 5, stride=2, exp_ratio=6, act_layer=nn.SiLU, se_layer=_se(0.25 / 6)),
        dict(c=8, k=16, expansion=6, kernel=5, stride=2),
    ),
    "timm_ir_eca": (
        lambda: InvertedResidual(12, 12, 3, exp_ratio=4, act_layer=nn.SiLU, se_layer=EcaModule),
        dict(c=12, k=12, expansion=4, attention="eca"),
    ),
    "timm_ds_se": (  # EfficientNet-B0's first block
        lambda: DepthwiseSeparableConv(16, 8, 3, act_layer=nn.SiLU, se_layer=_se(0.25)),
        dict(c=16, k=8, expansion=1),
    ),
    "tv_mobilenetv2": (
        lambda: TvInvertedResidual(8, 8, 1, 6),
        dict(c=8, k=8, expansion=6, act="relu6", attention=None),
    ),
    "tv_mobilenetv2_t1": (
        lambda: TvInvertedResidual(8, 16, 1, 1),
        dict(c=8, k=16, expansion=1, act="relu6", attention=None),
    ),
    "tv_mbconv": (lambda: MBConv(MBConvConfig(4, 3, 1, 8, 8, 1), 0.0, nn.BatchNorm2d), dict(c=8, k=8, expansion=4)),
}


@pytest.mark.parametrize("name", sorted(MODULES))
def test_traced_mbconv_blocks_are_the_seed_blocks(name):
    make, kw = MODULES[name]
    seed = B.mbconv(n=1, in_size=(8, 8), **kw)
    g = _graph(make(), False)
    assert (g.c, g.nodes) == (seed.c, seed.nodes)  # names too: the store's block key
    assert {k for k, _ in g.sources} == set(seed.param_shapes())
    with pytest.raises(NotABlock, match="BatchNorm.*batch statistics in training mode"):
        _graph(make(), True)


def test_a_separable_block_without_gate_keys_as_separable_unless_an_mbconv_class():
    g = _graph(DepthwiseSeparableConv(8, 16, act_layer=nn.ReLU6), False)
    assert g.nodes == B.separable(n=1, c=8, k=16, in_size=(8, 8), act="relu6", pw_act=None).nodes
    g = _graph(TvInvertedResidual(8, 16, 1, 1), False)
    assert g.nodes == B.mbconv(n=1, c=8, k=16, in_size=(8, 8), expansion=1, act="relu6", attention=None).nodes


class _GateOther(nn.Module):
    """An SE whose gate scales a tensor other than the one it pooled: not a channel gate."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 1)
        self.se = SqueezeExcitation(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return y * self.se._scale(x)


@pytest.mark.parametrize(
    "module, reason",
    [
        (lambda: SqueezeExcitation(8, 2, scale_activation=nn.Hardsigmoid), "Hardsigmoid scale_activation on pooled"),
        (lambda: InvertedResidual(8, 8, se_layer=partial(EcaModule, use_mlp=True)), "Conv1d se.conv on pooled"),
        (_GateOther, "scales a tensor other than the one it pooled"),
        (lambda: SqueezeExcitation(8, 2, activation=nn.Tanh), "Tanh activation on pooled channel means"),
    ],
)
def test_gates_without_a_block_node_name_the_reason(module, reason):
    with pytest.raises(NotABlock, match=re.escape(reason)):
        _graph(module(), False)


def _randomize(model: nn.Module, gen: torch.Generator) -> None:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.2)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.2)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)


# the blocks: EfficientNet with SE and residual, stride 2, MobileNetV2 (relu6, no SE), ECA; odd sizes
EVAL = {
    "timm_ir_se_res": (9, 7),
    "timm_ir_se_s2": (11, 10),
    "tv_mobilenetv2": (10, 9),
    "timm_ir_eca": (8, 11),
}


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("name", sorted(EVAL))
def test_fused_eval_block_matches_the_module_in_float64(name, device):
    """The traced description under its fused plan (outputs NaN-poisoned) against the module in float64, and
    the patched module's forward runs that plan."""
    make, kw = MODULES[name]
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(3)
    module = make()
    _randomize(module, gen)
    module = module.to(device).eval()
    x = torch.randn(2, kw["c"], *EVAL[name], generator=gen).to(device)
    g = _graph(module, False)
    blk = g.block(x)
    plan = rank(blk)[0].plan
    assert any(s.kind in FUSED for s in plan.steps), plan.describe()
    with torch.no_grad():
        want = copy.deepcopy(module).double()(x.double())
        got = block_autograd.block(blk, g.params(module, x), x, plan, poison=True)
        assert rel_error(got, want) < 1e-5, rel_error(got, want)
        ours = copy.deepcopy(module)
        report = patch(ours)
        assert [n for n, _ in report.blocks] == [""] and "in eval mode" in report.blocks[0][1]
        assert rel_error(ours(x), want) < 1e-5
    assert last_plan(ours) == (blk, plan)
    assert unpatch(ours) > 0


# ---- block autograd through se / eca nodes -------------------------------------------------------------
GRAD_BLOCKS = {
    "se_res": lambda: B.mbconv(n=2, c=12, k=12, in_size=(7, 6), expansion=4),
    "se_s2": lambda: B.mbconv(n=2, c=10, k=16, in_size=(9, 8), expansion=6, stride=2),
    "eca_relu6": lambda: B.mbconv(n=2, c=12, k=12, in_size=(6, 7), expansion=4, act="relu6", attention="eca"),
    "se_t1": lambda: B.mbconv(n=2, c=16, k=8, in_size=(8, 8), expansion=1),
}


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("name", sorted(GRAD_BLOCKS))
def test_mbconv_gradients_match_float64(name, device):
    blk = GRAD_BLOCKS[name]()
    plan = rank(blk)[0].plan
    assert any(s.kind in FUSED for s in plan.steps), plan.describe()
    params = check_gradients(blk, plan, seed=5, device=device)
    gate = next(nd.name for nd in blk.nodes if nd.op in B.GATES)
    assert any(k.startswith(gate + ".") for k in params)  # the gate's parameters get gradients too


def test_report_names_the_blocks_fused_in_eval_and_why_train_falls_back():
    from test_patch_blocks import MODELS as SGD_MODELS  # the EfficientNet stage the SGD test trains

    make, x_shape, _ = SGD_MODELS["timm_efficientnet_stage"]
    torch.manual_seed(0)
    model = make().eval()
    report = patch(model, example_input=torch.randn(x_shape))
    text, kernels = str(report), dict(report.kernels)
    for name, kind in (("0.0", "DepthwiseSeparableConv"), ("1.0", "InvertedResidual"), ("1.1", "InvertedResidual")):
        assert f"block   {name}: {kind} as a fused block plan in eval mode" in text
        why = "BatchNormAct2d bn1: BatchNorm normalises with batch statistics in training mode"
        assert f"left    {name}: {kind} in train mode runs per-conv kernels: {why}" in text
        assert kernels[name].startswith("plan ") and "default tile schedules" in kernels[name], kernels[name]
        assert kernels[f"{name}.se.conv_reduce"] == f"computed inside the fused block {name}"
    assert "[se+project" in kernels["1.1"], kernels["1.1"]  # the gate runs in the project conv's prologue
