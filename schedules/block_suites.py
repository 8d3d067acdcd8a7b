"""Block suites: the distinct fused-block shapes of real networks, for tuning, audits and the bytes table.

Each suite lists the blocks (kernels.block graphs) one forward pass of the network runs, once per
distinct shape, with how many times the network repeats it. The shapes follow the reference models at
224x224: ConvNeXt-T (timm convnext_tiny), EfficientNet-B0 (timm efficientnet_b0), MobileNetV2
(torchvision mobilenet_v2), InceptionNeXt-T (timm inception_next_tiny token mixers), the ASPP head of
DeepLabV3 (torchvision: rates 12/24/36 at output stride 8; the paper's 6/12/18 at output stride 16), HorNet-T
7x7's gnConv token mixers (official hornet_tiny_7x7: orders 2-5, s = 1/3) and ECA-ResNet-50-D's bottlenecks (timm
ecaresnet50d, its stride-2 blocks with ResNet-D's average-pool shortcut included).

    python -m tunerd.schedules.block_suites [--batch 32] [--dtype bfloat16]

prints, per block, the modelled HBM bytes of the planner's choice against the unfused plan.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass

from tunerd.kernels import block as _block
from tunerd.kernels import plan as _plan
from tunerd.kernels.block import Block


@dataclass(frozen=True)
class Entry:
    name: str  # e.g. "stage2.0"
    block: Block
    count: int  # how many blocks of the network have this shape


def _convnext_t(n: int, dtype: str) -> list[Entry]:
    stages = ((96, 56, 3), (192, 28, 3), (384, 14, 9), (768, 7, 3))
    return [
        Entry(f"stage{i}", _block.convnext(n=n, c=c, in_size=(s, s), dtype=dtype), d)
        for i, (c, s, d) in enumerate(stages, 1)
    ]


def _inceptionnext_t(n: int, dtype: str) -> list[Entry]:
    stages = ((96, 56, 3), (192, 28, 3), (384, 14, 9), (768, 7, 3))
    return [
        Entry(f"stage{i}.mixer", _block.inception_dw(n=n, c=c, in_size=(s, s), dtype=dtype), d)
        for i, (c, s, d) in enumerate(stages, 1)
    ]


def _mbconv_stages(
    n: int,
    dtype: str,
    stem: int,
    size: int,
    stages: tuple[tuple[int, int, int, int, int], ...],
    se_ratio: float | None,
    act: str,
) -> list[Entry]:
    """stages: (expansion, kernel, out channels, repeats, first stride), as the papers' tables."""
    out: list[Entry] = []
    c = stem
    for i, (t, k, co, reps, s) in enumerate(stages, 1):
        out.append(
            Entry(
                f"stage{i}.0",
                _block.mbconv(
                    n=n,
                    c=c,
                    k=co,
                    in_size=(size, size),
                    expansion=t,
                    kernel=k,
                    stride=s,
                    se_ratio=se_ratio,
                    act=act,
                    dtype=dtype,
                    attention="se" if se_ratio else None,
                ),
                1,
            )
        )
        size //= s
        if reps > 1:
            out.append(
                Entry(
                    f"stage{i}.1",
                    _block.mbconv(
                        n=n,
                        c=co,
                        k=co,
                        in_size=(size, size),
                        expansion=t,
                        kernel=k,
                        stride=1,
                        se_ratio=se_ratio,
                        act=act,
                        dtype=dtype,
                        attention="se" if se_ratio else None,
                    ),
                    reps - 1,
                )
            )
        c = co
    return out


def _efficientnet_b0(n: int, dtype: str) -> list[Entry]:
    stages = ((1, 3, 16, 1, 1), (6, 3, 24, 2, 2), (6, 5, 40, 2, 2), (6, 3, 80, 3, 2), (6, 5, 112, 3, 1),
              (6, 5, 192, 4, 2), (6, 3, 320, 1, 1))  # fmt: skip
    return _mbconv_stages(n, dtype, stem=32, size=112, stages=stages, se_ratio=0.25, act="silu")


def _mobilenetv2(n: int, dtype: str) -> list[Entry]:
    stages = ((1, 3, 16, 1, 1), (6, 3, 24, 2, 2), (6, 3, 32, 3, 2), (6, 3, 64, 4, 2), (6, 3, 96, 3, 1),
              (6, 3, 160, 3, 2), (6, 3, 320, 1, 1))  # fmt: skip
    return _mbconv_stages(n, dtype, stem=32, size=112, stages=stages, se_ratio=None, act="relu6")


