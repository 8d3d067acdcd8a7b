"""timm's layers that patch knows beyond torch's: BatchNormAct2d (BatchNorm, drop and activation in one module, in
timm's ConvNormAct and most of its modern models) fuses with the conv before it like nn.BatchNorm2d, the activation
too when the epilogue has it and nothing sits between, else the module keeps applying its drop and act; Conv2dSame
(TensorFlow 'SAME' padding from each input's size) runs with the kernel's own padding; a module torch.fx cannot
trace is traced child by child."""

from __future__ import annotations

import copy
from functools import partial

import models_zoo as zoo
import pytest
import torch
from test_train_models import _randomize
from timm.layers import Conv2dSame, ConvNormAct
from timm.layers.norm_act import BatchNormAct2d
from torch import nn

from tunerd.kernels.convargs import tf_same_padding
from tunerd.nn import is_norm_act
from tunerd.patching import patch, unpatch

pytestmark = pytest.mark.usefixtures("one_thread")


class _OwnForward(BatchNormAct2d):
    """A subclass with its own forward: not timm's semantics, so never fused."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 2.0


def _same_as_torch(base: nn.Module, x: torch.Tensor) -> dict[str, str]:
    """Train step and eval forward of base patched (float32) vs unpatched in float64; the report's fused pairs."""
    _randomize(base, torch.Generator().manual_seed(3))
    ours, ref = copy.deepcopy(base), copy.deepcopy(base).double()
    report = patch(ours)
    close = dict(rtol=1e-4, atol=1e-5)
    ours.train(), ref.train()
    y, r = ours(x), ref(x.double())
    torch.testing.assert_close(y.double(), r, **close)
    dy = torch.randn_like(r)
    (y * dy.float()).sum().backward()
    (r * dy).sum().backward()
    for (n, p), q in zip(ref.named_parameters(), ours.parameters()):
        torch.testing.assert_close(q.grad.double(), p.grad, **close, msg=n)
    for (n, b), c in zip(ref.named_buffers(), ours.buffers()):
        torch.testing.assert_close(c.to(b.dtype), b, **close, msg=n)
    ours.eval(), ref.eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(x).double(), ref(x.double()), **close)
    unpatch(ours)
    assert not any("_tunerd_orig_class" in vars(m) for m in ours.modules())
    return dict(report.fused)


@pytest.mark.parametrize(
    "act, absorbed",
    [(nn.ReLU, True), (nn.SiLU, True), (nn.LeakyReLU, True), (partial(nn.LeakyReLU, 0.1), False), (nn.Identity, False)],
    ids=["relu", "silu", "leaky_relu", "leaky_relu_0.1", "identity"],
)
def test_conv_norm_act_fuses_its_batchnorm_and_absorbable_activation(act, absorbed):
    block = nn.Sequential(ConvNormAct(4, 8, 3, act_layer=act), ConvNormAct(8, 6, 1, act_layer=act))
    assert is_norm_act(block[0].bn)
    fused = _same_as_torch(block, torch.randn(2, 4, 7, 9))
    want = "0.bn + 0.bn.act" if absorbed else "0.bn"
    assert fused == {"0.conv": want, "1.conv": want.replace("0.", "1.")}


def test_a_drop_between_norm_and_act_keeps_the_act_outside():
    bn = BatchNormAct2d(8, act_layer=nn.ReLU, drop_layer=lambda: nn.Dropout(0.0))
    fused = _same_as_torch(nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), bn), torch.randn(2, 4, 6, 6))
    assert fused == {"0": "1"}  # BN fused; dropout then ReLU still run by the module


def test_identity_norm_act_takes_the_activation_module_after_it():
    bn = BatchNormAct2d(8, apply_act=False)
    fused = _same_as_torch(nn.Sequential(nn.Conv2d(4, 8, 3), bn, nn.Hardswish()), torch.randn(2, 4, 6, 6))
    assert fused == {"0": "1 + 2"}


