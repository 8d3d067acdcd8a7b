"""The block benchmark (benchmarks/blocks.py): small interpreter mode end to end, the correctness gate that
records a wrong or failing contender, the eager contender against float64 on every family, case order."""

from __future__ import annotations

import json
import math

import pytest
import torch

from benchmarks import blocks, run
from benchmarks.timing import Failure, TimingConfig
from tunerd.kernels import reference


def test_small_mode_times_every_contender_and_records_bytes(tmp_path):
    doc = blocks.main(["--small", "--suites", "mobilenetv2", "--passes", "fwd,fwd+bwd", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["device"]["interpreter"] is True and "not GPU numbers" in data["note"]
    assert data["config"]["small"] and data["config"]["tune_budget"] == doc["config"]["tune_budget"] == 0
    assert [c["pass"] for c in data["cases"]] == ["fwd", "fwd+bwd"] and not data["stopped"]
    for c in data["cases"]:
        got = c["contenders"]
        assert set(got) == set(blocks.CONTENDERS)
        for name in ("tunerd", "eager"):
            assert got[name]["status"] == "ok" and got[name]["median_ms"] > 0, (name, got[name])
            assert got[name]["rel_error"] < reference.tolerance(c["dtype"])
        assert got["torch_compile"]["status"] == "skipped" and "interpreter" in got["torch_compile"]["reason"]
        assert c["plan"]["source"] == "default" and c["plan"]["plan"].startswith("mbconv[")
        # the fused plan's modelled traffic and launches against the unfused (eager) plan
        assert 0 < c["plan"]["bytes"] < c["eager_plan"]["bytes"] and c["bytes_ratio"] < 1
        assert c["plan"]["launches"] < c["eager_plan"]["launches"]
        assert c["speedups"]["vs_eager"] > 0 and c["speedups"]["vs_compile"] is None
    bwd = data["cases"][1]["contenders"]
    params = {"x", "expand.weight", "dw.weight", "project.weight", "project_bn.shift"}
    for name in ("tunerd", "eager"):  # the gradient of the input and of every parameter, each checked
        assert params <= set(bwd[name]["grad_rel_error"])
        assert bwd[name]["grad_rel_error_max"] < reference.tolerance("float32")
    row = data["summary"]["mobilenetv2"]
    assert row["fwd"]["vs_eager"]["n"] == row["fwd+bwd"]["vs_eager"]["n"] == 1 and row["bytes_ratio"] < 1
    assert "all" in data["summary"]
    # beside the tiny blocks: the GPU-size block's modelled traffic (batch 32, bf16), fused below unfused
    (m,) = data["modelled"]["rows"]
    assert m["suite"] == "mobilenetv2" and "n32" in m["name"] and 0 < m["plan"]["bytes"] < m["eager_plan"]["bytes"]
    md = (tmp_path / "report.md").read_text()
    assert "interpreter" in md and "| mobilenetv2 |" in md and "mbconv[" in md


def test_module_case_checks_every_form_and_eager_against_float64(tmp_path):
    """repvgg_a0's small module case: the auto form, each forced form and the timm module's own forward, output and
    every gradient within tolerance of the float64 module; the auto form's pick and the modelled bytes recorded."""
    blocks.main(["--small", "--suites", "repvgg_a0", "--passes", "fwd+bwd", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "results.json").read_text())
    assert [c["pass"] for c in data["cases"]] == ["fwd+bwd"]
    for c in data["cases"]:
        got = c["contenders"]
        assert set(got) == {*blocks.CONTENDERS, *blocks.FORM_CONTENDERS}
        for name in ("tunerd", "eager", *blocks.FORM_CONTENDERS):
            assert got[name]["status"] == "ok" and got[name]["rel_error"] < reference.tolerance("float32"), got[name]
        assert c["plan"]["form"] in ("combine", "merged", "eager") and c["plan"]["plan"].startswith("rep_block ")
        assert set(c["plan"]["costs"]) == {"combine", "merged", "eager"} and c["eager_plan"]["bytes"] > 0
    bwd = data["cases"][0]["contenders"]
    names = {"x", "conv_kxk.conv.weight", "conv_1x1.bn.bias", "identity.weight"}
    for name in ("tunerd", "tunerd_combine", "tunerd_merged"):
        assert names <= set(bwd[name]["grad_rel_error"]) and bwd[name]["grad_rel_error_max"] < 1e-5
    assert data["modelled"]["rows"][0]["suite"] == "repvgg_a0"
    assert "tunerd_combine" in (tmp_path / "report.md").read_text()


def _outs(*ts: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return tuple(t.clone() for t in ts)


def test_wrong_raising_and_skipped_contenders_are_recorded_and_the_rest_timed():
    g = torch.Generator().manual_seed(0)
    y, dx = torch.randn(4, 8, generator=g), torch.randn(4, 8, generator=g)
    ref = (y.double(), dx.double())
    tol = reference.tolerance("float32")
    eager_dx = dx + 1e-3 * dx.norm() / 8 * torch.randn(4, 8, generator=g)  # eager's own gradient error ~1e-3

    def boom(i: int) -> tuple[torch.Tensor, ...]:
        raise RuntimeError("no kernel for this shape")

    def twice(fn):
        return (fn, fn)

    checked = {
        "tunerd": twice(lambda i: _outs(y, dx + 2e-3 * dx)),  # gradient within 4x eager's error: passes
        "eager": twice(lambda i: _outs(y, eager_dx)),
        "wrong_out": twice(lambda i: _outs(1.1 * y, dx)),
        "nan_out": twice(lambda i: _outs(torch.full_like(y, math.nan), dx)),
        "wrong_grad": twice(lambda i: _outs(y, 1.5 * dx)),
        "raises": twice(boom),
        "compile": run.Skip("torch.compile off"),
        "setup": Failure("setup", "could not build"),
    }
    cfg = TimingConfig(warmup=0, reps=2, rounds=1, flush_bytes=0)
    res = blocks.measure(checked, ref, ["x"], tol, 1, torch.device("cpu"), cfg)
    assert list(res) == list(checked)
    assert res["eager"]["status"] == "ok" and res["eager"]["samples"] == 2
    assert (
        res["tunerd"]["status"] == "ok"
        and tol < res["tunerd"]["grad_rel_error"]["x"] < 4 * res["eager"]["grad_rel_error"]["x"]
    )
    assert res["wrong_out"]["status"] == "wrong-result" and res["wrong_out"]["wrong"] == ["output"]
    assert res["nan_out"]["status"] == "wrong-result" and res["nan_out"]["rel_error"] == math.inf
    assert res["wrong_grad"]["status"] == "wrong-result" and res["wrong_grad"]["wrong"] == ["x"]
    assert res["raises"]["status"] == "error" and "no kernel" in res["raises"]["error"]
    assert res["compile"] == {"status": "skipped", "reason": "torch.compile off"}
    assert res["setup"]["status"] == "error" and res["setup"]["stage"] == "setup"
    doc = {"contenders": res}
    assert blocks.speedups(doc)["vs_compile"] is None and blocks.speedups(doc)["vs_eager"] > 0


@pytest.mark.parametrize("dtype, passes", [("float32", (False, True)), ("bfloat16", (False,))])
def test_eager_contender_matches_float64_on_every_family(dtype, passes):
    for name, make in blocks.SMALL.items():
        blk = make(dtype)
        for backward in passes:
            s = blocks.make_sets(blk, 1, torch.device("cpu"), 0, backward)[0]
            got = blocks._runner(blocks.eager_forward(blk), [s])(0)
            want = blocks.oracle(blk, s)
            assert len(got) == len(want) == (2 + len(s.params) if backward else 1)
            errs = blocks.errors(got, want)
            assert max(errs) < reference.tolerance(dtype), (name, backward, errs)


def test_cases_run_every_suite_forward_first_on_its_heaviest_block():
    cfg = blocks.parse_args(["--full", "--dtypes", "bf16,fp32", "--batch", "8"])
    cases = blocks.plan_cases(cfg)
    suites = {*blocks.SUITES, *blocks.MODULE_SUITES}
    assert len(cases) == len(suites) * 2 * 2
    first = cases[: len(suites)]
    assert {c.suite for c in first} == suites and {(c.op, c.dtype) for c in first} == {("fwd", "bfloat16")}
    assert all(c.block.n == 8 for c in cases if c.block is not None)
    rep = [c for c in cases if c.module is not None]  # repvgg_a0's heaviest block: stage 1's stride-2 one
    assert {c.suite for c in rep} == {"repvgg_a0"} and all(c.module.x_shape == (8, 48, 112, 112) for c in rep)
    convnext = next(c for c in cases if c.suite == "convnext_t")  # 3 blocks at 56x56 move more than 9 at 14x14
    assert convnext.entry == "stage1" and convnext.count == 3
