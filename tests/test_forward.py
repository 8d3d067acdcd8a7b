"""Forward correctness of every generated family against float64 torch, on poisoned outputs."""

import pytest
import torch
from convcases import Case, random_case, run_case
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tunerd.kernels import reference
from tunerd.kernels.schedule import Schedule

RESNET = dict(affine=True, residual="pre", activation="relu")  # relu(bn(conv) + identity)
CONVNEXT = dict(layer_scale=True, residual="post")  # identity + gamma * conv
BIAS_GELU = dict(bias=True, activation="gelu")

GEOMETRY = [
    # conv2d implicit GEMM
    Case(2, 16, 32, (9, 9), 3, padding=1),  # ResNet 3x3
    Case(2, 32, 16, (6, 7), 1),  # 1x1 pointwise path
    Case(2, 32, 48, (8, 8), 1, stride=2),  # 1x1 stride-2 downsample
    Case(2, 3, 16, (15, 15), 7, stride=2, padding=3),  # RGB stem 7x7 s2 (flat reduction)
    Case(2, 3, 32, (16, 16), 4, stride=4),  # patch embedding, kernel = stride
    Case(2, 32, 32, (8, 8), 3, padding=1, groups=2),  # grouped, 16 channels per group
    Case(2, 32, 32, (8, 8), 3, padding=1, groups=8),  # ResNeXt-like, 4 channels per group
    Case(2, 16, 16, (12, 12), 3, padding=4, dilation=4),  # ASPP atrous
    Case(2, 16, 24, (7, 11), (1, 7), padding=(0, 3)),  # rectangular
    Case(2, 16, 16, (9, 9), 4, padding="same"),  # even kernel 'same' (asymmetric)
    Case(2, 16, 16, (9, 10), 3, padding="valid", stride=(2, 1)),
    # depthwise direct
    Case(2, 24, 24, (9, 9), 3, padding=1, groups=24),
    Case(2, 24, 24, (9, 9), 3, stride=2, padding=1, groups=24),  # MobileNetV2 s2
    Case(2, 16, 16, (10, 10), 7, padding=3, groups=16),  # ConvNeXt 7x7
    Case(2, 8, 8, (9, 9), 5, padding=4, dilation=2, groups=8, n=1),  # UniRepLKNet dilated branch
    Case(2, 16, 16, (6, 13), (1, 11), padding=(0, 5), groups=16),  # InceptionNeXt band 1x11
    Case(2, 16, 16, (13, 6), (11, 1), padding=(5, 0), groups=16),  # band 11x1
    Case(2, 8, 16, (8, 8), 3, padding=1, groups=8, n=1),  # channel multiplier 2
    # conv1d
    Case(1, 16, 24, (20,), 3, padding=1),
    Case(1, 32, 32, (19,), 4, padding=((3, 0),), groups=32),  # Mamba causal short conv
    Case(1, 8, 8, (40,), 31, padding=15, groups=8),  # long depthwise
    Case(1, 16, 16, (21,), 5, stride=2, padding=2),
    # conv3d
    Case(3, 8, 16, (4, 6, 6), 3, padding=1),
    Case(3, 16, 16, (4, 6, 6), (1, 3, 3), padding=(0, 1, 1), groups=16),  # (2+1)D spatial, depthwise
    Case(3, 16, 16, (5, 4, 4), (3, 1, 1), padding=(1, 0, 0)),  # (2+1)D temporal, dense
    Case(3, 8, 8, (4, 5, 5), 3, padding=1, groups=8, stride=(1, 2, 2)),
]


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("case", GEOMETRY, ids=str)
def test_geometry(case, dtype):
    err = run_case(case, dtype)
    assert err < reference.tolerance(dtype), f"rel error {err:.3g}"


EPILOGUES = [
    dict(bias=True),
    BIAS_GELU,
    RESNET,
    CONVNEXT,
    dict(bias=True, affine=True, activation="silu"),
    dict(residual="pre"),
    dict(layer_scale=True, activation="hardswish"),
]
EPILOGUES += [
    dict(bias=True, activation=a)
    for a in ("relu", "relu6", "silu", "gelu_tanh", "hardswish", "sigmoid", "leaky_relu", "starrelu")
]
EP_GEOM = [
    Case(2, 16, 32, (7, 7), 3, padding=1),
    Case(2, 16, 16, (7, 7), 7, padding=3, groups=16),
    Case(1, 16, 16, (12,), 4, padding=((3, 0),), groups=16),
    Case(3, 8, 8, (3, 4, 4), 3, padding=1),
]


@pytest.mark.parametrize("ep", EPILOGUES, ids=lambda e: "+".join(f"{k}={v}" for k, v in e.items()))
@pytest.mark.parametrize("geom", EP_GEOM, ids=str)
def test_epilogue(geom, ep):
    case = Case(**{**geom.__dict__, "epilogue": ep})
    for dtype in ("float32", "bfloat16"):
        err = run_case(case, dtype)
        assert err < reference.tolerance(dtype), f"{dtype}: rel error {err:.3g}"


