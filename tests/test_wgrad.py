"""Conv wgrad: division-free pixel tiles, a kernel row's taps per program (k_order 'row') and the in-kernel,
fixed-order split-K sum, against float64 autograd with NaN-poisoned buffers; determinism; sm_90 SASS."""

from __future__ import annotations

import math

import pytest
import torch
from convcases import Case
from test_backward import RESNET, _assert_ok, grad_errors

from tunerd.kernels import conv, generator, runtime
from tunerd.kernels.backward import Needs, conv_backward, grad_spec, wgrad_args, wgrad_counters, wgrad_partials
from tunerd.kernels.conv import EpilogueArgs
from tunerd.kernels.schedule import Schedule, ScheduleError, resolve
from tunerd.kernels.spec import Epilogue, conv_spec
from tunerd.kernels.validate import compile_check

CUDA = [pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setattr(conv, "POISON_OUTPUTS", True)


def _sched(order: str, split: int, bk: int = 16) -> Schedule:
    return Schedule(block_m=16, block_n=16, block_k=bk, split_k=split, k_order=order)


CASES = [
    Case(2, 16, 24, (9, 11), 3, padding=1),  # odd sizes: partial pixel tiles along every axis
    Case(2, 16, 16, (9, 9), 3, stride=2, padding=1),
    Case(2, 16, 16, (11, 11), 3, stride=2, padding=2, dilation=2),
    Case(2, 32, 32, (7, 7), 3, padding=1, groups=2),
    Case(2, 16, 16, (8, 8), 4, padding="same", n=3),  # 4 taps per row, asymmetric padding, odd batch
    Case(2, 16, 16, (6, 7), (1, 3), padding=(0, 1)),
    Case(1, 16, 16, (21,), 5, stride=2, padding=2),
    Case(3, 16, 16, (3, 5, 6), 3, padding=1, n=1),
]


@pytest.mark.parametrize(
    "sched",
    [_sched("row", 3), _sched("row", 1, 32), _sched("tap", 5), _sched("flat", 2, 64)],
    ids=lambda s: s.describe(),
)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_wgrad_orders_and_splits(case, sched):
    _assert_ok(grad_errors(case, needs=Needs(input=False, weight=True), schedules={"wgrad": sched}), "float32")


@pytest.mark.parametrize("split", [1, 4])
def test_row_order_with_the_chain(split):
    # chain sums (dshift, dscale) and d residual from the first column tile, summed in the kernel too
    case = Case(2, 16, 32, (7, 9), 3, padding=1, epilogue=RESNET)
    sched = {"wgrad": Schedule(block_m=16, block_n=16, block_k=32, split_k=split, k_order="row")}
    _assert_ok(grad_errors(case, schedules=sched), "float32")


@pytest.mark.parametrize("device", ["cpu", *CUDA])
def test_bf16_default_schedule(device):
    case = Case(2, 64, 64, (14, 14), 3, padding=1, n=4)
    _assert_ok(grad_errors(case, "bfloat16", device, needs=Needs(input=False, weight=True)), "bfloat16")


@pytest.mark.parametrize("device", ["cpu", *CUDA])
def test_in_kernel_split_sum_is_deterministic_and_leaves_counters_zeroed(device):
    spec = conv_spec(n=3, c=16, k=32, in_size=(9, 10), kernel=3, padding=1, op="wgrad")
    v = generator.render(spec, resolve(spec, _sched("row", 7)))
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 16, 9, 10, generator=gen).to(device)
    dy = torch.randn(3, 9, 10, 32, generator=gen).to(device)
    cnt = wgrad_counters(v, torch.device(device))
    sums = []
    for _ in range(2):  # the same counters serve both launches
        dw = wgrad_partials(spec, 7, torch.device(device))
        runtime.launch(v, wgrad_args(spec, dy, x, dw, counters=cnt), torch.device(device))
        assert not cnt.any()
        sums.append(dw[0].clone())
    assert torch.equal(sums[0], sums[1])
    ref = torch.nn.grad.conv2d_weight(x.double(), (32, 16, 3, 3), dy.permute(0, 3, 1, 2).double(), padding=1)
    got = sums[0].reshape(32, 3, 3, 16).permute(0, 3, 1, 2)
    assert ((got - ref).norm() / ref.norm()).item() < 1e-5


def test_wgrad_counters_come_from_the_per_stream_cache():
    """No allocation or memset per backward: the counters are the stream's cached ones (shared with split fwd /
    dgrad launches, which leave them zeroed too); a raised launch marks them suspect, zeroed before the next use."""
    spec = conv_spec(n=2, c=16, k=16, in_size=(5, 6), kernel=3, padding=1, op="wgrad")
    v = generator.render(spec, resolve(spec, _sched("row", 3)))
    runtime.clear_workspaces()
    first = wgrad_counters(v, torch.device("cpu"))
    allocations = runtime.workspace_stats()["allocations"]
    again = wgrad_counters(v, torch.device("cpu"))
    assert again.data_ptr() == first.data_ptr() and runtime.workspace_stats()["allocations"] == allocations
    assert not again.any()
    with pytest.raises(RuntimeError, match="boom"), runtime._failure_marks({"cnt_ptr": again}, torch.device("cpu")):
        again[0] = 1  # as a launch interrupted after one arrival
        raise RuntimeError("boom")
    zeroed = runtime.workspace_stats()["zeroed_after_failure"]
    assert not wgrad_counters(v, torch.device("cpu")).any()
    assert runtime.workspace_stats()["zeroed_after_failure"] == zeroed + 1