def _deeplabv3_aspp(n: int, dtype: str) -> list[Entry]:
    return [
        Entry("os8", _block.aspp(n=n, c=2048, in_size=(28, 28), rates=(12, 24, 36), dtype=dtype), 1),
        Entry("os16", _block.aspp(n=n, c=2048, in_size=(14, 14), rates=(6, 12, 18), dtype=dtype), 1),
    ]


def _hornet_t(n: int, dtype: str) -> list[Entry]:
    stages = ((64, 56, 2, 2), (128, 28, 3, 3), (256, 14, 18, 4), (512, 7, 2, 5))  # (dim, size, depth, order)
    return [
        Entry(f"stage{i}.gnconv", _block.gnconv(n=n, c=c, in_size=(s, s), order=o, scale=1 / 3, dtype=dtype), d)
        for i, (c, s, d, o) in enumerate(stages, 1)
    ]


def _ecaresnet50d(n: int, dtype: str) -> list[Entry]:
    """Stages of (width, out channels, size, blocks) after the deep stem (64 channels at 56 x 56): the first block of
    each stage (stage 1: a 1x1 downsample shortcut; stages 2-4: stride 2, ResNet-D's AvgPool2d(2, 2, ceil_mode) ->
    1x1 -> BN shortcut) and its stride-1 blocks, ECA kernel adaptive to out channels."""
    stages = ((64, 256, 56, 3), (128, 512, 28, 4), (256, 1024, 14, 6), (512, 2048, 7, 3))
    out = [Entry("layer1.0", _block.bottleneck(n=n, c=64, k=256, width=64, in_size=(56, 56), dtype=dtype), 1)]
    for i, (w, k, s, d) in enumerate(stages, 1):
        if i > 1:
            down = _block.bottleneck(
                n=n, c=k // 2, k=k, width=w, in_size=(2 * s, 2 * s), stride=2, avg_down=True, dtype=dtype
            )
            out.append(Entry(f"layer{i}.0", down, 1))
        blk = _block.bottleneck(n=n, c=k, k=k, width=w, in_size=(s, s), dtype=dtype)
        out.append(Entry(f"layer{i}.1", blk, d - 1))
    return out


BLOCK_SUITES: dict[str, Callable[[int, str], list[Entry]]] = {
    "convnext_t": _convnext_t,
    "efficientnet_b0": _efficientnet_b0,
    "mobilenetv2": _mobilenetv2,
    "inceptionnext_t": _inceptionnext_t,
    "deeplabv3_aspp": _deeplabv3_aspp,
    "hornet_t": _hornet_t,
    "ecaresnet50d": _ecaresnet50d,
}


def block_suite(name: str, batch: int = 32, dtype: str = "bfloat16") -> list[Entry]:
    if name not in BLOCK_SUITES:
        raise KeyError(f"unknown block suite {name!r}; choose from {', '.join(BLOCK_SUITES)}")
    return BLOCK_SUITES[name](batch, dtype)


@dataclass(frozen=True)
class BytesRow:
    """The planner's plan for one block and its modelled HBM bytes and launches against the unfused plan."""

    suite: str
    block: str
    count: int
    shape: str
    plan: str
    bytes: int
    unfused_bytes: int
    launches: int
    unfused_launches: int

    @property
    def ratio(self) -> float:
        return self.bytes / self.unfused_bytes


def bytes_rows(name: str, batch: int = 32, dtype: str = "bfloat16") -> list[BytesRow]:
    rows = []
    for e in block_suite(name, batch, dtype):
        best = _plan.rank(e.block)[0]
        base = _plan.cost(e.block, _plan.unfused(e.block))
        rows.append(
            BytesRow(
                name,
                e.name,
                e.count,
                e.block.describe(),
                best.plan.describe(),
                best.bytes,
                base.bytes,
                best.launches,
                base.launches,
            )  # fmt: skip
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tunerd.schedules.block_suites", description=__doc__.split("\n\n")[0])
    p.add_argument("--suites", default=",".join(BLOCK_SUITES))
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--dtype", default="bfloat16")
    ns = p.parse_args(argv)
    print("| suite | block | x | plan | MB fused | MB unfused | ratio | launches |")
    print("|---|---|---|---|---|---|---|---|")
    for name in ns.suites.split(","):
        rows = bytes_rows(name, ns.batch, ns.dtype)
        for r in rows:
            print(
                f"| {name} | {r.block} | {r.count} | {r.plan} | {r.bytes / 1e6:.1f} | {r.unfused_bytes / 1e6:.1f} | "
                f"{r.ratio:.2f} | {r.launches} vs {r.unfused_launches} |"
            )
        fused, unfused = sum(r.bytes * r.count for r in rows), sum(r.unfused_bytes * r.count for r in rows)
        print(f"| {name} | whole network | | | {fused / 1e6:.1f} | {unfused / 1e6:.1f} | {fused / unfused:.2f} | |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
