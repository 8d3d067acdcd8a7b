"""kernels.conv.pack_weight caches packed weights per weight tensor, layout, memory and version."""

import gc

import torch

import tunerd
from tunerd.kernels import conv
from tunerd.kernels.spec import conv_spec


def _specs(c: int = 8, k: int = 16):
    dense = conv_spec(n=1, c=c, k=k, in_size=(5, 5), kernel=3, padding=1)
    dw = conv_spec(n=1, c=k, k=k, in_size=(5, 5), kernel=3, padding=1, groups=k)
    return dense, dw


def _packed_ref(spec, w):
    if spec.kind == "depthwise":
        return w.reshape(spec.k, spec.taps).t()
    return w.permute(0, 2, 3, 1)


def test_eval_packs_each_weight_once():
    dense, _ = _specs()
    w = torch.nn.Parameter(torch.randn(16, 8, 3, 3))
    a = conv.pack_weight(dense, w)
    assert torch.equal(a, _packed_ref(dense, w)) and a.is_contiguous()
    assert conv.pack_weight(dense, w) is a


def test_in_place_updates_and_data_swaps_repack():
    dense, _ = _specs()
    w = torch.nn.Parameter(torch.randn(16, 8, 3, 3))
    a = conv.pack_weight(dense, w)
    with torch.no_grad():
        w.add_(1.0)  # an optimizer step: same memory, new version
    b = conv.pack_weight(dense, w)
    assert b is not a and torch.equal(b, _packed_ref(dense, w))
    w.data = torch.randn(16, 8, 3, 3)  # new memory
    c = conv.pack_weight(dense, w)
    assert c is not b and torch.equal(c, _packed_ref(dense, w))
    torch.nn.Module.load_state_dict(torch.nn.ParameterDict({"w": w}), {"w": torch.zeros(16, 8, 3, 3)})
    assert torch.equal(conv.pack_weight(dense, w), torch.zeros(16, 3, 3, 8))


def test_layouts_are_cached_apart_and_entries_die_with_their_weight():
    _, dw = _specs()
    w = torch.randn(16, 1, 3, 3)
    p = conv.pack_weight(dw, w)
    assert torch.equal(p, _packed_ref(dw, w))
    wt = w.transpose(2, 3)  # another tensor object and stride: its own entry
    assert torch.equal(conv.pack_weight(dw, wt), _packed_ref(dw, wt))
    n = len(conv._packed)
    del w, wt, p
    gc.collect()
    assert len(conv._packed) <= n - 2


def _reference(m: torch.nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    a, b = m[0], m[2]
    h = torch.relu(torch.nn.functional.conv2d(x.double(), a.weight.double(), a.bias.double(), padding=1))
    return torch.nn.functional.conv2d(h, b.weight.double(), b.bias.double())


def test_a_patched_model_in_eval_follows_in_place_weight_updates():
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(16, 8, 1)).eval()
    report = tunerd.patch(m)
    assert report.swapped
    x = torch.randn(2, 3, 9, 9)
    with torch.no_grad():
        for _ in range(2):  # the second call hits the cache
            assert torch.allclose(m(x).double(), _reference(m, x), atol=1e-4)
        m[0].weight.mul_(-1.0)
        m[2].weight.data = torch.randn_like(m[2].weight)
        assert torch.allclose(m(x).double(), _reference(m, x), atol=1e-4)


def test_fused_blocks_pointwise_operands_are_cached_and_follow_updates():
    from tunerd.kernels import fused

    w = torch.nn.Parameter(torch.randn(24, 16, 1, 1))
    b = fused._gemm_weight(w)
    assert torch.equal(b, w.detach().reshape(24, 16).t()) and b.is_contiguous()
    assert fused._gemm_weight(w) is b
    assert conv.pack_weight(conv_spec(n=1, c=16, k=24, in_size=(3, 3), kernel=1), w) is not b  # another form
    with torch.no_grad():
        w.mul_(2)
    again = fused._gemm_weight(w)
    assert again is not b and torch.equal(again, w.detach().reshape(24, 16).t())
