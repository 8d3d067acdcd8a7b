"""Register-blocked depthwise forward: block_k consecutive outputs along the last dim per thread.

Numerics against float64 torch on NaN-poisoned outputs for every width (1 = flat pixel tiles), ragged last
groups, masked channel tiles, stride, dilation, channel multiplier, 1d/3d; the schedule rules (canonical
width, BatchNorm statistics keep flat tiles), the space and the cost model's issue term; and, from the
sm_90 compiler, the instruction mix of the defaults (issue 13's acceptance: FFMA share, registers, spills).
"""

from dataclasses import replace

import pytest
import torch
from convcases import Case, run_case

from tunerd.kernels import generator, reference
from tunerd.kernels import schedule as ks
from tunerd.kernels.conv import EpilogueArgs, conv_forward
from tunerd.kernels.schedule import Schedule
from tunerd.kernels.spec import Epilogue, conv_spec
from tunerd.schedules import cost, space
from tunerd.schedules.device import DeviceLimits

H100 = DeviceLimits.h100()

CASES = [
    Case(2, 40, 40, (9, 13), 7, padding=3, groups=40),  # ConvNeXt 7x7, 13 wide: ragged groups, 40 of 64 channels
    Case(2, 24, 24, (11, 11), 3, stride=2, padding=1, groups=24),  # MobileNetV2 s2
    Case(2, 16, 16, (9, 17), 5, padding=4, dilation=2, groups=16, n=1),  # dilated branch
    Case(2, 16, 16, (6, 19), (1, 11), padding=(0, 5), groups=16),  # band 1x11
    Case(2, 8, 16, (7, 9), 3, padding=1, groups=8, n=1),  # channel multiplier 2
    Case(2, 8, 8, (8, 20), (3, 13), padding=(1, 6), groups=8, n=1),  # long row (RepLKNet-like), 13 taps
    Case(1, 32, 32, (19,), 4, padding=((3, 0),), groups=32),  # Mamba causal conv1d
    Case(1, 8, 8, (21,), 5, stride=3, padding=2, groups=8),  # stride 3, no reuse between outputs
    Case(3, 16, 16, (3, 5, 11), 3, padding=1, groups=16, n=1),  # conv3d depthwise
]
WIDTHS = (1, 2, 4, 8, 16)


def _schedule(width: int) -> Schedule:
    return Schedule(block_m=16 * width, block_n=32, block_k=width, num_warps=2)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_widths_match_float64(case, dtype):
    # each width on one dtype and the default everywhere keeps the interpreter's run short
    width = WIDTHS[(CASES.index(case) + ("float32", "float16", "bfloat16").index(dtype)) % len(WIDTHS)]
    for s in (None, _schedule(width)):
        err = run_case(case, dtype, schedule=s)
        assert err < reference.tolerance(dtype), f"{s}: rel error {err:.3g}"


@pytest.mark.parametrize("width", WIDTHS)
def test_every_width_with_epilogue(width):
    # identity + gamma * (dw7x7(x) + b): the chain is applied once per output column of a group
    ep = dict(bias=True, layer_scale=True, residual="post")
    case = Case(2, 24, 24, (7, 11), 7, padding=3, groups=24, epilogue=ep)
    assert run_case(case, "float32", schedule=_schedule(width)) < 1e-5


def test_width_is_canonical():
    spec = conv_spec(n=1, c=16, k=16, in_size=(9, 5), kernel=3, padding=1, groups=16)
    # at most the row width (5 -> 8), block_m and MAX_BLOCK_W; the old default block_k=32 is a width too
    assert ks.canonical(spec, Schedule(block_m=64, block_n=16)).block_k == 8
    assert ks.canonical(spec, Schedule(block_m=4, block_n=16, block_k=8)).block_k == 4
    wide = conv_spec(n=1, c=16, k=16, in_size=(4, 200), kernel=3, padding=1, groups=16)
    assert ks.canonical(wide, Schedule(block_m=256, block_n=16, block_k=64)).block_k == ks.MAX_BLOCK_W
    # BatchNorm statistics are partial sums per block_m consecutive pixels: flat tiles only
    stats = replace(spec, epilogue=Epilogue(stats=True))
    assert ks.canonical(stats, Schedule(block_m=64, block_n=16, block_k=8)).block_k == 1
    assert ks.default(stats).block_k == 1
    # backward passes do not read it
    assert ks.canonical(spec.with_(op="dgrad"), Schedule(block_k=4)).block_k == Schedule.block_k


