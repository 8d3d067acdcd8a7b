"""The batch size is a launch argument: one source, one loaded kernel (one JIT compile) serves every batch size
of a layer, and every batch size computes the right thing (float64 torch, NaN-poisoned outputs)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as tF

from tunerd.kernels import conv, generator, reference, runtime, trust
from tunerd.kernels.backward import Needs, conv_backward, grad_spec
from tunerd.kernels.conv import EpilogueArgs, make_spec, run_forward
from tunerd.kernels.schedule import Schedule
from tunerd.kernels.spec import Epilogue, SpecError, conv_spec

# one explicit schedule per pass (defaults are sized per batch); large tiles keep n = 256 cheap on the interpreter
CONV = dict(c=16, k=16, in_size=(2, 3), kernel=3, padding=1)
SCHEDULES = {
    "fwd": Schedule(block_m=256, block_n=16, block_k=16),
    "dgrad": Schedule(block_m=256, block_n=16, block_k=16),
    # one program per split over the flattened (tap, c) columns; pixel tile 2 images x 2 x 16: odd batches run the
    # masked last image tile
    "wgrad": Schedule(block_m=16, block_n=256, block_k=64, split_k=2, k_order="flat"),
}
DEPTHWISE = dict(c=16, k=16, in_size=(5, 5), kernel=3, padding=1, groups=16)
DW_SCHEDULES = {
    "fwd": Schedule(block_m=32, block_n=16, block_k=4),
    "dgrad": Schedule(block_m=32, block_n=16),
    "wgrad": Schedule(block_m=16, block_n=16, block_k=16, split_k=2),
}


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setattr(conv, "POISON_OUTPUTS", True)


def _errors(layer: dict, n: int, schedules: dict[str, Schedule]) -> dict[str, float]:
    """Forward into a NaN-filled buffer, then dgrad and wgrad (bias + relu chain); relative errors vs float64."""
    x = torch.randn(n, layer["c"], *layer["in_size"])
    w = torch.randn(layer["k"], layer["c"] // layer.get("groups", 1), 3, 3) / 12
    bias = torch.randn(layer["k"])
    ep = EpilogueArgs(bias=bias, activation="relu")
    groups = layer.get("groups", 1)
    spec = make_spec(x, w, 2, 1, layer["padding"], 1, groups, ep, save_z=True)
    out = torch.full((n, *spec.out_size, spec.k), float("nan"))
    res = run_forward(spec, x, w, ep, schedules["fwd"], out=out)
    leaf = [t.double().requires_grad_() for t in (x, w, bias)]
    y = torch.relu(tF.conv2d(leaf[0], leaf[1], leaf[2], 1, layer["padding"], 1, groups))
    dy = torch.randn(y.shape, dtype=torch.float64)
    ref = torch.autograd.grad((y * dy).sum(), leaf)
    g = conv_backward(dy.float(), x, w, spec, ep, res.z, Needs(bias=True), schedules=schedules)
    got = {"y": res.y, "input": g.input, "weight": g.weight, "bias": g.bias}
    return {k: reference.rel_error(v, r) for k, v, r in zip(got, got.values(), (y, *ref))}


def _variant_ids(layer: dict, n: int, schedules: dict[str, Schedule]) -> dict[str, str]:
    fwd = conv_spec(n=n, epilogue=Epilogue(bias=True, activation="relu", save_z=True), **layer)
    return {op: generator.render(grad_spec(fwd, op) if op != "fwd" else fwd, schedules[op]).id for op in schedules}


@pytest.mark.parametrize(
    "layer, schedules, batches",
    [(CONV, SCHEDULES, (1, 3, 17, 256)), (DEPTHWISE, DW_SCHEDULES, (1, 3, 17))],
    ids=["conv", "depthwise"],
)
def test_one_kernel_serves_every_batch(layer, schedules, batches):
    ids = {n: _variant_ids(layer, n, schedules) for n in batches}
    assert all(v == ids[batches[0]] for v in ids.values()), ids  # one source per pass for every n
    loaded = None
    for n in batches:
        errs = _errors(layer, n, schedules)
        assert max(errs.values()) < 2e-5, (n, errs)
        if loaded is None:  # the first batch loaded the three kernels (if no earlier test had)
            loaded = runtime.compiles()["loaded"]
        assert runtime.compiles()["loaded"] == loaded, f"batch {n} loaded a kernel of its own"


def test_the_source_names_its_batch_range_and_not_its_batch():
    spec = conv_spec(n=17, **CONV)
    v = generator.render(spec, SCHEDULES["fwd"])
    assert '"n":' not in v.source.split("import triton")[0]  # the header's spec is batch-free
    cap = (2**31 - 1) // (6 * 16)  # largest tensor: 6 pixels x 16 channels per image
    assert v.batch == generator.BatchRange(1, cap, False) and f"# batch:    1 <= n <= {cap} (int32" in v.source
    assert generator.render(spec.with_(n=cap), SCHEDULES["fwd"]).id == v.id
    wide = generator.render(spec.with_(n=cap + 1), SCHEDULES["fwd"])
    assert wide.id != v.id and wide.batch == generator.BatchRange(cap + 1, None, True)
    # trust: a claim made for another batch of the layer is this batch's rendering, byte for byte
    assert trust.verify(spec.with_(n=256), SCHEDULES["fwd"], v.source, variant_id=v.id).id == v.id


def test_a_variant_is_refused_outside_its_batch_range():
    v = generator.render(conv_spec(n=3, **CONV), SCHEDULES["fwd"])
    cap = v.batch.hi
    stale = generator.Variant(v.spec.with_(n=cap + 1), v.schedule, v.source, v.kernel_name, v.grid)
    with pytest.raises(SpecError, match=f"batch size {cap + 1} is outside the batch range 1 <= n <= {cap}"):
        runtime.kernel_args(stale, {})
    assert runtime.kernel_args(v, {"UPCAST": False}) == {"UPCAST": False, "n": 3}


@pytest.mark.parametrize("layer, schedules", [(CONV, SCHEDULES), (DEPTHWISE, DW_SCHEDULES)], ids=["conv", "depthwise"])
def test_the_int64_form_computes_the_same(monkeypatch, layer, schedules):
    # a limit small enough that n = 3 needs int64 offsets: the int64 form (sizes derived from n in int64 too)
    per_image = layer["k"] * layer["in_size"][0] * layer["in_size"][1]
    monkeypatch.setattr(generator, "INT32_LIMIT", 2 * per_image)
    generator.clear_render_cache()
    try:
        spec = conv_spec(n=3, epilogue=Epilogue(bias=True, activation="relu", save_z=True), **layer)
        for op in schedules:
            v = generator.render(grad_spec(spec, op) if op != "fwd" else spec, schedules[op])
            assert v.batch == generator.BatchRange(3, None, True) and "n = n.to(tl.int64)" in v.source
        errs = _errors(layer, 3, schedules)
        assert max(errs.values()) < 2e-5, errs
    finally:
        generator.clear_render_cache()


def test_a_ragged_batch_reuses_the_schedule_its_layer_ran_without_a_compile():
    """Default path (no explicit schedule, no tuned answer): a smaller batch of a layer runs the schedule the
    largest batch so far ran, so its own default (sized to its batch) never costs a compile."""
    conv.forget_layer_schedules()
    layer = dict(c=16, k=32, in_size=(4, 4), kernel=3, padding=1)
    w = torch.randn(32, 16, 3, 3) / 12

    def run(n: int) -> str:
        x = torch.randn(n, 16, 4, 4)
        spec = make_spec(x, w, 2, 1, 1, 1, 1, EpilogueArgs())
        v = conv.choose_variant(spec, x.device, None)
        out = torch.full((n, 4, 4, 32), float("nan"))
        y = run_forward(spec, x, w, EpilogueArgs(), out=out).y
        assert reference.rel_error(y, tF.conv2d(x.double(), w.double(), padding=1)) < 1e-5
        return v.id

    full = conv_spec(n=8, **layer)
    ragged = conv_spec(n=1, **layer)
    assert generator.render(full).schedule != generator.render(ragged).schedule  # defaults differ per batch
    before = runtime.compiles()["loaded"]
    assert run(8) == run(1) == run(3) == generator.render(full).id
    assert runtime.compiles()["loaded"] - before <= 1
    conv.forget_layer_schedules()
    assert run(1) == generator.render(ragged).id  # nothing remembered: its own default
