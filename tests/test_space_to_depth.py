"""Space-to-depth stems: the folded stride-1 conv equals the strided one, forward and gradients."""

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from convcases import Case, run_case, spec_of

from tunerd.kernels import generator, trust
from tunerd.kernels import space_to_depth as s2d
from tunerd.kernels.autograd import conv
from tunerd.kernels.schedule import Schedule, ScheduleError, check, default
from tunerd.kernels.spec import conv_spec
from tunerd.schedules import space
from tunerd.schedules.device import DeviceLimits

CASES = [  # c, k, (h, w), kernel, stride, padding
    (3, 8, (28, 28), 7, 2, 3),  # ResNet stem
    (3, 5, (17, 13), 7, 2, 3),  # odd sizes: the folded input crops / pads rows never read
    (3, 16, (16, 16), 4, 4, 0),  # ConvNeXt patch stem -> 1x1 over 48 channels
    (3, 4, (15, 15), 3, 2, 1),  # MobileNet stem
    (1, 3, (9, 11), 5, 3, (2, 1)),  # stride 3, different padding per dim
    (4, 6, (10, 12), (5, 3), (2, 3), ((2, 1), (0, 1))),  # asymmetric kernel, stride and padding pairs
]


def _spec(c, k, size, kernel, stride, padding, n=2):
    return conv_spec(n=n, c=c, k=k, in_size=size, kernel=kernel, stride=stride, padding=padding)


def _reference(x, w, spec):
    (pt, pb), (pl, pr) = spec.padding
    return F.conv2d(F.pad(x, (pl, pr, pt, pb)), w, stride=spec.stride)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"c{c[0]}k{c[3]}s{c[4]}")
def test_folded_conv_equals_the_strided_conv_with_gradients(case):
    spec = _spec(*case)
    new = s2d.rewrite(spec)
    assert new.stride == (1, 1) and not new.has_padding and new.c % s2d.CHANNEL_MULTIPLE == 0
    assert new.out_size == spec.out_size
    x = torch.randn(spec.n, spec.c, *spec.in_size, dtype=torch.float64, requires_grad=True)
    w = torch.randn(spec.k, spec.c, *spec.kernel, dtype=torch.float64, requires_grad=True)
    ref = _reference(x, w, spec)
    y = F.conv2d(s2d.fold_input(x, spec), s2d.fold_weight(w, spec))
    assert y.shape == ref.shape
    torch.testing.assert_close(y, ref, rtol=0, atol=1e-12)
    dy = torch.randn_like(ref)
    gx, gw = torch.autograd.grad(ref, (x, w), dy)
    fx, fw = torch.autograd.grad(y, (x, w), dy)
    torch.testing.assert_close(fx, gx, rtol=0, atol=1e-12)
    torch.testing.assert_close(fw, gw, rtol=0, atol=1e-12)


def test_folded_input_is_channels_last_and_padded_with_zero_channels():
    spec = _spec(3, 8, (14, 14), 7, 2, 3)
    x = torch.randn(2, 3, 14, 14)
    xf = s2d.fold_input(x, spec)
    assert xf.shape == (2, 16, *s2d.rewrite(spec).in_size)
    assert xf.is_contiguous(memory_format=torch.channels_last)
    assert torch.count_nonzero(xf[:, 12:]) == 0
    wf = s2d.fold_weight(torch.randn(8, 3, 7, 7), spec)
    assert wf.shape == (8, 16, 4, 4) and torch.count_nonzero(wf[:, 12:]) == 0
    # tap (u, v) = (3, *) holds kernel rows s*u + a = 6 (a=0) and 7 (a=1, outside the 7x7 kernel: zero)
    assert torch.count_nonzero(wf[:, 6:12, 3, :]) == 0


