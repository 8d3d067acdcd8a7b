"""tunerd.functional training path: autograd through the custom ops, needs_input_grad, torch.compile,
BatchNorm statistics, against float64 torch autograd on fresh random inputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as tF
from torch.library import opcheck

from tunerd import functional as F
from tunerd.kernels import conv as kconv
from tunerd.kernels import reference, runtime
from tunerd.kernels.autograd import conv as autograd_conv
from tunerd.kernels.spec import SpecError, conv_spec, normalize_padding

_FN = {1: (F.conv1d, tF.conv1d), 2: (F.conv2d, tF.conv2d), 3: (F.conv3d, tF.conv3d)}
_ACT = {
    "relu": torch.relu,
    "gelu": tF.gelu,
    "silu": tF.silu,
    "hardswish": tF.hardswish,
    "sigmoid": torch.sigmoid,
    None: lambda v: v,
}


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setattr(kconv, "POISON_OUTPUTS", True)


@pytest.fixture
def launched(monkeypatch):
    """The (op, spec) of every kernel launch."""
    seen: list = []
    orig = runtime.launch

    def record(variant, args, device):
        seen.append((variant.spec.op, variant.spec))
        return orig(variant, args, device)

    monkeypatch.setattr(runtime, "launch", record)
    return seen


def _params(
    ndim,
    c,
    k,
    size,
    ks,
    groups,
    *,
    bias=False,
    affine=False,
    residual=None,
    gamma=False,
    star=False,
    stride=1,
    padding=0,
    dilation=1,
):
    x = torch.randn(2, c, *size)
    w = torch.randn(k, c // groups, *((ks,) * ndim)) / (c // groups * ks**ndim) ** 0.5
    out = conv_spec(
        n=2, c=c, k=k, in_size=size, kernel=ks, stride=stride, padding=padding, dilation=dilation, groups=groups
    ).out_size
    p = {"input": x, "weight": w}
    if bias:
        p["bias"] = torch.randn(k)
    if affine:
        p["scale"], p["shift"] = torch.rand(k) + 0.5, torch.randn(k)
    if residual:
        p["residual"] = torch.randn(2, k, *out)
    if gamma:
        p["layer_scale"] = torch.randn(k)
    if star:
        p["starrelu_scale"], p["starrelu_bias"] = torch.tensor(0.9), torch.tensor(-0.3)
    return {n: t.requires_grad_() for n, t in p.items()}


def _reference(ndim, p, stride, padding, dilation, groups, activation, residual_mode):
    """float64 torch forward of the same call on detached float64 leaves (returned in p's order)."""
    q = {n: t.detach().double().requires_grad_() for n, t in p.items()}
    ks = tuple(q["weight"].shape[2:])
    st, dl = (stride,) * ndim if isinstance(stride, int) else stride, (dilation,) * ndim
    pads = [v for pair in reversed(normalize_padding(padding, ks, dl, st)) for v in pair]
    y = tF.__dict__[f"conv{ndim}d"](tF.pad(q["input"], pads), q["weight"], q.get("bias"), stride, 0, dilation, groups)
    ch = (1, -1) + (1,) * ndim
    if "scale" in q:
        y = y * q["scale"].reshape(ch) + q["shift"].reshape(ch)
    if residual_mode == "pre" and "residual" in q:
        y = y + q["residual"]
    if activation == "starrelu":
        y = q["starrelu_scale"] * torch.relu(y) ** 2 + q["starrelu_bias"]
    else:
        y = _ACT[activation](y)
    if "layer_scale" in q:
        y = y * q["layer_scale"].reshape(ch)
    if residual_mode == "post" and "residual" in q:
        y = y + q["residual"]
    return y, q


CASES = [
    # ndim, c, k, size, ks, groups, stride, padding, dilation, activation, residual_mode, extras
    (2, 8, 16, (7, 7), 3, 1, 2, 1, 1, "relu", "pre", dict(affine=True, residual=True)),  # ResNet block tail
    (2, 16, 16, (7, 7), 3, 16, 1, 1, 1, None, "post", dict(bias=True, gamma=True, residual=True)),  # ConvNeXt
    (2, 8, 8, (6, 6), 3, 8, 2, ((0, 1), (1, 0)), 1, "starrelu", "post", dict(star=True, bias=True)),  # learnable s, b
    (1, 16, 16, (12,), 4, 16, 1, ((3, 0),), 1, "silu", "post", dict(bias=True)),  # Mamba causal conv + SiLU
    (1, 8, 16, (13,), 3, 2, 3, 1, 2, "gelu", "post", dict(bias=True, affine=True)),  # grouped, s3, dilated
    (3, 4, 8, (3, 4, 4), 3, 1, (1, 2, 2), 1, 1, "hardswish", "pre", dict(residual=True, gamma=True)),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}d-g{c[5]}-{c[9]}-{c[10]}")
def test_functional_grads_match_float64_torch(case):
    ndim, c, k, size, ks, groups, stride, padding, dilation, act, mode, extra = case
    p = _params(ndim, c, k, size, ks, groups, stride=stride, padding=padding, dilation=dilation, **extra)
    ours = _FN[ndim][0]
    kw = {n: t for n, t in p.items() if n not in ("input", "weight", "bias")}
    y = ours(
        p["input"],
        p["weight"],
        p.get("bias"),
        stride,
        padding,
        dilation,
        groups,
        activation=act,
        residual_mode=mode,
        **kw,
    )
    yref, q = _reference(ndim, p, stride, padding, dilation, groups, act, mode)
    assert reference.rel_error(y, yref) < 1e-5
    dy = torch.randn(yref.shape, dtype=torch.float64)
    got = torch.autograd.grad(y, list(p.values()), dy.float())
    want = torch.autograd.grad(yref, list(q.values()), dy)
    for name, a, b in zip(p, got, want):
        assert a.shape == b.shape, name
        assert reference.rel_error(a, b) < 2e-5, f"{name}: {reference.rel_error(a, b):.3g}"


def test_needs_input_grad_is_respected(launched):
    x = torch.randn(2, 8, 6, 6)
    w = torch.randn(8, 8, 3, 3, requires_grad=True)
    b = torch.randn(8)  # frozen
    y = F.conv2d(x, w, b, padding=1, activation="gelu")
    (gw,) = torch.autograd.grad(y.sum(), [w])
    ops = [op for op, _ in launched]
    assert ops == ["fwd", "wgrad"]  # no dgrad for an input that needs no gradient
    assert launched[0][1].epilogue.save_z  # z kept for gelu'
    ref = torch.nn.grad.conv2d_weight(x.double(), w.shape, _gelu_grad(x, w, b), padding=1)
    assert reference.rel_error(gw, ref) < 1e-5

    launched.clear()
    xg = x.clone().requires_grad_()
    y = F.conv2d(xg, w.detach(), b, padding=1)  # identity chain
    y.sum().backward()
    assert [op for op, _ in launched] == ["fwd", "dgrad"] and not launched[0][1].epilogue.save_z
    assert xg.grad is not None

    launched.clear()
    with torch.no_grad():
        F.conv2d(xg, w, b, padding=1, activation="gelu")
    assert [op for op, _ in launched] == ["fwd"] and not launched[0][1].epilogue.save_z


def _gelu_grad(x, w, b):
    z = tF.conv2d(x.double(), w.detach().double(), b.double(), padding=1).requires_grad_()
    (g,) = torch.autograd.grad(tF.gelu(z).sum(), [z])
    return g


def test_channels_last_gradients_keep_the_format():
    x = torch.randn(2, 8, 6, 6).to(memory_format=torch.channels_last).requires_grad_()
    w = torch.randn(16, 8, 3, 3, requires_grad=True)
    y = F.conv2d(x, w, None, 2, 1, activation="relu")
    assert y.is_contiguous(memory_format=torch.channels_last)
    y.backward(torch.randn_like(y))
    assert x.grad.is_contiguous(memory_format=torch.channels_last) and w.grad.is_contiguous()


def _block(x, w1, b1, w2, g):
    # a tiny ConvNeXt-like block: depthwise 3x3 + bias, pointwise + GELU, pointwise + layer scale + skip
    h = F.conv2d(x, w1, b1, padding=1, groups=x.shape[1])
    h = F.conv2d(h, w2, None, activation="gelu")
    return F.conv2d(h, w2.transpose(0, 1).contiguous(), None, layer_scale=g, residual=x, residual_mode="post")


def test_torch_compile_gives_the_same_grads():
    torch._dynamo.reset()
    x = torch.randn(2, 16, 5, 5, requires_grad=True)
    ps = [torch.randn(16, 1, 3, 3) / 3, torch.randn(16), torch.randn(32, 16, 1, 1) / 4, torch.randn(16)]
    ps = [p.requires_grad_() for p in ps]
    eager = _block(x, *ps)
    g_eager = torch.autograd.grad(eager.square().sum(), [x, *ps])
    compiled = torch.compile(_block, backend="aot_eager", fullgraph=True)
    out = compiled(x, *ps)
    g_comp = torch.autograd.grad(out.square().sum(), [x, *ps])
    assert torch.equal(out, eager)
    for a, b in zip(g_comp, g_eager):
        assert torch.equal(a, b)


def test_custom_ops_pass_opcheck():
    x, w, b = torch.randn(2, 8, 5, 5), torch.randn(8, 4, 3, 3), torch.randn(8)
    r, star = torch.randn(2, 8, 3, 3), torch.tensor([0.9, -0.3])
    fwd = (
        x,
        w,
        b,
        None,
        None,
        r,
        None,
        star,
        [2, 2],
        [1, 1, 1, 1],
        [1, 1],
        2,
        "starrelu",
        "pre",
        None,
        "ieee",
        True,
        False,
    )
    opcheck(torch.ops.tunerd.conv.default, fwd)
    z = torch.randn(2, 3, 3, 8)
    bwd = (
        torch.randn(2, 8, 3, 3),
        x,
        w,
        z,
        b,
        None,
        None,
        r,
        None,
        star,
        None,
        None,
        None,
        [2, 2],
        [1, 1, 1, 1],
        [1, 1],
        2,
        "starrelu",
        "pre",
        "ieee",
        False,
        [True, True, True, False, False, True, False, True],
    )
    opcheck(torch.ops.tunerd.conv_backward.default, bwd)
    # BatchNorm statistics: (y, z, mean, var) forward; dmean, dvar and the saved mean backward
    fwd = (
        x,
        w[:, :, :2],
        None,
        None,
        None,
        None,
        None,
        None,
        [1, 1],
        [0, 0, 0, 0],
        [1, 1],
        2,
        None,
        "post",
        None,
        "ieee",
        False,
        True,
    )
    opcheck(torch.ops.tunerd.conv.default, fwd)
    k = torch.randn(8)
    bwd = (
        torch.randn(2, 8, 4, 5),
        x,
        w[:, :, :2],
        torch.randn(2, 4, 5, 8),
        None,
        None,
        None,
        None,
        None,
        None,
        k,
        k + 1,
        k - 1,
        [1, 1],
        [0, 0, 0, 0],
        [1, 1],
        2,
        None,
        "post",
        "ieee",
        True,
        [True, True, False, False, False, False, False, False],
    )
    opcheck(torch.ops.tunerd.conv_backward.default, bwd)


def test_batchnorm_train_from_stats_matches_torch():
    # conv -> batch-statistics BN -> relu, with the statistics from the conv kernel itself (differentiable)
    x = torch.randn(4, 8, 6, 6, requires_grad=True)
    w = (torch.randn(16, 8, 3, 3) / 8).requires_grad_()
    gamma, beta = (torch.rand(16) + 0.5).requires_grad_(), torch.randn(16).requires_grad_()
    z, mean, var = autograd_conv(x, w, None, 1, 1, ndim=2, stats=True)
    ch = (1, -1, 1, 1)
    y = torch.relu((z - mean.reshape(ch)) * torch.rsqrt(var.reshape(ch) + 1e-5) * gamma.reshape(ch) + beta.reshape(ch))
    leaves = [x, w, gamma, beta]
    q = [t.detach().double().requires_grad_() for t in leaves]
    yref = torch.relu(tF.batch_norm(tF.conv2d(q[0], q[1], padding=1), None, None, q[2], q[3], training=True))
    assert reference.rel_error(y, yref) < 1e-4
    dy = torch.randn(yref.shape, dtype=torch.float64)
    for a, b in zip(torch.autograd.grad(y, leaves, dy.float()), torch.autograd.grad(yref, q, dy)):
        assert reference.rel_error(a, b) < 1e-4


def test_stats_need_no_extra_z_copy(launched):
    x = torch.randn(2, 8, 5, 5, requires_grad=True)
    w = torch.randn(8, 8, 3, 3, requires_grad=True)
    z, mean, var = autograd_conv(x, w, None, 1, 1, ndim=2, stats=True)
    fwd = launched[0][1]
    assert fwd.epilogue.stats and not fwd.epilogue.save_z  # z is the output itself
    (z.sum() + mean.sum() + var.sum()).backward()
    zd = tF.conv2d(x.double(), w.double(), padding=1)
    # d/dz of (sum z + mean z + biased var z) = 1 + 1/n + 2 (z - mean) / n, n = N * P * Q per channel
    n = zd.numel() // zd.shape[1]
    ref = torch.nn.grad.conv2d_input(
        x.shape, w.double(), 1 + (1 + 2 * (zd - zd.mean((0, 2, 3), keepdim=True))) / n, padding=1
    )
    assert reference.rel_error(x.grad, ref) < 1e-5


def test_bad_learnable_scalars_give_clear_errors():
    x, w = torch.randn(1, 4, 5, 5), torch.randn(4, 4, 3, 3)
    with pytest.raises(SpecError, match="one-element float tensor"):
        F.conv2d(x, w, activation="starrelu", starrelu_scale=torch.ones(2))
    with pytest.raises(SpecError, match="must be a float or a tensor"):
        F.conv2d(x, w, activation="starrelu", starrelu_bias="0.5")
