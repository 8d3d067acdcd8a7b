"""The backward checks on CUDA (compiled dgrad / wgrad kernels). Skipped without a GPU."""

import dataclasses

import pytest
import torch
from convcases import Case
from test_backward import ACTIVATIONS, CHAINS, EP_GEOM, GEOMETRY, _assert_ok, _poison, grad_errors  # noqa: F401

from tunerd import functional as F
from tunerd.kernels.backward import Needs, conv_backward
from tunerd.kernels.conv import EpilogueArgs
from tunerd.kernels.schedule import Schedule
from tunerd.kernels.spec import Epilogue, conv_spec

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("case", GEOMETRY, ids=str)
def test_geometry_grads_cuda(case, dtype):
    _assert_ok(grad_errors(case, dtype, device="cuda", channels_last=True), dtype)


@pytest.mark.parametrize(
    "ep",
    [dict(bias=True, activation=a) for a in ACTIVATIONS] + CHAINS,
    ids=lambda e: "+".join(f"{k}={v}" for k, v in e.items()),
)
@pytest.mark.parametrize("geom", EP_GEOM, ids=str)
def test_chain_grads_cuda(geom, ep):
    case = dataclasses.replace(geom, epilogue=ep)
    for dtype in ("float32", "bfloat16"):
        _assert_ok(grad_errors(case, dtype, device="cuda"), dtype)


@pytest.mark.parametrize(
    "case",
    [
        Case(2, 64, 64, (56, 56), 3, padding=1, n=8, epilogue=dict(bias=True)),
        Case(
            2,
            64,
            128,
            (56, 56),
            3,
            stride=2,
            padding=1,
            n=8,
            epilogue=dict(affine=True, residual="pre", activation="relu"),
        ),
        Case(2, 3, 64, (224, 224), 7, stride=2, padding=3, n=4),
        Case(
            2,
            96,
            96,
            (56, 56),
            7,
            padding=3,
            groups=96,
            n=8,
            epilogue=dict(bias=True, layer_scale=True, residual="post"),
        ),
        Case(
            1, 1536, 1536, (2048,), 4, padding=((3, 0),), groups=1536, n=2, epilogue=dict(bias=True, activation="silu")
        ),
        Case(3, 64, 64, (8, 28, 28), (3, 1, 1), padding=(1, 0, 0), n=2),
    ],
    ids=str,
)
def test_realistic_shapes_cuda(case):
    for dtype in ("float16", "bfloat16"):
        _assert_ok(grad_errors(case, dtype, device="cuda", channels_last=True, stats=case.ndim == 2), dtype)


def test_deterministic_split_k_wgrad_cuda():
    # small-channel layer with many pixels: split-K partials reduced in fixed order, bitwise reproducible
    spec = conv_spec(
        n=16, c=16, k=16, in_size=(64, 64), kernel=3, padding=1, dtype="bfloat16", epilogue=Epilogue(bias=True)
    )
    x = torch.randn(16, 16, 64, 64, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(16, 16, 3, 3, device="cuda", dtype=torch.bfloat16)
    dy = torch.randn(16, 16, 64, 64, device="cuda", dtype=torch.bfloat16)
    ep = EpilogueArgs(bias=torch.randn(16, device="cuda", dtype=torch.bfloat16))
    sched = {"wgrad": Schedule(block_m=16, block_n=16, block_k=64, split_k=64)}
    runs = [
        conv_backward(dy, x, w, spec, ep, None, Needs(input=False, weight=True, bias=True), schedules=sched)
        for _ in range(3)
    ]
    assert all(torch.equal(r.weight, runs[0].weight) and torch.equal(r.bias, runs[0].bias) for r in runs)


def test_compiled_training_step_cuda():
    x = torch.randn(4, 32, 16, 16, device="cuda", requires_grad=True)
    w = (torch.randn(32, 1, 7, 7, device="cuda") / 7).requires_grad_()
    g = torch.randn(32, device="cuda", requires_grad=True)

    def block(x, w, g):
        return F.conv2d(x, w, None, padding=3, groups=32, layer_scale=g, residual=x, activation="gelu")

    eager = torch.autograd.grad(block(x, w, g).square().sum(), [x, w, g])
    comp = torch.autograd.grad(torch.compile(block)(x, w, g).square().sum(), [x, w, g])
    for a, b in zip(comp, eager):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
