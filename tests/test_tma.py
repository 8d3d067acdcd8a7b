"""Schedule option tma (issue 13, item 2): stride-1 conv fwd whose operands are loaded through Hopper tensor
descriptors (tl.make_tensor_descriptor): 1x1 as a plain GEMM over 2-D descriptors; k x k with tiles that are boxes of
output pixels of one image, each tap's A tile the [1, *box, block_k] box of the NHWC input whose out-of-bounds zero
fill is the padding. Legal only on 16-byte channel rows; numerics on the interpreter (which runs descriptors, bf16
through the UPCAST dot) against float64 torch on NaN-poisoned outputs; the sm_90 build (Triton 3.6 and 3.9) loads
with UTMALDG and no cp.async."""

from __future__ import annotations

from dataclasses import replace

import pytest
from convcases import Case, run_case, spec_of

from tunerd.kernels import conv, generator, reference
from tunerd.kernels.schedule import Schedule, ScheduleError, canonical, check, default, tma_applies, tma_box
from tunerd.kernels.spec import Epilogue, conv_spec
from tunerd.kernels.validate import compile_check
from tunerd.schedules import space
from tunerd.schedules.device import DeviceLimits

TMA = Schedule(block_m=32, block_n=16, block_k=16, tma=True)
SPEC = conv_spec(n=32, c=256, k=64, in_size=(56, 56), kernel=1, dtype="bfloat16")


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setattr(conv, "POISON_OUTPUTS", True)


def test_legal_only_for_aligned_pointwise_forward():
    assert tma_applies(SPEC) and tma_applies(SPEC.with_(c=8, k=24, dtype="float16"))  # 16-byte rows
    assert tma_applies(SPEC.with_(dtype="float32", precision="tf32"))
    assert tma_applies(SPEC.with_(c=64, groups=8)) and not tma_applies(SPEC.with_(c=64, groups=16))  # group bases
    for spec in (
        SPEC.with_(c=12),  # 24-byte rows
        SPEC.with_(op="dgrad"),
        SPEC.with_(stride=(2, 2)),
        conv_spec(n=2, c=64, k=64, in_size=(8, 8), kernel=3, stride=2, padding=1, dtype="bfloat16"),
        conv_spec(n=2, c=64, k=64, in_size=(8, 8), kernel=3, padding=1),  # fp32 'ieee'
        conv_spec(n=2, c=64, k=64, in_size=(8, 8), kernel=3, padding=1, dtype="bfloat16", op="dgrad"),
        SPEC.with_(n=20000),  # offsets beyond int32
        SPEC.with_(dtype="float32"),  # 'ieee' fp32: a CUDA-core dot (tf32 is a tensor-core one)
    ):
        assert not tma_applies(spec), spec.describe()
        assert not canonical(spec, TMA).tma
        with pytest.raises(ScheduleError, match="tma"):
            check(spec, TMA)
    s = default(SPEC)
    assert "tma" not in s.to_dict() and Schedule.from_json(replace(s, tma=True).to_json()).tma
    base, tma = generator.render(SPEC, s).source, generator.render(SPEC, replace(s, tma=True)).source
    assert "make_tensor_descriptor" not in base and tma.count("tl.make_tensor_descriptor(") == 2


CASES = [
    (Case(2, 32, 24, (5, 7), 1), "float16"),  # partial pixel, channel and output-channel tiles
    (Case(2, 48, 40, (3, 5), 1, epilogue=dict(bias=True, activation="relu", residual="post")), "float16"),
    (Case(2, 32, 32, (4, 5), 1, groups=2, n=3), "bfloat16"),  # groups: each group's descriptor base
]


