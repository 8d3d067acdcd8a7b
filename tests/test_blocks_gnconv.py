"""HorNet's gnConv on the block compiler, and torchvision's DeepLabV3 ASPP through tunerd.patch.

gnConv: the block (kernels.block.gnconv) equals the official module (copied below: HorNet has no timm model); the
planner fuses the scale and the first gate into the depthwise (dw_gate) and each later gate into its pointwise
GEMM's epilogue (pw_gate), never a launch of their own; numerics against float64 with NaN-poisoned outputs on odd
sizes in three dtypes, gradients through block_autograd's recompute, a patched HorNet-style model trained three
SGD steps against unpatched torch. ASPP: DeepLabHead's ASPP module proven from its trace and run as the fused
aspp plan in eval mode; train mode (batch statistics) falls back with the reason in the report.
"""

from __future__ import annotations

import copy

import models_zoo  # noqa: F401  (torchvision after tunerd, with torchvision's ops declared)
import pytest
import torch
import torch.nn.functional as F
from blockcheck import check_gradients, check_plan
from torch import nn
from torchvision.models.segmentation.deeplabv3 import DeepLabHead

from tunerd.blocks import BlockTracer, from_graph, last_plan
from tunerd.kernels import block as B
from tunerd.kernels import block_reference, fused, reference
from tunerd.kernels import plan as P
from tunerd.kernels.schedule import Schedule
from tunerd.kernels.spec import SpecError
from tunerd.patching import patch

pytestmark = pytest.mark.usefixtures("one_thread")