def test_a_subclass_with_its_own_forward_is_left_alone():
    m = nn.Sequential(nn.Conv2d(4, 8, 3), _OwnForward(8, act_layer=nn.ReLU))
    assert not is_norm_act(m[1])
    assert _same_as_torch(m, torch.randn(2, 4, 6, 6)) == {}


@pytest.mark.parametrize(
    "kernel, stride, dilation, size",
    [(3, 2, 1, (7, 10)), (5, 2, 1, (9, 8)), (3, 1, 2, (6, 7)), (4, 3, 1, (11, 5))],
    ids=["3x3s2", "5x5s2", "3x3d2", "4x4s3"],
)
def test_conv2d_same_pads_per_input_size_in_the_kernel(kernel, stride, dilation, size):
    conv = Conv2dSame(4, 8, kernel, stride=stride, dilation=dilation, bias=False)
    fused = _same_as_torch(nn.Sequential(conv, BatchNormAct2d(8, act_layer=nn.SiLU)), torch.randn(2, 4, *size))
    assert fused == {"0": "1 + 1.act"}
    y = _same_as_torch(
        nn.Sequential(Conv2dSame(4, 6, kernel, stride=stride, dilation=dilation)), torch.randn(1, 4, *size)
    )
    assert y == {}  # a lone Conv2dSame: swapped (not fused), same numbers
    report = patch(nn.Sequential(Conv2dSame(4, 6, kernel, stride=stride)))
    assert report.swapped == [("0", "Conv2dSame")] and not report.left
    pads = tf_same_padding(size, (kernel,) * 2, (stride,) * 2, (dilation,) * 2)
    assert all(high - low in (0, 1) for low, high in pads)


def test_tuning_specs_of_conv2d_same_carry_its_padding():
    """schedules.model_specs: a Conv2dSame's spec pads as the layer does (its padding attribute says 0)."""
    from tunerd.schedules.suites import model_specs

    (spec,) = model_specs(nn.Sequential(Conv2dSame(4, 8, 3, stride=2)), torch.randn(1, 4, 8, 11))
    assert spec.padding == ((0, 1), (1, 1)) and spec.out_size == (4, 6)


@pytest.mark.parametrize("name, pairs", [("timm_efficientnet", 10), ("timm_cspnet", 14), ("timm_fastvit", 2)])
def test_timm_models_built_on_conv_norm_act_fuse(name, pairs):
    report = patch(zoo.build(name))
    assert len(report.fused) == pairs, str(report)


class _Untraceable(nn.Module):
    """Data-dependent control flow at the top (torch.fx cannot trace it) over traceable conv -> BN children."""

    def __init__(self) -> None:
        super().__init__()
        self.a = ConvNormAct(4, 8, 3, act_layer=nn.SiLU)
        self.b = nn.Sequential(nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8), nn.ReLU())
        self.c = nn.Conv2d(8, 6, 3, padding=1)
        self.c_bn = nn.BatchNorm2d(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.b(self.a(x))
        if y.sum() > 0:  # data-dependent: the top level does not trace
            y = y * 2.0
        return self.c_bn(self.c(y))  # called from the untraceable forward: never fused


def test_untraceable_parents_are_traced_child_by_child():
    fused = _same_as_torch(_Untraceable(), torch.randn(2, 4, 7, 7))
    assert fused == {"a.conv": "a.bn + a.bn.act", "b.0": "b.1 + b.2"}
    report = patch(_Untraceable())
    assert report.left == [
        ("<model>", "torch.fx could not trace the model (TraceError); BatchNorm after their own convs left unfused")
    ]


@pytest.mark.parametrize(
    "name, convs, fused",
    [("tf_efficientnet_b0", 81, 49), ("efficientvit_b0", 50, 26), ("cspdarknet53", 67, 67), ("regnety_016", 140, 86)],
)
def test_full_timm_architectures_fuse_every_conv_bn_pair(name, convs, fused):
    """Tracing only (no forward): Conv2dSame, an untraceable top level (EfficientViT) and BatchNormAct2d."""
    import timm

    report = patch(timm.create_model(name, pretrained=False))
    assert (len(report.swapped), len(report.fused)) == (convs, fused), str(report)
