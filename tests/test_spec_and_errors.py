"""BlockSpec identity, schedule rules and clear errors for bad input."""

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tunerd import functional as F
from tunerd.kernels import generator
from tunerd.kernels.schedule import Schedule, ScheduleError, default
from tunerd.kernels.spec import BlockSpec, Epilogue, SpecError, canonical_json, conv_spec


def _spec(**kw):
    base = dict(n=2, c=16, k=32, in_size=(8, 8), kernel=3, padding=1)
    base.update(kw)
    return conv_spec(**base)


@settings(max_examples=60, deadline=None)
@given(
    nd=st.integers(1, 3),
    c=st.sampled_from([4, 8, 12]),
    g=st.sampled_from([1, 2, 4]),
    k=st.integers(1, 5),
    s=st.integers(1, 3),
    d=st.integers(1, 2),
    lo=st.integers(0, 3),
    hi=st.integers(0, 3),
    act=st.sampled_from([None, "relu", "starrelu"]),
    dtype=st.sampled_from(["float32", "bfloat16"]),
)
def test_spec_json_round_trip(nd, c, g, k, s, d, lo, hi, act, dtype):
    spec = conv_spec(
        n=1,
        c=c,
        k=c * 2,
        in_size=(12,) * nd,
        kernel=k,
        stride=s,
        dilation=d,
        padding=((lo, hi),) * nd,
        groups=g,
        dtype=dtype,
        epilogue=Epilogue(bias=True, activation=act),
    )
    again = BlockSpec.from_json(spec.to_json())
    assert again == spec and hash(again) == hash(spec) and again.to_json() == spec.to_json()


def test_same_inputs_same_source_and_id():
    spec = _spec(epilogue=Epilogue(bias=True, activation="gelu"))
    a, b = generator.render(spec), generator.render(BlockSpec.from_json(spec.to_json()))
    assert a.source == b.source and a.id == b.id
    other = generator.render(spec, Schedule(block_m=32, block_n=32, block_k=16))
    assert other.id != a.id
    # the source records what it computes: the spec without its batch size (a launch argument) and the batch range
    assert canonical_json({k: v for k, v in spec.to_dict().items() if k != "n"}) in a.source
    assert a.batch is not None and spec.n in a.batch and "# batch:" in a.source


def test_irrelevant_knobs_do_not_change_depthwise_source():
    spec = _spec(c=16, k=16, groups=16)
    a = generator.render(spec, Schedule(block_m=32, block_n=16, block_k=16, group_m=4))
    b = generator.render(spec, Schedule(block_m=32, block_n=16, block_k=64, group_m=8))
    assert a.id == b.id


def test_default_schedule_depends_on_shape():
    small = default(_spec(n=1, c=3, k=16, in_size=(8, 8), kernel=7, padding=3))
    big = default(_spec(n=32, c=256, k=256, in_size=(56, 56)))
    assert small != big
    assert small.k_order == "flat" and big.k_order == "tap"
    assert small.block_m <= 64 and big.block_m * big.block_n >= 64 * 64


@pytest.mark.parametrize(
    "bad,msg",
    [
        (Schedule(block_m=24), "power of two"),
        (Schedule(block_k=8), "minimum of 16"),
        ({"block_m": "64"}, "must be an int"),
        ({"tile": 3}, "unknown schedule fields"),
    ],
)
def test_bad_schedules(bad, msg):
    with pytest.raises(ScheduleError, match=msg):
        generator.render(_spec(), bad)


@pytest.mark.parametrize(
    "text,msg",
    [
        ("{not json", "not valid JSON"),
        ("[]", "JSON object"),
        ('{"kind": "conv"}', "missing spec fields"),
        (
            '{"kind":"conv","n":1,"c":4,"k":4,"in_size":[4,4],"kernel":[3,3],"stride":[1,1],"padding":[[0,0],[0,0]],'
            '"dilation":[1,1],"colour":"red"}',
            "unknown spec fields",
        ),
        (
            '{"kind":"conv","n":1,"c":4,"k":4,"in_size":[4,4],"kernel":[3,3],"stride":[1,1],"padding":[[0,0],[0,0]],'
            '"dilation":[1,1],"epilogue":{"activation":"swish9"}}',
            "unknown activation",
        ),
        (
            '{"kind":"conv","n":1,"c":4,"k":4,"in_size":[4,4],"kernel":[3],"stride":[1,1],"padding":[[0,0],[0,0]],'
            '"dilation":[1,1]}',
            "kernel must be",
        ),
        (
            '{"kind":"conv","n":0,"c":4,"k":4,"in_size":[4,4],"kernel":[3,3],"stride":[1,1],"padding":[[0,0],[0,0]],'
            '"dilation":[1,1]}',
            "positive int",
        ),
    ],
)
def test_malformed_spec_json(text, msg):
    with pytest.raises(SpecError, match=msg):
        BlockSpec.from_json(text)


