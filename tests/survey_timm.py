"""How much of each timm architecture `tunerd.patch` swaps and fuses (no forward: tracing only, random weights).

    python tests/survey_timm.py [model ...]     # default: the list below

Per model: convs, BatchNorms, convs swapped, conv -> BN pairs fused, whole blocks fused, and the top reasons
for what was left.
"""

from __future__ import annotations

import collections
import sys
import time

import models_zoo  # noqa: F401  (declares torchvision's op schemas before timm imports it)
import timm
import torch

from tunerd.patching import patch

MODELS = (
    "resnet50 efficientnet_b0 tf_efficientnet_b0 mobilenetv3_large_100 regnety_016 cspresnet50 cspdarknet53 "
    "convnext_tiny dla34 hrnet_w18_small densenet121 res2net50_26w_4s repvgg_a0 ghostnet_100 mixnet_s rexnet_100 "
    "efficientvit_b0 fastvit_t8 inception_next_tiny mobileone_s0 resnest14d selecsls42b dpn68 vovnet39a "
    "ese_vovnet19b_dw gernet_s darknet53 cs3darknet_s edgenext_xx_small mobilevit_xxs poolformer_s12 "
    "convmixer_768_32 xception41 tresnet_m nfnet_l0 regnetz_b16 lcnet_050 tinynet_a hardcorenas_a fbnetc_100"
).split()


def survey(name: str) -> str:
    m = timm.create_model(name, pretrained=False)
    convs = sum(isinstance(x, torch.nn.modules.conv._ConvNd) for x in m.modules())
    bns = sum(isinstance(x, torch.nn.modules.batchnorm._BatchNorm) for x in m.modules())
    t = time.perf_counter()
    r = patch(m)
    why = collections.Counter(w.split(":")[0][:60] for _, w in r.left).most_common(2)
    return (
        f"{name:24s} convs {convs:4d}  bn {bns:4d}  swapped {len(r.swapped):4d}  fused {len(r.fused):4d}  "
        f"blocks {len(r.blocks):3d}  {time.perf_counter() - t:4.1f}s  {dict(why)}"
    )


if __name__ == "__main__":
    torch.set_num_threads(1)
    for name in sys.argv[1:] or MODELS:
        print(survey(name), flush=True)
