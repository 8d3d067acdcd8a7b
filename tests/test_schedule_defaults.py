"""Default schedules of issue 13's spill fixes, run on the interpreter against float64 torch on
NaN-poisoned outputs (the sm_90 compiles are in test_static)."""

from __future__ import annotations

from convcases import Case, run_case, spec_of

from tunerd.kernels import reference
from tunerd.kernels.schedule import default
from tunerd.kernels.spec import Epilogue, conv_spec


def test_one_tap_rows_up_to_sixteen_wide_are_one_group():
    # k11x1 on a 14-wide row: one group of 16 outputs (2 masked) per row, as InceptionNeXt's 14x14 band
    case = Case(2, 8, 8, (13, 14), (11, 1), padding=(5, 0), groups=8, n=1)
    s = default(spec_of(case, "float32"))
    assert s.block_k == 16
    assert run_case(case, "float32") < reference.tolerance("float32")
    # wider rows and rows of several taps keep groups of 8
    assert default(spec_of(Case(2, 8, 8, (5, 28), (11, 1), padding=(5, 0), groups=8), "float32")).block_k == 8
    assert default(spec_of(Case(2, 8, 8, (5, 14), (1, 11), padding=(0, 5), groups=8), "float32")).block_k == 8


def test_stats_with_a_16_bit_output_keep_32_sums_per_thread():
    """A fwd gathering BatchNorm statistics and storing a 16-bit output: at most 32 fp32 sums per thread (RepVGG's
    stacked 3x3 stats conv spilled 8 bytes at 64 under Triton 3.9); stats_only, fp32 and plain epilogues keep theirs."""

    def spec(dtype: str, **ep: bool):
        return conv_spec(n=32, c=48, k=96, in_size=(56, 56), kernel=3, padding=1, dtype=dtype, epilogue=Epilogue(**ep))

    for dtype in ("float16", "bfloat16"):
        s = default(spec(dtype, stats=True))
        assert s.block_m * s.block_n // (32 * s.num_warps) == 32 and (s.block_m, s.num_warps) == (64, 8)
        assert default(spec(dtype, stats=True, stats_only=True)) == default(spec(dtype)) != s
    assert default(spec("float32", stats=True)) == default(spec("float32"))
    late = conv_spec(n=8, c=64, k=96, in_size=(32, 32), kernel=3, padding=1, dtype="bfloat16")  # 64x128: more warps
    assert (default(late.with_(epilogue=Epilogue(stats=True))).num_warps, default(late).num_warps) == (8, 4)
