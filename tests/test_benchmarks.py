"""The benchmark: small interpreter mode end to end, its math, the model builders, failure handling."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from benchmarks import networks, report, run, timing
from tunerd.kernels import reference
from tunerd.kernels import schedule as _sched
from tunerd.kernels.spec import Epilogue, SpecError, conv_spec
from tunerd.schedules import suites


def test_small_mode_runs_end_to_end_and_writes_valid_outputs(tmp_path):
    doc = run.main(["--small", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["device"]["name"] == "triton-interpreter (CPU)" and data["device"]["interpreter"] is True
    assert "not GPU numbers" in data["note"]
    assert data["config"]["tune"]["budget_trials"] == doc["config"]["tune_budget"] > 0
    assert data["peaks"]["copy_gbps"] > 0 and data["peaks"]["matmul_tflops"]["bfloat16"] > 0
    fwd = [c for c in data["cases"] if c["pass"] == "fwd" and not c["fused"]]
    fused = [c for c in data["cases"] if c["fused"]]
    assert fwd and fused
    for c in fwd:
        got = c["contenders"]
        assert got["tunerd_default"]["status"] == "ok" and got["torch"]["status"] == "ok"
        assert got["tunerd_default"]["rel_error"] < reference.tolerance(c["dtype"])
        assert got["torch_compile"]["status"] == "skipped" and got["torch_compile"]["reason"]
        assert c["speedups"]["default_vs_torch"] > 0 and c["roofline"]["roofline_ms"] > 0
    assert all(c["contenders"]["torch_unfused"]["status"] == "ok" for c in fused)
    assert {c["pass"] for c in data["cases"]} == {"fwd", "dgrad", "wgrad"}
    assert {c["dtype"] for c in data["cases"]} == {"float32", "bfloat16"}
    statuses = {"ok", "error", "wrong-result", "skipped"}
    for c in data["cases"]:
        assert c["contenders"]["torch" if not c["fused"] else "torch_unfused"]["status"] == "ok"
        assert {r["status"] for r in c["contenders"].values()} <= statuses
    assert "quick" in data["summary"] and "all" in data["summary"]
    md = (tmp_path / "report.md").read_text()
    assert "interpreter" in md and "| quick |" in md
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert (tmp_path / "speedup.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_geomean_on_known_numbers():
    assert report.geomean([1.0, 4.0]) == pytest.approx(2.0)
    assert report.geomean([2.0, None, 8.0, -1.0, math.inf]) == pytest.approx(4.0)
    assert report.geomean([]) is None and report.geomean([None, 0.0]) is None


def _case(suite: str, fused: bool, **ms: float | None) -> dict:
    return {
        "suite": suite,
        "fused": fused,
        "roofline": {},
        "contenders": {k: ({"status": "ok", "median_ms": v} if v else {"status": "error"}) for k, v in ms.items()},
    }


def test_speedups_and_per_suite_summary():
    plain = _case("a", False, tunerd_tuned=1.0, tunerd_default=2.0, torch=4.0, torch_compile=None)
    fused = _case("a", True, tunerd_tuned=2.0, tunerd_default=2.0, torch_unfused=8.0, torch_compile=1.0)
    for c in (plain, fused):
        c["speedups"] = report.case_speedups(c)
    assert plain["speedups"] == {
        "tuned_vs_torch": 4.0,
        "tuned_vs_compile": None,
        "default_vs_torch": 2.0,
        "tuned_vs_default": 2.0,
    }
    assert fused["speedups"]["tuned_vs_unfused"] == 4.0 and fused["speedups"]["tuned_vs_compile"] == 0.5
    assert "tuned_vs_torch" not in fused["speedups"]
    s = report.summarize([plain, fused])
    assert s["a"]["tuned_vs_default"] == {"geomean": pytest.approx(math.sqrt(2.0)), "n": 2}
    assert s["a"]["tuned_vs_compile"]["n"] == 1 and s["all"]["cases"] == 2


def test_roofline_math_on_known_numbers():
    peaks = {"copy_gbps": 1000.0, "matmul_tflops": {"bfloat16": 100.0, "float32": 10.0}}
    limits = run.measured_limits(peaks)
    assert limits.dram_bw == 1e12 and limits.fp16_flops == 1e14 and limits.fp32_flops == 1e13
    # 1x1 conv, bf16: flops = 2*M*K*C, bytes = 2*(x + w + y)
    spec = conv_spec(n=8, c=256, k=256, in_size=(32, 32), kernel=1, dtype="bfloat16")
    flops, nbytes = 2 * 8 * 32 * 32 * 256 * 256, 2 * (8 * 256 * 1024 * 2 + 256 * 256)
    assert (spec.flops, spec.min_bytes) == (flops, nbytes)
    r = run.roofline(spec, {"tunerd_tuned": 2 * flops / 1e14 * 1e3, "tunerd_default": None}, limits)
    assert r["bound"] == "compute" and r["roofline_ms"] == pytest.approx(flops / 1e14 * 1e3)
    assert r["tunerd_tuned"] == pytest.approx(0.5) and r["tunerd_default"] is None
    # depthwise runs on CUDA cores (the fp32 rate) and is memory-bound here
    dw = conv_spec(n=8, c=256, k=256, in_size=(32, 32), kernel=3, padding=1, groups=256, dtype="bfloat16")
    r = run.roofline(dw, {"tunerd_tuned": 4 * dw.min_bytes / 1e12 * 1e3}, limits)
    assert r["bound"] == "memory" and r["tunerd_tuned"] == pytest.approx(0.25)


@pytest.mark.parametrize(
    "name,params,convs,linears",
    [("resnet50", 25_557_032, 53, 1), ("mobilenetv2", 3_504_872, 52, 1), ("convnext_t", 28_589_128, 22, 37)],
)
def test_model_builders_match_the_reference_architectures(name, params, convs, linears):
    m = networks.build(name, device="meta")
    assert networks.param_count(m) == params
    assert networks.conv_count(m) == convs
    assert sum(isinstance(x, torch.nn.Linear) for x in m.modules()) == linears
    y = m(torch.empty(2, 3, 224, 224, device="meta"))
    assert tuple(y.shape) == (2, 1000)


def test_model_builder_layer_structure():
    r = networks.build("resnet50", device="meta")
    assert [sum(1 for _ in stage) for stage in [r.layers[:3], r.layers[3:7], r.layers[7:13], r.layers[13:]]] == [
        3,
        4,
        6,
        3,
    ] and len(r.layers) == 16
    assert r.layers[3].conv2.stride == (2, 2) and r.layers[3].conv1.stride == (1, 1)  # v1.5
    mb = networks.build("mobilenetv2", device="meta")
    blocks = [b for b in mb.features if isinstance(b, networks.InvertedResidual)]
    assert len(blocks) == sum(n for _, _, n, _ in networks.MOBILENETV2_SETTINGS) == 17
    assert sum(b.use_res for b in blocks) == 10
    cx = networks.build("convnext_t", device="meta")
    assert [len(s) for s in cx.stages] == [3, 3, 9, 3]
    assert cx.stages[2][0].dwconv.kernel_size == (7, 7) and cx.stages[2][0].pwconv1.out_features == 4 * 384
    tiny = networks.build("convnext_t", width=0.125, num_classes=10, blocks_per_stage=1)
    assert [len(s) for s in tiny.stages] == [1, 1, 1, 1]
    assert tiny(torch.randn(1, 3, 32, 32)).shape == (1, 10)


def test_compare_records_a_failing_contender_and_times_the_rest():
    def boom(i: int) -> None:
        raise RuntimeError("inductor exploded")

    calls = []
    res = timing.compare(
        {"ok": calls.append, "bad": boom},
        3,
        torch.device("cpu"),
        timing.TimingConfig(warmup=1, reps=2, rounds=3, flush_bytes=0),
    )
    assert isinstance(res["ok"], timing.Timing) and res["ok"].samples == 6
    assert sorted(set(calls)) == [0, 1, 2]  # input sets rotate
    assert isinstance(res["bad"], timing.Failure) and "inductor exploded" in res["bad"].error


def test_torch_compile_failure_is_recorded_not_fatal(monkeypatch):
    def broken_compile(fn, **kwargs):  # like Inductor: compiling happens, and fails, at the first call
        def compiled(*args):
            raise RuntimeError("torch.compile is broken here")

        return compiled

    monkeypatch.setattr(torch, "compile", broken_compile)
    # the tuner is not under test here: hand back the default schedule without measuring
    monkeypatch.setattr(run, "tune_spec", lambda spec, cfg, harness: (_sched.default(spec), {"seconds": 0.0}))
    cfg = run.parse_args(["--small", "--compile", "on"])
    spec = conv_spec(
        n=1,
        c=16,
        k=16,
        in_size=(6, 6),
        kernel=3,
        padding=1,
        dtype="float32",
        epilogue=Epilogue(bias=True, activation="relu"),
    )
    limits = run.measured_limits({"copy_gbps": 1.0, "matmul_tflops": {"bfloat16": 1.0, "float32": 1.0}})
    doc = run.run_case(run.Case("quick", 0, spec, "bias+relu", (0,)), cfg, torch.device("cpu"), None, limits)
    got = doc["contenders"]
    assert got["torch_compile"]["status"] == "error" and "broken" in got["torch_compile"]["error"]
    assert got["tunerd_tuned"]["status"] == got["torch_unfused"]["status"] == "ok"
    assert doc["speedups"]["tuned_vs_unfused"] > 0 and doc["speedups"]["tuned_vs_compile"] is None


def test_torch_contenders_match_the_reference_with_causal_padding():
    spec = conv_spec(
        n=2,
        c=8,
        k=8,
        in_size=(12,),
        kernel=4,
        padding=((3, 0),),
        groups=8,
        dtype="float32",
        epilogue=Epilogue(bias=True, activation="silu"),
    )
    x, w, b = torch.randn(2, 8, 12), torch.randn(8, 1, 4), torch.randn(8)
    y = run.torch_forward(spec)(x, w, b)
    assert reference.rel_error(y, reference.conv(spec, x, w, bias=b)) < 1e-6
    plain = spec.with_(epilogue=Epilogue())
    dy = torch.randn(2, 8, 12)
    x64, w64 = x.double().requires_grad_(), w.double().requires_grad_()
    dx_ref, dw_ref = torch.autograd.grad(reference.conv(plain, x64, w64), [x64, w64], dy.double())
    sets = [{"x": x, "w": w, "dy": dy}]
    dx = run.torch_backward(plain.with_(op="dgrad"), sets, torch.device("cpu"))(0)
    dw = run.torch_backward(plain.with_(op="wgrad"), sets, torch.device("cpu"))(0)
    assert reference.rel_error(dx, dx_ref) < 1e-6 and reference.rel_error(dw, dw_ref) < 1e-6


def test_plan_orders_cases_and_derives_fused_ones():
    assert run.spread(10, 1) == [5] and run.spread(10, 3) == [0, 4, 9] and run.spread(2, 5) == [0, 1]
    cx = suites.suite("convnext_t")
    first, second = run.pick_layers(cx, 2)
    assert cx[first].kind == "depthwise" and cx[second].kind == "conv"
    assert len(set(run.pick_layers(cx, 5))) == 5 and run.pick_layers(cx[:3], 9) == run.pick_layers(cx[:3], 3)
    cfg = run.parse_args(["--small"])
    assert cfg.dtypes == ["float32", "bfloat16"] and cfg.suites == ["quick"] and not cfg.compile
    cases = run.plan(cfg)
    assert cases[0].spec.op == "fwd" and cases[0].spec.dtype == "float32"
    assert all(c.spec.dtype == "float32" for c in cases[: len(cases) // 2])  # the first dtype comes first
    fused = {c.fused: c.spec for c in cases if c.fused and c.spec.dtype == "float32"}
    assert set(fused) == set(run.FUSED_KINDS)
    assert fused["bias+gelu"].kind == "depthwise" and fused["bn+relu+res"].epilogue.residual == "pre"
    assert all(c.spec.op == "fwd" for c in cases if c.fused)


def test_e2e_training_step_small():
    cfg = run.parse_args(["--small", "--e2e-only"])
    doc = run.e2e_model("resnet50", cfg, torch.device("cpu"))
    got = doc["contenders"]
    assert got["eager"]["status"] == "ok" and got["eager"]["median_ms"] > 0
    assert got["torch_compile"]["status"] == "skipped"
    assert got["tunerd"]["status"] in ("ok", "error", "wrong-result")  # a tunerd failure is recorded, not raised
    assert "convs swapped" in got["tunerd"].get("note", "convs swapped")
    assert doc["batch"] == cfg.e2e_batch and doc["dtype"] == "float32"


def test_atomic_write_leaves_complete_files(tmp_path):
    doc = {
        "device": {"name": "x", "interpreter": True, "torch": "t", "triton": "t"},
        "labels": {"torch": "torch"},
        "created": "now",
        "elapsed_s": 1.0,
        "peaks": {"copy_gbps": 1.0, "matmul_tflops": {"bfloat16": 1.0}},
        "config": {"compile_mode": "m", "tune": {}, "timing": {}, "n_inputs": 2},
        "cases": [],
        "summary": {},
        "e2e": [],
        "stopped": None,
    }
    doc["cases"] = [
        {
            **_case("a", False, tunerd_tuned=1.0),
            "speedups": {},
            "layer": 0,
            "name": "n",
            "pass": "fwd",
            "dtype": "float32",
            "epilogue": None,
        }
    ]
    doc["cases"][0]["contenders"]["torch"] = {"status": "wrong-result", "rel_error": math.inf}
    paths = report.write(doc, tmp_path, final=False)
    assert json.loads(Path(paths["json"]).read_text())["cases"][0]["contenders"]["torch"]["rel_error"] == "inf"
    assert json.loads(Path(paths["json"]).read_text())["device"]["name"] == "x"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.md", "results.json"]  # no temp files left


def test_named_subsets_pick_the_intended_layers():
    picks = {p.label: suites.suite(p.suite)[i] for p, i in run.resolve("representative")}
    assert len(picks) == len(run.SUBSETS["representative"]) == 12 and len(set(picks.values())) == 12
    stem = picks["ResNet-50 stem 7x7/2"]
    assert (stem.c, stem.kernel, stem.stride) == (3, (7, 7), (2, 2))
    assert picks["ResNet-50 3x3"].kernel == (3, 3) and picks["ResNet-50 1x1 reduce"].kernel == (1, 1)
    assert picks["ConvNeXt-T dw 7x7"].kind == "depthwise" and picks["ConvNeXt-T dw 7x7"].kernel == (7, 7)
    assert picks["RepLKNet-31B dw 31x31"].kind == "depthwise" and picks["RepLKNet-31B dw 31x31"].kernel == (31, 31)
    mamba = picks["Mamba causal conv1d k4"]
    assert mamba.ndim == 1 and mamba.padding == ((3, 0),) and mamba.kind == "depthwise"
    assert picks["(2+1)D spatial 1x3x3"].kernel == (1, 3, 3) and picks["(2+1)D temporal 3x1x1"].kernel == (3, 1, 1)
    mb = [picks[f"MobileNetV2 {x}"] for x in ("expand 1x1", "dw 3x3", "project 1x1")]
    assert mb[0].k == mb[1].c == mb[2].c and mb[1].kind == "depthwise"  # one inverted-residual block
    # the plan: every pick's forward first (in the subset's order), then the backward passes, then fused cases
    cfg = run.parse_args(["--full", "--cases", "representative", "--dtypes", "bf16"])
    assert cfg.suites == list(dict.fromkeys(p.suite for p in run.SUBSETS["representative"]))
    cases = run.plan(cfg)
    assert [c.pick for c in cases[:12]] == [p.label for p in run.SUBSETS["representative"]]
    assert all(c.spec.op == "fwd" for c in cases[:12]) and {c.spec.op for c in cases[12:36]} == {"dgrad", "wgrad"}
    assert all(c.fused for c in cases[36:]) and all(c.spec.dtype == "bfloat16" for c in cases)
    chosen = {(p.suite, i) for p, i in run.resolve("representative")}
    assert all((c.suite, c.layer) in chosen for c in cases)  # fused cases stay on the subset's layers
    with pytest.raises(SystemExit):
        run.parse_args(["--cases", "nope"])
    with pytest.raises(SpecError, match="unknown case subset"):
        run.resolve("nope")
