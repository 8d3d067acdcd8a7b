"""The implicit-GEMM templates' address paths, and kernels that name their shape values.

fwd and dgrad hoist each row's offset and a word of per-tap validity bits out of the reduction (a 64-bit word
past 32 taps, per-step index math past 64, no word without padding); every path against the float64 reference
on NaN-poisoned outputs, with full and partial channel blocks. GPU twins run the compiled kernels.
"""

from __future__ import annotations

import re

import pytest
from convcases import Case, run_case
from test_backward import _assert_ok, _poison, grad_errors  # noqa: F401  (_poison: NaN-poisoned outputs)

from tunerd.kernels import generator, reference
from tunerd.kernels.backward import Needs
from tunerd.kernels.schedule import Schedule
from tunerd.kernels.spec import conv_spec

PATHS = [
    Case(2, 16, 24, (9, 11), 3, padding=1),  # 9 taps: 32-bit word, full channel blocks
    Case(2, 16, 16, (8, 9), 7, padding=3, n=1),  # 49 taps: 64-bit word
    Case(2, 8, 8, (10, 11), 9, padding=4, n=1),  # 81 taps: per-step index math
    Case(2, 16, 16, (9, 8), 3),  # no padding: no word
    Case(2, 24, 40, (8, 7), 3, stride=2, padding=1, dilation=2, groups=2),  # 12 channels a group: partial blocks
    Case(3, 8, 16, (4, 5, 6), 3, stride=(1, 2, 1), padding=1),
    Case(1, 16, 16, (19,), 5, padding=((4, 0),)),  # causal padding
]
TAP = Schedule(block_m=32, block_n=16, block_k=16, group_m=2, k_order="tap")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("case", PATHS, ids=str)
def test_forward_address_paths(case, dtype):
    assert run_case(case, dtype, schedule=TAP) < reference.tolerance(dtype)


@pytest.mark.parametrize("case", PATHS, ids=str)
def test_dgrad_address_paths(case):
    errs = grad_errors(case, needs=Needs(input=True, weight=False), schedules={"dgrad": TAP})
    _assert_ok(errs, "float32")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("case", PATHS, ids=str)
def test_forward_address_paths_cuda(case, dtype):
    assert run_case(case, dtype, device="cuda", schedule=TAP) < reference.tolerance(dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("case", PATHS, ids=str)
def test_dgrad_address_paths_cuda(case):
    errs = grad_errors(case, device="cuda", needs=Needs(input=True, weight=False), schedules={"dgrad": TAP})
    _assert_ok(errs, "float32")


def _code(source: str) -> list[str]:
    """The kernel's statements after its constants block, comments dropped."""
    body = source[source.index("\ndef tunerd_") + 1 :]
    return [line.split("#")[0] for line in body.splitlines()[1:] if "tl.constexpr =" not in line]


@pytest.mark.parametrize("op", ["fwd", "dgrad", "wgrad"])
@pytest.mark.parametrize("k_order", ["tap", "flat"])
def test_kernels_name_their_shape_values(op, k_order):
    spec = conv_spec(n=3, c=40, k=56, in_size=(13, 17), kernel=3, stride=2, padding=1, dtype="bfloat16", op=op)
    v = generator.render(spec, Schedule(block_m=32, block_n=32, block_k=32, k_order=k_order))
    # sizes, channels, element strides (17 * 40, 13 * 17 * 40), output pixels (3 * 7 * 9), the packed weight row
    shape_values = {"13", "17", "40", "56", "680", "8840", "189", "360"}
    bare = {n for line in _code(v.source) for n in re.findall(r"(?<![\w.])\d+(?![\w.])", line)} & shape_values
    assert not bare, f"{op}: bare shape numbers {sorted(bare)} in the kernel body (use the named constants)"
    assert "C: tl.constexpr = 40" in v.source and "SX_H: tl.constexpr = W_IN * C  # 680" in v.source
