"""Schedule option split_k for conv fwd and dgrad (issue 13, item 5): the reduction (taps x channel blocks) split
split_k ways over program_id(1), each split's fp32 partial tile written to a workspace, the last of a tile's splits
to arrive summing them in split order and running the epilogue once. Numerics on the interpreter against float64
torch on NaN-poisoned outputs; validation; the space offers it only where the grid leaves SMs idle and the cost
model prefers it only there."""

from __future__ import annotations

import threading
from dataclasses import replace

import pytest
import torch
from convcases import Case, run_case, spec_of

from tunerd.kernels import conv, generator, reference, runtime
from tunerd.kernels.backward import Needs, conv_backward
from tunerd.kernels.conv import EpilogueArgs
from tunerd.kernels.schedule import Schedule, ScheduleError, canonical, check, default, resolve
from tunerd.kernels.spec import Epilogue, conv_spec
from tunerd.schedules import cost, space
from tunerd.schedules.device import DeviceLimits

pytestmark = pytest.mark.usefixtures("one_thread")

LATE = conv_spec(n=8, c=512, k=512, in_size=(7, 7), kernel=3, padding=1, dtype="bfloat16")  # 28 tiles < 132 SMs
EARLY = conv_spec(n=32, c=64, k=64, in_size=(56, 56), kernel=3, padding=1, dtype="bfloat16")  # 784 tiles


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setattr(conv, "POISON_OUTPUTS", True)


CHAIN = dict(bias=True, affine=True, residual="pre", activation="relu")  # relu(bn(conv + bias) + identity)
FWD = [  # odd shapes: partial pixel, channel and split tiles (9 taps over 3 or 4 splits)
    (
        Case(2, 24, 40, (7, 9), 3, padding=1, groups=2, n=1),
        "float16",
        Schedule(block_m=32, block_n=16, block_k=16, split_k=3),
    ),
    (
        Case(2, 16, 24, (6, 5), 3, padding=3, dilation=2, n=1, epilogue=CHAIN),
        "bfloat16",
        Schedule(block_m=16, block_n=16, block_k=16, split_k=4),
    ),
    (
        Case(1, 8, 24, (11,), 5, padding=2),
        "float32",
        Schedule(block_m=16, block_n=16, block_k=16, split_k=2, k_order="flat"),
    ),
]


def _id(row) -> str:
    return str(row) if not isinstance(row, Schedule) else row.describe().replace(" ", "-")


@pytest.mark.parametrize("case, dtype, s", FWD, ids=_id)
def test_forward_matches_float64(case, dtype, s):
    assert canonical(spec_of(case, dtype), s).split_k == s.split_k
    assert run_case(case, dtype, schedule=s) < reference.tolerance(dtype)


def test_forward_stats_see_the_whole_sum():
    """BatchNorm statistics come from the last split's epilogue, over the full reduction."""
    g = torch.Generator().manual_seed(5)
    x, w = torch.randn(2, 16, 5, 6, generator=g), torch.randn(24, 16, 3, 3, generator=g) / 12
    s = Schedule(block_m=16, block_n=16, block_k=16, split_k=3)
    y, mean, var = conv.conv_forward(x, w, 2, padding=1, schedule=s, stats=True)
    z = torch.nn.functional.conv2d(x.double(), w.double(), padding=1)
    assert reference.rel_error(y, z) < 1e-5
    assert reference.rel_error(mean, z.mean(dim=(0, 2, 3))) < 1e-5
    assert reference.rel_error(var, z.var(dim=(0, 2, 3), unbiased=False)) < 1e-5


DGRAD = [
    (
        Case(2, 24, 40, (7, 9), 3, stride=2, padding=1, groups=2, n=1),
        "float32",
        Schedule(block_m=32, block_n=16, block_k=16, split_k=2),
    ),
    (Case(2, 16, 32, (5, 6), 3, padding=1, n=1), "bfloat16", Schedule(block_m=16, block_n=16, block_k=16, split_k=4)),
    (
        Case(2, 16, 8, (5, 6), 3, padding=1),
        "float32",
        Schedule(block_m=16, block_n=16, block_k=16, split_k=3, k_order="flat"),
    ),
]