# ---- the official gnConv (HorNet, Rao et al. 2022), as its repository writes it (no print; gflayer: a global filter
# there, a 3 x 3 depthwise here where a test wants the interpreter cheap) ------------------------------------------
def get_dwconv(dim, kernel, bias):
    return nn.Conv2d(dim, dim, kernel_size=kernel, padding=(kernel - 1) // 2, bias=bias, groups=dim)


class gnconv(nn.Module):  # noqa: N801  (the official name)
    def __init__(self, dim, order=5, gflayer=None, h=14, w=8, s=1.0):
        super().__init__()
        self.order = order
        self.dims = [dim // 2**i for i in range(order)]
        self.dims.reverse()
        self.proj_in = nn.Conv2d(dim, 2 * dim, 1)
        if gflayer is None:
            self.dwconv = get_dwconv(sum(self.dims), 7, True)
        else:
            self.dwconv = gflayer(sum(self.dims), h=h, w=w)
        self.proj_out = nn.Conv2d(dim, dim, 1)
        self.pws = nn.ModuleList([nn.Conv2d(self.dims[i], self.dims[i + 1], 1) for i in range(order - 1)])
        self.scale = s

    def forward(self, x, mask=None, dummy=False):
        B, C, H, W = x.shape
        fused_x = self.proj_in(x)
        pwa, abc = torch.split(fused_x, (self.dims[0], sum(self.dims)), dim=1)
        dw_abc = self.dwconv(abc) * self.scale
        dw_list = torch.split(dw_abc, self.dims, dim=1)
        x = pwa * dw_list[0]
        for i in range(self.order - 1):
            x = self.pws[i](x) * dw_list[i + 1]
        x = self.proj_out(x)
        return x


class LayerNorm(nn.Module):  # HorNet's channels_first LayerNorm
    def __init__(self, normalized_shape, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(normalized_shape))
        self.bias = nn.Parameter(torch.zeros(normalized_shape))
        self.eps = eps

    def forward(self, x):
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class HorNetBlock(nn.Module):  # the official Block's token-mixer half: x + gamma1 * gnconv(norm1(x))
    def __init__(self, dim, order, s, gflayer=None):
        super().__init__()
        self.norm1 = LayerNorm(dim)
        self.gnconv = gnconv(dim, order=order, s=s, gflayer=gflayer)
        self.gamma1 = nn.Parameter(0.5 * torch.ones(dim))

    def forward(self, x):
        B, C, H, W = x.shape
        return x + self.gamma1.view(C, 1, 1) * self.gnconv(self.norm1(x))


def _module_params(m: gnconv) -> dict[str, torch.Tensor]:
    out = {
        f"{k}.{p}": getattr(getattr(m, k), p).detach()
        for k in ("proj_in", "dwconv", "proj_out")
        for p in ("weight", "bias")
    }
    for i, pw in enumerate(m.pws):
        out.update({f"pws{i}.weight": pw.weight.detach(), f"pws{i}.bias": pw.bias.detach()})
    return out


# ---- description and planner ---------------------------------------------------------------------------
def test_gnconv_block_is_the_official_module():
    torch.manual_seed(0)
    m = gnconv(24, order=3, s=1 / 3).double()
    blk = B.gnconv(n=2, c=24, in_size=(5, 7), order=3, scale=1 / 3)
    assert [blk.shapes[n].c for n in ("pwa", "abc", "dw1", "gate2")] == [6, 42, 12, 24]
    assert B.Block.from_json(blk.to_json()) == blk
    x = torch.randn(2, 24, 5, 7, dtype=torch.float64)
    want = m(x)
    got = block_reference.block(blk, _module_params(m), x)
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-12)


def test_gnconv_errors_and_legality():
    with pytest.raises(SpecError, match="multiple of 2"):
        B.gnconv(n=1, c=20, in_size=(4, 4), order=4)
    with pytest.raises(SpecError, match="odd"):
        B.gnconv(n=1, c=8, in_size=(4, 4), kernel=4)
    with pytest.raises(SpecError, match="finite float"):
        B.node("s", "scalar", ["x"], value=float("inf"))
    with pytest.raises(SpecError, match="mul of mismatched"):
        half = B.node("a", "split", ["x"], start=0, size=2)
        B.Block(n=1, c=4, in_size=(3, 3), nodes=(half, B.node("m", "mul", ["a", "x"])))
    blk = B.gnconv(n=1, c=16, in_size=(5, 5), order=2)
    names = [nd.name for nd in blk.nodes]
    dw = names[names.index("abc") : names.index("gate0") + 1]
    assert P.matches(blk, P.Step("dw_gate", tuple(dw)))
    assert P.step_outputs(blk, P.Step("dw_gate", tuple(dw))) == ("dw_scale", "gate0")
    assert not P.matches(blk, P.Step("dw_gate", tuple(dw[:-1])))  # no gate
    assert not P.matches(blk, P.Step("pw_gate", tuple(dw)))  # a depthwise is no GEMM
    pw = ("pws0", "dw1", "gate1")
    assert P.matches(blk, P.Step("pw_gate", pw)) and not P.matches(blk, P.Step("dw_gate", pw))
    g = P.gate_parts(blk, list(dw), "dw_gate")
    assert (g.src, g.src_start, g.start, g.size) == ("proj_in", 8, 0, 8)  # abc = proj_in[8:24], its d0 = [0, 8)
    assert (g.partner, g.partner_start, g.written) == ("proj_in", 0, (8, 24))  # pwa = proj_in[0:8]; d1 written


def test_planner_fuses_the_gates_and_models_the_bytes():
    """HorNet-T stage 3 (C=256, order 4, 14 x 14): the gates ride in the depthwise and the GEMM epilogues."""
    blk = B.gnconv(n=32, c=256, in_size=(14, 14), order=4, scale=1 / 3, dtype="bfloat16")
    best = P.rank(blk)[0]
    assert [s.kind for s in best.plan.steps] == ["conv", "dw_gate", "pw_gate", "pw_gate", "pw_gate", "conv"]
    assert best.launches == 6  # 4 GEMMs and the depthwise: the scale and the 4 gates launch nothing
    u = P.cost(blk, P.unfused(blk))
    assert u.launches == 6 + 5 and best.bytes < 0.7 * u.bytes
    pix, dims = 32 * 14 * 14, [32, 64, 128, 256]
    dw = best.steps[1]
    # reads pwa and abc (2C channels of proj_in), writes gate0 and the slices d1..d3 later steps read
    assert dw.bytes == pix * (2 * 256 + dims[0] + sum(dims[1:])) * 2 + sum(dims) * (49 * 2 + 4)
    pw = best.steps[2]  # gate0 and d1 in, gate1 out, the 32 -> 64 weight and bias
    assert pw.bytes == pix * (32 + 64 + 64) * 2 + 32 * 64 * 2 + 64 * 4


# ---- numerics ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_gnconv_matches_float64(dtype):
    """C = 24, order 3 (dims 6, 12, 24: no power of two), 5 x 7 pixels (a partial pixel tile), s = 1/3."""
    blk = B.gnconv(n=1, c=24, in_size=(5, 7), order=3, scale=1 / 3, dtype=dtype)
    plan = P.best(blk)
    assert [s.kind for s in plan.steps] == ["conv", "dw_gate", "pw_gate", "pw_gate", "conv"]
    check_plan(blk, plan, seed=1)


def test_gnconv_small_tiles():
    """Channel tiles that straddle the gate / written boundary (16 wide over dims 6 | 12 | 24), two images in
    several pixel tiles, a 3 x 3 depthwise without scale; 16-wide GEMM tiles with two reduction steps."""
    blk = B.gnconv(n=2, c=24, in_size=(4, 3), order=3, kernel=3, scale=None, dtype="float16")
    plan = P.best(blk)
    s16 = Schedule(block_m=16, block_n=16, block_k=16, num_warps=4)
    check_plan(blk, plan, seed=2, schedules={1: s16, 2: s16, 3: s16})


def test_dw_gate_dilated_offset_gate_without_second_output():
    """A dw_gate beyond gnConv's: a dilated 3 x 5 depthwise without bias or scale, the gate on its channels [4, 8)
    (operands swapped), nothing else reading the depthwise value (no second output)."""
    nodes = (
        B.node("proj", "conv", ["x"], out=12, kernel=1),
        B.node("src", "split", ["proj"], start=4, size=8),
        B.node("dw", "conv", ["src"], out=8, kernel=(3, 5), dilation=2, padding=(2, 4), groups=8),
        B.node("p", "split", ["proj"], start=0, size=4),
        B.node("d", "split", ["dw"], start=4, size=4),
        B.node("m", "mul", ["p", "d"]),
    )
    blk = B.Block(n=2, c=6, in_size=(5, 6), nodes=nodes, dtype="bfloat16")
    plan = P.best(blk)
    assert plan.describe() == "conv[proj] | dw_gate[src+dw+p+d+m]"
    assert P.step_outputs(blk, plan.steps[1]) == ("m",)
    check_plan(blk, plan, seed=3)


def test_gnconv_gradients_match_float64():
    blk = B.gnconv(n=2, c=8, in_size=(4, 3), order=2, kernel=3, scale=0.5)
    plan = P.best(blk)
    check_gradients(blk, plan, seed=7)


# ---- tunerd.patch ----------------------------------------------------------------------------------------
def test_gnconv_module_is_recognized_by_its_traced_graph():
    m = gnconv(24, order=3, s=1 / 3)
    g = from_graph(m, BlockTracer().trace(m), True)
    seed = B.gnconv(n=1, c=24, in_size=(8, 8), order=3, scale=1 / 3)
    assert (g.c, g.nodes) == (24, seed.nodes)  # the seed's names: the store's block key
    assert {k for k, _ in g.sources} == set(seed.param_shapes())


def _train(model, x, dy, steps=3):
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=0.05)
    ys, grads = [], []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        y = model(x)
        (y * dy).sum().backward()
        ys.append(y.detach().clone())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        opt.step()
    return ys, grads, {n: p.detach().clone() for n, p in model.named_parameters()}


