"""Block suites match the real networks' blocks, and the planner's modelled savings on them."""

import models_zoo  # noqa: F401  (declares torchvision's op schemas before timm imports it)
import pytest
import torch

from tunerd.schedules.block_suites import BLOCK_SUITES, block_suite, bytes_rows

timm = pytest.importorskip("timm")


def test_every_suite_builds_with_the_networks_block_counts():
    counts = {name: sum(e.count for e in block_suite(name, batch=2)) for name in BLOCK_SUITES}
    assert counts == {
        "convnext_t": 18,
        "efficientnet_b0": 16,
        "mobilenetv2": 17,
        "inceptionnext_t": 18,
        "deeplabv3_aspp": 2,
        "hornet_t": 25,
        "ecaresnet50d": 16,
    }
    with pytest.raises(KeyError, match="unknown block suite"):
        block_suite("resnet9000")


def _mbconv_shapes(model: torch.nn.Module, size: int) -> list[tuple]:
    """(c, k, stride, kernel, hidden, in size) of every MBConv-like block, from forward hooks."""
    found = []

    def hook(mod, args, _out):
        x = args[0]
        dw = next(m for m in mod.modules() if isinstance(m, torch.nn.Conv2d) and m.groups > 1)
        out_conv = [m for m in mod.modules() if isinstance(m, torch.nn.Conv2d) and m.groups == 1][-1]
        found.append((x.shape[1], out_conv.out_channels, dw.stride[0], dw.kernel_size[0], dw.in_channels, x.shape[2]))

    kinds = ("DepthwiseSeparableConv", "InvertedResidual")
    handles = [m.register_forward_hook(hook) for m in model.modules() if type(m).__name__ in kinds]
    with torch.no_grad():
        model.eval()(torch.zeros(1, 3, size, size))
    for h in handles:
        h.remove()
    return found


def _suite_shapes(name: str) -> list[tuple]:
    out = []
    for e in block_suite(name, batch=1):
        b = e.block
        dw = b.node("dw")
        proj = b.node("project")
        hidden = b.node("expand")["out"] if any(n.name == "expand" for n in b.nodes) else b.c
        out += [(b.c, proj["out"], dw["stride"], dw["kernel"], hidden, b.in_size[0])] * e.count
    return out


@pytest.mark.parametrize("name,timm_name", [("efficientnet_b0", "efficientnet_b0"), ("mobilenetv2", "mobilenetv2_100")])
def test_mbconv_suites_match_timm(name, timm_name):
    model = timm.create_model(timm_name, pretrained=False, num_classes=10)
    assert _mbconv_shapes(model, 224) == _suite_shapes(name)


def test_planner_halves_the_modelled_traffic_of_convnext_and_efficientnet():
    for name in ("convnext_t", "efficientnet_b0"):
        rows = bytes_rows(name, batch=32)
        fused = sum(r.bytes * r.count for r in rows)
        unfused = sum(r.unfused_bytes * r.count for r in rows)
        assert fused <= 0.5 * unfused, (name, fused / unfused)
        assert all(r.bytes <= r.unfused_bytes and r.launches <= r.unfused_launches for r in rows)
    stage1 = bytes_rows("convnext_t", batch=32)[0]
    assert stage1.launches == 1 and stage1.ratio < 0.1  # the whole block in one launch at 96 channels