@pytest.mark.parametrize("case, dtype, s", DGRAD, ids=_id)
def test_dgrad_matches_float64(case, dtype, s):
    spec = spec_of(case, dtype)
    dt = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    x = torch.randn(spec.n, spec.c, *spec.in_size).to(dt)
    w = (torch.randn(spec.k, spec.cg, *spec.kernel) / (spec.cg * spec.taps) ** 0.5).to(dt)
    dy = torch.randn(spec.n, spec.k, *spec.out_size).to(dt)
    got = conv_backward(dy, x, w, spec, EpilogueArgs(), needs=Needs(input=True, weight=False), schedules={"dgrad": s})
    want = torch.nn.grad.conv2d_input(
        x.shape, w.double(), dy.double(), stride=case.stride, padding=case.padding, groups=case.groups
    )
    assert reference.rel_error(got.input, want) < reference.tolerance(dtype)


def test_counters_are_left_zeroed_for_the_next_launch():
    """The workspace runtime.kernel_args adds: one fp32 tile per program, one counter per tile, which the kernel
    leaves zeroed (a caller's own buffers can serve many launches)."""
    spec = conv_spec(n=1, c=16, k=16, in_size=(4, 4), kernel=3, padding=1)
    s = Schedule(block_m=16, block_n=16, block_k=16, split_k=3)
    v = generator.render(spec, s)
    assert v.grid == (1, 3) and "ws_ptr, cnt_ptr" in v.source
    x, w = torch.randn(1, 16, 4, 4), torch.randn(16, 16, 3, 3)
    out = torch.full((1, 4, 4, 16), float("nan"))
    args = conv.forward_args(spec, x, w, EpilogueArgs(), out, schedule=s)
    ws = runtime.split_workspace(v, args)
    assert ws["ws_ptr"].numel() == 3 * 16 * 16 and ws["cnt_ptr"].tolist() == [0]
    for _ in range(2):
        runtime.launch(v, {**args, **ws}, x.device)
        assert ws["cnt_ptr"].tolist() == [0]
    want = torch.nn.functional.conv2d(x.double(), w.double(), padding=1).permute(0, 2, 3, 1)
    assert reference.rel_error(out, want) < 1e-5
    assert runtime.split_workspace(generator.render(spec, replace(s, split_k=1)), args) == {}


def test_validation():
    s = Schedule(block_m=64, block_n=64, block_k=64, split_k=2)
    assert resolve(LATE, s).split_k == 2 and resolve(LATE.with_(op="dgrad"), s).split_k == 2
    assert "split_k" in default(LATE).to_dict() and default(LATE).split_k == 1  # off by default
    with pytest.raises(ScheduleError, match="exceeds the 9 reduction steps"):
        check(LATE.with_(c=64, k=64), replace(s, split_k=16))  # 9 taps x 1 channel block
    with pytest.raises(ScheduleError, match="int32"):
        check(EARLY.with_(n=4096), replace(s, split_k=8))
    dw = conv_spec(n=1, c=32, k=32, in_size=(8, 8), kernel=3, padding=1, groups=32)  # depthwise: a direct kernel
    assert canonical(dw, replace(s, split_k=4)).split_k == 1
    assert (
        generator.render(LATE, default(LATE)).source
        == generator.render(LATE, Schedule.from_dict(default(LATE).to_dict())).source
    )


def test_space_offers_it_where_tiles_are_fewer_than_sms():
    h100 = DeviceLimits.h100()
    for spec in (LATE, LATE.with_(op="dgrad")):
        cands = space.space(spec, h100, max_candidates=None)
        split = [s for s in cands if s.split_k > 1]
        assert split and all(space.split_candidate(spec, s, h100) for s in split)
        assert all(cost.programs(spec, replace(s, split_k=1)) < h100.sm_count for s in split)
        best = {k: min(cost.predict(spec, s, h100) for s in cands if (s.split_k > 1) == k) for k in (False, True)}
        assert best[True] < best[False]
    assert not any(s.split_k > 1 for s in space.space(EARLY, h100, max_candidates=None))
    assert not any(s.split_k > 1 for s in space.space(LATE, DeviceLimits.interpreter(), max_candidates=None))