@pytest.mark.parametrize(
    "kw, why",
    [
        (dict(c=16, stride=2), "many channels: rows are already 16-byte vectors"),
        (dict(c=3, stride=1), "stride 1: nothing to fold"),
        (dict(c=3, stride=2, dilation=2), "dilated"),
        (dict(c=4, stride=2, groups=2), "grouped"),
    ],
)
def test_other_convs_are_not_rewritten(kw, why):
    spec = conv_spec(
        n=1,
        c=kw["c"],
        k=8,
        in_size=(16, 16),
        kernel=3,
        stride=kw["stride"],
        padding=1,
        dilation=kw.get("dilation", 1),
        groups=kw.get("groups", 1),
    )
    assert not s2d.applies(spec), why
    with pytest.raises(ValueError, match="does not apply"):
        s2d.rewrite(spec)


# ---- the folded kernel: schedule option, default for stems, forward and training -------------------------
TOL = {"float32": 1e-5, "float16": 2e-3, "bfloat16": 1.6e-2}
STEM = Case(2, 3, 8, (13, 11), 7, stride=2, padding=3, epilogue={"affine": True, "activation": "relu"})


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_stem_default_runs_folded_and_matches_float64(dtype):
    spec = spec_of(STEM, dtype)
    assert default(spec).space_to_depth
    assert run_case(STEM, dtype) < TOL[dtype]  # NaN-poisoned output, float64 torch reference


def test_folded_and_unfolded_schedules_agree_on_a_patch_stem():
    case = Case(2, 3, 16, (8, 12), 4, stride=4, epilogue={"bias": True})
    spec = spec_of(case, "float32")
    folded = default(spec)
    assert folded.space_to_depth and s2d.rewrite(spec).kernel == (1, 1)
    assert run_case(case, "float32", schedule=folded) < TOL["float32"]
    assert run_case(case, "float32", schedule=replace(folded, space_to_depth=False, k_order="flat")) < TOL["float32"]


def test_training_through_the_folded_stem_matches_float64():
    x = torch.randn(2, 3, 12, 10, requires_grad=True)
    w = (torch.randn(8, 3, 7, 7) * 0.1).requires_grad_()
    b = torch.randn(8, requires_grad=True)
    y, mean, var = conv(x, w, b, 2, 3, ndim=2, stats=True)
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, w, b))
    z64 = F.conv2d(x64, w64, stride=2, padding=3)
    ref = z64 + b64[:, None, None]
    torch.testing.assert_close(y.double(), ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(mean.double(), z64.mean((0, 2, 3)), rtol=0, atol=1e-5)
    torch.testing.assert_close(var.double(), z64.var((0, 2, 3), unbiased=False), rtol=0, atol=1e-5)
    dy = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, w, b), dy)
    want = torch.autograd.grad(ref, (x64, w64, b64), dy.double())
    for g, r in zip(got, want):
        torch.testing.assert_close(g.double(), r, rtol=0, atol=1e-4)


def test_schedule_option_is_checked_keyed_and_re_rendered():
    spec = spec_of(STEM, "bfloat16")
    s = default(spec)
    assert "space_to_depth" not in Schedule().to_dict()  # every other schedule keeps its key
    assert Schedule.from_dict(s.to_dict()) == s
    with pytest.raises(ScheduleError, match="must be a bool"):
        Schedule.from_dict({**s.to_dict(), "space_to_depth": 1})
    dense = conv_spec(n=2, c=32, k=32, in_size=(8, 8), kernel=3, stride=2, padding=1)
    with pytest.raises(ScheduleError, match="space_to_depth folds"):
        check(dense, replace(default(dense), space_to_depth=True))
    v = generator.render(spec, s)
    assert v.schedule.space_to_depth and v.spec == spec
    assert v.source == generator.render(s2d.rewrite(spec), replace(s, space_to_depth=False)).source
    assert trust.verify(spec, s.to_dict(), v.source, variant_id=v.id).id == v.id


def test_tuning_space_offers_folded_and_unfolded_stem_schedules():
    spec = spec_of(STEM, "bfloat16")
    cands = space.space(spec, DeviceLimits.h100())
    assert any(s.space_to_depth for s in cands) and any(not s.space_to_depth for s in cands)
    for s in cands:
        check(spec, s)