def test_patched_hornet_model_trains_like_unpatched():
    torch.manual_seed(0)
    dw3 = lambda dim, h, w: get_dwconv(dim, 3, True)  # noqa: E731
    base = nn.Sequential(nn.Conv2d(3, 16, 1), HorNetBlock(16, order=3, s=1 / 3, gflayer=dw3))
    plain, ours = copy.deepcopy(base), copy.deepcopy(base)
    gen = torch.Generator().manual_seed(1)
    x, dy = torch.randn(1, 3, 5, 4, generator=gen), torch.randn(1, 16, 5, 4, generator=gen)
    report = patch(ours, example_input=x)
    assert [n for n, _ in report.blocks] == ["1.gnconv"], str(report)  # recognized by its submodules and graph
    assert "fused block plan in train and eval mode" in report.blocks[0][1], str(report)
    kernels = dict(report.kernels)
    assert "plan conv[proj_in] | dw_gate[abc+dwconv+dw_scale+pwa+dw0+gate0] | pw_gate[" in kernels["1.gnconv"]
    ours.train()
    want, got = _train(plain, x, dy), _train(ours, x, dy)
    blk, plan = last_plan(ours.get_submodule("1.gnconv"))
    assert [s.kind for s in plan.steps] == ["conv", "dw_gate", "pw_gate", "pw_gate", "conv"]
    for step in range(3):
        assert reference.rel_error(got[0][step], want[0][step]) < 1e-4, step
        for n, g in got[1][step].items():
            assert reference.rel_error(g, want[1][step][n]) < 1e-4, (step, n)
    for n, p in got[2].items():
        assert reference.rel_error(p, want[2][n]) < 1e-4, n


