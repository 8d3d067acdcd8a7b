"""Shape suites: layer counts, cross-checked against independent nn.Module builds traced by model_specs
(on the meta device), and a compile-validity sample of each suite's default variants."""

import pytest
import torch
from torch import nn

from tunerd.kernels import generator
from tunerd.kernels.spec import BlockSpec, Epilogue, SpecError
from tunerd.kernels.validate import compile_check
from tunerd.schedules import cost, space
from tunerd.schedules.device import DeviceLimits
from tunerd.schedules.suites import SUITES, layers, model_specs, suite

UNIQUE = {
    "resnet50": 23,
    "resnext50_32x4d": 24,
    "mobilenetv2": 30,
    "convnext_t": 16,
    "replknet31b": 26,
    "inceptionnext_t": 24,
    "repvgg_a0": 16,
    "mamba_short_conv": 20,
    "video_2plus1d": 25,
    "quick": 6,
}
LAYERS = {"resnet50": 53, "resnext50_32x4d": 53, "mobilenetv2": 52, "convnext_t": 58, "repvgg_a0": 44}


# ---- independent reference builds (torchvision's layouts), traced with model_specs ------------
class Bottleneck(nn.Module):
    def __init__(self, cin, planes, stride, groups, base_width):
        super().__init__()
        width = int(planes * base_width / 64) * groups
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, groups=groups, bias=False)
        self.conv3 = nn.Conv2d(width, planes * 4, 1, bias=False)
        self.down = nn.Conv2d(cin, planes * 4, 1, stride, bias=False) if stride != 1 or cin != planes * 4 else None

    def forward(self, x):
        y = self.conv3(self.conv2(self.conv1(x)))
        return y + (self.down(x) if self.down is not None else x)


def resnet(groups=1, base_width=64):
    mods, cin = [nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.MaxPool2d(3, 2, 1)], 64
    for planes, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
        for i in range(blocks):
            mods.append(Bottleneck(cin, planes, stride if i == 0 else 1, groups, base_width))
            cin = planes * 4
    return nn.Sequential(*mods)


class InvertedResidual(nn.Module):
    def __init__(self, cin, out, stride, t):
        super().__init__()
        hidden = cin * t
        convs = [nn.Conv2d(cin, hidden, 1)] if t != 1 else []
        convs += [nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden), nn.Conv2d(hidden, out, 1)]
        self.body = nn.Sequential(*convs)
        self.skip = stride == 1 and cin == out

    def forward(self, x):
        return x + self.body(x) if self.skip else self.body(x)


def mobilenet_v2():
    mods, cin = [nn.Conv2d(3, 32, 3, 2, 1)], 32
    for t, c, n, s in (
        (1, 16, 1, 1),
        (6, 24, 2, 2),
        (6, 32, 3, 2),
        (6, 64, 4, 2),
        (6, 96, 3, 1),
        (6, 160, 3, 2),
        (6, 320, 1, 1),
    ):
        for i in range(n):
            mods.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
            cin = c
    return nn.Sequential(*mods, nn.Conv2d(cin, 1280, 1))


def conv2plus1d(cin, out, mid, stride=1):
    return nn.Sequential(
        nn.Conv3d(cin, mid, (1, 3, 3), (1, stride, stride), (0, 1, 1), bias=False),
        nn.Conv3d(mid, out, (3, 1, 1), (stride, 1, 1), (1, 0, 0), bias=False),
    )


class BasicBlock3d(nn.Module):
    def __init__(self, cin, planes, stride):
        super().__init__()
        mid = (cin * planes * 27) // (cin * 9 + 3 * planes)
        self.c1, self.c2 = conv2plus1d(cin, planes, mid, stride), conv2plus1d(planes, planes, mid)
        self.down = nn.Conv3d(cin, planes, 1, stride, bias=False) if stride != 1 or cin != planes else None

    def forward(self, x):
        return self.c2(self.c1(x)) + (self.down(x) if self.down is not None else x)


def r2plus1d_18():
    mods, cin = (
        [
            nn.Conv3d(3, 45, (1, 7, 7), (1, 2, 2), (0, 3, 3), bias=False),
            nn.Conv3d(45, 64, (3, 1, 1), 1, (1, 0, 0), bias=False),
        ],
        64,
    )
    for planes, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        mods += [BasicBlock3d(cin, planes, stride), BasicBlock3d(planes, planes, 1)]
        cin = planes
    return nn.Sequential(*mods)


def traced(build, shape, dtype=torch.bfloat16):
    with torch.device("meta"):
        model = build().to(dtype)
        x = torch.empty(shape, dtype=dtype)
    return model_specs(model, x)