def test_bad_calls_give_clear_errors():
    # torch's wording and exception types (RuntimeError / TypeError), and SpecError for tunerd's callers
    x = torch.randn(2, 6, 8, 8)
    w = torch.randn(4, 3, 3, 3)
    with pytest.raises(SpecError, match=r"expected input\[2, 5, 8, 8\] to have 2 channels"):
        F.conv2d(torch.randn(2, 5, 8, 8), torch.randn(4, 1, 3, 3), groups=2)
    with pytest.raises(RuntimeError, match=r"Expected 3D \(unbatched\) or 4D \(batched\) input"):
        F.conv2d(torch.randn(8, 8), w)
    with pytest.raises(RuntimeError, match=r"weight type \(torch.float16, cpu\) should be the same"):
        F.conv2d(x, w.half(), groups=2)
    with pytest.raises(SpecError, match=r"bias type \(torch.float16, cpu\) should be the same"):
        F.conv2d(x, w, torch.randn(4, dtype=torch.float16), groups=2)
    with pytest.raises(SpecError, match=r"expected bias to be 1-dimensional with 4 elements"):
        F.conv2d(x, w, torch.randn(5), groups=2)
    with pytest.raises(RuntimeError, match="Kernel size can't be greater than actual input size"):
        F.conv2d(torch.randn(1, 3, 2, 2), torch.randn(4, 3, 5, 5))
    with pytest.raises(SpecError, match=r"weight type \(torch.float32, meta\)"):
        F.conv2d(x, w.to("meta"), groups=2)
    with pytest.raises(NotImplementedError, match="input dtype torch.float64 is not supported"):
        F.conv2d(x.double(), w.double(), groups=2)
    with pytest.raises(SpecError, match="residual must have the output's shape"):
        F.conv2d(x, w, groups=2, padding=1, residual=torch.randn(2, 4, 7, 7))
    with pytest.raises(SpecError, match="together"):
        F.conv2d(x, w, groups=2, scale=torch.ones(4))
    with pytest.raises(RuntimeError, match="'same' is not supported for strided"):
        F.conv2d(x, w, groups=2, stride=2, padding="same")
    with pytest.raises(SpecError, match="unknown activation"):
        F.conv2d(x, w, groups=2, activation="mish")
    with pytest.raises(RuntimeError, match=r"weight of size \[4, 6, 3, 3\], expected input\[2, 6, 8, 8\] to have 12"):
        F.conv2d(x, torch.randn(4, 6, 3, 3), groups=2)
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        F.conv2d(x.numpy(), w)


def test_bf16_on_the_interpreter_is_right_not_garbage():
    # Triton's interpreter computes bf16 tl.dot wrongly; the generator upcasts there (and only there).
    x = torch.randn(2, 32, 6, 6, dtype=torch.bfloat16)
    w = torch.randn(32, 32, 3, 3, dtype=torch.bfloat16) / 17
    y = F.conv2d(x, w, padding=1)
    ref = torch.nn.functional.conv2d(x.double(), w.double(), padding=1)
    assert ((y.double() - ref).norm() / ref.norm()).item() < 1e-2


def test_spec_describe_and_digest():
    spec = _spec(stride=2, groups=4)
    assert "g4" in spec.describe() and "s2x2" in spec.describe()
    assert len(spec.digest) == 16 and spec.digest == BlockSpec.from_json(spec.to_json()).digest
    assert json.loads(spec.key)["groups"] == 4


def test_old_interpreter_with_new_numpy_is_refused_clearly(monkeypatch):
    # Triton 3.6's interpreter calls int() on 1-element arrays, which numpy >= 2.4 rejects deep inside a kernel
    import numpy as np
    import triton

    from tunerd.kernels import runtime

    runtime._check_interpreter.cache_clear()
    monkeypatch.setattr(triton, "__version__", "3.6.0")
    monkeypatch.setattr(np, "__version__", "2.4.1")
    with pytest.raises(RuntimeError, match="numpy<2.4"):
        runtime._check_interpreter()
    runtime._check_interpreter.cache_clear()
    monkeypatch.setattr(np, "__version__", "2.3.5")
    runtime._check_interpreter()  # a working pair passes
    runtime._check_interpreter.cache_clear()
