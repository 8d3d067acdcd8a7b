"""The forward checks on CUDA (compiled kernels). Skipped without a GPU."""

import pytest
from convcases import Case, run_case
from test_forward import EP_GEOM, EPILOGUES, GEOMETRY

from tunerd.kernels import reference

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("case", GEOMETRY, ids=str)
def test_geometry_cuda(case, dtype):
    assert run_case(case, dtype, device="cuda") < reference.tolerance(dtype)


@pytest.mark.parametrize("ep", EPILOGUES, ids=lambda e: "+".join(f"{k}={v}" for k, v in e.items()))
@pytest.mark.parametrize("geom", EP_GEOM, ids=str)
def test_epilogue_cuda(geom, ep):
    case = Case(**{**geom.__dict__, "epilogue": ep})
    for dtype in ("float32", "float16", "bfloat16"):
        assert run_case(case, dtype, device="cuda", channels_last_input=True) < reference.tolerance(dtype)


@pytest.mark.parametrize(
    "case",
    [
        Case(2, 64, 64, (56, 56), 3, padding=1, n=8, epilogue=dict(bias=True)),
        Case(2, 96, 96, (56, 56), 7, padding=3, groups=96, n=8),
        Case(2, 128, 128, (32, 32), 31, padding=15, groups=128, n=2),
    ],
    ids=str,
)
def test_realistic_shapes_cuda(case):
    for dtype in ("float16", "bfloat16"):
        assert run_case(case, dtype, device="cuda", channels_last_input=True) < reference.tolerance(dtype)
