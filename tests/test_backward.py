"""Backward kernels (dgrad, wgrad, the epilogue chain's gradients, BatchNorm statistics) against
float64 torch autograd, on fresh random inputs with every kernel-written buffer NaN-poisoned."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as tF
from convcases import DTYPES, Case, make_inputs, random_case, spec_of
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tunerd.kernels import conv, generator, reference
from tunerd.kernels import epilogue as E
from tunerd.kernels.backward import Needs, conv_backward, grad_spec
from tunerd.kernels.conv import EpilogueArgs, run_forward
from tunerd.kernels.schedule import Schedule, check, default, next_pow2
from tunerd.kernels.spec import Epilogue, SpecError, conv_spec
from tunerd.kernels.validate import compile_check

_CONV = {1: tF.conv1d, 2: tF.conv2d, 3: tF.conv3d}
RESNET = dict(affine=True, residual="pre", activation="relu")  # relu(bn(conv) + identity)
CONVNEXT = dict(layer_scale=True, residual="post")  # identity + layer_scale * conv
EVERYTHING = dict(bias=True, affine=True, residual="pre", activation="gelu", layer_scale=True)


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setattr(conv, "POISON_OUTPUTS", True)


def _tol(dtype: str) -> float:
    # fp32 accumulation over a few hundred terms; 16-bit dz operands add one rounding
    return {"float32": 2e-5, "float16": 3e-3, "bfloat16": 2e-2}[dtype]


def grad_errors(
    case: Case,
    dtype: str = "float32",
    device: str = "cpu",
    *,
    stats: bool = False,
    needs: Needs | None = None,
    schedules: dict | None = None,
    channels_last: bool = False,
) -> dict[str, float]:
    """Forward (saving z) then backward; relative error of every computed gradient vs float64 autograd."""
    spec0 = spec_of(case, dtype)
    ep_spec = dataclasses.replace(spec0.epilogue, stats=stats)
    spec = spec0.with_(epilogue=dataclasses.replace(ep_spec, save_z=E.saves_z(ep_spec)))
    inp = make_inputs(spec0, DTYPES[dtype], device)
    x = inp["x"]
    if channels_last and case.ndim > 1:
        x = x.to(memory_format=torch.channels_last if case.ndim == 2 else torch.channels_last_3d)
    star_keys = ("starrelu_scale", "starrelu_bias")
    star = [torch.tensor(inp[k], device=device) for k in star_keys] if "starrelu_scale" in inp else [1.0, 0.0]
    ep = EpilogueArgs(
        bias=inp.get("bias"),
        scale=inp.get("scale"),
        shift=inp.get("shift"),
        residual=inp.get("residual"),
        layer_scale=inp.get("layer_scale"),
        activation=spec.epilogue.activation,
        residual_mode=spec.epilogue.residual or "post",
        starrelu_scale=star[0],
        starrelu_bias=star[1],
    )
    res = run_forward(spec, x, inp["w"], ep)

    d = torch.float64
    leaf = {
        k: inp[k].to(d).requires_grad_()
        for k in ("x", "w", "bias", "scale", "shift", "residual", "layer_scale")
        if k in inp
    }
    if "starrelu_scale" in inp:
        leaf["starrelu"] = torch.tensor([inp["starrelu_scale"], inp["starrelu_bias"]], dtype=d, requires_grad=True)
    z = _CONV[spec.ndim](
        reference.pad_input(spec, leaf["x"]), leaf["w"], None, spec.stride, 0, spec.dilation, spec.groups
    )
    y = E.apply_torch(
        spec.epilogue,
        z,
        bias=leaf.get("bias"),
        scale=leaf.get("scale"),
        shift=leaf.get("shift"),
        residual=leaf.get("residual"),
        layer_scale=leaf.get("layer_scale"),
        starrelu_scale=leaf["starrelu"][0] if "starrelu" in leaf else 1.0,
        starrelu_bias=leaf["starrelu"][1] if "starrelu" in leaf else 0.0,
    )
    errs = {"y": reference.rel_error(res.y, y)}
    dy = torch.randn(y.shape, dtype=d, device=device)
    loss = (y * dy).sum()
    dmean = dvar = None
    if stats:
        dims = (0,) + tuple(range(2, spec.ndim + 2))
        var, mean = torch.var_mean(z, dims, correction=0)
        errs["mean"] = reference.rel_error(res.mean, mean)
        errs["var"] = reference.rel_error(res.var, var)
        dmean, dvar = torch.randn(spec.k, dtype=d, device=device), torch.randn(spec.k, dtype=d, device=device)
        loss = loss + (mean * dmean).sum() + (var * dvar).sum()
    ref = dict(zip(leaf, torch.autograd.grad(loss, list(leaf.values()))))
    names = {
        "x": "input",
        "w": "weight",
        "bias": "bias",
        "scale": "scale",
        "shift": "shift",
        "residual": "residual",
        "layer_scale": "layer_scale",
        "starrelu": "starrelu",
    }
    if needs is None:
        needs = Needs(**{names[k]: True for k in leaf})
    g = conv_backward(dy.to(DTYPES[dtype]), x, inp["w"], spec, ep, res.z, needs, dmean, dvar, res.mean, schedules)
    for k, name in names.items():
        got = getattr(g, name)
        if not getattr(needs, name) or k not in leaf:
            assert got is None, f"{name} gradient computed but not requested"
            continue
        assert got.shape == ref[k].shape, (name, got.shape, ref[k].shape)
        errs[name] = reference.rel_error(got, ref[k])
    if channels_last and g.input is not None:
        assert g.input.stride() == x.stride()
    return errs


def _assert_ok(errs: dict[str, float], dtype: str) -> None:
    bad = {k: f"{v:.3g}" for k, v in errs.items() if not v < _tol(dtype)}
    assert not bad, f"relative errors above {_tol(dtype)}: {bad}"


GEOMETRY = [
    # conv2d implicit GEMM
    Case(2, 16, 32, (7, 7), 3, padding=1),
    Case(2, 16, 24, (9, 9), 3, stride=2, padding=1),  # stride 2: 4 phases
    Case(2, 16, 16, (10, 11), 3, stride=3, padding=((1, 2), (0, 1))),  # stride 3, asymmetric padding
    Case(2, 16, 16, (11, 11), 3, stride=2, padding=2, dilation=2),  # gcd(stride, dilation) = 2: tapless phases
    Case(2, 16, 16, (10, 10), 3, padding=4, dilation=4, n=1),  # ASPP atrous
    Case(2, 3, 16, (15, 15), 7, stride=2, padding=3),  # RGB stem: wgrad over flattened (tap, c)
    Case(2, 32, 32, (6, 6), 3, padding=1, groups=8, n=1),  # 4 channels per group: flat dgrad and wgrad
    Case(2, 32, 48, (6, 6), 1, stride=2),  # 1x1 s2: odd pixels get no gradient (zeros, not garbage)
    Case(2, 16, 16, (8, 8), 4, padding="same", n=1),  # even kernel, asymmetric 'same'
    Case(2, 3, 16, (16, 16), 4, stride=4),  # patch embedding
    # depthwise direct
    Case(2, 24, 24, (9, 9), 3, padding=1, groups=24),
    Case(2, 24, 24, (9, 9), 3, stride=2, padding=1, groups=24),
    Case(2, 16, 16, (10, 10), 7, padding=3, groups=16),  # ConvNeXt 7x7: 49 taps over several tap blocks
    Case(2, 8, 16, (8, 8), 3, padding=1, groups=8, n=1),  # channel multiplier 2
    Case(2, 8, 24, (7, 7), 3, stride=3, padding=1, groups=8),  # multiplier 3, stride 3
    Case(2, 8, 8, (9, 9), 5, padding=4, dilation=2, groups=8, n=1),  # dilated branch
    # conv1d
    Case(1, 16, 24, (20,), 3, padding=1),
    Case(1, 32, 32, (19,), 4, padding=((3, 0),), groups=32),  # Mamba causal short conv
    Case(1, 16, 16, (21,), 5, stride=2, padding=2),
    # conv3d
    Case(3, 8, 16, (4, 5, 5), 3, padding=1, n=1),
    Case(3, 8, 16, (5, 6, 6), 3, stride=2, padding=1, n=1),
    Case(3, 16, 16, (4, 6, 6), (1, 3, 3), padding=(0, 1, 1), groups=16),  # (2+1)D spatial, depthwise
    Case(3, 8, 8, (4, 5, 5), 3, padding=1, groups=8, stride=(1, 2, 2)),
]


@pytest.mark.parametrize("case", GEOMETRY, ids=str)
def test_geometry_grads(case):
    _assert_ok(grad_errors(case), "float32")


@pytest.mark.parametrize(
    "case,dtype",
    [
        (GEOMETRY[1], "bfloat16"),
        (GEOMETRY[6], "float16"),
        (GEOMETRY[11], "bfloat16"),
        (GEOMETRY[17], "float16"),
        (GEOMETRY[20], "bfloat16"),
    ],
    ids=str,
)
def test_half_precision_grads(case, dtype):
    _assert_ok(grad_errors(case, dtype, channels_last=True), dtype)


ACTIVATIONS = ["relu", "relu6", "silu", "gelu", "gelu_tanh", "hardswish", "sigmoid", "leaky_relu", "starrelu"]
# dense (dgrad by phases + split-K wgrad) and depthwise (direct) kernels
EP_GEOM = [Case(2, 16, 16, (7, 7), 3, stride=2, padding=1), Case(2, 16, 16, (7, 7), 3, padding=1, groups=16)]


@pytest.mark.parametrize("act", ACTIVATIONS)
@pytest.mark.parametrize("geom", EP_GEOM, ids=str)
def test_activation_grads(geom, act):
    case = dataclasses.replace(geom, epilogue=dict(bias=True, activation=act))
    _assert_ok(grad_errors(case), "float32")


CHAINS = [
    RESNET,
    CONVNEXT,
    EVERYTHING,
    dict(residual="pre"),
    dict(bias=True, affine=True),
    dict(affine=True, activation="starrelu", layer_scale=True, residual="post"),
]
CHAIN_GEOM = [
    Case(2, 16, 24, (7, 7), 3, stride=2, padding=1),
    Case(2, 16, 16, (7, 7), 3, padding=1, groups=16),
    Case(1, 16, 16, (12,), 4, padding=((3, 0),), groups=16),
    Case(3, 8, 8, (3, 4, 4), 3, padding=1, n=1),
]


# every chain on a dense and a depthwise geometry; 1d and 3d take turns
@pytest.mark.parametrize(
    "geom,ep",
    [(CHAIN_GEOM[j if j < 2 else 2 + i % 2], ep) for i, ep in enumerate(CHAINS) for j in (0, 1, 2)],
    ids=lambda p: str(p) if isinstance(p, Case) else "+".join(f"{k}={v}" for k, v in p.items()),
)
def test_chain_grads(geom, ep):
    _assert_ok(grad_errors(dataclasses.replace(geom, epilogue=ep)), "float32")


@pytest.mark.parametrize(
    "case",
    [
        Case(2, 16, 24, (7, 7), 3, stride=2, padding=1),
        Case(2, 16, 16, (7, 7), 3, padding=1, groups=16, epilogue=dict(bias=True)),
        Case(1, 8, 8, (12,), 3, padding=1, epilogue=dict(bias=True, activation="silu")),
        Case(3, 8, 16, (3, 4, 4), 3, padding=1, groups=2),
    ],
    ids=str,
)
def test_stats_and_their_grads(case):
    # mean / var of the pre-epilogue output (no bias), gradients through them and through y
    _assert_ok(grad_errors(case, stats=True), "float32")


@pytest.mark.parametrize("kind", ["conv", "depthwise"])
def test_stats_of_large_means_are_stable_and_deterministic(kind):
    # channel means 10^3 times their spread, 105 pixels over 7 tiles of 16 (the last one ragged): per-tile
    # mean and M2 merged by Chan's formula match float64 moments of the very z the kernel wrote
    groups = 16 if kind == "depthwise" else 1
    spec = conv_spec(n=3, c=16, k=16, in_size=(7, 5), kernel=1, groups=groups, epilogue=Epilogue(stats=True))
    sched = dataclasses.replace(default(spec), block_m=16)
    check(spec, sched)
    x = 1000 + torch.randn(3, 16, 7, 5)
    w = torch.rand(16, 16 // groups, 1, 1) + 0.5
    res = run_forward(spec, x, w, EpilogueArgs(), sched)
    var, mean = torch.var_mean(res.y.double(), (0, 2, 3), correction=0)
    assert reference.rel_error(res.mean, mean) < 1e-7
    assert reference.rel_error(res.var, var) < 1e-6  # E[z^2] - E[z]^2 in fp32 is off by ~1 here
    again = run_forward(spec, x, w, EpilogueArgs(), sched)
    assert torch.equal(again.mean, res.mean) and torch.equal(again.var, res.var)


def test_stats_bf16():
    case = Case(2, 16, 32, (6, 6), 3, padding=1)
    errs = grad_errors(case, "bfloat16", stats=True)
    assert errs["mean"] < 1e-5 and errs["var"] < 1e-5  # fp32 moments of the fp32 accumulator
    _assert_ok(errs, "bfloat16")


def test_frozen_weight_still_gives_chain_grads():
    # no wgrad launch: the chain's parameter gradients come from the torch fallback over the saved z
    case = Case(2, 16, 16, (6, 6), 3, padding=1, epilogue=dict(EVERYTHING, activation="starrelu"))
    needs = Needs(
        input=True, weight=False, bias=True, scale=True, shift=True, residual=True, layer_scale=True, starrelu=True
    )
    _assert_ok(grad_errors(case, needs=needs), "float32")
    case = Case(2, 8, 8, (6, 6), 3, padding=1, groups=8, epilogue=dict(bias=True, residual="pre"))
    _assert_ok(grad_errors(case, needs=Needs(input=False, weight=False, bias=True, residual=True)), "float32")


def test_only_requested_grads():
    case = Case(2, 16, 16, (6, 6), 3, padding=1, epilogue=EVERYTHING)
    errs = grad_errors(case, needs=Needs(input=False, weight=True, layer_scale=True))
    assert set(errs) == {"y", "weight", "layer_scale"}
    _assert_ok(errs, "float32")


@pytest.mark.parametrize(
    "sched",
    [
        {
            "dgrad": Schedule(block_m=16, block_n=16, block_k=16, group_m=1, k_order="flat"),
            "wgrad": Schedule(block_m=16, block_n=16, block_k=16, split_k=4, k_order="flat"),
        },
        {
            "dgrad": Schedule(block_m=32, block_n=32, block_k=16, group_m=2, k_order="tap"),
            "wgrad": Schedule(block_m=32, block_n=32, block_k=32, split_k=3, k_order="tap"),
        },
        {"dgrad": Schedule(block_m=64, block_n=16, block_k=32), "wgrad": Schedule(block_m=16, block_n=64, block_k=64)},
    ],
    ids=["flat-sk4", "tap-sk3", "wide"],
)
def test_conv_schedules_agree(sched):
    case = Case(2, 24, 40, (7, 9), 3, stride=2, padding=1, groups=2, epilogue=RESNET)
    _assert_ok(grad_errors(case, schedules=sched), "float32")


@pytest.mark.parametrize(
    "sched",
    [
        {"dgrad": Schedule(block_m=16, block_n=4), "wgrad": Schedule(block_m=16, block_n=8, block_k=4, split_k=5)},
        {"dgrad": Schedule(block_m=64, block_n=32), "wgrad": Schedule(block_m=32, block_n=32, block_k=32, split_k=1)},
    ],
    ids=["small", "big"],
)
def test_depthwise_schedules_agree(sched):
    case = Case(2, 6, 12, (7, 7), 5, stride=2, padding=2, groups=6, n=1, epilogue=dict(bias=True, activation="gelu"))
    _assert_ok(grad_errors(case, schedules=sched), "float32")


def test_wgrad_split_k_is_deterministic():
    # partial sums per split, reduced in fixed order: bitwise identical across runs (no atomics)
    spec = conv_spec(n=2, c=16, k=16, in_size=(10, 10), kernel=3, padding=1, epilogue=Epilogue(bias=True))
    x, w, dy = torch.randn(2, 16, 10, 10), torch.randn(16, 16, 3, 3), torch.randn(2, 16, 10, 10)
    ep = EpilogueArgs(bias=torch.randn(16))
    needs = Needs(input=False, weight=True, bias=True)
    sched = {"wgrad": Schedule(block_m=16, block_n=16, block_k=16, split_k=4)}
    a = conv_backward(dy, x, w, spec, ep, None, needs, schedules=sched)
    b = conv_backward(dy, x, w, spec, ep, None, needs, schedules=sched)
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
    ref = torch.nn.grad.conv2d_weight(x.double(), w.shape, dy.double(), padding=1)
    assert reference.rel_error(a.weight, ref) < 1e-5


def test_backward_needs_saved_z():
    spec = conv_spec(n=1, c=16, k=16, in_size=(6, 6), kernel=3, padding=1, epilogue=Epilogue(activation="relu"))
    with pytest.raises(ValueError, match="needs z"):
        conv_backward(
            torch.randn(1, 16, 6, 6),
            torch.randn(1, 16, 6, 6),
            torch.randn(16, 16, 3, 3),
            spec,
            EpilogueArgs(activation="relu"),
            None,
        )


def test_backward_specs_key_only_what_the_kernel_reads():
    fwd = conv_spec(
        n=1, c=16, k=16, in_size=(6, 6), kernel=3, padding=1, epilogue=Epilogue(bias=True, residual="post", save_z=True)
    )
    d, w = grad_spec(fwd, "dgrad"), grad_spec(fwd, "wgrad")
    assert d.epilogue == Epilogue() and w.epilogue == Epilogue(bias=True)  # 'post' and save_z drop out
    assert "save_z" not in fwd.with_(epilogue=Epilogue()).to_json()  # inference keys unchanged
    assert generator.render(d).source != generator.render(fwd).source
    full = fwd.with_(epilogue=Epilogue(**EVERYTHING, stats=True))
    for op in ("dgrad", "wgrad"):  # a backward spec's forward gives the same backward spec back
        g = grad_spec(full, op)
        assert grad_spec(g.with_(op="fwd"), op) == g
    with pytest.raises(SpecError, match="forward option"):
        fwd.with_(op="dgrad")


@pytest.mark.parametrize(
    "kw",
    [
        dict(n=32, c=16, k=16, in_size=(112, 112), kernel=3, padding=1),  # small channels, many pixels
        dict(n=8, c=3, k=64, in_size=(224, 224), kernel=7, stride=2, padding=3),  # stem
        dict(n=8, c=256, k=512, in_size=(14, 14), kernel=1, stride=2),
        dict(n=8, c=128, k=128, in_size=(28, 28), kernel=3, padding=1, groups=32),
        dict(n=8, c=96, k=96, in_size=(56, 56), kernel=7, padding=3, groups=96),
        dict(n=2, c=128, k=128, in_size=(32, 32), kernel=31, padding=15, groups=128),
        dict(n=1, c=4, k=4, in_size=(5,), kernel=3, padding=1, groups=4),
    ],
)
def test_default_backward_schedules_fit_the_problem(kw):
    spec = conv_spec(dtype="bfloat16", **kw)
    for op in ("dgrad", "wgrad"):
        g = grad_spec(spec, op)
        s = default(g)
        check(g, s)  # compile-valid
        if g.kind == "conv" and op == "dgrad":
            assert s.block_n <= max(16, next_pow2(g.cg)) and s.block_m <= max(16, next_pow2(g.phase_pixels))
        if op == "wgrad":
            v = generator.render(g, s)
            programs = v.grid[0] * v.grid[1] * v.grid[2]
            assert programs >= min(264, g.out_pixels // 256) or s.split_k == 64
            assert s.split_k == 1 or g.out_pixels // s.split_k >= 4 * (s.block_k if g.kind == "conv" else s.block_m)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    case=random_case(
        groups=(1, 2),
        cg=(1, 3, 8, 16),
        max_kernel=(4, 4, 3),
        max_size=(8, 8, 4),
        epilogues=(
            {},
            dict(bias=True, activation="relu"),
            RESNET,
            CONVNEXT,
            dict(bias=True, activation="silu", layer_scale=True),
        ),
    ),
    stats=st.booleans(),
)
def test_random_specs(case, stats):
    _assert_ok(grad_errors(case, stats=stats), "float32")


@pytest.mark.slow
def test_real_compiler_accepts_backward_kernels():
    full = Epilogue(bias=True, affine=True, activation="gelu", residual="pre", layer_scale=True, stats=True)
    big = Schedule(block_m=128, block_n=64, block_k=64, split_k=4, num_warps=8, num_stages=3)
    picked = []
    for op in ("dgrad", "wgrad"):
        for kw, ep, dt, sched in [
            (dict(c=64, k=64, in_size=(56, 56), kernel=3, padding=1, stride=2), full, "bfloat16", None),
            (
                dict(c=3, k=64, in_size=(224, 224), kernel=7, stride=2, padding=3),
                Epilogue(activation="starrelu"),
                "float16",
                None,
            ),
            (dict(c=128, k=128, in_size=(28, 28), kernel=3, padding=1, groups=32), Epilogue(), "float32", None),
            (dict(c=96, k=96, in_size=(56, 56), kernel=7, padding=3, groups=96), full, "bfloat16", None),
            (
                dict(c=64, k=128, in_size=(28, 28), kernel=3, padding=1, groups=64, stride=2),
                Epilogue(activation="hardswish", residual="pre"),
                "float16",
                None,
            ),
            (
                dict(c=1536, k=1536, in_size=(2048,), kernel=4, padding=((3, 0),), groups=1536),
                Epilogue(bias=True, activation="silu"),
                "bfloat16",
                None,
            ),
            (
                dict(c=64, k=64, in_size=(8, 28, 28), kernel=3, padding=1),
                Epilogue(residual="pre", activation="relu"),
                "bfloat16",
                big,
            ),
        ]:
            picked.append(generator.render(grad_spec(conv_spec(n=8, dtype=dt, epilogue=ep, **kw), op), sched))
    fwd_stats = Epilogue(bias=True, activation="relu", stats=True, save_z=True)
    picked.append(
        generator.render(
            conv_spec(n=8, c=64, k=64, in_size=(56, 56), kernel=3, padding=1, dtype="bfloat16", epilogue=fwd_stats)
        )
    )
    picked.append(
        generator.render(
            conv_spec(
                n=8, c=96, k=96, in_size=(56, 56), kernel=7, padding=3, groups=96, dtype="float16", epilogue=fwd_stats
            )
        )
    )
    results = compile_check(picked, arch=90)
    bad = [(v.spec.describe(), v.schedule.describe(), r["error"]) for v, r in zip(picked, results) if not r["ok"]]
    assert not bad, bad