def test_conv_wgrad_needs_counters():
    spec = conv_spec(n=1, c=16, k=16, in_size=(4, 4), kernel=3, padding=1, op="wgrad")
    t = torch.zeros(1)
    with pytest.raises(ValueError, match="counters"):
        wgrad_args(spec, t, torch.zeros(1, 16, 4, 4), t)


def test_pixel_tile_pads_least():
    big = conv_spec(n=32, c=64, k=64, in_size=(56, 56), kernel=3, padding=1, op="wgrad")
    assert generator.wgrad_pixel_tile(big, 64) == (1, 8, 8)  # 56 = 7 x 8: no padded pixel
    small = conv_spec(n=32, c=512, k=512, in_size=(7, 7), kernel=3, padding=1, op="wgrad")
    # n is a launch argument: the tile does not depend on it, and holds at most 2 images, so a small batch
    # wastes at most one image per step (32 whole images per step would waste 31 of 32 at n = 1)
    assert generator.wgrad_pixel_tile(small, 32) == generator.wgrad_pixel_tile(small.with_(n=1), 32) == (1, 4, 8)
    padded = math.prod(-(-e // b) * b for e, b in zip((32, 7, 7), generator.wgrad_pixel_tile(small, 64)))
    assert padded <= 1.31 * 32 * 49
    for spec in (big, small, conv_spec(n=3, c=16, k=16, in_size=(5, 6, 7), kernel=3, op="wgrad")):
        for bk in (16, 32, 64, 128):
            assert math.prod(generator.wgrad_pixel_tile(spec, bk)) == bk


def test_row_order_is_conv_wgrad_only():
    fwd = conv_spec(n=1, c=16, k=16, in_size=(8, 8), kernel=3, padding=1)
    with pytest.raises(ScheduleError, match="row"):
        resolve(fwd, Schedule(k_order="row"))
    with pytest.raises(ScheduleError, match="row"):
        resolve(grad_spec(fwd, "dgrad"), Schedule(k_order="row"))
    one_wide = conv_spec(n=1, c=16, k=16, in_size=(8, 8), kernel=(3, 1), padding=(1, 0), op="wgrad")
    assert resolve(one_wide, Schedule(k_order="row")).k_order == "tap"  # one tap per row: the tap loop


def test_frozen_chain_and_bias_through_in_kernel_sum():
    spec = conv_spec(n=2, c=16, k=16, in_size=(10, 10), kernel=3, padding=1, epilogue=Epilogue(bias=True))
    x, w, dy = torch.randn(2, 16, 10, 10), torch.randn(16, 16, 3, 3), torch.randn(2, 16, 10, 10)
    ep = EpilogueArgs(bias=torch.randn(16))
    needs = Needs(input=False, weight=True, bias=True)
    sched = {"wgrad": _sched("row", 6)}
    a = conv_backward(dy, x, w, spec, ep, None, needs, schedules=sched)
    b = conv_backward(dy, x, w, spec, ep, None, needs, schedules=sched)
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
    assert ((a.bias.double() - dy.double().sum((0, 2, 3))).norm() / dy.double().sum((0, 2, 3)).norm()) < 1e-5


@pytest.mark.slow
def test_sm90_wgrad_main_loops_have_no_division_and_no_spills():
    layers = [
        conv_spec(n=32, c=64, k=64, in_size=(56, 56), kernel=3, padding=1, dtype="bfloat16", op="wgrad"),
        conv_spec(n=32, c=256, k=64, in_size=(56, 56), kernel=1, dtype="bfloat16", op="wgrad"),
        conv_spec(n=32, c=3, k=64, in_size=(224, 224), kernel=7, stride=2, padding=3, dtype="bfloat16", op="wgrad"),
        conv_spec(n=8, c=64, k=64, in_size=(8, 28, 28), kernel=3, padding=1, dtype="bfloat16", op="wgrad"),
        conv_spec(n=32, c=128, k=128, in_size=(28, 28), kernel=3, padding=1, groups=32, op="wgrad"),
    ]
    variants = [generator.render(s, resolve(s, None)) for s in layers]
    variants.append(generator.render(layers[0], resolve(layers[0], Schedule(block_k=64, split_k=32, k_order="tap"))))
    for v, r in zip(variants, compile_check(variants)):
        assert r["ok"], (v.spec.describe(), r.get("error"))
        assert r["loop_mulhi"] == 0 and r["loop_idiv"] == 0, (v.spec.describe(), r)
        assert r["spill_bytes"] == 0, (v.spec.describe(), r)
    assert variants[0].schedule.k_order == "row"