@pytest.mark.parametrize(
    "name,build,shape",
    [
        ("resnet50", resnet, (32, 3, 224, 224)),
        ("resnext50_32x4d", lambda: resnet(groups=32, base_width=4), (32, 3, 224, 224)),
        ("mobilenetv2", mobilenet_v2, (32, 3, 224, 224)),
        ("video_2plus1d", r2plus1d_18, (8, 3, 16, 112, 112)),
    ],
)
def test_suites_match_traced_reference_models(name, build, shape):
    assert suite(name) == traced(build, shape)


def test_repvgg_suite_is_timms_repvgg_a0():
    """The suite is what timm's own training-form repvgg_a0 runs (its 3x3 and 1x1 branch convs)."""
    import models_zoo  # noqa: F401  (timm after tunerd, with torchvision's ops declared)
    import timm

    assert suite("repvgg_a0") == traced(lambda: timm.create_model("repvgg_a0"), (32, 3, 224, 224))


@pytest.mark.parametrize("name", sorted(SUITES))
def test_suite_counts_and_validity(name):
    specs = suite(name)
    assert len(specs) == UNIQUE[name] == len(set(specs))
    default = SUITES[name]
    for s in specs:
        assert isinstance(s, BlockSpec) and s.op == "fwd" and s.epilogue == Epilogue()
        assert s.dtype == default.dtype and s.n == default.batch
        assert BlockSpec.from_json(s.to_json()) == s
    if name in LAYERS:
        assert len(list(layers(name))) == LAYERS[name]


def test_suite_parameters():
    small = suite("resnet50", batch=8, dtype="float16")
    assert all(s.n == 8 and s.dtype == "float16" for s in small) and len(small) == 23
    fused = suite("resnet50", fused=True)
    assert len(fused) == 24  # the stage-1 projection shortcut differs from conv3 only by its epilogue
    assert Epilogue(affine=True, residual="pre", activation="relu") in {s.epilogue for s in fused}
    assert {s.kind for s in suite("convnext_t")} == {"conv", "depthwise"}
    dw = [s for s in suite("replknet31b") if s.kind == "depthwise"]
    assert {s.kernel for s in dw} >= {(31, 31), (29, 29), (27, 27), (13, 13)}
    assert all(s.padding == ((3, 0),) and s.kernel == (4,) for s in suite("mamba_short_conv"))
    bands = {s.kernel for s in suite("inceptionnext_t") if s.kind == "depthwise"}
    assert bands == {(3, 3), (1, 11), (11, 1)}
    with pytest.raises(SpecError, match="unknown suite 'resnet18'; available: .*resnet50"):
        suite("resnet18")
    with pytest.raises(SpecError, match="batch"):
        suite("quick", batch=0)


def test_model_specs_handles_dims_dtypes_and_bad_layers():
    model = nn.Sequential(
        nn.Conv1d(8, 8, 3, padding=1),
        nn.Conv1d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv1d(8, 16, 4, stride=2, padding="valid"),
    )
    specs = model_specs(model, torch.randn(2, 8, 20))
    assert len(specs) == 2 and specs[0].ndim == 1 and specs[0].dtype == "float32" and specs[1].out_size == (9,)
    bad = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"), nn.Conv2d(4, 4, 1))
    with pytest.raises(SpecError, match="layer 0: padding_mode='reflect'"):
        model_specs(bad, torch.randn(1, 4, 6, 6))
    assert len(model_specs(bad, torch.randn(1, 4, 6, 6), strict=False)) == 1
    with pytest.raises(SpecError, match="float64"):
        model_specs(nn.Conv2d(2, 2, 1).double(), torch.randn(1, 2, 3, 3, dtype=torch.float64))


@pytest.mark.slow
def test_suite_default_variants_and_space_extremes_compile_for_sm90():
    picked = []
    for i, name in enumerate(sorted(SUITES)):  # one default variant per suite, with its fused epilogue
        specs = suite(name, fused=True)
        picked.append(generator.render(specs[(3 * i) % len(specs)]))
    # the space's largest shared-memory candidates: the real compiler agrees with the estimate
    h100 = DeviceLimits.h100()
    extremes = []
    for spec in (suite("resnet50", dtype="float32")[2], suite("resnet50")[2]):
        s = max(space.space(spec, h100, max_candidates=None), key=lambda s: cost.smem_bytes(spec, s))
        extremes.append((spec, s))
        picked.append(generator.render(spec, s))
    results = compile_check(picked, arch=90)
    bad = [(v.spec.describe(), v.schedule.describe(), r["error"]) for v, r in zip(picked, results) if not r["ok"]]
    assert not bad, bad
    for (spec, s), r in zip(extremes, results[-len(extremes) :]):
        assert r["shared"] <= cost.smem_bytes(spec, s) <= h100.smem_per_block