def test_deeplab_head_aspp_is_fused_in_eval_and_falls_back_in_train():
    """torchvision DeepLabHead(in_channels=6, 3 classes): ASPP (256 channels per branch, rates 12/24/36 on 5 x 4
    pixels) proven from its trace, the image pooling's interpolation a broadcast, run as the aspp plan in eval mode;
    in train mode (batch statistics) it runs its own forward, and the report says why."""
    torch.manual_seed(0)
    base = DeepLabHead(6, 3)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for mod in base.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.copy_(torch.randn(mod.running_mean.shape, generator=gen) * 0.2)
                mod.running_var.copy_(torch.rand(mod.running_var.shape, generator=gen) + 0.5)
    aspp = base[0].eval()
    g = from_graph(aspp, BlockTracer().trace(aspp), False)
    assert g.nodes == B.aspp(n=1, c=6, in_size=(8, 8), k=256, rates=(12, 24, 36)).nodes and g.sized == ("pool_up",)
    ours = copy.deepcopy(base)
    x = torch.randn(1, 6, 5, 4, generator=gen)
    report = patch(ours)
    assert [n for n, _ in report.blocks] == ["0"] and "plan in eval mode" in report.blocks[0][1], str(report)
    assert any(n == "0" and "train mode runs per-conv kernels" in w and "batch statistics" in w for n, w in report.left)
    base.eval(), ours.eval()
    with torch.no_grad():
        want, got = base(x), ours(x)
    blk, plan = last_plan(ours.get_submodule("0"))
    assert blk.in_size == (5, 4) and any(s.kind == "aspp" for s in plan.steps), plan.describe()
    assert reference.rel_error(got, want) < 1e-4
    assert ours.get_submodule("0").__dict__["_tunerd_graphs"].keys() == {False}  # train mode: its own forward


# ---- compile-validity ------------------------------------------------------------------------------------
@pytest.mark.slow
def test_hornet_t_defaults_compile_for_sm90_without_spills():
    from tunerd.schedules.block_suites import block_suite

    items = []
    for dt in ("bfloat16", "float32"):
        for e in block_suite("hornet_t", 32, dt)[2:3]:  # stage 3: C=256 order 4, GEMMs 32->64 to 128->256
            plan = P.best(e.block)
            items += [(e.block, plan, i, None) for i, s in enumerate(plan.steps) if s.kind in P.FUSED]
    for (blk, plan, i, _), r in zip(items, fused.compile_check(items)):
        assert r["ok"], r["error"]
        assert r["spill_bytes"] == 0, (blk.describe(), plan.steps[i], r)
        if plan.steps[i].kind == "pw_gate":
            assert r["mma"] == ("fma" if blk.dtype == "float32" else "wgmma"), r


def test_interpolate_that_is_no_broadcast_is_refused():
    class Resize(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 1)

        def forward(self, x):
            return F.interpolate(self.conv(x), scale_factor=2.0, mode="bilinear")

    from tunerd.blocks import NotABlock

    m = Resize()
    with pytest.raises(NotABlock, match="interpolation other than of a 1 x 1 map"):
        from_graph(m, BlockTracer().trace(m), False)


# ---- GPU twins -----------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_gnconv_matches_float64_cuda(dtype):
    for blk in (
        B.gnconv(n=2, c=24, in_size=(5, 7), order=3, scale=1 / 3, dtype=dtype),
        B.gnconv(n=4, c=256, in_size=(14, 14), order=4, scale=1 / 3, dtype=dtype),  # HorNet-T stage 3
    ):
        check_plan(blk, P.best(blk), seed=1, device="cuda")