def test_statistics_with_flat_tiles():
    x = torch.randn(2, 16, 7, 9)
    w = torch.randn(16, 1, 3, 3) / 3
    res = conv_forward(x, w, 2, 1, 1, 1, 16, EpilogueArgs(), stats=True)
    y, mean, var = res
    ref = torch.nn.functional.conv2d(x.double(), w.double(), None, 1, 1, 1, 16)
    assert reference.rel_error(y, ref) < 1e-5
    torch.testing.assert_close(mean.double(), ref.mean(dim=(0, 2, 3)), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(var.double(), ref.var(dim=(0, 2, 3), unbiased=False), rtol=1e-4, atol=1e-5)


def test_source_loads_each_column_once_per_row():
    spec = conv_spec(n=2, c=96, k=96, in_size=(56, 56), kernel=7, padding=3, groups=96, dtype="bfloat16")
    v = generator.render(spec, Schedule(block_m=128, block_n=32, block_k=8, num_warps=4))
    row = v.source.split("# one kernel row")[1].split("# epilogue")[0]
    assert row.count("xv = tl.load(") == 7 + 8 - 1  # kw + r - 1 input columns
    assert row.count("tl.load(w_row") == 7  # each weight once, in fp32
    assert row.count("tl.fma(") == 7 * 8
    assert "mask=n_mask" not in row  # 32 divides 96: no channel masks
    assert v.grid == (-(-(2 * 56 * 7) // 16), 3)


def test_space_offers_widths_and_the_flat_path():
    spec = conv_spec(n=32, c=96, k=96, in_size=(56, 56), kernel=7, padding=3, groups=96, dtype="bfloat16")
    cands = space.space(spec, H100, max_candidates=None)
    assert {s.block_k for s in cands} == set(WIDTHS)
    for s in cands:
        assert ks.canonical(spec, s) == s and s.block_k <= s.block_m
    narrow = conv_spec(n=32, c=768, k=768, in_size=(7, 7), kernel=7, padding=3, groups=768, dtype="bfloat16")
    assert max(s.block_k for s in space.space(narrow, H100, max_candidates=None)) == 8
    stats = replace(spec, epilogue=Epilogue(stats=True))
    assert {s.block_k for s in space.space(stats, H100)} == {1}


def test_cost_model_counts_issue_and_reuse():
    spec = conv_spec(n=32, c=96, k=96, in_size=(56, 56), kernel=7, padding=3, groups=96, dtype="bfloat16")
    issue = [cost.direct_issue_per_fma(spec, Schedule(block_m=128, block_n=32, block_k=w)) for w in WIDTHS]
    assert issue == sorted(issue, reverse=True) and issue[0] > 3 > 2 > issue[3]  # sm_90 SASS: ~4 and 1.84
    flat, blocked = Schedule(block_m=64, block_n=32, block_k=1), ks.default(spec)
    assert cost.work(spec, blocked).step_loads * 8 < cost.work(spec, flat).step_loads * 2  # loads per output
    assert cost.predict(spec, blocked, H100) < cost.predict(spec, flat, H100)
    e = cost.estimate(spec, blocked, H100)
    assert e.padded_flops >= spec.flops and e.programs == -(-(32 * 56 * 7) // 16) * 3


@pytest.mark.slow
def test_defaults_compile_to_fma_bound_loops_on_sm90():
    """Issue 13's acceptance, from the real compiler: 7x7 >= 45% FFMA per kernel-row loop iteration and
    <= 128 registers, 31x31 >= 40%, no spills (a 3x3 s2 at width 8 spilled one register), every dtype."""
    from tunerd.kernels.validate import compile_check

    layers = [
        (dict(c=96, k=96, in_size=(56, 56), kernel=7, padding=3, groups=96), 0.45),
        (dict(c=768, k=768, in_size=(7, 7), kernel=7, padding=3, groups=768), 0.45),
        (dict(c=128, k=128, in_size=(56, 56), kernel=31, padding=15, groups=128), 0.40),
        (dict(c=128, k=128, in_size=(112, 112), kernel=3, stride=2, padding=1, groups=128), 0.25),
    ]
    picked = [(generator.render(conv_spec(n=32, dtype="bfloat16", **g)), share) for g, share in layers]
    picked += [(generator.render(conv_spec(n=32, dtype=dt, **layers[0][0])), 0.45) for dt in ("float16", "float32")]
    results = compile_check([v for v, _ in picked], arch=90)
    for (v, share), r in zip(picked, results):
        what = f"{v.spec.describe()} {v.schedule.describe()}: {r}"
        assert r["ok"] and r["spill_bytes"] == 0 and r["regs"] <= 128, what
        assert r["loop_fma_share"] >= share, what


GPU_CASES = [
    Case(2, 96, 96, (56, 56), 7, padding=3, groups=96, n=4),
    Case(2, 128, 128, (32, 32), 31, padding=15, groups=128, n=2),
    Case(2, 144, 144, (28, 28), 3, stride=2, padding=1, groups=144, n=4),
    Case(1, 1536, 1536, (1024,), 4, padding=((3, 0),), groups=1536, n=2),
]


@pytest.mark.gpu
@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("case", CASES + GPU_CASES, ids=str)
def test_widths_match_float64_cuda(case, width):
    for dtype in ("float32", "float16", "bfloat16"):
        s = Schedule(block_m=max(16, 8 * width), block_n=32, block_k=width, num_warps=4)
        err = run_case(case, dtype, device="cuda", schedule=s, channels_last_input=True)
        assert err < reference.tolerance(dtype), f"{dtype}: rel error {err:.3g}"
