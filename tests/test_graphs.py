"""tunerd.graphs: opt-in CUDA graphs for eval, no-grad calls of patched modules.

On CPU the policy runs against an injected backend that "captures" by recording the forward and "replays" by
running it again on the static input into the static output buffer (what a replay does to memory), so keys,
invalidation, the LRU bound, clones and fallbacks are checked here; the gpu tests capture real CUDA graphs.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import models_zoo  # noqa: F401  (timm after tunerd, with torchvision's ops declared)
import pytest
import torch
from timm.models.convnext import ConvNeXtBlock

import tunerd
from tunerd import graphs
from tunerd.kernels import reference
from tunerd.nn import Conv2d, ConvBNAct

pytestmark = pytest.mark.usefixtures("one_thread")


class FakeBackend:
    """Captures on any device: replay re-runs the recorded forward on the static input into the static output."""

    def __init__(self, fail: Exception | None = None) -> None:
        self.fail = fail
        self.captured: list[tuple[int, ...]] = []

    def supports(self, x: torch.Tensor) -> bool:
        return True

    def capture(self, forward: graphs.Forward, static_in: torch.Tensor) -> tuple[Callable[[], None], torch.Tensor]:
        if self.fail is not None:
            raise self.fail
        self.captured.append(tuple(static_in.shape))
        out = forward(static_in)

        def replay() -> None:
            with graphs.ordinary():
                out.copy_(forward(static_in))

        return replay, out


def _conv(backend: FakeBackend, max_graphs: int = graphs.MAX_GRAPHS) -> Conv2d:
    m = Conv2d(4, 8, 3, padding=1, activation="relu").eval()
    graphs.enable(m, max_graphs, backend)
    return m


def _want(m: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    w, b = m.weight.detach().double(), m.bias.detach().double()
    return torch.relu(torch.nn.functional.conv2d(x.double(), w, b, padding=1))


def test_one_capture_per_signature_and_outputs_are_fresh_clones():
    fake = FakeBackend()
    m = _conv(fake)
    x1, x2 = torch.randn(2, 4, 5, 5), torch.randn(2, 4, 5, 5)
    with torch.no_grad():
        y1 = m(x1)
        y2 = m(x2)  # same signature: a replay, which rewrites the static output
        y3 = m(x1.contiguous(memory_format=torch.channels_last))  # another stride: another graph
        y4 = m(torch.randn(1, 4, 5, 5))
    cache = graphs.cache_of(m)
    assert cache is not None and fake.captured == [(2, 4, 5, 5), (2, 4, 5, 5), (1, 4, 5, 5)]
    assert cache.counts["captures"] == 3 and cache.counts["replays"] == 4 and len(cache.entries) == 3
    assert reference.rel_error(y1, _want(m, x1)) < 1e-5  # the first output survived the second call
    assert reference.rel_error(y2, _want(m, x2)) < 1e-5 and reference.rel_error(y3, _want(m, x1)) < 1e-5
    statics = {e.static_out.data_ptr() for e in cache.entries.values()}
    assert not statics & {y.data_ptr() for y in (y1, y2, y3, y4)}
    assert y4.shape == (1, 8, 5, 5)


def test_parameter_updates_moves_and_mode_changes_invalidate():
    fake = FakeBackend()
    m = _conv(fake)
    x = torch.randn(2, 4, 5, 5)
    with torch.no_grad():
        m(x)
        m(x)
        assert len(fake.captured) == 1
        m.weight.mul_(0.5)  # an optimizer step: in place, version bumped
        assert reference.rel_error(m(x), _want(m, x)) < 1e-5
        assert len(fake.captured) == 2
        m.bias.data = m.bias.data.clone()  # moved (as .to() moves every parameter)
        m(x)
        assert len(fake.captured) == 3
        m.activation = None  # an option the forward reads
        torch.testing.assert_close(m(x), torch.nn.functional.conv2d(x, m.weight, m.bias, padding=1))
        m.train()
        m(x)  # training: the ordinary forward, graphs dropped
        m.eval()
        m(x)
    cache = graphs.cache_of(m)
    assert cache is not None and len(fake.captured) == 5 and cache.counts["invalidations"] == 4
    assert cache.counts["ordinary"] == 1


def test_a_fused_convs_batchnorm_counts_as_its_own():
    """ConvBNAct's conv reads the BatchNorm kept outside its submodules: its running statistics invalidate."""
    fake = FakeBackend()
    m = ConvBNAct(4, 8, 3, padding=1).eval()
    graphs.enable(m.conv, backend=fake)
    x = torch.randn(2, 4, 5, 5)
    with torch.no_grad():
        m(x)
        m.bn.running_mean.add_(1.0)
        got = m(x)
        bn = m.bn  # a pass-through now: its running statistics by hand
        z = torch.nn.functional.conv2d(x, m.conv.weight, None, padding=1)
        want = torch.relu(torch.nn.functional.batch_norm(z, bn.running_mean, bn.running_var, bn.weight, bn.bias))
    assert len(fake.captured) == 2 and reference.rel_error(got, want.double()) < 1e-5
    m.bn.train()  # a training BatchNorm behind an eval conv: batch statistics, never a graph
    with torch.no_grad():
        m(x)
    assert len(fake.captured) == 2 and graphs.cache_of(m.conv).last_ordinary == "training mode"  # type: ignore[union-attr]


