"""Default schedules of issue 13's spill fixes, run on the interpreter against float64 torch on
NaN-poisoned outputs (the sm_90 compiles are in test_static)."""

from __future__ import annotations

from convcases import Case, run_case, spec_of

from tunerd.kernels import reference
from tunerd.kernels.schedule import default


def test_one_tap_rows_up_to_sixteen_wide_are_one_group():
    # k11x1 on a 14-wide row: one group of 16 outputs (2 masked) per row, as InceptionNeXt's 14x14 band
    case = Case(2, 8, 8, (13, 14), (11, 1), padding=(5, 0), groups=8, n=1)
    s = default(spec_of(case, "float32"))
    assert s.block_k == 16
    assert run_case(case, "float32") < reference.tolerance("float32")
    # wider rows and rows of several taps keep groups of 8
    assert default(spec_of(Case(2, 8, 8, (5, 28), (11, 1), padding=(5, 0), groups=8), "float32")).block_k == 8
    assert default(spec_of(Case(2, 8, 8, (5, 14), (1, 11), padding=(0, 5), groups=8), "float32")).block_k == 8