def test_cost_model_prefers_it_only_when_it_helps():
    h100 = DeviceLimits.h100()
    s = Schedule(block_m=64, block_n=128, block_k=64, num_stages=3)
    late = [cost.predict(LATE, replace(s, split_k=k), h100) for k in (1, 2, 4)]
    assert late[0] > late[1] > late[2]  # 28 programs on 132 SMs: splitting fills them
    e = replace(s, block_m=128, block_n=64)  # 784 programs, 6 waves: a split only adds partial traffic
    assert cost.predict(EARLY, e, h100) < cost.predict(EARLY, replace(e, split_k=2), h100)
    assert cost.programs(LATE, replace(s, split_k=4)) == 4 * cost.programs(LATE, s)
    assert Epilogue() == LATE.epilogue


def _split_case():
    spec = conv_spec(n=1, c=16, k=24, in_size=(5, 6), kernel=3, padding=1)
    s = Schedule(block_m=16, block_n=16, block_k=16, split_k=3)
    g = torch.Generator().manual_seed(11)
    x, w = torch.randn(1, 16, 5, 6, generator=g), torch.randn(24, 16, 3, 3, generator=g) / 12
    want = torch.nn.functional.conv2d(x.double(), w.double(), padding=1)
    return spec, s, x, w, want


def _cached_counters(spec, s):
    v = generator.render(spec, s)
    return runtime.split_workspace(v, {"x": torch.empty(0)})["cnt_ptr"]


def test_workspace_is_cached_per_stream_without_a_memset():
    """Launches on one stream (a thread, on the interpreter) reuse one counter buffer the kernels leave zeroed: no
    allocation and no fill per launch; another thread gets its own."""
    spec, s, x, w, want = _split_case()
    runtime.clear_workspaces()
    for i in range(3):
        y = conv.conv_forward(x, w, 2, padding=1, schedule=s)
        assert reference.rel_error(y, want) < 1e-5
        if i == 0:
            before = runtime.workspace_stats()
    after = runtime.workspace_stats()
    assert after == before and after["cached"] == 1
    cnt = _cached_counters(spec, s)
    assert cnt.tolist() == [0] * cnt.numel()
    other = {}
    t = threading.Thread(target=lambda: other.update(cnt=_cached_counters(spec, s)))
    t.start()
    t.join()
    assert other["cnt"].data_ptr() != cnt.data_ptr() and runtime.workspace_stats()["cached"] == 2


def test_non_zero_counters_are_repaired():
    """A counter left non-zero (forced here) is zeroed before the next launch trusts it, and a launch that raised
    marks its stream's counters suspect: zeroed before the next use."""
    spec, s, x, w, want = _split_case()
    runtime.clear_workspaces()
    conv.conv_forward(x, w, 2, padding=1, schedule=s)
    _cached_counters(spec, s)[1] = 2  # a tile whose counter says two splits already arrived
    repaired = runtime.workspace_stats()["repaired"]
    assert reference.rel_error(conv.conv_forward(x, w, 2, padding=1, schedule=s), want) < 1e-5
    assert runtime.workspace_stats()["repaired"] == repaired + 1

    real = runtime.load(generator.render(spec, s))

    class Failing:  # counts one arrival on every tile, then fails, as a launch interrupted mid-way
        arg_names = real.arg_names

        def __getitem__(self, grid):
            def run(*args):
                args[self.arg_names.index("cnt_ptr")].add_(1)
                raise RuntimeError("launch failed")

            return run

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(runtime, "load", lambda v: Failing())
        with pytest.raises(RuntimeError, match="launch failed"):
            conv.conv_forward(x, w, 2, padding=1, schedule=s)
    zeroed = runtime.workspace_stats()["zeroed_after_failure"]
    assert reference.rel_error(conv.conv_forward(x, w, 2, padding=1, schedule=s), want) < 1e-5
    stats = runtime.workspace_stats()
    assert stats["zeroed_after_failure"] == zeroed + 1 and stats["repaired"] == repaired + 1
    cnt = _cached_counters(spec, s)
    assert cnt.tolist() == [0] * cnt.numel()