def test_inference_mode_gets_its_own_graphs():
    """inference_mode's static buffers are inference tensors: a later no_grad call of the same shape must not write
    into them (torch refuses), so the mode is part of the signature."""
    fake = FakeBackend()
    m = _conv(fake)
    x = torch.randn(2, 4, 5, 5)
    with torch.inference_mode():
        m(x)
    with torch.no_grad():
        y = m(x)
    assert len(fake.captured) == 2 and reference.rel_error(y, _want(m, x)) < 1e-5


def test_lru_keeps_at_most_max_graphs():
    fake = FakeBackend()
    m = _conv(fake, max_graphs=2)
    xs = {n: torch.randn(n, 4, 5, 5) for n in (1, 2, 3)}
    with torch.no_grad():
        for n in (1, 2, 1, 3):  # 1 used again before 3 arrives: 2 is the least recent
            m(xs[n])
        m(xs[1])
        m(xs[2])
    cache = graphs.cache_of(m)
    assert cache is not None and [k[0][0] for k in cache.entries] == [1, 2]
    assert [s[0] for s in fake.captured] == [1, 2, 3, 2] and cache.counts["evictions"] == 2


def test_failed_capture_runs_the_ordinary_path_once_and_says_why():
    fake = FakeBackend(fail=RuntimeError("operation not permitted when stream is capturing"))
    m = _conv(fake)
    x = torch.randn(2, 4, 5, 5)
    with torch.no_grad():
        y = m(x)
        m(x)
    assert reference.rel_error(y, _want(m, x)) < 1e-5
    st = graphs.stats(torch.nn.Sequential(m))["0"]
    assert st["captures"] == 0 and st["ordinary"] == 2 and st["graphs"] == 0
    (why,) = st["failed"].values()
    assert "not permitted" in why and st["last_ordinary"] == why


def test_failed_signatures_are_remembered_up_to_a_bound(monkeypatch):
    monkeypatch.setattr(graphs, "MAX_FAILED", 3)
    m = _conv(FakeBackend(fail=RuntimeError("no")))
    with torch.no_grad():
        for w in range(1, 6):
            m(torch.randn(1, 4, 1, w))
    assert [k[0] for k in graphs.cache_of(m).failed] == [(1, 4, 1, 3), (1, 4, 1, 4), (1, 4, 1, 5)]  # oldest dropped


def test_never_captures_on_cpu_with_grad_or_in_training():
    m = Conv2d(4, 8, 3, padding=1, cuda_graphs=True).eval()  # the real CUDA backend
    x = torch.randn(2, 4, 5, 5)
    with torch.no_grad():
        m(x)
    cache = graphs.cache_of(m)
    assert cache is not None and not cache.entries and "cpu" in (cache.last_ordinary or "")
    fake = FakeBackend()
    m = _conv(fake)
    m(x)  # grad enabled
    assert graphs.cache_of(m).last_ordinary == "grad enabled"  # type: ignore[union-attr]
    with torch.inference_mode():
        m.train()
        m(x)
    assert graphs.cache_of(m).last_ordinary == "training mode" and not fake.captured  # type: ignore[union-attr]
    for bad in (0, 2.5):
        with pytest.raises(ValueError, match="at least 1"):
            graphs.enable(m, bad)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="at least 1"):
            tunerd.patch(model := torch.nn.Sequential(torch.nn.Conv2d(2, 2, 1)), cuda_graphs=bad)  # type: ignore[arg-type]
        assert type(model[0]) is torch.nn.Conv2d  # refused before anything changed


