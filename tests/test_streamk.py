"""Schedule option stream_k for conv fwd and dgrad (issue 13, item 5): a persistent grid of stream_k programs,
each walking a contiguous range of the (output tile, reduction step) space; a tile split across programs is summed
by its last arrival in program order through the split-K workspace, its epilogue run once. Numerics on the
interpreter against float64 torch on NaN-poisoned outputs (odd shapes, tiles split across programs, fused chains,
statistics, every stride phase of a dgrad); the schedule's key, validation, cost model and space."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from convcases import Case, run_case, spec_of

from tunerd.kernels import conv, generator, reference, runtime
from tunerd.kernels.backward import Needs, conv_backward
from tunerd.kernels.conv import EpilogueArgs
from tunerd.kernels.schedule import Schedule, ScheduleError, canonical, check, default
from tunerd.kernels.spec import Epilogue, conv_spec
from tunerd.schedules import cost, space
from tunerd.schedules.device import DeviceLimits

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setattr(conv, "POISON_OUTPUTS", True)


CHAIN = dict(bias=True, affine=True, residual="pre", activation="relu")  # relu(bn(conv + bias) + identity)
T16 = dict(block_m=16, block_n=16, block_k=16)
CASES = [  # (case, dtype, stream_k): 16x16 tiles, 9 or more steps each, ranges crossing tiles mid-way
    (Case(2, 16, 24, (5, 7), 3, padding=1, n=2), "float32", 5),  # 6 tiles x 9 steps: 11 per program
    (Case(2, 24, 40, (7, 9), 3, padding=1, groups=2, n=1, epilogue=CHAIN), "float16", 7),  # 2 groups, 8 tiles
    (Case(2, 16, 24, (6, 5), 3, padding=3, dilation=2, n=1, epilogue=CHAIN), "bfloat16", 3),
    (Case(1, 8, 24, (11,), 5, padding=2), "float32", 4),  # flat order: 3 steps per tile, ranges of 5
    (Case(2, 16, 16, (4, 4), 3, padding=1, n=1), "float32", 32),  # more programs than steps: idle programs
]


def _id(row) -> str:
    return str(row)


@pytest.mark.parametrize("case, dtype, programs", CASES, ids=_id)
def test_forward_matches_float64(case, dtype, programs):
    s = Schedule(**T16, stream_k=programs, k_order="flat" if case.ndim == 1 else "tap")
    spec = spec_of(case, dtype)
    assert canonical(spec, s).stream_k == programs and generator.render(spec, s).grid == (programs, 1)
    assert run_case(case, dtype, schedule=s) < reference.tolerance(dtype)


def test_stats_and_determinism():
    """BatchNorm statistics from the tile's one epilogue over its whole reduction; the same launch twice gives the
    same bits (fixed-order fix-up), and the counters are left zeroed."""
    g = torch.Generator().manual_seed(7)
    x, w = torch.randn(2, 16, 5, 6, generator=g), torch.randn(24, 16, 3, 3, generator=g) / 12
    s = Schedule(**T16, stream_k=5)
    y, mean, var = conv.conv_forward(x, w, 2, padding=1, schedule=s, stats=True)
    z = torch.nn.functional.conv2d(x.double(), w.double(), padding=1)
    assert reference.rel_error(y, z) < 1e-5
    assert reference.rel_error(mean, z.mean(dim=(0, 2, 3))) < 1e-5
    assert reference.rel_error(var, z.var(dim=(0, 2, 3), unbiased=False)) < 1e-5
    again = conv.conv_forward(x, w, 2, padding=1, schedule=s)
    assert torch.equal(again, y)
    v = generator.render(conv_spec(n=2, c=16, k=24, in_size=(5, 6), kernel=3, padding=1), s)
    cnt = runtime.split_workspace(v, {"x": x})["cnt_ptr"]  # this thread's cached counters, one per tile
    assert cnt.numel() == 8 and cnt.tolist() == [0] * 8  # 4 x 2 tiles


DGRAD = [  # (c, k, size, stride, groups, k_order, activation, stream_k): phases of 4, 2 and 1 taps at stride 2
    (16, 24, (7, 9), 2, 1, "tap", None, 7),
    (24, 40, (7, 9), 2, 2, "tap", "relu", 3),
    (16, 32, (5, 6), 1, 1, "tap", None, 5),
    (16, 8, (5, 6), 1, 1, "flat", "relu", 4),
]


@pytest.mark.parametrize("c, k, size, stride, groups, order, act, programs", DGRAD, ids=str)
def test_dgrad_matches_float64(c, k, size, stride, groups, order, act, programs):
    """Every stride phase's tiles in one walk (steps of the largest phase's reduction, clipped to each phase's);
    the activation's gradient applied to dy as it loads."""
    g = torch.Generator().manual_seed(3)
    spec = conv_spec(
        n=2,
        c=c,
        k=k,
        in_size=size,
        kernel=3,
        stride=stride,
        padding=1,
        groups=groups,
        epilogue=Epilogue(activation=act),
    )
    x, w = torch.randn(2, c, *size, generator=g), torch.randn(k, c // groups, 3, 3, generator=g) / 10
    dy = torch.randn(2, k, *spec.out_size, generator=g)
    z = torch.nn.functional.conv2d(x, w, stride=stride, padding=1, groups=groups)
    s = Schedule(**T16, stream_k=programs, k_order=order)
    assert generator.render(spec.with_(op="dgrad", epilogue=Epilogue()), s).grid == (programs, 1, 1)
    got = conv_backward(
        dy,
        x,
        w,
        spec,
        EpilogueArgs(activation=act),
        z=z.permute(0, 2, 3, 1).contiguous(),
        needs=Needs(input=True, weight=False),
        schedules={"dgrad": s},
    )
    gz = dy.double() * (z > 0) if act else dy.double()
    want = torch.nn.grad.conv2d_input(x.shape, w.double(), gz, stride=stride, padding=1, groups=groups)
    assert reference.rel_error(got.input, want) < 1e-5


def test_schedule_key_and_validation():
    spec = conv_spec(n=2, c=16, k=24, in_size=(5, 7), kernel=3, padding=1)
    assert "stream_k" not in default(spec).to_dict() and "stream_k" not in Schedule().to_dict()
    s = Schedule(**T16, stream_k=132)
    assert s.to_dict()["stream_k"] == 132 and Schedule.from_dict(s.to_dict()) == s
    assert "streamk132" in s.describe()
    assert canonical(spec.with_(op="dgrad"), s).stream_k == 132 and canonical(spec.with_(op="wgrad"), s).stream_k == 0
    with pytest.raises(ScheduleError, match="without split_k"):
        check(spec, replace(s, split_k=2))
    with pytest.raises(ScheduleError, match="0 \\(off\\) or 1..4096"):
        check(spec, replace(s, stream_k=5000))
    with pytest.raises(ScheduleError, match="must be an int"):
        Schedule.from_dict({"stream_k": True})


H100 = DeviceLimits.h100()
WAVES = conv_spec(n=5, c=256, k=128, in_size=(64, 64), kernel=3, padding=1, dtype="bfloat16")  # 160 tiles of 128x128
LATE = conv_spec(n=8, c=512, k=512, in_size=(7, 7), kernel=3, padding=1, dtype="bfloat16")  # 28 tiles of 64x128


def test_cost_model_prefers_it_on_quantized_and_small_grids():
    s = Schedule(block_m=256, block_n=128, block_k=32, num_warps=8, num_stages=4)  # one program per SM
    assert cost.occupancy(WAVES, s, H100) == 1 and cost.programs(WAVES.with_(n=10), s) == 160
    wq = WAVES.with_(n=10)  # 160 tiles on 132 SMs: two waves, the second 28 programs
    assert cost.predict(wq, replace(s, stream_k=132), H100) < 0.8 * cost.predict(wq, s, H100)
    t = Schedule(block_m=64, block_n=128, block_k=64, num_stages=3)  # 28 tiles
    slots = 132 * cost.occupancy(LATE, t, H100)
    assert cost.predict(LATE, replace(t, stream_k=slots), H100) < 0.5 * cost.predict(LATE, t, H100)
    full = WAVES.with_(n=33)  # 528 tiles of 256x128 = 4 full waves: nothing to gain, the fix-up costs
    assert cost.programs(full, s) == 4 * 132
    assert cost.predict(full, s, H100) < cost.predict(full, replace(s, stream_k=132), H100)


def test_space_offers_it_where_the_grid_quantizes():
    cands = space.space(WAVES.with_(n=10), H100, max_candidates=None)
    sk = [s for s in cands if s.stream_k]
    assert sk and all(s.stream_k == 132 * cost.occupancy(WAVES, s, H100) for s in sk)
    assert all(s.split_k == 1 and not s.tma and s.group_m == 8 for s in sk)
    for s in sk[:50]:
        tiles = cost.programs(WAVES.with_(n=10), replace(s, stream_k=0))
        assert tiles % s.stream_k and tiles <= 4 * s.stream_k
        # offered only where the model prices the fix-up a clear gain over the same tiling unsplit
        assert cost.predict(WAVES.with_(n=10), s, H100) <= space.STREAM_K_GAIN * cost.predict(
            WAVES.with_(n=10), replace(s, stream_k=0), H100
        )
    # 512 tiles of 256x128 on 132 SMs: the last of 4 waves is 88% full; a fix-up cannot buy the 10% it must
    big = Schedule(block_m=256, block_n=128, block_k=32, num_warps=8, num_stages=4)
    assert cost.occupancy(WAVES, big, H100) == 1 and cost.programs(WAVES.with_(n=32), big) == 512
    assert space.stream_k_programs(WAVES.with_(n=10), big, H100) == 132
    assert space.stream_k_programs(WAVES.with_(n=32), big, H100) == 0
    assert not any(s.stream_k for s in space.space(LATE, DeviceLimits.interpreter(), max_candidates=None))
    assert any(s.stream_k for s in space.space(LATE.with_(op="dgrad"), H100, max_candidates=None))
    assert not any(s.stream_k for s in space.space(LATE.with_(op="wgrad"), H100, max_candidates=None))


@pytest.mark.gpu
@pytest.mark.parametrize("knob", [dict(stream_k=132), dict(split_k=4)], ids=["stream_k", "split_k"])
def test_gpu_streams_and_graph_capture(knob):
    """On CUDA: float64-correct, the same bits on a second stream (its own cached workspace) and from a captured CUDA
    graph (fresh buffers in the graph's pool, zeroed by the graph itself), counters left zeroed."""
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(8, 256, 14, 14, device=dev, generator=g).to(torch.bfloat16)
    w = (torch.randn(256, 256, 3, 3, device=dev, generator=g) / 48).to(torch.bfloat16)
    want = torch.nn.functional.conv2d(x.double(), w.double(), padding=1)
    s = Schedule(block_m=64, block_n=128, block_k=64, num_stages=3, **knob)
    y = conv.conv_forward(x, w, 2, padding=1, schedule=s)
    assert reference.rel_error(y, want) < reference.tolerance("bfloat16")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        y2 = conv.conv_forward(x, w, 2, padding=1, schedule=s)
    side.synchronize()
    assert torch.equal(y2, y)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        yg = conv.conv_forward(x, w, 2, padding=1, schedule=s)
    for _ in range(2):
        graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(yg, y) and runtime.verify_workspaces() == 0