def test_largest_depthwise_31x31():
    case = Case(2, 4, 4, (8, 8), 31, padding=15, groups=4, n=1, epilogue=dict(bias=True))
    assert run_case(case, "float32") < 1e-5


@pytest.mark.parametrize(
    "schedule",
    [
        Schedule(block_m=16, block_n=16, block_k=16, group_m=1),
        Schedule(block_m=32, block_n=64, block_k=32, group_m=4, k_order="flat"),
        Schedule(block_m=128, block_n=16, block_k=64, group_m=2, k_order="tap"),
    ],
    ids=lambda s: s.describe(),
)
def test_conv_schedules_agree(schedule):
    case = Case(2, 24, 40, (7, 9), 3, padding=1, groups=2, epilogue=RESNET)
    assert run_case(case, "float32", schedule=schedule) < 1e-5


@pytest.mark.parametrize(
    "schedule", [Schedule(block_m=8, block_n=4), Schedule(block_m=64, block_n=32)], ids=lambda s: s.describe()
)
def test_depthwise_schedules_agree(schedule):
    case = Case(2, 20, 20, (7, 7), 5, padding=2, groups=20, epilogue=BIAS_GELU)  # partial tiles either way
    assert run_case(case, "float32", schedule=schedule) < 1e-5


@pytest.mark.parametrize("case", [GEOMETRY[0], GEOMETRY[11], GEOMETRY[22]], ids=str)
def test_memory_format_follows_input(case):
    from convcases import make_inputs, spec_of

    from tunerd import functional as F

    spec = spec_of(case, "float32")
    inp = make_inputs(spec, torch.float32, "cpu")
    fmt = torch.channels_last if case.ndim == 2 else torch.channels_last_3d
    fn = {2: F.conv2d, 3: F.conv3d}[case.ndim]
    y_cf = fn(inp["x"], inp["w"], None, case.stride, case.padding, case.dilation, case.groups)
    y_cl = fn(inp["x"].to(memory_format=fmt), inp["w"], None, case.stride, case.padding, case.dilation, case.groups)
    assert y_cf.is_contiguous()
    assert y_cl.is_contiguous(memory_format=fmt)
    torch.testing.assert_close(y_cf, y_cl)
    # a strided view (every other channel) is accepted too
    xv = torch.randn(spec.n, 2 * spec.c, *spec.in_size)[:, ::2]
    ref = torch.nn.functional.__dict__[f"conv{case.ndim}d"](
        xv, inp["w"], None, case.stride, case.padding, case.dilation, case.groups
    )
    torch.testing.assert_close(
        fn(xv, inp["w"], None, case.stride, case.padding, case.dilation, case.groups), ref, rtol=1e-4, atol=1e-4
    )


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    case=random_case(epilogues=({}, dict(bias=True, activation="relu"), RESNET, CONVNEXT, BIAS_GELU)),
    dtype=st.sampled_from(["float32", "float16"]),
)
def test_random_specs(case, dtype):
    err = run_case(case, dtype)
    assert err < reference.tolerance(dtype), f"{case}: rel error {err:.3g}"


@pytest.mark.parametrize("groups", [1, 16])
def test_bf16_outputs_round_to_nearest_even(groups):
    # the interpreter's fp32 -> bf16 cast truncates; the kernels round there explicitly, as a GPU does.
    # Same bf16-exact inputs in fp32 give the very accumulator, so the bf16 output is its rounding.
    from tunerd.kernels.autograd import conv

    x = torch.randn(2, 16, 6, 6).bfloat16()
    w = torch.randn(16, 16 // groups, 3, 3).bfloat16()
    r = torch.randn(2, 16, 6, 6).bfloat16()
    y = conv(x, w, None, padding=1, groups=groups, ndim=2, activation="relu", residual=r, residual_mode="pre")
    yf = conv(
        x.float(),
        w.float(),
        None,
        padding=1,
        groups=groups,
        ndim=2,
        activation="relu",
        residual=r.float(),
        residual_mode="pre",
    )
    assert torch.equal(y, yf.bfloat16())
    # backward: dz = dy * gamma is fp32 (a bf16 tl.dot operand in the implicit GEMM); dx is stored as bf16
    gamma = torch.rand(16) + 0.5
    dy = torch.randn(2, 16, 6, 6).bfloat16()
    xs, xf = x.clone().requires_grad_(), x.float().requires_grad_()
    conv(xs, w, None, padding=1, groups=groups, ndim=2, layer_scale=gamma).backward(dy)
    dz = dy.float() * gamma.reshape(1, -1, 1, 1)
    if groups == 1:  # the implicit GEMM's tl.dot takes dz as a bf16 operand (rounded here by torch)
        dz = dz.bfloat16().float()
    conv(xf, w.float(), None, padding=1, groups=groups, ndim=2).backward(dz)
    assert torch.equal(xs.grad, xf.grad.bfloat16())