@pytest.mark.parametrize("case, dtype", CASES, ids=str)
def test_matches_float64(case, dtype):
    spec = spec_of(case, dtype)
    assert tma_applies(spec)
    assert run_case(case, dtype, schedule=TMA) < reference.tolerance(dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("case, dtype", CASES, ids=str)
def test_matches_float64_cuda(case, dtype):
    import torch
    import triton

    # descriptors made in the kernel live in global scratch that the launch allocates through this
    triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
    assert run_case(case, dtype, device="cuda", schedule=replace(TMA, block_m=64, block_n=32, block_k=32)) < (
        reference.tolerance(dtype)
    )


def test_space_offers_it_on_gpus_only():
    h100 = DeviceLimits.h100()
    cands = space.space(SPEC, h100, max_candidates=None)
    assert any(s.tma for s in cands) == space.tma_supported()
    assert all(canonical(SPEC, s) == s for s in cands)
    assert not any(s.tma for s in space.space(SPEC.with_(c=12), h100, max_candidates=None))
    assert not any(s.tma for s in space.space(SPEC, DeviceLimits.interpreter(), max_candidates=None))


@pytest.mark.slow
def test_sm90_build_loads_by_tma():
    s = default(SPEC.with_(c=1024, k=256, in_size=(14, 14)))
    spec = SPEC.with_(c=1024, k=256, in_size=(14, 14))
    base, tma = compile_check([generator.render(spec, s), generator.render(spec, replace(s, tma=True))], arch=90)
    assert base["ok"] and tma["ok"], (base["error"], tma["error"])
    assert base["tma"] == 0 and base["cp_async"] > 0
    assert tma["tma"] > 0 and tma["cp_async"] == 0 and tma["spill_bytes"] == 0 and tma["loop_mma"]
    assert tma["regs"] < base["regs"]  # no per-element addresses
    if base["loop_sass"]:  # Triton 3.6 unrolls the pointer path's loop (16 steps)
        assert tma["loop_sass"] < base["loop_sass"]


def test_an_unaligned_view_takes_the_pointer_path(monkeypatch):
    """A channels-last input at an odd storage offset (2 bytes past a 16-byte boundary) cannot be a TMA
    descriptor's base: the forward renders the same schedule without tma and is still correct."""
    import torch

    launched = []
    real = conv.runtime.launch
    monkeypatch.setattr(conv.runtime, "launch", lambda v, *a: launched.append(v.schedule) or real(v, *a))
    g = torch.Generator().manual_seed(3)
    n, c, k, h, w = 2, 32, 16, 3, 4
    flat = torch.randn(1 + n * h * w * c, generator=g).to(torch.bfloat16)
    x = flat[1:].view(n, h, w, c).permute(0, 3, 1, 2)  # channels-last memory, data_ptr % 16 == 2
    assert x.is_contiguous(memory_format=torch.channels_last) and x.data_ptr() % 16
    weight = torch.randn(k, c, 1, 1, generator=g).to(torch.bfloat16)
    y = conv.conv_forward(x, weight, 2, schedule=TMA)
    assert [s.tma for s in launched] == [False]
    want = torch.nn.functional.conv2d(x.double(), weight.double())
    assert reference.rel_error(y, want) < reference.tolerance("bfloat16")
    aligned = x.clone(memory_format=torch.channels_last)  # a fresh allocation: aligned
    conv.conv_forward(aligned, weight, 2, schedule=TMA)
    assert [s.tma for s in launched] == [False, True]


KXK = conv_spec(n=32, c=64, k=64, in_size=(56, 56), kernel=3, padding=1, dtype="bfloat16")


def test_kxk_boxes():
    assert tma_applies(KXK) and tma_applies(KXK.with_(dilation=(2, 2), padding=((2, 2), (2, 2)), groups=4))
    assert tma_applies(conv_spec(n=2, c=16, k=16, in_size=(9,), kernel=4, padding=3, dtype="float16"))
    assert tma_applies(conv_spec(n=1, c=16, k=16, in_size=(4, 6, 6), kernel=3, padding=1, dtype="bfloat16"))
    assert tma_box(KXK, 64) == (8, 8) and tma_box(KXK.with_(in_size=(7, 7)), 64) == (8, 8)  # least padding
    assert tma_box(KXK.with_(in_size=(14, 64)), 64) == (1, 64)  # ties: whole rows (an A box that needs no reshape)
    assert tma_box(conv_spec(n=2, c=16, k=16, in_size=(9,), kernel=3, dtype="float16"), 16) == (16,)
    s = canonical(KXK, Schedule(block_m=64, block_n=64, block_k=32, k_order="flat", l1_load=True, tma=True))
    assert s.tma and s.k_order == "tap" and not s.l1_load
    v = generator.render(KXK, s)
    assert (
        "block_shape=[1, BOX_H, BOX_W, BLOCK_K]" in v.source and "x_ptr + g * CG, shape=[n, H_IN, W_IN, CG]" in v.source
    )
    assert v.grid == (32 * 7 * 7, 1)  # 8x8 boxes: 7 x 7 per image
    assert "tl.load(" not in v.source.split("for kk in range(")[1].split("acc = tl.dot")[0]  # no pointer loads
    stats = KXK.with_(in_size=(7, 7), epilogue=Epilogue(stats=True))  # stats rows need whole boxes
    with pytest.raises(ScheduleError, match="boxes"):
        check(stats, s)
    check(stats.with_(in_size=(8, 8)), s)


CHAIN = dict(bias=True, affine=True, residual="pre", activation="relu")


def _id(row) -> str:
    return row.describe().replace(" ", "-") if isinstance(row, Schedule) else str(row)


KXK_CASES = [
    (Case(2, 32, 48, (7, 9), 3, padding=1, groups=2), "float16", Schedule(block_m=32, block_n=16, block_k=16)),
    (
        Case(2, 16, 24, (6, 5), 3, padding=3, dilation=2, n=1, epilogue=CHAIN),
        "bfloat16",
        Schedule(block_m=16, block_n=32, block_k=16),
    ),
    (Case(1, 16, 24, (13,), 4, padding=3), "float16", Schedule(block_m=16, block_n=16, block_k=16)),
    (Case(3, 16, 16, (3, 4, 5), 3, padding=1, n=1), "float16", Schedule(block_m=16, block_n=16, block_k=16)),  # 5-D
    (Case(2, 32, 16, (5, 6), 3, padding=1, n=1), "float16", Schedule(block_m=16, block_n=16, block_k=16, split_k=3)),
]


@pytest.mark.parametrize("case, dtype, s", KXK_CASES, ids=_id)
def test_kxk_matches_float64(case, dtype, s):
    assert tma_applies(spec_of(case, dtype))
    assert run_case(case, dtype, schedule=replace(s, tma=True)) < reference.tolerance(dtype)


def test_kxk_stats():
    import torch

    g = torch.Generator().manual_seed(7)
    x, w = torch.randn(2, 16, 8, 8, generator=g).half(), (torch.randn(32, 16, 3, 3, generator=g) / 12).half()
    s = Schedule(block_m=16, block_n=16, block_k=16, tma=True)  # 2 x 8 boxes tile 8 x 8
    y, mean, var = conv.conv_forward(x, w, 2, padding=1, schedule=s, stats=True)
    z = torch.nn.functional.conv2d(x.double(), w.double(), padding=1)
    assert reference.rel_error(y, z) < reference.tolerance("float16")
    assert reference.rel_error(mean, z.mean(dim=(0, 2, 3))) < 1e-4
    assert reference.rel_error(var, z.var(dim=(0, 2, 3), unbiased=False)) < 1e-4


@pytest.mark.gpu
@pytest.mark.parametrize("case, dtype, s", KXK_CASES, ids=_id)
def test_kxk_matches_float64_cuda(case, dtype, s):
    import torch
    import triton

    triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
    assert run_case(case, dtype, device="cuda", schedule=replace(s, tma=True)) < reference.tolerance(dtype)


@pytest.mark.slow
def test_sm90_kxk_build_loads_by_tma():
    s = default(KXK)
    base, tma = compile_check([generator.render(KXK, s), generator.render(KXK, replace(s, tma=True))], arch=90)
    assert base["ok"] and tma["ok"], (base["error"], tma["error"])
    assert base["tma"] == 0 and base["cp_async"] > 0
    assert tma["tma"] > 0 and tma["cp_async"] == 0 and tma["spill_bytes"] == 0 and tma["loop_mma"]
    assert tma["loop_sass"] < base["loop_sass"]  # no per-tap index or mask math (3.9: 166 -> 135)