def test_patch_enables_graphs_on_convs_and_fused_blocks_and_nested_ones_stay_ordinary():
    torch.manual_seed(0)
    model = torch.nn.Sequential(ConvNeXtBlock(16), torch.nn.Conv2d(16, 16, 1)).eval()
    base = copy.deepcopy(model)
    report = tunerd.patch(model, cuda_graphs=2, example_input=torch.randn(1, 16, 4, 4))
    assert sorted(report.graphs) == ["0", "0.conv_dw", "1"] and "replay CUDA graphs" in str(report)
    fakes = {name: FakeBackend() for name in report.graphs}
    for name, fake in fakes.items():
        cache = graphs.cache_of(model.get_submodule(name))
        assert cache is not None and cache.max_graphs == 2 and not cache.entries  # example_input captured nothing
        cache.backend = fake
    x = torch.randn(2, 16, 5, 5)
    with torch.no_grad():
        got = model(x)
        want = copy.deepcopy(base).double()(x.double())
    assert reference.rel_error(got, want) < 1e-5
    assert fakes["0"].captured == [(2, 16, 5, 5)] and fakes["1"].captured == [(2, 16, 5, 5)]
    assert not fakes["0.conv_dw"].captured  # inside the block's fused plan
    twin = graphs.cache_of(copy.deepcopy(model)[0])  # a copy keeps the setting, captures its own graphs
    assert twin is not None and twin.max_graphs == 2 and not twin.entries and twin.counts["captures"] == 0
    assert tunerd.unpatch(model) == 3 and not graphs.stats(model)


def test_the_cuda_graph_benchmark_cases_are_gpu_only(tmp_path):
    """benchmarks.blocks' cuda_graphs suite: forward cases only, left out of the default suites without CUDA, and
    a run asked for on CPU records why its cases did not run."""
    from benchmarks import blocks

    assert "cuda_graphs" not in blocks.parse_args(["--full"]).suites
    cfg = blocks.parse_args(["--full", "--suites", "cuda_graphs", "--dtypes", "bf16"])
    cases = blocks.plan_cases(cfg)
    assert [(c.entry, c.op) for c in cases] == [("convnext_block", "fwd"), ("resnet_basic", "fwd")]
    doc = blocks.main(["--small", "--suites", "cuda_graphs", "--out", str(tmp_path)])
    assert [c["error"] for c in doc["cases"]] == ["CUDA graphs need a CUDA device: GPU only"] * 2
    assert "cuda_graphs" in (tmp_path / "report.md").read_text()


# ---- on a GPU: real CUDA graphs ---------------------------------------------------------------------------
def _resnet_cuda() -> torch.nn.Module:
    torch.manual_seed(0)
    return models_zoo.build("timm_resnet").cuda().eval()


@pytest.mark.gpu
def test_a_patched_model_captured_whole_replays_what_it_computes_eagerly():
    """torch.cuda.graph over a whole patched timm model (fused conv + BN, fused blocks, split workspaces): each
    replay on a new input equals the eager patched forward and the float64 model."""
    base = _resnet_cuda()
    model = copy.deepcopy(base)
    tunerd.patch(model)
    static = torch.randn(2, 3, 32, 32, device="cuda")
    with torch.no_grad():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            model(static)  # warm-up: JIT compiles and weight packing outside the capture
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = model(static)
        for seed in (1, 2):
            x = torch.randn(2, 3, 32, 32, device="cuda", generator=torch.Generator("cuda").manual_seed(seed))
            static.copy_(x)
            graph.replay()
            torch.testing.assert_close(out, model(x), rtol=1e-5, atol=1e-5)
            assert reference.rel_error(out, copy.deepcopy(base).double()(x.double())) < 1e-4


@pytest.mark.gpu
def test_cuda_graphs_match_the_ordinary_path_and_follow_parameter_updates():
    base = _resnet_cuda()
    ordinary, graphed = copy.deepcopy(base), copy.deepcopy(base)
    tunerd.patch(ordinary)
    report = tunerd.patch(graphed, cuda_graphs=True)
    assert report.graphs
    xs = [torch.randn(2, 3, 32, 32, device="cuda") for _ in range(2)]
    with torch.no_grad():
        for x in (*xs, xs[0].contiguous(memory_format=torch.channels_last)):
            torch.testing.assert_close(graphed(x), ordinary(x), rtol=1e-5, atol=1e-5)
        st = graphs.stats(graphed)
        assert sum(s["replays"] for s in st.values()) >= 3 and not [s["failed"] for s in st.values() if s["failed"]]
        for m in (ordinary, graphed):  # the same update of every parameter and running statistic
            for t in (*m.parameters(), *(b for b in m.buffers() if b.is_floating_point())):
                t.mul_(0.9)
        y1, y2 = graphed(xs[0]), graphed(xs[1])
        torch.testing.assert_close(y1, ordinary(xs[0]), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(y2, ordinary(xs[1]), rtol=1e-5, atol=1e-5)
    st = graphs.stats(graphed)
    assert sum(s["invalidations"] for s in st.values()) > 0 and sum(s["captures"] for s in st.values()) > 0
    x = xs[0].requires_grad_()
    graphed(x).sum().backward()  # grad enabled: the ordinary path, differentiable
    assert x.grad is not None and "grad enabled" in {s["last_ordinary"] for s in graphs.stats(graphed).values()}
