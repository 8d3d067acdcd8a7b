"""tunerd.functional.conv1d/2d/3d behave as torch.nn.functional: PyTorch's own OpInfo samples and error inputs.

Every sample of op_db's nn.functional.conv1d/2d/3d runs (outputs and gradients against a float64 torch
oracle on poisoned buffers) in float32, conv1d's and conv2d's also in bfloat16; float64 samples must be refused with
NotSupported (documented in kernels.convargs); every error input must raise torch's exception type
with torch's message.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as TF
from torch.testing._internal.common_methods_invocations import op_db

from tunerd import functional as F
from tunerd import nn as tnn
from tunerd.kernels import conv as kconv
from tunerd.kernels.convargs import ConvArgumentError, NotSupported
from tunerd.kernels.spec import SpecError

OPS = {
    o.name.rsplit(".", 1)[1]: o
    for o in op_db
    if o.name in ("nn.functional.conv1d", "nn.functional.conv2d", "nn.functional.conv3d")
}
pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same'")  # torch's own reference warns
# relative-error bounds vs float64 (fp32 accumulation in every case)
TOL = {torch.float32: 1e-5, torch.bfloat16: 1.5e-2}


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setattr(kconv, "POISON_OUTPUTS", True)


def _rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    assert got.shape == ref.shape and got.dtype != torch.float64
    assert torch.isfinite(got).all(), "a kernel left poisoned (NaN) elements"
    return ((got.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def _run_samples(name: str, dtype: torch.dtype) -> int:
    op, ours = OPS[name], getattr(F, name)
    count = 0
    for s in op.sample_inputs("cpu", dtype, requires_grad=True):
        leaves = [t for t in (s.input, *s.args) if isinstance(t, torch.Tensor)]
        y = ours(s.input, *s.args, **s.kwargs)
        ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
        ref = getattr(TF, name)(*ref_leaves, **s.kwargs)
        assert y.dtype == dtype and y.is_contiguous() == ref.is_contiguous()
        assert _rel(y, ref) < TOL[dtype], (name, dtype, s)
        gy = torch.randn(ref.shape, dtype=torch.float64)
        grads = torch.autograd.grad(y, leaves, gy.to(dtype))
        ref_grads = torch.autograd.grad(ref, ref_leaves, gy)
        for what, g, rg in zip(("input", "weight", "bias"), grads, ref_grads):
            assert g.shape == rg.shape and g.dtype == dtype
            assert _rel(g, rg) < TOL[dtype] * 4, (name, dtype, what, s)
        count += 1
    return count


@pytest.mark.parametrize("name", sorted(OPS))
def test_opinfo_samples_float32(name):
    assert _run_samples(name, torch.float32) == len(list(OPS[name].sample_inputs("cpu", torch.float32)))


@pytest.mark.parametrize("name", ["conv1d", "conv2d"])  # conv3d's bf16 run would double the CPU budget
def test_opinfo_samples_bfloat16(name):
    assert _run_samples(name, torch.bfloat16) == len(list(OPS[name].sample_inputs("cpu", torch.bfloat16)))


@pytest.mark.parametrize("name", sorted(OPS))
def test_opinfo_float64_is_refused_with_the_reason(name):
    samples = list(OPS[name].sample_inputs("cpu", torch.float64))
    assert samples
    for s in samples:
        with pytest.raises(NotImplementedError, match="float64 is not supported.*accumulate in fp32"):
            getattr(F, name)(s.input, *s.args, **s.kwargs)


@pytest.mark.parametrize("name", sorted(OPS))
def test_opinfo_error_inputs(name):
    op = OPS[name]
    errors = list(op.error_inputs("cpu"))
    assert errors
    for e in errors:
        s = e.sample_input
        with pytest.raises(e.error_type, match=e.error_regex):
            getattr(F, name)(s.input, *s.args, **s.kwargs)
        with pytest.raises(SpecError):  # and still a SpecError (ValueError) for tunerd's own callers
            getattr(F, name)(s.input, *s.args, **s.kwargs)


def test_numpy_ints_and_one_element_tuples_as_torch():
    x, w, b = torch.randn(2, 4, 9, 9), torch.randn(6, 2, 3, 3), torch.randn(6)
    ref = TF.conv2d(x, w, b, stride=(2,), padding=(np.int64(1),), dilation=[np.int32(2)], groups=np.int64(2))
    y = F.conv2d(x, w, b, stride=(2,), padding=(np.int64(1),), dilation=[np.int32(2)], groups=np.int64(2))
    assert _rel(y, ref.double()) < 1e-5
    y = F.conv2d(x, w, b, stride=np.int64(2), groups=torch.tensor(2))
    assert _rel(y, TF.conv2d(x, w, b, stride=2, groups=2).double()) < 1e-5


@pytest.mark.parametrize(
    "kwargs,exc,msg",
    [
        (dict(stride=1.5), TypeError, "'stride' must be an int"),
        (dict(stride=True), TypeError, "'stride' must be an int"),
        (dict(groups=2.0), TypeError, "'groups' must be an int"),
        (dict(stride=(1, 1, 1)), RuntimeError, "a list of 2 values"),
        (dict(padding="full"), RuntimeError, "Invalid padding string"),
        (dict(groups=4), RuntimeError, "expected weight to be divisible by 4"),
        (dict(groups=1), RuntimeError, "expected input\\[2, 4, 6, 6\\] to have 2 channels"),
    ],
)
def test_errors_have_torch_types(kwargs, exc, msg):
    x, w = torch.randn(2, 4, 6, 6), torch.randn(6, 2, 3, 3)
    kwargs.setdefault("groups", 2)
    with pytest.raises(exc) as torch_err:
        TF.conv2d(x, w, **kwargs)
    with pytest.raises(exc, match=msg) as ours:
        F.conv2d(x, w, **kwargs)
    assert isinstance(ours.value, SpecError) and isinstance(torch_err.value, exc)


def test_unbatched_with_epilogue_and_module():
    x, w = torch.randn(4, 7, 7), torch.randn(4, 1, 3, 3)
    res = torch.randn(4, 7, 7)
    y = F.conv2d(x, w, padding=1, groups=4, activation="relu", residual=res, residual_mode="post")
    ref = TF.relu(TF.conv2d(x.double(), w.double(), padding=1, groups=4)) + res.double()
    assert y.shape == (4, 7, 7) and _rel(y, ref) < 1e-5
    m = tnn.Conv1d(3, 5, 3, padding=1)
    xs = torch.randn(3, 11)
    ref = torch.nn.functional.conv1d(xs.double(), m.weight.double(), m.bias.double(), padding=1)
    assert _rel(m(xs), ref) < 1e-5
    with pytest.raises(RuntimeError, match="Expected 3D \\(unbatched\\) or 4D \\(batched\\) input to conv2d"):
        F.conv2d(torch.randn(7, 7), w)


def test_unsupported_calls_are_not_implemented_errors():
    w = torch.randn(4, 2, 3, 3)
    with pytest.raises(NotImplementedError, match="empty batch"):
        F.conv2d(torch.randn(0, 2, 5, 5), w)
    with pytest.raises(NotSupported, match="int64"):
        F.conv2d(torch.ones(1, 2, 5, 5, dtype=torch.long), w.long())
    assert issubclass(ConvArgumentError, RuntimeError) and issubclass(NotSupported, RuntimeError)
